//! The messages tagstream publishes to NATS JetStream; see `tagstream/v1/points.proto` for
//! the subject scheme, the message id and the ordering guarantees.

#[allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tagstream.v1.rs"));
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
}
