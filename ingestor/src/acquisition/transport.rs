//! The byte stream under tokio-modbus, watched so that a timeout does not cost the
//! connection.
//!
//! tokio-modbus takes the next frame it reads as the answer to the request it just sent.
//! After a request timed out, its late answer would be read as the next request's: on a
//! gateway that is a neighbour's poll failing with a header mismatch, and the connection
//! (every unit behind the gateway) dropped for one lost reply. So:
//!
//! - **Modbus TCP** frames carry a transaction id. This stream notes the id of every
//!   request written and drops an answer whose id belongs to an earlier request of this
//!   connection: a late reply. An answer with an id
//!   never sent reaches tokio-modbus, which reports the mismatch as before.
//! - **RTU** frames (on a serial line or over TCP) carry no id. After a timeout the line is
//!   given one more timeout to go quiet, then whatever arrived is drained before the next
//!   request is written (libmodbus's protocol error recovery does the same).
//!
//! It also notes when the device closes the connection: tokio-modbus 0.17.0 reports that
//! as `io::Error::last_os_error()`, whatever errno the thread last left ("Success (os
//! error 0)"), which says nothing (slowtec/tokio-modbus#360 fixes it upstream, not in a
//! release yet).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{self, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How frames are told apart on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Modbus TCP: an MBAP header with a transaction id and a length.
    Mbap,
    /// Modbus RTU: no id, no length; frames are separated by silence.
    Rtu,
}

/// What the stream and the link holding it know of each other.
#[derive(Debug, Default)]
pub struct Shared {
    /// The device closed the connection (a read returned end of stream).
    pub closed: AtomicBool,
    /// Drain what has arrived before the next request is written (RTU, after a timeout).
    pub drain_before_write: AtomicBool,
}

/// Earlier requests whose answers are recognised as late: a few polls' worth of reads.
const REMEMBERED_REQUESTS: usize = 64;

/// The MBAP header: transaction id, protocol id, length (of the unit id and the PDU),
/// unit id.
const MBAP_HEADER: usize = 7;

/// A stream carrying Modbus frames for tokio-modbus.
#[derive(Debug)]
pub struct Transport<S> {
    inner: S,
    framing: Framing,
    shared: Arc<Shared>,
    /// Transaction ids of the requests written, newest last.
    sent: VecDeque<u16>,
    /// The request being written: its header bytes so far and its length once known.
    outgoing: OutgoingFrame,
    /// Bytes read and not handed on yet (Modbus TCP).
    incoming: Vec<u8>,
    /// How many bytes at the front of `incoming` are cleared to be handed on.
    cleared: usize,
}

#[derive(Debug, Default)]
struct OutgoingFrame {
    header: [u8; 6],
    written: usize,
}

