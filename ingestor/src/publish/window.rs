//! The publishes awaiting their acks, in the order they were sent.
//!
//! Acks are taken in as they arrive (not in order), so that any failure is seen at once:
//! the publisher stops sending at the first one and resends from the first
//! unacknowledged record. Before, acks were awaited in order only when the window was
//! full, so after a stream leader died the publisher went on sending for as long as the
//! window took to fill; a message sent once the new leader was elected was stored while
//! an earlier one, lost with the old leader, was stored again only after it: the stream
//! held records out of order (found by `tests/jetstream_cluster.rs`, one run in
//! seven). A disconnection fails the window at once too: the acks of what the dead
//! server took never come, and waiting for them added the ack timeout to every
//! failover.
//!
//! The stream's sequence in each ack is checked: a record whose sequence is lower than
//! an earlier record's was stored out of order anyway (a failure not yet seen when the
//! next message left), and is counted in `reordered` with a warning. The stream
//! sequences of a record's parts are handed back with the record once its last part is
//! acked: the queue keeps them to find what a broker's power cut took back.

use std::{collections::VecDeque, time::Instant};

use async_nats::jetstream::{context::PublishAckFuture, publish::PublishAck};
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use tagstream_core::report::PublisherStatus;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::PublishError;
use crate::queue::Acked;

type Answer = (u64, Result<PublishAck, String>);

/// One sent message.
struct Slot {
    sequence: u64,
    /// Whether this is the last message of the record that this window sends.
    last_part: bool,
    sent: Instant,
    ack: Option<PublishAck>,
}

/// The unanswered publishes of one connection.
pub struct AckWindow {
    slots: VecDeque<Slot>,
    /// The number of `slots[0]` among every message sent through this window.
    first: u64,
    answers: FuturesUnordered<BoxFuture<'static, Answer>>,
    disconnects: watch::Receiver<u64>,
    seen_disconnects: u64,
    /// The stream sequence of the last message taken in order.
    stream_sequence: u64,
    /// The stream sequences of the record being taken in, so far.
    record_stream_sequences: Vec<u64>,
}

impl std::fmt::Debug for AckWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckWindow")
            .field("in_flight", &self.slots.len())
            .finish_non_exhaustive()
    }
}

fn dropped() -> PublishError {
    PublishError::Publish("the broker connection dropped with publishes in flight".into())
}

impl AckWindow {
    /// A window on a connection whose disconnections `disconnects` counts.
    pub fn new(mut disconnects: watch::Receiver<u64>) -> Self {
        let seen_disconnects = *disconnects.borrow_and_update();
        Self {
            slots: VecDeque::new(),
            first: 0,
            answers: FuturesUnordered::new(),
            disconnects,
            seen_disconnects,
            stream_sequence: 0,
            record_stream_sequences: Vec::new(),
        }
    }

    /// Notes a sent message of record `sequence`.
    pub fn push(&mut self, sequence: u64, last_part: bool, ack: PublishAckFuture) {
        let number = self.first + self.slots.len() as u64;
        self.slots.push_back(Slot {
            sequence,
            last_part,
            sent: Instant::now(),
            ack: None,
        });
        self.answers
            .push(async move { (number, ack.await.map_err(|e| e.to_string())) }.boxed());
    }

    /// Takes in the acks that have arrived, without waiting; fails at the first failed
    /// publish or a disconnection.
    pub fn check(&mut self) -> Result<(), PublishError> {
        if *self.disconnects.borrow() != self.seen_disconnects {
            return Err(dropped());
        }
        while let Some(Some(answer)) = self.answers.next().now_or_never() {
            self.take(answer)?;
        }
        Ok(())
    }

    /// Waits until at most `keep` messages are unanswered, and returns the records whose
    /// every message sent is acked by then (in order), added to `acked`.
    pub async fn settle(
        &mut self,
        keep: usize,
        status: &std::sync::Mutex<PublisherStatus>,
        acked: &mut Vec<Acked>,
    ) -> Result<(), PublishError> {
        self.check()?;
        loop {
            while self.slots.front().is_some_and(|s| s.ack.is_some()) {
                let slot = self.slots.pop_front().expect("a front slot");
                self.first += 1;
                if let Some(record) = self.account(slot, status) {
                    acked.push(record);
                }
            }
            if self.slots.len() <= keep {
                return Ok(());
            }
            tokio::select! {
                answer = self.answers.next() => match answer {
                    Some(answer) => self.take(answer)?,
                    None => return Ok(()),
                },
                _ = self.disconnects.changed() => return Err(dropped()),
            }
        }
    }

    fn take(&mut self, (number, answer): Answer) -> Result<(), PublishError> {
        let ack = answer.map_err(PublishError::Publish)?;
        if let Some(slot) = number
            .checked_sub(self.first)
            .and_then(|i| self.slots.get_mut(i as usize))
        {
            slot.ack = Some(ack);
        }
        Ok(())
    }

    /// Counts an acked message taken in order; returns its record when it was the
    /// record's last message.
    fn account(&mut self, slot: Slot, status: &std::sync::Mutex<PublisherStatus>) -> Option<Acked> {
        let ack = slot.ack.expect("an acked slot");
        let mut s = status.lock().expect("status lock");
        s.connected = true;
        s.last_error = None;
        let latency = slot.sent.elapsed().as_secs_f64();
        s.last_ack_latency = Some(latency);
        s.ack_latency.observe(latency);
        if ack.duplicate {
            s.duplicates += 1;
            debug!(sequence = slot.sequence, "duplicate dropped by JetStream");
        }
        if ack.sequence < self.stream_sequence {
            s.reordered += 1;
            warn!(
                record = slot.sequence,
                stream_sequence = ack.sequence,
                after = self.stream_sequence,
                "a record was stored after a later one (a failover while it was in flight)"
            );
        }
        self.stream_sequence = self.stream_sequence.max(ack.sequence);
        self.record_stream_sequences.push(ack.sequence);
        slot.last_part.then(|| {
            s.acked_records += 1;
            Acked {
                sequence: slot.sequence,
                stream_sequences: std::mem::take(&mut self.record_stream_sequences),
            }
        })
    }
}
