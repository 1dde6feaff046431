//! Idempotency by request id: a request repeated within the window is answered with the
//! first outcome and never written twice, including while the first is still running.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use async_nats::Subject;
use bytes::Bytes;

/// How long an answered request id is remembered.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Most request ids remembered; the oldest answered ones are forgotten first.
const MOST: usize = 100_000;

#[derive(Debug)]
enum Entry {
    /// Being written; these reply subjects wait for the outcome.
    Running { fingerprint: Bytes, waiters: Vec<Subject> },
    /// Answered with this encoded reply.
    Answered { fingerprint: Bytes, reply: Bytes },
}

impl Entry {
    fn fingerprint(&self) -> &Bytes {
        match self {
            Self::Running { fingerprint, .. } | Self::Answered { fingerprint, .. } => fingerprint,
        }
    }
}

/// What a request id has seen.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: write it.
    New,
    /// The same request is running; the reply subject was added to its waiters.
    Running,
    /// The same request was answered with this reply.
    Answered(Bytes),
    /// The id was used for a different request.
    Conflict,
}

/// The request ids of the window.
#[derive(Debug, Default)]
pub struct Requests {
    entries: HashMap<String, Entry>,
    /// Answered ids, oldest first.
    answered: VecDeque<(Instant, String)>,
}

impl Requests {
    /// Records a request `id` (with what it asks, `fingerprint`, and where it wants the
    /// reply) and says what to do with it.
    pub fn arrive(&mut self, id: &str, fingerprint: Bytes, reply_to: Subject) -> Seen {
        self.forget(Instant::now());
        match self.entries.get_mut(id) {
            None => {
                self.entries.insert(
                    id.to_owned(),
                    Entry::Running {
                        fingerprint,
                        waiters: vec![reply_to],
                    },
                );
                Seen::New
            }
            Some(entry) if *entry.fingerprint() != fingerprint => Seen::Conflict,
            Some(Entry::Running { waiters, .. }) => {
                waiters.push(reply_to);
                Seen::Running
            }
            Some(Entry::Answered { reply, .. }) => Seen::Answered(reply.clone()),
        }
    }

    /// Records the reply of a request that was [`Seen::New`]; returns who waits for it.
    pub fn answer(&mut self, id: &str, reply: Bytes) -> Vec<Subject> {
        let Some(Entry::Running { fingerprint, waiters }) = self.entries.remove(id) else {
            return Vec::new();
        };
        self.entries
            .insert(id.to_owned(), Entry::Answered { fingerprint, reply });
        self.answered.push_back((Instant::now(), id.to_owned()));
        waiters
    }

    fn forget(&mut self, now: Instant) {
        while let Some((at, id)) = self.answered.front() {
            if now.duration_since(*at) < WINDOW && self.entries.len() < MOST {
                break;
            }
            self.entries.remove(id);
            self.answered.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_request_waits_for_or_gets_the_first_outcome() {
        let mut requests = Requests::default();
        let what = Bytes::from_static(b"setpoint=21.5");
        assert_eq!(requests.arrive("r1", what.clone(), "_INBOX.a".into()), Seen::New);
        assert_eq!(requests.arrive("r1", what.clone(), "_INBOX.b".into()), Seen::Running);
        assert_eq!(
            requests.arrive("r1", Bytes::from_static(b"setpoint=99"), "_INBOX.c".into()),
            Seen::Conflict
        );
        let waiters = requests.answer("r1", Bytes::from_static(b"written"));
        assert_eq!(waiters, [Subject::from("_INBOX.a"), Subject::from("_INBOX.b")]);
        assert_eq!(
            requests.arrive("r1", what, "_INBOX.d".into()),
            Seen::Answered(Bytes::from_static(b"written"))
        );
        assert_eq!(requests.arrive("r2", Bytes::new(), "_INBOX.e".into()), Seen::New);
    }

    #[test]
    fn answered_ids_are_forgotten_after_the_window() {
        let mut requests = Requests::default();
        requests.arrive("old", Bytes::new(), "_INBOX.a".into());
        requests.answer("old", Bytes::new());
        requests.forget(Instant::now() + WINDOW);
        assert_eq!(requests.arrive("old", Bytes::new(), "_INBOX.b".into()), Seen::New);
    }
}