impl<S> Transport<S> {
    pub fn new(inner: S, framing: Framing, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            framing,
            shared,
            sent: VecDeque::with_capacity(REMEMBERED_REQUESTS),
            outgoing: OutgoingFrame::default(),
            incoming: Vec::new(),
            cleared: 0,
        }
    }

    /// Notes the transaction id of each request frame in `bytes`, written in order.
    fn note_written(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let frame = &mut self.outgoing;
            if frame.written < frame.header.len() {
                let take = (frame.header.len() - frame.written).min(bytes.len());
                frame.header[frame.written..frame.written + take].copy_from_slice(&bytes[..take]);
                frame.written += take;
                bytes = &bytes[take..];
                if frame.written == frame.header.len() {
                    if self.sent.len() == REMEMBERED_REQUESTS {
                        self.sent.pop_front();
                    }
                    self.sent
                        .push_back(u16::from_be_bytes([frame.header[0], frame.header[1]]));
                }
                continue;
            }
            let total = frame.header.len() + usize::from(u16::from_be_bytes([frame.header[4], frame.header[5]]));
            let take = (total - frame.written).min(bytes.len());
            frame.written += take;
            bytes = &bytes[take..];
            if frame.written >= total {
                *frame = OutgoingFrame::default();
            }
        }
    }

    /// Whether `id` is an earlier request's: its answer comes too late to be wanted.
    fn is_late(&self, id: u16) -> bool {
        self.sent.back().is_some_and(|newest| *newest != id) && self.sent.contains(&id)
    }

    /// Sorts the complete frames at the front of `incoming` (past what is cleared): late
    /// replies are dropped, the others cleared to be handed on. Bytes that do not parse as
    /// MBAP are handed on as they are, for tokio-modbus to reject.
    fn sort_incoming(&mut self) {
        while self.incoming.len() - self.cleared >= MBAP_HEADER {
            let frame = &self.incoming[self.cleared..];
            let length = usize::from(u16::from_be_bytes([frame[4], frame[5]]));
            let protocol = u16::from_be_bytes([frame[2], frame[3]]);
            if protocol != 0 || !(2..=254).contains(&length) {
                self.cleared = self.incoming.len();
                return;
            }
            let total = 6 + length;
            if frame.len() < total {
                return;
            }
            if self.is_late(u16::from_be_bytes([frame[0], frame[1]])) {
                self.incoming.drain(self.cleared..self.cleared + total);
            } else {
                self.cleared += total;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> Transport<S> {
    /// Reads into `buf`, noting an end of stream.
    fn poll_inner(&mut self, cx: &mut task::Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before && buf.remaining() > 0 {
            self.shared.closed.store(true, Ordering::Relaxed);
        }
        polled
    }

    /// Discards whatever has arrived, without waiting for more.
    fn drain(&mut self, cx: &mut task::Context<'_>) -> Poll<std::io::Result<()>> {
        let mut scratch = [0u8; 256];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match self.poll_inner(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Transport<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut task::Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.framing == Framing::Rtu {
            return this.poll_inner(cx, buf);
        }
        loop {
            if this.cleared > 0 {
                let n = this.cleared.min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.drain(..n);
                this.cleared -= n;
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 512];
            let mut read = ReadBuf::new(&mut scratch);
            ready!(this.poll_inner(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream: what is left goes on as it is, then the end.
                this.cleared = this.incoming.len();
                if this.cleared == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.incoming.extend_from_slice(read.filled());
            this.sort_incoming();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Transport<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut task::Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.framing == Framing::Rtu && this.shared.drain_before_write.swap(false, Ordering::Relaxed) {
            ready!(this.drain(cx))?;
        }
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        if this.framing == Framing::Mbap {
            this.note_written(&data[..written]);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut bytes = id.to_be_bytes().to_vec();
        bytes.extend([0, 0]);
        bytes.extend(u16::try_from(pdu.len() + 1).unwrap().to_be_bytes());
        bytes.push(unit);
        bytes.extend(pdu);
        bytes
    }

    fn transport() -> Transport<tokio::io::Empty> {
        Transport::new(tokio::io::empty(), Framing::Mbap, Arc::default())
    }

    #[test]
    fn request_ids_are_noted_across_split_writes() {
        let mut t = transport();
        let mut two = frame(7, 1, &[3, 0, 0, 0, 2]);
        two.extend(frame(8, 2, &[3, 0, 0, 0, 2]));
        for chunk in two.chunks(5) {
            t.note_written(chunk);
        }
        assert_eq!(t.sent, [7, 8]);
        assert!(t.is_late(7));
        assert!(!t.is_late(8), "the newest request's answer is wanted");
        assert!(!t.is_late(9), "an id never sent is not a late reply");
    }

    #[test]
    fn late_replies_are_dropped_and_the_wanted_one_is_kept_whole() {
        let mut t = transport();
        t.note_written(&frame(1, 1, &[3, 0, 0, 0, 1]));
        t.note_written(&frame(2, 2, &[3, 0, 0, 0, 1]));
        let late = frame(1, 1, &[3, 2, 0, 42]);
        let wanted = frame(2, 2, &[3, 2, 0, 7]);
        let mut bytes = late.clone();
        bytes.extend(&wanted);
        // Arriving a byte at a time, the frames are sorted once whole.
        for byte in &bytes {
            t.incoming.push(*byte);
            t.sort_incoming();
        }
        assert_eq!(t.incoming, wanted);
        assert_eq!(t.cleared, wanted.len());
    }

    #[test]
    fn what_is_not_mbap_goes_on_for_tokio_modbus_to_reject() {
        let mut t = transport();
        t.note_written(&frame(1, 1, &[3, 0, 0, 0, 1]));
        t.incoming.extend([0, 1, 0x12, 0x34, 0, 5, 1, 3, 2, 0, 0]);
        t.sort_incoming();
        assert_eq!(t.cleared, t.incoming.len());
    }
}
