//! The memory tier: every record appended and not yet acknowledged, in sequence order.
//!
//! A record is published from here as soon as it is appended. It is written to sled only
//! when JetStream has not acknowledged it within the flush interval (the queue's writer
//! task claims it for a group write), and an acknowledgement that comes first takes it out of
//! memory without any disk write: a point is safe once JetStream acked it *or* sled
//! flushed it, and it need not be in both.
//!
//! The held records are a run of consecutive sequences:
//! ```text
//!   first held ... flushed ... unwritten ... next
//!   |  in sled, flushed  | claimed | memory only |
//! ```
//! Records below `flushed` are in sled and flushed (or acknowledged); they stay here as a
//! read cache until acknowledged or until the tier is over its size, when they go first.
//! Records in `flushed..unwritten` were claimed by a group write that has not flushed yet
//! (or failed and is being made again): never evicted, since sled may not have them.
//! Records from `unwritten` on are in memory only.

use std::collections::VecDeque;

use tokio::sync::oneshot;

use super::{
    Stored,
    record::{self, Record, Totals},
    retained::Acked,
};

/// An acknowledged record never written to sled, kept for the `retained` tree.
#[derive(Debug)]
pub struct Retain {
    pub sequence: u64,
    pub record: Record,
    pub stream_sequences: Vec<u64>,
    pub acked_ns: i64,
}

/// A record's value as sled stores it.
pub fn value(record: &Record) -> Vec<u8> {
    record::encode(&record.batches, record.enqueued_ns, record.before.unwrap_or_default())
}

/// What an appender is told: its records are safe, or why they could not be written.
pub type Answer = oneshot::Sender<Result<(), String>>;

#[derive(Debug, Default)]
pub struct Memory {
    held: VecDeque<Stored>,
    /// Encoded bytes of `held` and `to_retain`.
    bytes: usize,
    /// Every sequence below it is flushed to sled or acknowledged.
    pub flushed: u64,
    /// The first sequence no group write has claimed.
    pub unwritten: u64,
    /// The sequence the next record takes.
    pub next: u64,
    /// Every sequence below it is reserved on disk: none is ever handed out twice.
    pub reserved: u64,
    /// The totals of every record appended so far: what the next record follows.
    pub totals: Totals,
    /// The last sequence JetStream acknowledged (every one before it too).
    pub acked_through: Option<u64>,
    /// Acknowledged records never written, for the `retained` tree at the next group.
    pub to_retain: Vec<Retain>,
    /// Appenders waiting until their last record is safe.
    waiters: VecDeque<(u64, Answer)>,
    /// Points of the records from `unwritten` on (the queue's figures add them).
    unwritten_points: u64,
    /// Records acknowledged before any write.
    pub acked_unwritten: u64,
    /// Set by the last group write at shutdown: nothing is taken after it.
    pub closed: bool,
}

fn size(record: &Record) -> usize {
    record::encoded_len(&record.batches, record.before.unwrap_or_default())
}

impl Memory {
    /// A tier whose next record takes `next`, which is reserved on disk.
    pub fn new(next: u64, totals: Totals) -> Self {
        Self {
            flushed: next,
            unwritten: next,
            next,
            reserved: next,
            totals,
            ..Self::default()
        }
    }

    /// Encoded bytes held.
    pub const fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records held in memory only (not claimed by a write), and their points.
    pub fn unwritten(&self) -> (u64, u64) {
        (self.next - self.unwritten, self.unwritten_points)
    }

