//! The persistent queue between acquisition and publishing, on sled.
//!
//! # Invariants
//! - A point is reported persisted (`append` returns `Ok`) only after a sled flush that
//!   covers it: a crash afterwards loses nothing that was reported.
//! - Records are keyed by a big-endian `u64` sequence that only grows within an epoch,
//!   also across restarts and after the queue drained (`next_seq` is persisted beside the
//!   records and recovered as the larger of it and the last key + 1), so a
//!   `(epoch, sequence)` never names two different records.
//! - The epoch is random, created with the queue, and stored beside it. A new queue (new
//!   volume, or a corrupt one moved aside) gets a new epoch, so its message ids never
//!   collide with the old queue's in JetStream's duplicate window.
//! - Records leave only from the head: acknowledged by the publisher (`ack_through`), or
//!   dropped by the `dropOldest` policy, which is counted.
//!
//! # On disk
//! One sled database in the queue directory: tree `records` (sequence -> record, see
//! [`record`]) and tree `meta` (`epoch`, `next_seq`, both `u64` BE, and `format`).
//!
//! # Group commit and record size
//! Appends go to one writer task. It gathers every append that arrives within
//! `flush_interval` of the first, packs their batches into records of about
//! [`QueueConfig::record_bytes`], writes them and flushes once. Records of a few KiB keep
//! sled's memory flat (see `../shared/DESIGN.md`: tiny records cost ~25 B of RAM each,
//! records of tens of KiB balloon RSS), and one flush per group amortises the fsync.
//!
//! # Size limit
//! sled does not return space to the filesystem after deletes but reuses it, and its
//! files run at about 1.6x the payload (measured, DESIGN.md). The limit is therefore
//! applied to the payload times [`DISK_AMPLIFICATION`]; `size_on_disk` is reported
//! beside it. `dropOldest` removes head records to make room; `pausePolling` holds the
//! writer (and through the bounded channels, the pollers) until the publisher frees room.
//!
//! # Corruption
//! A database sled cannot open is moved aside to `<dir>.corrupt-<unix seconds>` and a
//! fresh queue (new epoch) is started, reported in [`Opened::moved_aside`]. A record that
//! does not decode is skipped and counted as lost; it never stops the queue.

pub mod record;
mod summary;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tagstream_crds::site::FullPolicy;
use tagstream_proto::v1::PointBatch;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info, warn};

pub use record::Record;

use tagstream_core::point::now_ns;

/// sled's bytes on disk per byte of payload, measured on this machine (DESIGN.md).
pub const DISK_AMPLIFICATION: f64 = 1.6;

/// How the queue is opened.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub dir: PathBuf,
    /// Most estimated disk use (payload x [`DISK_AMPLIFICATION`]).
    pub max_bytes: u64,
    pub policy: FullPolicy,
    pub flush_interval: Duration,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Target size of one record.
    pub record_bytes: usize,
}

impl QueueConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: 1 << 30,
            policy: FullPolicy::DropOldest,
            flush_interval: Duration::from_millis(5),
            cache_bytes: 32 << 20,
            record_bytes: 8 << 10,
        }
    }
}

/// Queue failures.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue at {}: {source}", path.display())]
    Storage {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("cannot move the corrupt queue {} aside: {source}", path.display())]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the queue directory {} is not writable: {source}. The ingestor needs a writable volume there \
         (in Kubernetes the Site's claim, which the pod's fsGroup 65532 makes writable; with docker a \
         volume or directory the container's user owns)",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the queue is closed")]
    Closed,
}

/// Figures for metrics and status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueStats {
    pub records: u64,
    pub points: u64,
    pub payload_bytes: u64,
    pub disk_bytes: u64,
    pub oldest_enqueued_ns: Option<i64>,
    pub dropped_points: u64,
    pub corrupt_records: u64,
    /// Whether `pausePolling` is holding appends back.
    pub paused: bool,
}

/// A stored record and its sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub sequence: u64,
    pub record: Record,
}

/// What opening found.
#[derive(Debug)]
pub struct Opened {
    pub queue: Queue,
    /// Where a corrupt queue was moved, when it was.
    pub moved_aside: Option<PathBuf>,
}

struct Append {
    batches: Vec<PointBatch>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug)]
struct Shared {
    config: QueueConfig,
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    epoch: u64,
    stats: Mutex<QueueStats>,
    /// The totals of every record appended so far: what the next record follows.
    totals: Mutex<record::Totals>,
    /// Woken when the publisher frees room (for `pausePolling`).
    room: Notify,
    /// Woken when records were written (for the publisher).
    appended: Notify,
}

