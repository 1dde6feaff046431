//! Points encoded straight into a `PointBatch`'s wire form, from borrowed tag names and
//! units: the polling path builds no `Point` (with its owned name, unit and reason
//! strings) and no `PointBatch` to encode afterwards. Its output decodes, with prost, to
//! the batch [`super::pipeline::wire_point`] builds (tested below).

use prost::encoding::{WireType, encode_key, encode_varint};
use tagstream_proto::{
    fields::{point, point_batch},
    v1::{Quality, SourceKind},
};

use tagstream_core::point::{PointValue, QualityLevel, Sample};

use crate::queue::StoredBatch;

fn text(number: u32, value: &str, buf: &mut Vec<u8>) {
    encode_key(number, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value.as_bytes());
}

fn varint(number: u32, value: u64, buf: &mut Vec<u8>) {
    encode_key(number, WireType::Varint, buf);
    encode_varint(value, buf);
}

/// One batch being encoded.
#[derive(Debug)]
pub struct BatchEncoder {
    source: String,
    kind: SourceKind,
    bytes: Vec<u8>,
    /// The point being encoded (its length precedes it in `bytes`).
    point: Vec<u8>,
    points: u32,
}

impl BatchEncoder {
    pub fn new(source: &str, kind: SourceKind, points: usize) -> Self {
        let mut bytes = Vec::with_capacity(source.len() + 4 + points * 40);
        text(point_batch::SOURCE, source, &mut bytes);
        varint(point_batch::SOURCE_KIND, kind as u64, &mut bytes);
        Self {
            source: source.to_owned(),
            kind,
            bytes,
            point: Vec::with_capacity(64),
            points: 0,
        }
    }

    /// Adds a point of `tag`.
    pub fn push(&mut self, tag: &str, sample: &Sample, unit: Option<&str>) {
        let buf = &mut self.point;
        buf.clear();
        text(point::TAG, tag, buf);
        varint(point::TIMESTAMP_NS, sample.timestamp_ns as u64, buf);
        match &sample.value {
            None => {}
            Some(PointValue::Bool(b)) => varint(point::BOOL_VALUE, u64::from(*b), buf),
            Some(PointValue::Int(i)) => varint(point::INT_VALUE, *i as u64, buf),
            Some(PointValue::UInt(u)) => varint(point::UINT_VALUE, *u, buf),
            Some(PointValue::Double(d)) => {
                encode_key(point::DOUBLE_VALUE, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&d.to_le_bytes());
            }
            Some(PointValue::String(s)) => text(point::STRING_VALUE, s, buf),
        }
        let quality = match sample.quality.level {
            QualityLevel::Good => Quality::Good,
            QualityLevel::Uncertain => Quality::Uncertain,
            QualityLevel::Bad => Quality::Bad,
        };
        varint(point::QUALITY, quality as u64, buf);
        if let Some(reason) = sample.quality.reason.as_deref().filter(|r| !r.is_empty()) {
            text(point::QUALITY_REASON, reason, buf);
        }
        if let Some(unit) = unit.filter(|u| !u.is_empty()) {
            text(point::UNIT, unit, buf);
        }
        encode_key(point_batch::POINTS, WireType::LengthDelimited, &mut self.bytes);
        encode_varint(buf.len() as u64, &mut self.bytes);
        self.bytes.extend_from_slice(buf);
        self.points += 1;
    }

    pub fn finish(self) -> StoredBatch {
        StoredBatch {
            source: self.source,
            source_kind: self.kind.into(),
            points: self.points,
            encoded: self.bytes.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use tagstream_core::point::{PointValue, Quality as SampleQuality, Sample};
    use tagstream_proto::v1::{PointBatch, SourceKind};

    use super::BatchEncoder;
    use crate::service::pipeline::wire_point;

    #[test]
    fn the_encoding_decodes_to_the_batch_prost_would_build() {
        let samples = [
            Sample::good(PointValue::Double(61.5), 1_790_000_000_000_000_000),
            Sample::good(PointValue::Double(-0.0), 1),
            Sample::good(PointValue::Int(-1_030_000_123), 2),
            Sample::good(PointValue::Int(i64::MIN), -5),
            Sample::good(PointValue::UInt(u64::MAX), 3),
            Sample::good(PointValue::Bool(false), 4),
            Sample::good(PointValue::String("PLA-7 é".into()), 5),
            Sample::good(PointValue::String(String::new()), 5),
            Sample::bad("exception 2: Illegal data address", 6),
            Sample {
                value: Some(PointValue::Double(1.0)),
                timestamp_ns: 7,
                quality: SampleQuality::uncertain("input boiler/flow is stale"),
            },
        ];
        for (kind, units) in [(SourceKind::Device, Some("degC")), (SourceKind::Formula, None)] {
            let mut encoder = BatchEncoder::new("boiler", kind, samples.len());
            let mut expected = PointBatch {
                source: "boiler".into(),
                source_kind: kind.into(),
                ..PointBatch::default()
            };
            for (i, sample) in samples.iter().enumerate() {
                let tag = format!("t{i}");
                encoder.push(&tag, sample, units);
                expected.points.push(wire_point(&tag, sample, units));
            }
            let batch = encoder.finish();
            assert_eq!(batch.points as usize, samples.len());
            assert_eq!(PointBatch::decode(batch.encoded.clone()).unwrap(), expected);
        }
    }
}
