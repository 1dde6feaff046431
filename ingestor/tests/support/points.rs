//! Test data: points that count up, and reading the count back.

use tagstream_proto::v1::{PointBatch, point::Value};

/// The unsigned values of every point of `batches`, in order (tests number their points).
pub fn counter_values<'a>(batches: impl IntoIterator<Item = &'a PointBatch>) -> Vec<u64> {
    batches
        .into_iter()
        .flat_map(|b| &b.points)
        .map(|p| match p.value {
            Some(Value::UintValue(n)) => n,
            ref other => panic!("not a counter value: {other:?}"),
        })
        .collect()
}

/// The counter values of every point of stored queue records, in order.
pub fn stored_values(stored: &[tagstream_ingestor::queue::Stored]) -> Vec<u64> {
    let batches: Vec<PointBatch> = stored
        .iter()
        .flat_map(|s| {
            s.record
                .batches
                .iter()
                .map(tagstream_ingestor::queue::StoredBatch::decode)
        })
        .collect();
    counter_values(&batches)
}
