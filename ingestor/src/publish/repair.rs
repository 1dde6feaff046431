//! Publishing again what a broker's power cut took back.
//!
//! JetStream acks a message before it syncs it (every `sync_interval`, 2 minutes by
//! default), so after a power cut a restarted broker may no longer hold messages it
//! acknowledged: the stream's tail from its last sync on is gone. The queue keeps
//! acknowledged records for `ackedRetention` with the stream sequence of each part
//! (`queue/retained.rs`). Whenever the publisher (re)connects, before it sends anything
//! new, it reads back the newest retained record's last message: when the stream still
//! holds it under the publisher's `Nats-Msg-Id`, nothing was lost. Otherwise it bisects
//! the retained records (the stream sequences grow with them, and a cut loses a tail) for
//! the first one the stream no longer holds, and sends again, in queue order, that
//! record's lost parts and every later record, so the stream stays in queue order.
//!
//! Reading the messages back, rather than comparing sequences with the stream's last one,
//! also finds the loss when other sites published into the same stream after the restart
//! (their messages took the lost sequences), or when the stream was deleted and made
//! again. The loss is reported at once (an ERROR log naming the records, `/status`, the
//! metric, and through the operator the Site's condition and a Warning event). When the
//! oldest retained record was lost too (and is not the queue's first), older ones may
//! have been, and the report says so.

use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use tagstream_core::point::now_ns;
use tracing::{error, info};

use super::{Connection, PublishError, format_message_id, window::AckWindow};
use crate::queue::{Acked, RetainedAck};

/// A retained record's lost parts and what the stream said.
#[derive(Debug)]
struct Loss {
    /// The first retained record the stream no longer holds whole.
    from: u64,
    /// Its parts the stream lost (every later record lost all of its parts).
    from_parts: Vec<usize>,
    /// The stream's last sequence when the loss was found.
    stream_last_sequence: u64,
}

/// The stream a repair reads from.
struct Probe {
    stream: jetstream::stream::Stream,
    /// The stream's first sequence: a message before it was removed by the stream's
    /// limits or a consumer, not by a power cut.
    first_sequence: u64,
    epoch: u64,
}

impl Probe {
    /// Whether the stream holds part `part` of record `sequence` at `stream_sequence`.
    async fn holds(&self, sequence: u64, part: usize, stream_sequence: u64) -> Result<bool, PublishError> {
        if stream_sequence < self.first_sequence {
            return Ok(true);
        }
        match self.stream.get_raw_message(stream_sequence).await {
            Ok(message) => {
                let expected = format_message_id(self.epoch, sequence, part as u32);
                Ok(message.headers.get("Nats-Msg-Id").map(ToString::to_string).as_deref() == Some(&expected))
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(PublishError::Publish(format!("reading the stream back: {e}"))),
        }
    }

    /// Whether the stream holds the last message the publisher was acked for a record.
    async fn holds_last(&self, sequence: u64, ack: &RetainedAck) -> Result<bool, PublishError> {
        match ack.stream_sequences.iter().enumerate().max_by_key(|(_, s)| **s) {
            Some((part, stream_sequence)) => self.holds(sequence, part, *stream_sequence).await,
            None => Ok(true),
        }
    }
}

impl Connection<'_> {
    /// Compares the retained records with the stream and sends again what it lost.
    pub(super) async fn repair(&self, epoch: u64, window: &mut AckWindow) -> Result<(), PublishError> {
        let Some((first, last)) = self.queue.retained_bounds().await? else {
            return Ok(());
        };
        let Some(loss) = self.find_loss(epoch, first, last).await? else {
            return Ok(());
        };
        let Loss {
            from,
            stream_last_sequence,
            ..
        } = loss;
        let records = self.queue.retained_count(from, last).await?;
        // Sequences start at 0 with a queue: before record 0 there was nothing to lose.
        let maybe_older = from == first && first > 0;
        let message = format!(
            "the broker lost {records} records it had acknowledged (queue records {from} to {last}; the \
             stream ends at sequence {stream_last_sequence}); publishing them again{}",
            if maybe_older {
                "; records acknowledged before the queue's ackedRetention may be lost for good"
            } else {
                ""
            }
        );
        error!(
            lost_from = from,
            lost_to = last,
            records,
            stream_last_sequence,
            maybe_older,
            "{message}"
        );
        {
            let mut status = self.status.lock().expect("status lock");
            status.broker_lost_records += records;
            status.last_broker_loss = Some(message);
            status.last_broker_loss_ns = Some(now_ns());
        }
        self.publish_again(epoch, &loss, last, window).await?;
        info!(records, "published again what the broker had lost");
        Ok(())
    }

