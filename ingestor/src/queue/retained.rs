//! Records JetStream acknowledged, kept on disk for `ackedRetention` after the ack.
//!
//! JetStream acknowledges a publish before it syncs it to disk (every `sync_interval`,
//! 2 minutes by default), so a power cut on the broker's node can take back messages it
//! acknowledged. An acknowledged record therefore moves from the queue's `records` tree
//! to its `retained` tree, with the stream sequence JetStream gave each of its parts; the
//! publisher compares those with the stream whenever it (re)connects and publishes again,
//! in order, the parts the stream no longer holds (`publish/repair.rs`).
//!
//! An entry is the record's value behind the ack:
//! ```text
//! i64 BE  acknowledged at (ns since the Unix epoch)
//! u32 BE  parts n
//! n x u64 BE  the stream sequence of each part, in part order
//! bytes   the record's value, as `records` held it
//! ```
//! Keys are the record's sequence. Records move in sequence order, so the tree is a run
//! of sequences (less any corrupt record the publisher skipped), and an entry is written
//! before its record is removed from `records`: sled recovers a prefix of its operations,
//! so a crash never leaves a record in neither tree.

use super::record::{self, Totals};

const FIXED: usize = 12;

/// An acknowledged record: its sequence and the stream sequence of each part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub sequence: u64,
    pub stream_sequences: Vec<u64>,
}

/// A retained entry, as its head tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetainedAck {
    pub acked_ns: i64,
    pub stream_sequences: Vec<u64>,
}

/// The entry for a record `value` acknowledged at `acked_ns`.
pub fn encode(acked_ns: i64, stream_sequences: &[u64], value: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(FIXED + 8 * stream_sequences.len() + value.len());
    entry.extend_from_slice(&acked_ns.to_be_bytes());
    entry.extend_from_slice(&(stream_sequences.len() as u32).to_be_bytes());
    for sequence in stream_sequences {
        entry.extend_from_slice(&sequence.to_be_bytes());
    }
    entry.extend_from_slice(value);
    entry
}

/// The ack of an entry and the record value behind it, or `None` when it is cut short.
pub fn decode(entry: &[u8]) -> Option<(RetainedAck, &[u8])> {
    let acked_ns = i64::from_be_bytes(entry.get(..8)?.try_into().ok()?);
    let parts = u32::from_be_bytes(entry.get(8..FIXED)?.try_into().ok()?) as usize;
    let end = FIXED.checked_add(parts.checked_mul(8)?)?;
    let stream_sequences = entry
        .get(FIXED..end)?
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Some((
        RetainedAck {
            acked_ns,
            stream_sequences,
        },
        entry.get(end..)?,
    ))
}

/// The same entry with new stream sequences, acknowledged again at `acked_ns`.
pub fn reacked(entry: &[u8], acked_ns: i64, stream_sequences: &[u64]) -> Option<Vec<u8>> {
    let (_, value) = decode(entry)?;
    Some(encode(acked_ns, stream_sequences, value))
}

/// Records and bytes in the tree, from its first and last entries (the totals each
/// record carries, as `summary.rs` counts `records`): opening never reads every entry.
pub fn summarize(tree: &sled::Tree) -> Result<(u64, u64), sled::Error> {
    let (Some((first_key, first)), Some((last_key, last))) = (tree.first()?, tree.last()?) else {
        return Ok((0, 0));
    };
    let records = sequence(&last_key).saturating_sub(sequence(&first_key)) + 1;
    let before = |entry: &[u8]| -> Option<Totals> { record::decode(decode(entry)?.1).ok()?.before };
    let bytes = match (before(&first), before(&last)) {
        (Some(start), Some(end)) => (end.bytes + last.len() as u64).saturating_sub(start.bytes),
        // Records from before the totals: an estimate from the ends.
        _ => records * ((first.len() + last.len()) as u64 / 2),
    };
    Ok((records, bytes))
}

fn sequence(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_gives_back_its_ack_and_value() {
        let entry = encode(42, &[7, 9, 12], b"value");
        let (ack, value) = decode(&entry).unwrap();
        assert_eq!(
            ack,
            RetainedAck {
                acked_ns: 42,
                stream_sequences: vec![7, 9, 12]
            }
        );
        assert_eq!(value, b"value");
        let again = reacked(&entry, 50, &[20, 21, 22]).unwrap();
        assert_eq!(decode(&again).unwrap().0.stream_sequences, vec![20, 21, 22]);
        assert_eq!(decode(&again).unwrap().1, b"value");
    }

    #[test]
    fn a_short_entry_is_none() {
        let entry = encode(42, &[7, 9, 12], b"");
        for cut in 0..entry.len() {
            assert!(decode(&entry[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode(&[0, 0, 0, 0, 0, 0, 0, 1, 255, 255, 255, 255]).is_none());
    }
}