    /// Records held (in memory only or also in sled).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn index(&self, sequence: u64) -> Option<usize> {
        let first = self.held.front()?.sequence;
        usize::try_from(sequence.checked_sub(first)?)
            .ok()
            .filter(|&i| i < self.held.len())
    }

    /// Adds records after the last one (their sequences must be reserved); `answer` is
    /// told once the last of them is safe.
    pub fn push(&mut self, records: Vec<Record>, answer: Answer) {
        for record in records {
            self.bytes += size(&record);
            self.unwritten_points += u64::from(record.points);
            self.held.push_back(Stored {
                sequence: self.next,
                record,
            });
            self.next += 1;
        }
        self.waiters.push_back((self.next - 1, answer));
    }

    /// Up to `max` records from `start` on, when memory holds `start`; `None` when it
    /// is older than anything held (sled has it, or it is gone).
    pub fn read(&self, start: u64, max: usize) -> Option<Vec<Stored>> {
        if start >= self.next {
            return Some(Vec::new());
        }
        let from = self.index(start)?;
        Some(self.held.range(from..).take(max).cloned().collect())
    }

    /// Where records older than memory's end: the first held sequence, or `next`.
    pub fn first_held(&self) -> u64 {
        self.held.front().map_or(self.next, |s| s.sequence)
    }

    /// The enqueue time of the oldest record in memory only.
    pub fn oldest_unwritten_ns(&self) -> Option<i64> {
        self.index(self.unwritten).map(|i| self.held[i].record.enqueued_ns)
    }

    /// The enqueue time of the oldest record written nowhere yet: in memory only, or
    /// acknowledged and waiting for `retained`. A group write is due a flush interval after it.
    pub fn oldest_unwritten_or_unretained_ns(&self) -> Option<i64> {
        let retain = self.to_retain.first().map(|r| r.acked_ns);
        [self.oldest_unwritten_ns(), retain].into_iter().flatten().min()
    }

    /// Takes JetStream's acknowledgement of every record through `last` (`acked` lists
    /// the stream sequences of their parts). Records acknowledged before any write leave
    /// memory, and with `retain` go to `to_retain`. Returns whether any of them had been
    /// claimed by a write (so sled may hold them).
    pub fn ack(&mut self, last: u64, acked: &[Acked], retain: bool, now: i64) -> bool {
        let mut claimed = false;
        while let Some(front) = self.held.front()
            && front.sequence <= last
        {
            let Some(stored) = self.held.pop_front() else { break };
            let bytes = size(&stored.record);
            if stored.sequence < self.unwritten {
                claimed = true;
                self.bytes -= bytes;
                continue;
            }
            self.acked_unwritten += 1;
            self.unwritten_points -= u64::from(stored.record.points);
            if retain {
                let stream_sequences = acked
                    .binary_search_by_key(&stored.sequence, |a| a.sequence)
                    .map_or_else(|_| Vec::new(), |i| acked[i].stream_sequences.clone());
                self.to_retain.push(Retain {
                    sequence: stored.sequence,
                    record: stored.record,
                    stream_sequences,
                    acked_ns: now,
                });
            } else {
                self.bytes -= bytes;
            }
        }
        self.acked_through = Some(self.acked_through.map_or(last, |a| a.max(last)));
        let after = (last + 1).min(self.next);
        self.unwritten = self.unwritten.max(after);
        self.flushed = self.flushed.max(after);
        self.answer_safe();
        claimed
    }

    /// Claims for a group write the records in memory only that were enqueued at or
    /// before `cutoff_ns`, and every record waiting for `retained`.
    pub fn claim(&mut self, cutoff_ns: i64) -> (Vec<Stored>, Vec<Retain>) {
        let mut records = Vec::new();
        while let Some(i) = self.index(self.unwritten)
            && self.held[i].record.enqueued_ns <= cutoff_ns
        {
            let stored = self.held[i].clone();
            self.unwritten_points -= u64::from(stored.record.points);
            self.unwritten += 1;
            records.push(stored);
        }
        let retain = std::mem::take(&mut self.to_retain);
        self.bytes -= retain.iter().map(|r| size(&r.record)).sum::<usize>();
        (records, retain)
    }

    /// Bytes a claim with `cutoff_ns` would write.
    pub fn claimable_bytes(&self, cutoff_ns: i64) -> u64 {
        let records: usize = self.index(self.unwritten).map_or(0, |from| {
            self.held
                .range(from..)
                .take_while(|s| s.record.enqueued_ns <= cutoff_ns)
                .map(|s| size(&s.record))
                .sum()
        });
        let retain: usize = self.to_retain.iter().map(|r| size(&r.record)).sum();
        (records + retain) as u64
    }

    /// A group write through `through` (exclusive) flushed: its appenders are answered.
    pub fn flushed_through(&mut self, through: u64) {
        self.flushed = self.flushed.max(through);
        self.answer_safe();
    }

    /// Records the full policy dropped from sled's head, through `sequence`.
    pub fn dropped_through(&mut self, sequence: u64) {
        self.forget_flushed_while(|_, front| front.sequence <= sequence);
    }

    /// Gives up flushed records (sled has them) from the oldest until under `limit`.
    pub fn evict(&mut self, limit: usize) {
        self.forget_flushed_while(|memory, _| memory.bytes >= limit);
    }

    /// Forgets flushed records from the oldest while `keep_going` holds for the tier and
    /// its oldest record; never one a group write may still need.
    fn forget_flushed_while(&mut self, keep_going: impl Fn(&Self, &Stored) -> bool) {
        while let Some(front) = self.held.front()
            && front.sequence < self.flushed
            && keep_going(self, front)
        {
            let bytes = size(&front.record);
            self.held.pop_front();
            self.bytes -= bytes;
        }
    }

    /// Answers every appender whose records are all acknowledged or flushed.
    fn answer_safe(&mut self) {
        let safe = self.flushed.max(self.acked_through.map_or(0, |a| a + 1));
        while self.waiters.front().is_some_and(|(last, _)| *last < safe) {
            if let Some((_, answer)) = self.waiters.pop_front() {
                let _ = answer.send(Ok(()));
            }
        }
    }

    /// Tells every appender still waiting that its records could not be written.
    pub fn fail_waiters(&mut self, failure: &str) {
        for (_, answer) in self.waiters.drain(..) {
            let _ = answer.send(Err(failure.to_owned()));
        }
    }
}