    /// The first retained record in `first..=last` the stream no longer holds whole.
    async fn find_loss(&self, epoch: u64, first: u64, last: u64) -> Result<Option<Loss>, PublishError> {
        let fail = |e: String| PublishError::Stream {
            stream: self.config.stream.name.clone(),
            message: e,
        };
        let mut stream = self
            .context
            .get_stream(&self.config.stream.name)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let state = stream.info().await.map_err(|e| fail(e.to_string()))?.state.clone();
        let probe = Probe {
            stream,
            first_sequence: state.first_sequence,
            epoch,
        };
        let at = |sequence: u64| self.queue.retained_at_or_after(sequence);
        let Some((newest, newest_ack)) = at(last).await? else {
            return Ok(None);
        };
        if probe.holds_last(newest, &newest_ack).await? {
            return Ok(None);
        }
        // A cut loses a tail, and the retained records' stream sequences grow with them.
        let (mut lo, mut hi) = (first, newest);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match at(mid).await? {
                Some((sequence, ack)) if sequence < hi && probe.holds_last(sequence, &ack).await? => lo = sequence + 1,
                Some((sequence, _)) if sequence < hi => hi = sequence,
                _ => hi = mid,
            }
        }
        let Some((from, ack)) = at(hi).await? else {
            return Ok(None);
        };
        let mut from_parts = Vec::new();
        for (part, stream_sequence) in ack.stream_sequences.iter().enumerate() {
            if !probe.holds(from, part, *stream_sequence).await? {
                from_parts.push(part);
            }
        }
        Ok(Some(Loss {
            from,
            from_parts,
            stream_last_sequence: state.last_sequence,
        }))
    }

    /// Sends again, in order, the lost parts of record `loss.from` and every part of the
    /// retained records after it through `last`, and notes their new stream sequences.
    async fn publish_again(
        &self,
        epoch: u64,
        loss: &Loss,
        last: u64,
        window: &mut AckWindow,
    ) -> Result<(), PublishError> {
        let chunk = self.config.chunk_records.max(1);
        // Each record's stream sequences, with the parts being sent again still to fill in.
        let mut pending = std::collections::VecDeque::new();
        let mut start = loss.from;
        loop {
            let records = self.queue.read_retained(start, last, chunk).await?;
            let Some(next) = records.last().map(|(s, _)| s.sequence + 1) else {
                break;
            };
            for (stored, ack) in records {
                let parts = stored.record.batches.len();
                let resent: Vec<usize> = if stored.sequence == loss.from && !loss.from_parts.is_empty() {
                    loss.from_parts.clone()
                } else {
                    (0..parts).collect()
                };
                let mut stream_sequences = ack.stream_sequences;
                stream_sequences.resize(parts, 0);
                let batches = stored
                    .record
                    .batches
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| resent.contains(i))
                    .map(|(i, b)| (i as u32, b))
                    .collect::<Vec<_>>();
                self.send_parts(epoch, stored.sequence, batches.into_iter(), window)
                    .await?;
                pending.push_back((stored.sequence, stream_sequences, resent));
                let mut acked = Vec::new();
                window
                    .settle(self.config.max_in_flight, self.status, &mut acked)
                    .await?;
                self.reack(&mut pending, acked).await?;
            }
            start = next;
        }
        let mut acked = Vec::new();
        window.settle(0, self.status, &mut acked).await?;
        self.reack(&mut pending, acked).await
    }

    /// Notes the new stream sequences of records sent again, in the order they were sent.
    async fn reack(
        &self,
        pending: &mut std::collections::VecDeque<(u64, Vec<u64>, Vec<usize>)>,
        acked: Vec<Acked>,
    ) -> Result<(), PublishError> {
        for record in acked {
            let Some((sequence, mut stream_sequences, sent)) = pending.pop_front() else {
                break;
            };
            for (part, stream_sequence) in sent.into_iter().zip(record.stream_sequences) {
                stream_sequences[part] = stream_sequence;
            }
            self.queue.reack(sequence, stream_sequences).await?;
        }
        Ok(())
    }
}
