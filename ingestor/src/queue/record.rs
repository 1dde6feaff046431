//! The value of one queue record: a header and the batches gathered in one group commit.
//!
//! ```text
//! u32 BE  point count     (so dropping a record can count its points without decoding)
//! i64 BE  enqueued at     (ns since the Unix epoch; the queue's oldest-point age)
//! bytes   QueueRecord     (protobuf: repeated tagstream.v1.PointBatch)
//! ```
//! The batches are stored without epoch, sequence and part: the publisher fills those in
//! from the record's key when it sends them. The body also carries the totals (points
//! and value bytes) of every record appended before this one, so that opening a queue
//! counts it from its first and last records instead of reading them all (see
//! `summary.rs`); records written before those fields existed decode with `before: None`.

use prost::Message;
use tagstream_proto::v1::PointBatch;

const HEADER: usize = 12;

#[derive(Clone, PartialEq, prost::Message)]
struct QueueRecord {
    #[prost(message, repeated, tag = "1")]
    batches: Vec<PointBatch>,
    #[prost(uint64, optional, tag = "2")]
    points_before: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    bytes_before: Option<u64>,
}

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

/// A decoded record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub points: u32,
    pub enqueued_ns: i64,
    pub batches: Vec<PointBatch>,
    /// The totals of every record appended before this one.
    pub before: Option<Totals>,
}

/// Encodes batches into one record value, after records totalling `before`. The batches
/// are encoded where they are (as `QueueRecord` fields 1, 2 and 3), not moved into a
/// message: a write that fails is made again from the same batches.
pub fn encode(batches: &[PointBatch], enqueued_ns: i64, before: Totals) -> Vec<u8> {
    use prost::encoding::{message, uint64};
    let points: usize = batches.iter().map(|b| b.points.len()).sum();
    let body_len = batches.iter().map(|b| message::encoded_len(1, b)).sum::<usize>()
        + uint64::encoded_len(2, &before.points)
        + uint64::encoded_len(3, &before.bytes);
    let mut value = Vec::with_capacity(HEADER + body_len);
    value.extend_from_slice(&u32::try_from(points).unwrap_or(u32::MAX).to_be_bytes());
    value.extend_from_slice(&enqueued_ns.to_be_bytes());
    for batch in batches {
        message::encode(1, batch, &mut value);
    }
    uint64::encode(2, &before.points, &mut value);
    uint64::encode(3, &before.bytes, &mut value);
    value
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
    let body = QueueRecord::decode(&value[HEADER..]).map_err(|e| CorruptRecord(e.to_string()))?;
    // A value cut at a field boundary still parses, with batches missing: the header's
    // count is what tells (found by tests/hostile_input.rs).
    let held: usize = body.batches.iter().map(|b| b.points.len()).sum();
    if held != points as usize {
        return Err(CorruptRecord(format!(
            "the header counts {points} points, the body holds {held}"
        )));
    }
    let before = body
        .points_before
        .zip(body.bytes_before)
        .map(|(points, bytes)| Totals { points, bytes });
    Ok(Record {
        points,
        enqueued_ns,
        batches: body.batches,
        before,
    })
}

/// At most the bytes a batch adds to the queue: its encoding, its field tag and length, and
/// a record header in case it ends up alone in a record.
pub fn batch_size(batch: &PointBatch) -> usize {
    batch.encoded_len() + 4 + HEADER
}
