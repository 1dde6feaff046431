//! Publishing again what a broker's power cut took back.
//!
//! JetStream acks a message before it syncs it (every `sync_interval`, 2 minutes by
//! default), so after a power cut a restarted broker may no longer hold messages it
//! acknowledged: the stream's tail from the last sync on is gone, and its last sequence
//! is lower than some the publisher was given. The queue keeps acknowledged records for
//! `ackedRetention` with the stream sequence of each part (`queue/retained.rs`). Whenever
//! the publisher (re)connects it compares them with the stream, before it sends anything
//! new: a part whose stream sequence is past the stream's last one was lost, and is sent
//! again, in queue order, so the stream stays in queue order. The loss is reported at
//! once (an ERROR log naming the records, `/status`, the metric, and through the
//! operator the Site's condition and a Warning event), repaired or not.
//!
//! The last surviving part is also read back: when it is not the message the publisher
//! sent (the stream was deleted and made again, its sequences reused), every retained
//! record is sent again, and JetStream's duplicate window drops what it still holds.
//! Either way, when the oldest retained record was lost too, records older than the
//! retention may have been lost with it, and the report says so.

use async_nats::jetstream;
use tagstream_core::point::now_ns;
use tracing::{error, info};

use super::{Connection, PublishError, format_message_id, window::AckWindow};
use crate::queue::{Acked, RetainedAck};

/// What the stream still holds of the retained records.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Everything the publisher was acked.
    Intact,
    /// The parts after `last_sequence` (of the stream), from record `from` on.
    TailLost { from: u64, last_sequence: u64 },
    /// Not the messages the publisher sent: every retained record is sent again.
    Replaced,
}

fn highest(ack: &RetainedAck) -> u64 {
    ack.stream_sequences.iter().copied().max().unwrap_or(0)
}

