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
