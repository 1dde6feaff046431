//! The value of one queue record: a header and the batches gathered in one group commit.
//!
//! ```text
//! u32 BE  point count     (so dropping a record can count its points without decoding)
//! i64 BE  enqueued at     (ns since the Unix epoch; the queue's oldest-point age)
//! bytes   QueueRecord     (protobuf: repeated tagstream.v1.PointBatch)
//! ```
//! The batches are stored without namespace, site, epoch, sequence and part: the
//! publisher appends those fields to each batch's stored encoding when it sends it
//! (protobuf takes fields in any order), so a record is never decoded into points and
//! encoded again on its way out. The body also carries the totals (points
//! and value bytes) of every record appended before this one, so that opening a queue
//! counts it from its first and last records instead of reading them all (see
//! `summary.rs`); records written before those fields existed decode with `before: None`.

use bytes::{Buf as _, Bytes};
use prost::{
    Message,
    encoding::{WireType, decode_key, decode_varint},
};
use tagstream_proto::{
    fields::{point, point_batch},
    v1::PointBatch,
};

const HEADER: usize = 12;

/// Field numbers of the record body (`QueueRecord`): the batches, then the totals before.
const BATCHES: u32 = 1;
const POINTS_BEFORE: u32 = 2;
const BYTES_BEFORE: u32 = 3;

/// Points and value bytes of a run of records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub points: u64,
    pub bytes: u64,
}

impl Totals {
    /// These totals followed by one record of `points` points and `bytes` bytes.
    #[must_use]
    pub const fn then(self, points: u64, bytes: u64) -> Self {
        Self {
            points: self.points + points,
            bytes: self.bytes + bytes,
        }
    }
}

/// A decoded record: its batches still encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub points: u32,
    pub enqueued_ns: i64,
    pub batches: Vec<StoredBatch>,
    /// The totals of every record appended before this one.
    pub before: Option<Totals>,
}

/// One batch of a record, as stored: what its subject needs, and its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBatch {
    pub source: String,
    /// `tagstream.v1.SourceKind`.
    pub source_kind: i32,
    pub points: u32,
    /// The `PointBatch` encoding, without namespace, site, epoch, sequence and part.
    pub encoded: Bytes,
}

impl StoredBatch {
    /// The whole batch (for tools and tests; the publisher sends `encoded`).
    pub fn decode(&self) -> PointBatch {
        PointBatch::decode(self.encoded.clone()).expect("checked when the record was read")
    }
}

/// A protobuf field as the queue reads it.
enum Field {
    Varint(u64),
    Bytes(Bytes),
    /// A fixed-width (32- or 64-bit) value.
    Fixed,
}

/// The top-level fields of the message in `buf`, in order.
fn fields(mut buf: Bytes) -> impl Iterator<Item = Result<(u32, Field), CorruptRecord>> {
    let corrupt = |e: prost::DecodeError| CorruptRecord(e.to_string());
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let mut next = || -> Result<(u32, Field), CorruptRecord> {
            let (tag, wire_type) = decode_key(&mut buf).map_err(corrupt)?;
            let field = match wire_type {
                WireType::Varint => Field::Varint(decode_varint(&mut buf).map_err(corrupt)?),
                WireType::LengthDelimited => {
                    let len = usize::try_from(decode_varint(&mut buf).map_err(corrupt)?).unwrap_or(usize::MAX);
                    if len > buf.len() {
                        return Err(CorruptRecord(format!("a field of {len} bytes in {} left", buf.len())));
                    }
                    Field::Bytes(buf.split_to(len))
                }
                WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                    let len = if wire_type == WireType::SixtyFourBit { 8 } else { 4 };
                    if len > buf.len() {
                        return Err(CorruptRecord("a fixed-width field past the end".into()));
                    }
                    buf.advance(len);
                    Field::Fixed
                }
                WireType::StartGroup | WireType::EndGroup => {
                    return Err(CorruptRecord(format!(
                        "field {tag} is a group, which tagstream never writes"
                    )));
                }
            };
            Ok((tag, field))
        };
        let field = next();
        if field.is_err() {
            buf.clear();
        }
        Some(field)
    })
}

