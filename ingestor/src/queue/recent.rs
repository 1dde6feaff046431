//! The records flushed last, kept decoded in memory so that a publisher keeping up reads
//! what was just written without going back to sled on the blocking pool: each such read
//! cost two thread hand-offs and a sled lookup per group commit, more than the read itself.
//!
//! The records held are a run of consecutive sequences, each also in sled: the writer adds
//! a record only after the flush that made it durable, removals from sled's head remove it
//! here too, and a reopened sled empties it. A read this run cannot answer whole goes to
//! sled, so a backlog (after a restart, or an outage longer than the run) is read as before.

use std::collections::VecDeque;

use super::Stored;

/// Encoded bytes held: two of the publisher's chunks of 64 records of about 8 KiB, and a
/// third of a second at 100k points/s; a publisher that keeps up reads milliseconds behind
/// the writer. 4 MiB raised the replay bench's peak by about 10 MiB (allocator slack).
pub const LIMIT_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Recent {
    records: VecDeque<Stored>,
    bytes: usize,
}

fn size(stored: &Stored) -> usize {
    stored.record.batches.iter().map(|b| b.encoded.len()).sum()
}

impl Recent {
    /// Adds the record after the last one held; one that does not follow it starts the run
    /// again, so the run never has a hole.
    pub fn push(&mut self, stored: Stored) {
        if self
            .records
            .back()
            .is_some_and(|last| last.sequence + 1 != stored.sequence)
        {
            self.clear();
        }
        self.bytes += size(&stored);
        self.records.push_back(stored);
        while self.bytes > LIMIT_BYTES {
            let Some(oldest) = self.records.pop_front() else { break };
            self.bytes -= size(&oldest);
        }
    }

    /// Forgets every record up to and including `sequence` (removed from sled).
    pub fn remove_through(&mut self, sequence: u64) {
        while let Some(oldest) = self.records.front()
            && oldest.sequence <= sequence
        {
            self.bytes -= size(oldest);
            self.records.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    /// Up to `max` records from `start` on, when the run holds `start`; `None` when the
    /// read must go to sled.
    pub fn read(&self, start: u64, max: usize) -> Option<Vec<Stored>> {
        let first = self.records.front()?.sequence;
        let skip = usize::try_from(start.checked_sub(first)?).ok()?;
        (skip < self.records.len()).then(|| self.records.iter().skip(skip).take(max).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{LIMIT_BYTES, Recent};
    use crate::queue::{Record, Stored, StoredBatch};

    fn stored(sequence: u64, bytes: usize) -> Stored {
        Stored {
            sequence,
            record: Record {
                points: 1,
                enqueued_ns: 0,
                batches: vec![StoredBatch {
                    source: "d".into(),
                    source_kind: 1,
                    points: 1,
                    encoded: Bytes::from(vec![0; bytes]),
                }],
                before: None,
            },
        }
    }

    fn sequences(records: Option<Vec<Stored>>) -> Option<Vec<u64>> {
        records.map(|r| r.iter().map(|s| s.sequence).collect())
    }

    #[test]
    fn reads_inside_the_run_and_refers_the_rest_to_sled() {
        let mut recent = Recent::default();
        for s in 10..15 {
            recent.push(stored(s, 10));
        }
        assert_eq!(sequences(recent.read(12, 2)), Some(vec![12, 13]));
        assert_eq!(sequences(recent.read(13, 64)), Some(vec![13, 14]));
        assert_eq!(sequences(recent.read(9, 64)), None, "9 may be in sled");
        assert_eq!(sequences(recent.read(15, 64)), None, "past the run");
        recent.remove_through(12);
        assert_eq!(sequences(recent.read(12, 64)), None);
        assert_eq!(sequences(recent.read(13, 64)), Some(vec![13, 14]));
    }

    #[test]
    fn a_gap_starts_the_run_again_and_the_oldest_go_past_the_limit() {
        let mut recent = Recent::default();
        recent.push(stored(1, 10));
        recent.push(stored(3, 10));
        assert_eq!(sequences(recent.read(1, 64)), None);
        assert_eq!(sequences(recent.read(3, 64)), Some(vec![3]));
        let big = LIMIT_BYTES / 3;
        for s in 4..8 {
            recent.push(stored(s, big));
        }
        assert_eq!(sequences(recent.read(4, 64)), None, "evicted");
        assert_eq!(sequences(recent.read(5, 64)), Some(vec![5, 6, 7]));
        recent.clear();
        assert_eq!(sequences(recent.read(7, 64)), None);
    }
}