impl Connection<'_> {
    /// Compares the retained records with the stream and sends again what it lost.
    pub(super) async fn repair(&self, epoch: u64, window: &mut AckWindow) -> Result<(), PublishError> {
        let Some((first, last)) = self.queue.retained_bounds().await? else {
            return Ok(());
        };
        let found = self.find_loss(epoch, first, last).await?;
        let (from, last_sequence) = match found {
            Found::Intact => return Ok(()),
            Found::TailLost { from, last_sequence } => (from, Some(last_sequence)),
            Found::Replaced => (first, None),
        };
        let records = last - from + 1;
        let maybe_older = from == first;
        let message = format!(
            "the broker lost {records} records it had acknowledged (queue records {from} to {last}{}); \
             publishing them again{}",
            last_sequence.map_or_else(
                || ", the stream no longer holds what was published".to_owned(),
                |s| format!(", stream sequences after {s}")
            ),
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
            stream_last_sequence = last_sequence,
            maybe_older,
            "{message}"
        );
        {
            let mut status = self.status.lock().expect("status lock");
            status.broker_lost_records += records;
            status.last_broker_loss = Some(message);
            status.last_broker_loss_ns = Some(now_ns());
        }
        self.publish_again(epoch, from, last, last_sequence, window).await?;
        info!(records, "published again what the broker had lost");
        Ok(())
    }

    /// Where the stream's holdings end among the retained records `first..=last`.
    async fn find_loss(&self, epoch: u64, first: u64, last: u64) -> Result<Found, PublishError> {
        let fail = |e: String| PublishError::Stream {
            stream: self.config.stream.name.clone(),
            message: e,
        };
        let mut stream = self
            .context
            .get_stream(&self.config.stream.name)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let last_sequence = stream
            .info()
            .await
            .map_err(|e| fail(e.to_string()))?
            .state
            .last_sequence;
        let at = |sequence: u64| self.queue.retained_at_or_after(sequence);
        let Some((newest, newest_ack)) = at(last).await? else {
            return Ok(Found::Intact);
        };
        // The first record with a part past the stream's end: the acks of later records
        // have higher stream sequences (they are published in order), so this bisects.
        let from = if highest(&newest_ack) <= last_sequence {
            None
        } else {
            let (mut lo, mut hi) = (first, newest);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match at(mid).await? {
                    Some((sequence, ack)) if highest(&ack) <= last_sequence => lo = sequence + 1,
                    Some((sequence, _)) => hi = sequence,
                    None => hi = mid,
                }
            }
            Some(hi)
        };
        // The last part the stream should still hold is read back: it must be ours.
        let survivor = match from {
            None => Some((newest, newest_ack)),
            Some(from) => self.queue.retained_before(from).await?,
        };
        if let Some((sequence, ack)) = survivor
            && let Some((part, stream_sequence)) = ack
                .stream_sequences
                .iter()
                .enumerate()
                .filter(|(_, s)| **s <= last_sequence)
                .max_by_key(|(_, s)| **s)
        {
            let expected = format_message_id(epoch, sequence, part as u32);
            match stream.get_raw_message(*stream_sequence).await {
                Ok(message) => {
                    let id = message.headers.get("Nats-Msg-Id").map(ToString::to_string);
                    if id.as_deref() != Some(expected.as_str()) {
                        return Ok(Found::Replaced);
                    }
                }
                // Removed since (a limit, a work queue's consumer): not a power cut's loss.
                Err(e) if matches!(e.kind(), jetstream::stream::RawMessageErrorKind::NoMessageFound) => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        Ok(from.map_or(Found::Intact, |from| Found::TailLost { from, last_sequence }))
    }

    /// Sends again, in order, the parts of retained records `from..=last` past the stream's
    /// `last_sequence` (every part when `None`), and notes their new stream sequences.
    async fn publish_again(
        &self,
        epoch: u64,
        from: u64,
        last: u64,
        last_sequence: Option<u64>,
        window: &mut AckWindow,
    ) -> Result<(), PublishError> {
        let chunk = self.config.chunk_records.max(1) as u64;
        // Each record's stream sequences, with the ones being sent again still to fill in.
        let mut pending: std::collections::VecDeque<(u64, Vec<u64>, Vec<usize>)> = std::collections::VecDeque::new();
        let mut start = from;
        while start <= last {
            let end = (start + chunk - 1).min(last);
            let mut sequences = Vec::new();
            let mut acks = Vec::new();
            let mut sequence = start;
            while sequence <= end {
                match self.queue.retained_at_or_after(sequence).await? {
                    Some((s, ack)) if s <= end => {
                        sequences.push(s);
                        acks.push(ack);
                        sequence = s + 1;
                    }
                    _ => break,
                }
            }
            let records = self.queue.read_retained(sequences).await?;
            for (stored, ack) in records.into_iter().zip(acks) {
                let lost: Vec<usize> = (0..stored.record.batches.len())
                    .filter(|i| last_sequence.is_none_or(|last| ack.stream_sequences.get(*i).is_none_or(|s| *s > last)))
                    .collect();
                if lost.is_empty() {
                    continue;
                }
                let mut stream_sequences = ack.stream_sequences.clone();
                stream_sequences.resize(stored.record.batches.len(), 0);
                let parts = stored
                    .record
                    .batches
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| lost.contains(i))
                    .map(|(i, b)| (i as u32, b))
                    .collect::<Vec<_>>();
                self.send_parts(epoch, stored.sequence, parts.into_iter(), window)
                    .await?;
                pending.push_back((stored.sequence, stream_sequences, lost));
                let mut acked = Vec::new();
                window
                    .settle(self.config.max_in_flight, self.status, &mut acked)
                    .await?;
                self.reack(&mut pending, acked)?;
            }
            start = end + 1;
        }
        let mut acked = Vec::new();
        window.settle(0, self.status, &mut acked).await?;
        self.reack(&mut pending, acked)
    }

    fn reack(
        &self,
        pending: &mut std::collections::VecDeque<(u64, Vec<u64>, Vec<usize>)>,
        acked: Vec<Acked>,
    ) -> Result<(), PublishError> {
        for record in acked {
            let Some((sequence, mut stream_sequences, sent)) = pending.pop_front() else {
                break;
            };
            debug_assert_eq!(sequence, record.sequence);
            for (part, stream_sequence) in sent.into_iter().zip(record.stream_sequences) {
                stream_sequences[part] = stream_sequence;
            }
            self.queue.reack(sequence, &stream_sequences)?;
        }
        Ok(())
    }
}