/// Whether a field of `tag` has the wire shape the schema gives it (`Some`), or is unknown.
fn shape_fits(expected: &[(u32, u8)], tag: u32, field: &Field) -> Option<bool> {
    let shape = match field {
        Field::Varint(_) => 0,
        Field::Fixed => 1,
        Field::Bytes(_) => 2,
    };
    expected.iter().find(|(t, _)| *t == tag).map(|(_, s)| *s == shape)
}

/// `PointBatch` and `Point` fields: (number, 0 varint / 1 fixed / 2 length-delimited).
const BATCH_SHAPES: [(u32, u8); 9] = [
    (point_batch::NAMESPACE, 2),
    (point_batch::SITE, 2),
    (point_batch::SOURCE, 2),
    (point_batch::SOURCE_KIND, 0),
    (point_batch::EPOCH, 1),
    (point_batch::SEQUENCE, 0),
    (point_batch::PART, 0),
    (point_batch::POINTS, 2),
    (point_batch::WRITE, 2),
];
const POINT_SHAPES: [(u32, u8); 10] = [
    (point::TAG, 2),
    (point::TIMESTAMP_NS, 0),
    (point::BOOL_VALUE, 0),
    (point::INT_VALUE, 0),
    (point::UINT_VALUE, 0),
    (point::DOUBLE_VALUE, 1),
    (point::STRING_VALUE, 2),
    (point::QUALITY, 0),
    (point::QUALITY_REASON, 2),
    (point::UNIT, 2),
];
/// `Point` fields holding text.
const POINT_TEXT: [u32; 4] = [point::TAG, point::STRING_VALUE, point::QUALITY_REASON, point::UNIT];

fn text(bytes: &[u8], what: &str) -> Result<String, CorruptRecord> {
    String::from_utf8(bytes.to_vec()).map_err(|e| CorruptRecord(format!("{what}: {e}")))
}

/// Checks a point as prost would decode it, without building it: every known field of its
/// wire shape, text in UTF-8.
fn check_point(encoded: Bytes) -> Result<(), CorruptRecord> {
    for field in fields(encoded) {
        let (tag, field) = field?;
        if shape_fits(&POINT_SHAPES, tag, &field) == Some(false) {
            return Err(CorruptRecord(format!("point field {tag} has the wrong wire type")));
        }
        if let Field::Bytes(bytes) = field
            && POINT_TEXT.contains(&tag)
        {
            std::str::from_utf8(&bytes).map_err(|e| CorruptRecord(format!("point field {tag}: {e}")))?;
        }
    }
    Ok(())
}

/// Reads what the queue needs of one stored batch and checks the rest, leaving the points
/// encoded: a record that reads here is one a consumer can decode.
fn stored_batch(encoded: Bytes) -> Result<StoredBatch, CorruptRecord> {
    let mut batch = StoredBatch {
        source: String::new(),
        source_kind: 0,
        points: 0,
        encoded: encoded.clone(),
    };
    for field in fields(encoded) {
        let (tag, field) = field?;
        if shape_fits(&BATCH_SHAPES, tag, &field) == Some(false) {
            return Err(CorruptRecord(format!("batch field {tag} has the wrong wire type")));
        }
        match (tag, field) {
            (point_batch::SOURCE, Field::Bytes(bytes)) => batch.source = text(&bytes, "source")?,
            (point_batch::SOURCE_KIND, Field::Varint(kind)) => batch.source_kind = kind as i32,
            (point_batch::POINTS, Field::Bytes(encoded_point)) => {
                check_point(encoded_point)?;
                batch.points += 1;
            }
            (point_batch::NAMESPACE | point_batch::SITE, Field::Bytes(bytes)) => {
                text(&bytes, "namespace or site")?;
            }
            (point_batch::WRITE, Field::Bytes(audit)) => {
                tagstream_proto::v1::WriteAudit::decode(audit)
                    .map_err(|e| CorruptRecord(format!("write audit: {e}")))?;
            }
            _ => {}
        }
    }
    Ok(batch)
}