/// A handle to the queue; clones share it.
#[derive(Clone, Debug)]
pub struct Queue {
    shared: Arc<Shared>,
    appends: mpsc::Sender<Append>,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Append")
            .field("batches", &self.batches.len())
            .finish_non_exhaustive()
    }
}

fn storage(path: &Path) -> impl Fn(sled::Error) -> QueueError + '_ {
    move |source| QueueError::Storage {
        path: path.to_path_buf(),
        source,
    }
}

fn u64_at(tree: &sled::Tree, key: &str) -> Result<Option<u64>, sled::Error> {
    Ok(tree
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes))
}

impl Queue {
    /// Opens (or creates) the queue and starts its writer on the current tokio runtime.
    pub fn open(config: QueueConfig) -> Result<Opened, QueueError> {
        check_writable(&config.dir)?;
        let (db, moved_aside) = match open_db(&config) {
            Ok(db) => (db, None),
            Err(e @ (sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_))) => {
                let aside = PathBuf::from(format!("{}.corrupt-{}", config.dir.display(), now_ns() / 1_000_000_000));
                error!(queue = %config.dir.display(), moved_to = %aside.display(), error = %e, "the queue is corrupt: moving it aside and starting a fresh one");
                std::fs::rename(&config.dir, &aside).map_err(|source| QueueError::MoveAside {
                    path: config.dir.clone(),
                    source,
                })?;
                (open_db(&config).map_err(storage(&config.dir))?, Some(aside))
            }
            Err(e) => return Err(storage(&config.dir)(e)),
        };
        let dir = config.dir.clone();
        let err = storage(&dir);
        let records = db.open_tree("records").map_err(&err)?;
        let meta = db.open_tree("meta").map_err(&err)?;
        let epoch = if let Some(epoch) = u64_at(&meta, "epoch").map_err(&err)? {
            epoch
        } else {
            let epoch = fastrand::u64(1..);
            meta.insert("epoch", &epoch.to_be_bytes()).map_err(&err)?;
            meta.insert("format", &1u64.to_be_bytes()).map_err(&err)?;
            db.flush().map_err(&err)?;
            epoch
        };
        let (stats, totals) = summary::summarize(&records, &meta, &db).map_err(&err)?;
        info!(queue = %config.dir.display(), epoch = format!("{epoch:016x}"), records = stats.records, points = stats.points, "queue opened");
        let (appends, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            config,
            db,
            records,
            meta,
            epoch,
            stats: Mutex::new(stats),
            totals: Mutex::new(totals),
            room: Notify::new(),
            appended: Notify::new(),
        });
        tokio::spawn(writer(Arc::clone(&shared), rx));
        Ok(Opened {
            queue: Self { shared, appends },
            moved_aside,
        })
    }

    /// The queue's epoch (random, fixed for its life).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    pub fn stats(&self) -> QueueStats {
        let mut stats = self.shared.stats.lock().expect("stats lock").clone();
        stats.disk_bytes = self.shared.db.size_on_disk().unwrap_or(0);
        stats
    }

    /// Stores `batches`; returns once they are on disk.
    pub async fn append(&self, batches: Vec<PointBatch>) -> Result<(), QueueError> {
        if batches.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        self.appends
            .send(Append { batches, done })
            .await
            .map_err(|_| QueueError::Closed)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(QueueError::Storage {
                path: self.shared.config.dir.clone(),
                source: sled::Error::Io(std::io::Error::other(message)),
            }),
            Err(_) => Err(QueueError::Closed),
        }
    }

    /// Up to `max` records with a sequence above `after` (from the head when `None`), in
    /// order. Memory is bounded by `max`, whatever the backlog.
    pub async fn read(&self, after: Option<u64>, max: usize) -> Result<Vec<Stored>, QueueError> {
        let shared = Arc::clone(&self.shared);
        run_blocking(move || {
            let start = after.map_or(0, |s| s.saturating_add(1));
            let mut out = Vec::with_capacity(max.min(1024));
            for entry in shared.records.range(start.to_be_bytes()..).take(max) {
                let (key, value) = entry.map_err(storage(&shared.config.dir))?;
                let sequence = u64::from_be_bytes(key.as_ref().try_into().unwrap_or_default());
                match record::decode(&value) {
                    Ok(record) => out.push(Stored { sequence, record }),
                    Err(e) => {
                        error!(sequence, error = %e, "skipping a corrupt queue record; its points are lost");
                        let err = storage(&shared.config.dir);
                        let counted = summary::counted_for(&shared.records, sequence).map_err(&err)?;
                        summary::note_hole(&shared.meta, sequence).map_err(&err)?;
                        shared.records.remove(&key).map_err(&err)?;
                        let counted = counted.unwrap_or(record::Totals {
                            points: 0,
                            bytes: value.len() as u64,
                        });
                        uncount(&shared, counted.points, counted.bytes);
                        shared.stats.lock().expect("stats lock").corrupt_records += 1;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Waits until records are appended, or `at_most` passes.
    pub async fn wait_for_records(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.shared.appended.notified()).await;
    }

    /// Removes every record up to and including `sequence` (the publisher's acked prefix).
    pub async fn ack_through(&self, sequence: u64) -> Result<(), QueueError> {
        let shared = Arc::clone(&self.shared);
        run_blocking(move || {
            remove_head(&shared, |key| key <= sequence, false)?;
            shared.room.notify_waiters();
            Ok(())
        })
        .await
    }

    /// Stops taking appends through this handle, flushes, and, when this is the last
    /// handle, waits (up to a second) for the writer to end so the database's file lock is
    /// released and the queue can be opened again. Every append already returned after its
    /// own flush; the final flush covers deletions of acknowledged records.
    pub async fn close(self) -> Result<(), QueueError> {
        let Self { shared, appends } = self;
        drop(appends);
        // The writer ends when every sender is gone; give it the time of one group.
        for _ in 0..200 {
            if Arc::strong_count(&shared) <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dir = shared.config.dir.clone();
        shared.db.flush_async().await.map_err(storage(&dir))?;
        Ok(())
    }
}

/// Creates and removes a file in `dir` (creating `dir` when missing): sled's own error for
/// a read-only or foreign-owned volume says only "Permission denied" or "Read-only file
/// system", without the directory or what to do.
fn check_writable(dir: &Path) -> Result<(), QueueError> {
    let probe = dir.join(".tagstream-write-check");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| QueueError::NotWritable {
            path: dir.to_path_buf(),
            source,
        })
}

fn open_db(config: &QueueConfig) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(&config.dir)
        .cache_capacity(config.cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Removes head records while `take(sequence)` holds; `dropped` counts their points as
/// dropped by the full policy. Returns the payload bytes freed.
fn remove_head(shared: &Shared, take: impl Fn(u64) -> bool, dropped: bool) -> Result<u64, QueueError> {
    let err = storage(&shared.config.dir);
    let mut freed = 0;
    while let Some((key, _)) = shared.records.first().map_err(&err)? {
        let sequence = u64::from_be_bytes(key.as_ref().try_into().unwrap_or_default());
        if !take(sequence) {
            break;
        }
        let Some(value) = shared.records.remove(&key).map_err(&err)? else {
            continue;
        };
        let points = record::header(&value).map_or(0, |(p, _)| u64::from(p));
        freed += value.len() as u64;
        uncount(shared, points, value.len() as u64);
        if dropped {
            shared.stats.lock().expect("stats lock").dropped_points += points;
        }
    }
    let oldest = shared
        .records
        .first()
        .map_err(&err)?
        .and_then(|(_, v)| record::header(&v).ok())
        .map(|(_, at)| at);
    shared.stats.lock().expect("stats lock").oldest_enqueued_ns = oldest;
    Ok(freed)
}

/// The writer task: gathers appends for one flush interval, writes them as records of
/// about `record_bytes`, flushes once, then answers every appender.
async fn writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Append>) {
    let mut next_seq = match next_sequence(&shared) {
        Ok(next) => next,
        Err(e) => {
            error!(error = %e, "cannot read the queue's sequence; refusing appends");
            return;
        }
    };
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + shared.config.flush_interval;
        let mut group = vec![first];
        while let Ok(Some(more)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            group.push(more);
        }
        let (batches, waiters): (Vec<Vec<PointBatch>>, Vec<_>) = group.into_iter().map(|a| (a.batches, a.done)).unzip();
        let incoming: u64 = batches.iter().flatten().map(|b| record::batch_size(b) as u64).sum();
        make_room(&shared, incoming, &mut rx).await;
        let result = {
            let shared = Arc::clone(&shared);
            let first_seq = next_seq;
            tokio::task::spawn_blocking(move || write_group(&shared, batches.into_iter().flatten(), first_seq)).await
        };
        let outcome = match result {
            Ok(Ok(next)) => {
                next_seq = next;
                shared.appended.notify_waiters();
                Ok(())
            }
            Ok(Err(e)) => {
                error!(error = %e, "cannot write to the queue; the points of this group are not persisted");
                Err(e.to_string())
            }
            Err(e) => Err(format!("queue writer failed: {e}")),
        };
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

fn next_sequence(shared: &Shared) -> Result<u64, sled::Error> {
    let stored = u64_at(&shared.meta, "next_seq")?.unwrap_or(0);
    let after_last = shared
        .records
        .last()?
        .and_then(|(k, _)| k.as_ref().try_into().ok())
        .map_or(0, |k| u64::from_be_bytes(k) + 1);
    Ok(stored.max(after_last))
}

/// Applies the full policy before `incoming` payload bytes are written.
async fn make_room(shared: &Arc<Shared>, incoming: u64, rx: &mut mpsc::Receiver<Append>) {
    let limit = shared.config.max_bytes;
    let fits = |shared: &Shared| {
        let payload = shared.stats.lock().expect("stats lock").payload_bytes + incoming;
        (payload as f64 * DISK_AMPLIFICATION) as u64 <= limit
    };
    if fits(shared) {
        return;
    }
    match shared.config.policy {
        FullPolicy::DropOldest => {
            let shared2 = Arc::clone(shared);
            let dropped = tokio::task::spawn_blocking(move || {
                let target = (limit as f64 / DISK_AMPLIFICATION) as u64;
                let over = |s: &Shared| s.stats.lock().expect("stats lock").payload_bytes + incoming > target;
                remove_head(&shared2, |_| over(&shared2), true)
            })
            .await;
            if let Ok(Ok(freed)) = dropped {
                warn!(
                    freed_bytes = freed,
                    "queue full: dropped the oldest points (policy dropOldest)"
                );
            }
        }
        FullPolicy::PausePolling => {
            shared.stats.lock().expect("stats lock").paused = true;
            warn!("queue full: holding new points until the broker takes some (policy pausePolling)");
            while !fits(shared) {
                // Appends wait in the channel meanwhile; when it fills, pollers wait too.
                let room = shared.room.notified();
                if rx.is_closed() {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), room).await;
            }
            shared.stats.lock().expect("stats lock").paused = false;
            info!("queue has room again; polling resumes");
        }
    }
}

/// Writes batches as records from `first_seq` on, then the next sequence, then flushes.
/// Returns the next sequence.
fn write_group(shared: &Shared, batches: impl Iterator<Item = PointBatch>, first_seq: u64) -> Result<u64, QueueError> {
    let err = storage(&shared.config.dir);
    let now = now_ns();
    let mut next = first_seq;
    let mut pending: Vec<PointBatch> = Vec::new();
    let mut pending_bytes = 0;
    let write_record = |pending: &mut Vec<PointBatch>, next: &mut u64| -> Result<(), QueueError> {
        if pending.is_empty() {
            return Ok(());
        }
        let before = *shared.totals.lock().expect("totals lock");
        let value = record::encode(std::mem::take(pending), now, before);
        let points = record::header(&value).map_or(0, |(p, _)| u64::from(p));
        // Counted before it is inserted: the publisher may read, send, ack and delete it
        // before this function returns, and a delete must never find it uncounted.
        count(shared, points, value.len() as u64, now);
        if let Err(e) = shared.records.insert(next.to_be_bytes(), value.as_slice()) {
            uncount(shared, points, value.len() as u64);
            return Err(err(e));
        }
        *shared.totals.lock().expect("totals lock") = before.then(points, value.len() as u64);
        *next += 1;
        Ok(())
    };
    for batch in batches {
        pending_bytes += record::batch_size(&batch);
        pending.push(batch);
        if pending_bytes >= shared.config.record_bytes {
            write_record(&mut pending, &mut next)?;
            pending_bytes = 0;
        }
    }
    write_record(&mut pending, &mut next)?;
    shared.meta.insert("next_seq", &next.to_be_bytes()).map_err(&err)?;
    shared.db.flush().map_err(&err)?;
    Ok(next)
}

/// Counts one record in the queue's figures.
fn count(shared: &Shared, points: u64, bytes: u64, enqueued_ns: i64) {
    let mut stats = shared.stats.lock().expect("stats lock");
    stats.records += 1;
    stats.points += points;
    stats.payload_bytes += bytes;
    stats.oldest_enqueued_ns.get_or_insert(enqueued_ns);
}

/// Takes one record out of the queue's figures.
fn uncount(shared: &Shared, points: u64, bytes: u64) {
    let mut stats = shared.stats.lock().expect("stats lock");
    stats.records = stats.records.saturating_sub(1);
    stats.points = stats.points.saturating_sub(points);
    stats.payload_bytes = stats.payload_bytes.saturating_sub(bytes);
}
