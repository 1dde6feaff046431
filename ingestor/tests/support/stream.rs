//! Reading a JetStream stream back and auditing it: every queue record of one epoch once,
//! no record or part missing, in queue order. Shared by the store-and-forward tests and
//! the e2e suite (`e2e/`), which audit the same guarantee on a cluster.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream;
use prost::Message as _;
use tagstream_proto::v1::PointBatch;

/// Every message of `stream` (by stream sequence), with its `Nats-Msg-Id`.
pub async fn stream_contents(client: async_nats::Client, stream: &str) -> Vec<(String, PointBatch)> {
    let context = jetstream::new(client);
    let mut stream = context.get_stream(stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for sequence in 1..=last {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(ToString::to_string)
            .unwrap_or_default();
        out.push((id, PointBatch::decode(message.payload.as_ref()).unwrap()));
    }
    out
}

/// Asserts the exactly-once, in-order guarantee over the batches of one queue, with at
/// most `crashes` gaps in the record sequences: a process killed (or a power cut) loses
/// the records it held in memory unacknowledged and skips the rest of its reserved block
/// of sequences, one gap each; nothing else may be missing.
pub fn assert_exactly_once_in_order(stored: &[(String, PointBatch)], crashes: usize) -> u64 {
    let mut parts: BTreeMap<(u64, u64), BTreeSet<u32>> = BTreeMap::new();
    for (id, batch) in stored {
        assert_eq!(
            id,
            &tagstream_ingestor::publish::message_id(batch),
            "Nats-Msg-Id does not name the record"
        );
        let fresh = parts
            .entry((batch.epoch, batch.sequence))
            .or_default()
            .insert(batch.part);
        assert!(
            fresh,
            "record {} part {} is in the stream twice",
            batch.sequence, batch.part
        );
    }
    let epochs: BTreeSet<u64> = parts.keys().map(|(e, _)| *e).collect();
    assert_eq!(epochs.len(), 1, "one queue, one epoch");
    let sequences: Vec<u64> = parts.keys().map(|(_, s)| *s).collect();
    let gaps: Vec<(u64, u64)> = sequences
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        gaps.len() <= crashes,
        "records are missing from the stream after {crashes} crashes: gaps between {gaps:?}"
    );
    for ((_, sequence), got) in &parts {
        let expected: BTreeSet<u32> = (0..=*got.iter().max().unwrap()).collect();
        assert_eq!(got, &expected, "record {sequence} lost a part");
    }
    let order: Vec<u64> = stored.iter().map(|(_, b)| b.sequence).collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "records out of order in the stream"
    );
    parts.len() as u64
}