impl From<&PointBatch> for StoredBatch {
    fn from(batch: &PointBatch) -> Self {
        Self {
            source: batch.source.clone(),
            source_kind: batch.source_kind,
            points: u32::try_from(batch.points.len()).unwrap_or(u32::MAX),
            encoded: batch.encode_to_vec().into(),
        }
    }
}

impl From<PointBatch> for StoredBatch {
    fn from(batch: PointBatch) -> Self {
        Self::from(&batch)
    }
}

/// Encodes batches into one record value, after records totalling `before`. The batches
/// are written where they are (as `QueueRecord` fields 1, 2 and 3), not moved into a
/// message: a write that fails is made again from the same batches.
pub fn encode(batches: &[StoredBatch], enqueued_ns: i64, before: Totals) -> Vec<u8> {
    use prost::encoding::{bytes, uint64};
    let points: u64 = batches.iter().map(|b| u64::from(b.points)).sum();
    let mut value = Vec::with_capacity(encoded_len(batches, before));
    value.extend_from_slice(&u32::try_from(points).unwrap_or(u32::MAX).to_be_bytes());
    value.extend_from_slice(&enqueued_ns.to_be_bytes());
    for batch in batches {
        bytes::encode(BATCHES, &batch.encoded, &mut value);
    }
    uint64::encode(POINTS_BEFORE, &before.points, &mut value);
    uint64::encode(BYTES_BEFORE, &before.bytes, &mut value);
    value
}

/// The length of the value [`encode`] makes, without making it.
pub fn encoded_len(batches: &[StoredBatch], before: Totals) -> usize {
    use prost::encoding::{encoded_len_varint, key_len, uint64};
    HEADER
        + batches
            .iter()
            .map(|b| key_len(BATCHES) + encoded_len_varint(b.encoded.len() as u64) + b.encoded.len())
            .sum::<usize>()
        + uint64::encoded_len(POINTS_BEFORE, &before.points)
        + uint64::encoded_len(BYTES_BEFORE, &before.bytes)
}

/// Why a stored value is not a record.
#[derive(Debug, thiserror::Error)]
#[error("corrupt queue record: {0}")]
pub struct CorruptRecord(String);

/// The header alone: (point count, enqueued at).
pub fn header(value: &[u8]) -> Result<(u32, i64), CorruptRecord> {
    let head: &[u8; HEADER] = value
        .get(..HEADER)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| CorruptRecord(format!("{} bytes, shorter than its header", value.len())))?;
    let points = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
    let enqueued = i64::from_be_bytes(head[4..].try_into().expect("8 bytes"));
    Ok((points, enqueued))
}

pub fn decode(value: &[u8]) -> Result<Record, CorruptRecord> {
    let (points, enqueued_ns) = header(value)?;
    let mut batches = Vec::new();
    let (mut points_before, mut bytes_before) = (None, None);
    for field in fields(Bytes::copy_from_slice(&value[HEADER..])) {
        match field? {
            (BATCHES, Field::Bytes(encoded)) => batches.push(stored_batch(encoded)?),
            (POINTS_BEFORE, Field::Varint(n)) => points_before = Some(n),
            (BYTES_BEFORE, Field::Varint(n)) => bytes_before = Some(n),
            _ => {}
        }
    }
    // A value cut at a field boundary still parses, with batches missing: the header's
    // count is what tells (found by tests/hostile_input.rs).
    let held: u64 = batches.iter().map(|b| u64::from(b.points)).sum();
    if held != u64::from(points) {
        return Err(CorruptRecord(format!(
            "the header counts {points} points, the body holds {held}"
        )));
    }
    let before = points_before
        .zip(bytes_before)
        .map(|(points, bytes)| Totals { points, bytes });
    Ok(Record {
        points,
        enqueued_ns,
        batches,
        before,
    })
}

/// At most the bytes a batch adds to the queue: its encoding, its field tag and length, and
/// a record header in case it ends up alone in a record.
pub fn batch_size(batch: &StoredBatch) -> usize {
    batch.encoded.len() + 6 + HEADER
}
