//! The messages tagstream publishes to NATS JetStream; see `tagstream/v1/points.proto` for
//! the subject scheme, the message id and the ordering guarantees.

#[allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tagstream.v1.rs"));
}

/// Field numbers of the messages the ingestor writes and reads without building them
/// (it encodes points straight from borrowed names, appends the envelope to stored
/// batches and scans queue records): one definition, checked against prost's encoding.
pub mod fields {
    /// `PointBatch`.
    pub mod point_batch {
        pub const NAMESPACE: u32 = 1;
        pub const SITE: u32 = 2;
        pub const SOURCE: u32 = 3;
        pub const SOURCE_KIND: u32 = 4;
        pub const EPOCH: u32 = 5;
        pub const SEQUENCE: u32 = 6;
        pub const PART: u32 = 7;
        pub const POINTS: u32 = 8;
        pub const WRITE: u32 = 9;
    }

    /// `Point`.
    pub mod point {
        pub const TAG: u32 = 1;
        pub const TIMESTAMP_NS: u32 = 2;
        pub const BOOL_VALUE: u32 = 3;
        pub const INT_VALUE: u32 = 4;
        pub const UINT_VALUE: u32 = 5;
        pub const DOUBLE_VALUE: u32 = 6;
        pub const STRING_VALUE: u32 = 7;
        pub const QUALITY: u32 = 8;
        pub const QUALITY_REASON: u32 = 9;
        pub const UNIT: u32 = 10;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{Point, PointBatch, Quality, SourceKind, point::Value};

    #[test]
    fn a_batch_round_trips_through_the_wire_format() {
        let batch = PointBatch {
            namespace: "default".into(),
            site: "plant-a".into(),
            source: "boiler".into(),
            source_kind: SourceKind::Device.into(),
            epoch: 0xdead_beef_0bad_cafe,
            sequence: 42,
            part: 1,
            points: vec![
                Point {
                    tag: "temperature_in".into(),
                    timestamp_ns: 1_790_000_000_000_000_000,
                    value: Some(Value::DoubleValue(61.5)),
                    quality: Quality::Good.into(),
                    quality_reason: String::new(),
                    unit: "degC".into(),
                },
                Point {
                    tag: "pressure".into(),
                    timestamp_ns: 1_790_000_000_000_000_000,
                    value: None,
                    quality: Quality::Bad.into(),
                    quality_reason: "timeout".into(),
                    unit: "bar".into(),
                },
            ],
            write: None,
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(PointBatch::decode(bytes.as_slice()).unwrap(), batch);
    }

    /// The field number prost writes first for `message`.
    fn first_field(message: &impl Message) -> u32 {
        let bytes = message.encode_to_vec();
        prost::encoding::decode_key(&mut bytes.as_slice()).unwrap().0
    }

    #[test]
    fn the_field_numbers_are_the_ones_prost_writes() {
        use super::{
            fields::{point, point_batch},
            v1::WriteAudit,
        };
        let batch = |f: fn(&mut PointBatch)| {
            let mut b = PointBatch::default();
            f(&mut b);
            first_field(&b)
        };
        assert_eq!(batch(|b| b.namespace = "n".into()), point_batch::NAMESPACE);
        assert_eq!(batch(|b| b.site = "s".into()), point_batch::SITE);
        assert_eq!(batch(|b| b.source = "d".into()), point_batch::SOURCE);
        assert_eq!(batch(|b| b.source_kind = 1), point_batch::SOURCE_KIND);
        assert_eq!(batch(|b| b.epoch = 1), point_batch::EPOCH);
        assert_eq!(batch(|b| b.sequence = 1), point_batch::SEQUENCE);
        assert_eq!(batch(|b| b.part = 1), point_batch::PART);
        assert_eq!(batch(|b| b.points.push(Point::default())), point_batch::POINTS);
        assert_eq!(batch(|b| b.write = Some(WriteAudit::default())), point_batch::WRITE);
        let one = |f: fn(&mut Point)| {
            let mut p = Point::default();
            f(&mut p);
            first_field(&p)
        };
        assert_eq!(one(|p| p.tag = "t".into()), point::TAG);
        assert_eq!(one(|p| p.timestamp_ns = 1), point::TIMESTAMP_NS);
        assert_eq!(one(|p| p.value = Some(Value::BoolValue(true))), point::BOOL_VALUE);
        assert_eq!(one(|p| p.value = Some(Value::IntValue(1))), point::INT_VALUE);
        assert_eq!(one(|p| p.value = Some(Value::UintValue(1))), point::UINT_VALUE);
        assert_eq!(one(|p| p.value = Some(Value::DoubleValue(1.0))), point::DOUBLE_VALUE);
        assert_eq!(
            one(|p| p.value = Some(Value::StringValue("v".into()))),
            point::STRING_VALUE
        );
        assert_eq!(one(|p| p.quality = 1), point::QUALITY);
        assert_eq!(one(|p| p.quality_reason = "r".into()), point::QUALITY_REASON);
        assert_eq!(one(|p| p.unit = "u".into()), point::UNIT);
    }
}
