//! The persistent queue between acquisition and publishing, on sled.
//!
//! # Invariants
//! - A point is reported persisted (`append` returns `Ok`) only after a sled flush that
//!   covers it and an fsync of sled's file: a crash or a power cut afterwards loses
//!   nothing that was reported. sled's own flush ends in `sync_file_range`, which neither
//!   writes the file's size nor empties the disk's cache: a power cut lost what it had
//!   covered (found with `tests/power_cut.rs`'s filesystem, which keeps only what was
//!   fsynced).
//! - Records are keyed by a big-endian `u64` sequence that only grows within an epoch,
//!   also across restarts and after the queue drained (`next_seq` is persisted beside the
//!   records and recovered as the larger of it and the last key + 1), so a
//!   `(epoch, sequence)` never names two different records.
//! - The epoch is random, created with the queue, and stored beside it. A new queue (new
//!   volume, or a corrupt one moved aside) gets a new epoch, so its message ids never
//!   collide with the old queue's in JetStream's duplicate window.
//! - Records leave only from the head: acknowledged by the publisher (`ack`), or dropped
//!   by the `dropOldest` policy, which is counted. An acknowledged record moves to the
//!   `retained` tree for `acked_retention` ([`retained`]), where the publisher finds what
//!   a broker's power cut took back.
//!
//! # On disk
//! One sled database in the queue directory: tree `records` (sequence -> record, see
//! [`record`]), tree `retained` (sequence -> acknowledged record, see [`retained`]) and
//! tree `meta` (`epoch`, `next_seq`, both `u64` BE, and `format`).
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
//! # A full disk, and failed writes
//! Each group is also checked against the filesystem's free space ([`volume`]): when the
//! disk, not `maxSize`, is what is short, the full policy applies the same way and the
//! queue reports `disk_full`. A write that fails anyway (the disk filled from outside
//! between two checks, or an I/O error) is not given up: sled refuses every call after a
//! failed write, so the writer gives up the reserve file, reopens sled, removes what the
//! failed group left behind, and writes the group again, retrying every second while it
//! fails. Appenders wait meanwhile (and through the bounded channels, the pollers);
//! nothing they handed over is lost or reported persisted before it is.
//!
//! The publisher reads only records below `durable_next`, the sequence after the last
//! flushed group, so it never sends a record a failed write or a crash could take back:
//! a sequence sent to JetStream is never reused for other points.
//!
//! # Corruption
//! A database sled cannot open is moved aside to `<dir>.corrupt-<unix seconds>` and a
//! fresh queue (new epoch) is started, reported in [`Opened::moved_aside`]. A record that
//! does not decode is skipped and counted as lost; it never stops the queue.

mod recent;
pub mod record;
pub mod retained;
mod summary;
pub mod volume;

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tagstream_crds::site::FullPolicy;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use record::{Record, StoredBatch};
pub use retained::{Acked, RetainedAck};
use volume::Volume;

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
    /// How long an acknowledged record stays in `retained`; zero removes it at its ack.
    pub acked_retention: Duration,
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
            acked_retention: Duration::from_secs(150),
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
    #[error("the queue at {} is reopening after a failed write", path.display())]
    Reopening { path: PathBuf },
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
    /// Whether the filesystem's free space, not `maxSize`, is limiting the queue.
    pub disk_full: bool,
    /// Bytes free on the queue's filesystem for this process.
    pub volume_available_bytes: Option<u64>,
    /// The last failed write, until a write succeeds again.
    pub write_error: Option<String>,
    /// Writes that failed (each followed by reopening sled and writing again).
    pub write_failures: u64,
    /// Acknowledged records kept for `acked_retention`, and their bytes.
    pub retained_records: u64,
    pub retained_bytes: u64,
    /// Acknowledged records given up before their retention ended, to make room.
    pub retained_evicted: u64,
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
    batches: Vec<StoredBatch>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The open sled database and its trees; replaced when sled is reopened.
#[derive(Debug)]
struct Store {
    db: sled::Db,
    records: sled::Tree,
    retained: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, for the fsync its flush does not make.
    file: File,
    /// Declared last, so dropped last: signals that sled's handles are gone.
    released: Released,
}

/// Tells a waiter when the last handle to a store is dropped, and sled's file lock with
/// it, so that sled can be opened again at once.
#[derive(Debug, Default)]
struct Released(Mutex<Option<std::sync::mpsc::Sender<()>>>);

impl Drop for Released {
    fn drop(&mut self) {
        if let Some(waiter) = self.0.get_mut().ok().and_then(Option::take) {
            let _ = waiter.send(());
        }
    }
}

impl Store {
    fn open(config: &QueueConfig) -> Result<Self, sled::Error> {
        let db = open_db(config)?;
        let records = db.open_tree("records")?;
        let retained = db.open_tree("retained")?;
        let meta = db.open_tree("meta")?;
        let file = File::open(config.dir.join("db"))?;
        Ok(Self {
            db,
            records,
            retained,
            meta,
            file,
            released: Released::default(),
        })
    }

    /// sled's flush, then an fsync of its file: only then is what the flush covered on disk.
    fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush()?;
        self.file.sync_data()?;
        Ok(())
    }
}

#[derive(Debug)]
struct Shared {
    config: QueueConfig,
    /// `None` while sled is being reopened.
    store: RwLock<Option<Arc<Store>>>,
    volume: Volume,
    epoch: u64,
    /// The sequence after the last flushed record: the publisher reads below it only.
    durable_next: AtomicU64,
    /// Set by any failed sled call: sled refuses writes from then on, and the writer
    /// reopens it.
    failed: AtomicBool,
    /// Set when the ingestor stops: the writer no longer waits for room nor retries a
    /// failed write, so a shutdown never waits on a broker that is gone.
    stopping: AtomicBool,
    /// Records the full policy removed since the last flush, as (sequence, points): they
    /// count as dropped once a flush covers their removal (a reopened sled may bring them
    /// back otherwise).
    unflushed_drops: Mutex<Vec<(u64, u64)>>,
    stats: Mutex<QueueStats>,
    /// The totals of every record appended so far: what the next record follows.
    totals: Mutex<record::Totals>,
    /// Woken when the publisher frees room (for `pausePolling`).
    room: Notify,
    /// Woken when records were written (for the publisher).
    appended: Notify,
    /// The records flushed last, for a publisher that keeps up.
    recent: Mutex<recent::Recent>,
    /// Cancelled by `close`: the writer takes what was already handed to it, then ends.
    closing: CancellationToken,
    /// The writer task, awaited by `close`.
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
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

fn sequence_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or_default())
}

impl Shared {
    /// The open store, or `Reopening` while the writer replaces it.
    fn store(&self) -> Result<Arc<Store>, QueueError> {
        self.store
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| QueueError::Reopening {
                path: self.config.dir.clone(),
            })
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, QueueStats> {
        self.stats.lock().expect("stats lock")
    }

    /// Measures what sled's files take and what the filesystem has free (blocking: a
    /// statvfs, and sled reads its file's metadata and its blob directory).
    fn measure_disk(&self) {
        let disk_bytes = self.store().ok().and_then(|s| s.db.size_on_disk().ok());
        let available = self.volume.space().map(|s| s.available);
        let mut stats = self.stats();
        if let Some(bytes) = disk_bytes {
            stats.disk_bytes = bytes;
        }
        stats.volume_available_bytes = available;
    }

    /// Maps a sled error to the queue's, noting that sled must be reopened.
    fn storage_error(&self) -> impl Fn(sled::Error) -> QueueError + '_ {
        move |source| {
            let error = storage(&self.config.dir)(source);
            self.failed.store(true, Ordering::Release);
            self.stats().write_error = Some(error.to_string());
            error
        }
    }

    /// Counts the drops a flush now covers.
    fn commit_drops(&self) {
        let dropped: u64 = self
            .unflushed_drops
            .lock()
            .expect("drops lock")
            .drain(..)
            .map(|(_, p)| p)
            .sum();
        self.stats().dropped_points += dropped;
    }
}

impl Queue {
    /// Opens (or creates) the queue and starts its writer on the current tokio runtime.
    pub fn open(config: QueueConfig) -> Result<Opened, QueueError> {
        check_writable(&config.dir)?;
        let volume = Volume::new(&config.dir);
        let (store, moved_aside) = match open_store(&config, &volume) {
            Ok(store) => (store, None),
            Err(e @ (sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_))) => {
                let aside = PathBuf::from(format!("{}.corrupt-{}", config.dir.display(), now_ns() / 1_000_000_000));
                error!(queue = %config.dir.display(), moved_to = %aside.display(), error = %e, "the queue is corrupt: moving it aside and starting a fresh one");
                std::fs::rename(&config.dir, &aside).map_err(|source| QueueError::MoveAside {
                    path: config.dir.clone(),
                    source,
                })?;
                (open_store(&config, &volume).map_err(storage(&config.dir))?, Some(aside))
            }
            Err(e) => return Err(storage(&config.dir)(e)),
        };
        let dir = config.dir.clone();
        let err = storage(&dir);
        let epoch = if let Some(epoch) = u64_at(&store.meta, "epoch").map_err(&err)? {
            epoch
        } else {
            let epoch = fastrand::u64(1..);
            store.meta.insert("epoch", &epoch.to_be_bytes()).map_err(&err)?;
            store.meta.insert("format", &1u64.to_be_bytes()).map_err(&err)?;
            store.flush().map_err(&err)?;
            sync_new_files(&config.dir).map_err(|e| err(sled::Error::Io(e)))?;
            epoch
        };
        let (mut stats, totals) = summary::summarize(&store.records, &store.meta, &store.db).map_err(&err)?;
        (stats.retained_records, stats.retained_bytes) = retained::summarize(&store.retained).map_err(&err)?;
        let next = next_sequence(&store).map_err(&err)?;
        volume.ensure_reserve();
        stats.volume_available_bytes = volume.space().map(|s| s.available);
        info!(queue = %config.dir.display(), epoch = format!("{epoch:016x}"), records = stats.records, points = stats.points, "queue opened");
        let (appends, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            config,
            store: RwLock::new(Some(Arc::new(store))),
            volume,
            epoch,
            durable_next: AtomicU64::new(next),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            unflushed_drops: Mutex::new(Vec::new()),
            stats: Mutex::new(stats),
            totals: Mutex::new(totals),
            room: Notify::new(),
            appended: Notify::new(),
            recent: Mutex::default(),
            closing: CancellationToken::new(),
            writer: Mutex::new(None),
        });
        let task = tokio::spawn(writer(Arc::clone(&shared), rx, next));
        *shared.writer.lock().expect("writer lock") = Some(task);
        Ok(Opened {
            queue: Self { shared, appends },
            moved_aside,
        })
    }

    /// The queue's epoch (random, fixed for its life).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// The queue's figures, from memory: the disk's (`disk_bytes`,
    /// `volume_available_bytes`) are as of the writer's last measure, at most
    /// [`DISK_MEASURE_PERIOD`] old.
    pub fn stats(&self) -> QueueStats {
        self.shared.stats().clone()
    }

    /// [`Queue::stats`] with the disk's figures measured now (on the blocking pool).
    pub async fn measured_stats(&self) -> QueueStats {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.measure_disk()).await;
        self.stats()
    }

    /// Records not yet acknowledged.
    pub fn records(&self) -> u64 {
        self.shared.stats().records
    }

    /// Whether `pausePolling` is holding appends back.
    pub fn is_paused(&self) -> bool {
        self.shared.stats().paused
    }

    /// Stores `batches`; returns once they are on disk.
    pub async fn append<B: Into<StoredBatch>>(&self, batches: impl IntoIterator<Item = B>) -> Result<(), QueueError> {
        let batches: Vec<StoredBatch> = batches.into_iter().map(Into::into).collect();
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

    /// Up to `max` flushed records with a sequence above `after` (from the head when
    /// `None`), in order. Memory is bounded by `max`, whatever the backlog.
    pub async fn read(&self, after: Option<u64>, max: usize) -> Result<Vec<Stored>, QueueError> {
        let start = after.map_or(0, |s| s.saturating_add(1));
        let durable = self.shared.durable_next.load(Ordering::Acquire);
        if start >= durable {
            return Ok(Vec::new());
        }
        if after.is_some()
            && let Some(records) = self.shared.recent.lock().expect("recent lock").read(start, max)
        {
            return Ok(records);
        }
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            let mut out = Vec::with_capacity(max.min(1024));
            for entry in store
                .records
                .range(start.to_be_bytes()..durable.to_be_bytes())
                .take(max)
            {
                let (key, value) = entry.map_err(&err)?;
                let sequence = sequence_of(&key);
                match record::decode(&value) {
                    Ok(record) => out.push(Stored { sequence, record }),
                    Err(e) => {
                        error!(sequence, error = %e, "skipping a corrupt queue record; its points are lost");
                        let counted = summary::counted_for(&store.records, sequence).map_err(&err)?;
                        summary::note_hole(&store.meta, sequence).map_err(&err)?;
                        store.records.remove(&key).map_err(&err)?;
                        let counted = counted.unwrap_or(record::Totals {
                            points: 0,
                            bytes: value.len() as u64,
                        });
                        uncount(&shared, counted.points, counted.bytes);
                        shared.stats().corrupt_records += 1;
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

    /// Takes the publisher's acknowledged prefix: every record up to and including the
    /// last of `acked` (in sequence order) leaves `records`. With a retention it moves to
    /// `retained` with its parts' stream sequences, and retained records acknowledged
    /// longer ago than the retention leave.
    ///
    /// On the blocking pool, once per chunk the publisher acknowledges. It ran on the
    /// caller's thread while an ack only removed records (in-memory log entries), where a
    /// round trip through the pool cost more than the removal; with a retention every
    /// acknowledged record is written again, and sled's writes wait for its log buffers,
    /// so on a slow disk the publisher's runtime thread would wait too.
    pub async fn ack(&self, acked: Vec<Acked>) -> Result<(), QueueError> {
        let Some(last) = acked.last().map(|a| a.sequence) else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        blocking(move || ack_through(&shared, &acked, last)).await?;
        self.shared.room.notify_waiters();
        Ok(())
    }

    /// The retained records from `from` through `through`, decoded, each with its ack,
    /// in one pass (one that does not decode is logged and left out).
    pub async fn read_retained(&self, from: u64, through: u64) -> Result<Vec<(Stored, RetainedAck)>, QueueError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            let mut out = Vec::new();
            for entry in store.retained.range(from.to_be_bytes()..=through.to_be_bytes()) {
                let (key, entry) = entry.map_err(&err)?;
                let sequence = sequence_of(&key);
                if let Some((ack, Ok(record))) =
                    retained::decode(&entry).map(|(ack, value)| (ack, record::decode(value)))
                {
                    out.push((Stored { sequence, record }, ack));
                } else {
                    error!(
                        sequence,
                        "skipping a corrupt retained record; it cannot be published again"
                    );
                }
            }
            Ok(out)
        })
        .await
    }

    /// The first and last retained sequences, when there are any.
    pub async fn retained_bounds(&self) -> Result<Option<(u64, u64)>, QueueError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            let first = store.retained.first().map_err(&err)?;
            let last = store.retained.last().map_err(&err)?;
            Ok(first
                .zip(last)
                .map(|((f, _), (l, _))| (sequence_of(&f), sequence_of(&l))))
        })
        .await
    }

    /// The first retained record at or after `sequence`, and its ack.
    pub async fn retained_at_or_after(&self, sequence: u64) -> Result<Option<(u64, RetainedAck)>, QueueError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            for entry in store.retained.range(sequence.to_be_bytes()..) {
                let (key, value) = entry.map_err(&err)?;
                if let Some((ack, _)) = retained::decode(&value) {
                    return Ok(Some((sequence_of(&key), ack)));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Notes that JetStream stored a retained record again, at `stream_sequences`: it is
    /// kept for another retention, since the broker has not synced it yet either.
    pub async fn reack(&self, sequence: u64, stream_sequences: Vec<u64>) -> Result<(), QueueError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            let key = sequence.to_be_bytes();
            if let Some(entry) = store.retained.get(key).map_err(&err)?
                && let Some(entry) = retained::reacked(&entry, now_ns(), &stream_sequences)
            {
                store.retained.insert(key, entry).map_err(&err)?;
            }
            Ok(())
        })
        .await
    }

    /// The ingestor is stopping: appends still come (what the pipeline holds), but the
    /// writer stops waiting for room (`pausePolling` writes them past the limit, by at
    /// most what is in flight) and gives up a write that keeps failing.
    pub fn stop_waiting(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.room.notify_waiters();
    }

    /// Shuts the queue down: the writer writes what was already handed to it and ends
    /// (appends through any handle fail with `Closed` from then on), and a last flush
    /// covers the deletions of acknowledged records. When no other handle is left, the
    /// database's file lock is released on return and the queue can be opened again.
    /// It used to wait for every other handle to go, polling their count for up to a
    /// second, and a handle kept elsewhere kept the writer running after the close.
    pub async fn close(self) -> Result<(), QueueError> {
        let Self { shared, appends } = self;
        drop(appends);
        shared.closing.cancel();
        let task = shared.writer.lock().expect("writer lock").take();
        if let Some(task) = task {
            task.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        }
        let store = shared.store()?;
        let flushed = Arc::clone(&shared);
        blocking(move || store.flush().map_err(flushed.storage_error())).await?;
        shared.commit_drops();
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

/// Opens sled; opening writes, so on a full disk the reserve file is given up for it.
fn open_store(config: &QueueConfig, volume: &Volume) -> Result<Store, sled::Error> {
    match Store::open(config) {
        Err(sled::Error::Io(e)) if volume.release_reserve() => {
            warn!(error = %e, "opening the queue failed; trying again with the reserve file's space");
            Store::open(config)
        }
        other => other,
    }
}

/// Runs `f` on the blocking pool: sled calls, fsyncs, statvfs and the reserve file's
/// writes never run on a runtime thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// How often the writer measures the disk's figures for [`Queue::stats`].
pub const DISK_MEASURE_PERIOD: Duration = Duration::from_secs(1);

/// Removes the head records through `last`, moving them to the retained tree (with the
/// stream sequences `acked` lists) unless there is no retention (blocking).
fn ack_through(shared: &Shared, acked: &[Acked], last: u64) -> Result<(), QueueError> {
    let store = shared.store()?;
    let retention = shared.config.acked_retention;
    // Moving a record writes it again: on a short disk that space goes to new points
    // (found by tests/disk_full.rs, where the moves took what the acks had freed).
    if retention.is_zero() || shared.stats().disk_full {
        remove_head(shared, &store, |key| key <= last, false, |_, _| Ok(()))?;
        if retention.is_zero() {
            // What an earlier run with a retention kept.
            remove_retained(shared, &store, |_| true)?;
        }
    } else {
        let now = now_ns();
        let err = shared.storage_error();
        remove_head(
            shared,
            &store,
            |key| key <= last,
            false,
            |sequence, value| {
                let streams = acked
                    .binary_search_by_key(&sequence, |a| a.sequence)
                    .map_or(&[][..], |i| acked[i].stream_sequences.as_slice());
                let entry = retained::encode(now, streams, value);
                let bytes = entry.len() as u64;
                store.retained.insert(sequence.to_be_bytes(), entry).map_err(&err)?;
                let mut stats = shared.stats();
                stats.retained_records += 1;
                stats.retained_bytes += bytes;
                Ok(())
            },
        )?;
        let cutoff = now - i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
        remove_retained(shared, &store, |ack| ack.acked_ns < cutoff)?;
    }
    Ok(())
}

/// Removes head records while `take(sequence)` holds, each after `keep(sequence, value)`;
/// `dropped` counts their points as dropped by the full policy. Returns the payload bytes
/// freed.
fn remove_head(
    shared: &Shared,
    store: &Store,
    take: impl Fn(u64) -> bool,
    dropped: bool,
    mut keep: impl FnMut(u64, &[u8]) -> Result<(), QueueError>,
) -> Result<u64, QueueError> {
    let err = shared.storage_error();
    let mut freed = 0;
    while let Some((key, value)) = store.records.first().map_err(&err)? {
        let sequence = sequence_of(&key);
        if !take(sequence) {
            break;
        }
        shared.recent.lock().expect("recent lock").remove_through(sequence);
        keep(sequence, &value)?;
        if store.records.remove(&key).map_err(&err)?.is_none() {
            continue;
        }
        let points = record::header(&value).map_or(0, |(p, _)| u64::from(p));
        freed += value.len() as u64;
        uncount(shared, points, value.len() as u64);
        if dropped {
            shared
                .unflushed_drops
                .lock()
                .expect("drops lock")
                .push((sequence, points));
        }
    }
    let oldest = store
        .records
        .first()
        .map_err(&err)?
        .and_then(|(_, v)| record::header(&v).ok())
        .map(|(_, at)| at);
    shared.stats().oldest_enqueued_ns = oldest;
    Ok(freed)
}

/// Removes retained records from the oldest while `take` holds for their ack; returns the
/// bytes freed.
fn remove_retained(
    shared: &Shared,
    store: &Store,
    mut take: impl FnMut(&RetainedAck) -> bool,
) -> Result<u64, QueueError> {
    let err = shared.storage_error();
    let mut freed = 0;
    while let Some((key, value)) = store.retained.first().map_err(&err)? {
        if retained::decode(&value).is_some_and(|(ack, _)| !take(&ack)) {
            break;
        }
        store.retained.remove(&key).map_err(&err)?;
        freed += value.len() as u64;
        let mut stats = shared.stats();
        stats.retained_records = stats.retained_records.saturating_sub(1);
        stats.retained_bytes = stats.retained_bytes.saturating_sub(value.len() as u64);
    }
    Ok(freed)
}

/// A new queue's files and their names reach the disk: sled writes its `conf` file
/// without an fsync, and a power cut would leave it empty.
fn sync_new_files(dir: &Path) -> std::io::Result<()> {
    File::open(dir.join("conf"))?.sync_all()?;
    File::open(dir)?.sync_all()
}

/// The writer task: gathers appends for one flush interval, writes them as records of
/// about `record_bytes`, flushes once, then answers every appender. A group that cannot
/// be written is kept and written again once sled is reopened; only shutdown gives up.
async fn writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Append>, mut next_seq: u64) {
    let mut closed = false;
    let mut measure = tokio::time::interval(DISK_MEASURE_PERIOD);
    measure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            // What was sent before the close is still received, then `None`.
            () = shared.closing.cancelled(), if !closed => {
                rx.close();
                closed = true;
                continue;
            }
            _ = measure.tick() => {
                let shared = Arc::clone(&shared);
                blocking(move || shared.measure_disk()).await;
                continue;
            }
            append = rx.recv() => match append {
                Some(append) => append,
                None => break,
            },
        };
        let deadline = tokio::time::Instant::now() + shared.config.flush_interval;
        let mut group = vec![first];
        while let Ok(Some(more)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            group.push(more);
        }
        let (batches, waiters): (Vec<Vec<StoredBatch>>, Vec<_>) =
            group.into_iter().map(|a| (a.batches, a.done)).unzip();
        let batches: Vec<StoredBatch> = batches.into_iter().flatten().collect();
        let outcome = loop {
            let failure = match write_with_room(&shared, &batches, next_seq, &mut rx).await {
                Ok(next) => {
                    next_seq = next;
                    shared.stats().write_error = None;
                    shared.appended.notify_waiters();
                    break Ok(());
                }
                Err(failure) => failure,
            };
            error!(error = %failure, "cannot write to the queue; reopening it and writing the same points again");
            {
                let mut stats = shared.stats();
                stats.write_error = Some(failure.clone());
                stats.write_failures += 1;
            }
            if rx.is_closed() || shared.stopping.load(Ordering::Acquire) {
                break Err(failure);
            }
            reopen_until_open(&shared, next_seq, &rx).await;
        };
        if let Err(failure) = &outcome {
            error!(error = %failure, "shutting down with a group the queue could not write; its points are lost");
        }
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Applies the full policy for `batches`, then writes them from `first_seq` on; returns
/// the next sequence, or why the write failed.
async fn write_with_room(
    shared: &Arc<Shared>,
    batches: &[StoredBatch],
    first_seq: u64,
    rx: &mut mpsc::Receiver<Append>,
) -> Result<u64, String> {
    let now = now_ns();
    let start = *shared.totals.lock().expect("totals lock");
    let records = pack(batches, shared.config.record_bytes, now, start);
    let incoming: u64 = records.iter().map(|(value, _)| value.len() as u64).sum();
    let failed = |shared: &Shared| {
        // A read, an acknowledgement or the full policy's drop found sled failed.
        shared.failed.load(Ordering::Acquire).then(|| {
            shared
                .stats()
                .write_error
                .clone()
                .unwrap_or_else(|| "sled failed".into())
        })
    };
    // The usual case in one trip to the blocking pool: the group fits and is written.
    let shared2 = Arc::clone(shared);
    let records = match blocking(move || {
        if let Some(failure) = failed(&shared2) {
            return Ok(Err(failure));
        }
        if !fits(&shared2, incoming).0 {
            return Err(records);
        }
        shared2.volume.ensure_reserve();
        Ok(write_group(&shared2, records, first_seq, now).map_err(|e| e.to_string()))
    })
    .await
    {
        Ok(written) => return written,
        Err(records) => records,
    };
    make_room(shared, incoming, rx).await;
    if let Some(failure) = failed(shared) {
        return Err(failure);
    }
    let shared2 = Arc::clone(shared);
    blocking(move || write_group(&shared2, records, first_seq, now))
        .await
        .map_err(|e| e.to_string())
}

/// Batches as record values of about `record_bytes` each, each after the totals of the
/// ones before it, and each value's record as reading it gives it back.
fn pack(batches: &[StoredBatch], record_bytes: usize, now: i64, mut totals: record::Totals) -> Vec<(Vec<u8>, Record)> {
    let mut records = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, batch) in batches.iter().enumerate() {
        bytes += record::batch_size(batch);
        if bytes >= record_bytes || i + 1 == batches.len() {
            let value = record::encode(&batches[start..=i], now, totals);
            let points = record::header(&value).map_or(0, |(p, _)| p);
            let record = Record {
                points,
                enqueued_ns: now,
                batches: batches[start..=i].to_vec(),
                before: Some(totals),
            };
            totals = totals.then(u64::from(points), value.len() as u64);
            records.push((value, record));
            start = i + 1;
            bytes = 0;
        }
    }
    records
}

/// Writes record values from `first_seq` on, then the next sequence, flushes, and only
/// then counts them and lets the publisher see them. Returns the next sequence.
fn write_group(shared: &Shared, records: Vec<(Vec<u8>, Record)>, first_seq: u64, now: i64) -> Result<u64, QueueError> {
    let err = shared.storage_error();
    let store = shared.store()?;
    let mut next = first_seq;
    for (value, _) in &records {
        store
            .records
            .insert(next.to_be_bytes(), value.as_slice())
            .map_err(&err)?;
        next += 1;
    }
    store.meta.insert("next_seq", &next.to_be_bytes()).map_err(&err)?;
    store.flush().map_err(&err)?;
    shared.commit_drops();
    let mut totals = shared.totals.lock().expect("totals lock");
    let mut recent = shared.recent.lock().expect("recent lock");
    for ((value, record), sequence) in records.into_iter().zip(first_seq..) {
        let points = u64::from(record.points);
        count(shared, points, value.len() as u64, now);
        *totals = totals.then(points, value.len() as u64);
        recent.push(Stored { sequence, record });
    }
    shared.durable_next.store(next, Ordering::Release);
    Ok(next)
}

fn next_sequence(store: &Store) -> Result<u64, sled::Error> {
    let stored = u64_at(&store.meta, "next_seq")?.unwrap_or(0);
    let after_last = store.records.last()?.map_or(0, |(k, _)| sequence_of(&k) + 1);
    Ok(stored.max(after_last))
}

/// Reopens sled after a failed write, once a second until it opens or the queue shuts
/// down. Records at or after `next_seq` were never flushed as a group nor seen by the
/// publisher: whatever of them sled kept is removed, and the group is written again.
async fn reopen_until_open(shared: &Arc<Shared>, next_seq: u64, rx: &mpsc::Receiver<Append>) {
    loop {
        let shared2 = Arc::clone(shared);
        match blocking(move || reopen(&shared2, next_seq)).await {
            Ok(()) => {
                info!(queue = %shared.config.dir.display(), "queue reopened after a failed write");
                return;
            }
            Err(e) => {
                error!(error = %e, "cannot reopen the queue; trying again in a second");
                shared.stats().write_error = Some(e.to_string());
            }
        }
        if rx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long reopening waits for readers to let go of the failed store.
const STORE_RELEASE_WAIT: Duration = Duration::from_secs(5);

fn reopen(shared: &Shared, next_seq: u64) -> Result<(), QueueError> {
    let err = storage(&shared.config.dir);
    let old = shared.store.write().expect("store lock").take();
    shared.recent.lock().expect("recent lock").clear();
    if let Some(old) = old {
        // Readers that cloned the store finish within their blocking call; sled's file
        // lock is released only when the last handle is gone.
        let (gone, released) = std::sync::mpsc::channel();
        *old.released.0.lock().expect("released lock") = Some(gone);
        drop(old);
        if released.recv_timeout(STORE_RELEASE_WAIT).is_err() {
            warn!(queue = %shared.config.dir.display(), "a reader still holds the failed queue; opening it again anyway");
        }
    }
    shared.volume.release_reserve();
    let store = Store::open(&shared.config).map_err(&err)?;
    let unflushed: Vec<sled::IVec> = store
        .records
        .range(next_seq.to_be_bytes()..)
        .keys()
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    for key in &unflushed {
        store.records.remove(key).map_err(&err)?;
    }
    store.flush().map_err(&err)?;
    // Removals are recovered as a prefix: a dropped record is gone if the head is past it.
    let head = store.records.first().map_err(&err)?.map(|(k, _)| sequence_of(&k));
    let dropped: u64 = shared
        .unflushed_drops
        .lock()
        .expect("drops lock")
        .drain(..)
        .filter(|(sequence, _)| head.is_none_or(|h| *sequence < h))
        .map(|(_, points)| points)
        .sum();
    let (stats, totals) = summary::summarize(&store.records, &store.meta, &store.db).map_err(&err)?;
    let (retained_records, retained_bytes) = retained::summarize(&store.retained).map_err(&err)?;
    {
        let mut current = shared.stats();
        *current = QueueStats {
            dropped_points: current.dropped_points + dropped,
            corrupt_records: current.corrupt_records,
            write_error: current.write_error.take(),
            write_failures: current.write_failures,
            retained_evicted: current.retained_evicted,
            retained_records,
            retained_bytes,
            ..stats
        };
    }
    *shared.totals.lock().expect("totals lock") = totals;
    *shared.store.write().expect("store lock") = Some(Arc::new(store));
    shared.failed.store(false, Ordering::Release);
    Ok(())
}

/// The payload the queue may hold now, and whether the disk (not `maxSize`) sets it
/// (blocking: a statvfs, and below the disk's margin sled's size on disk).
fn payload_limit(shared: &Shared) -> (u64, bool) {
    let configured = (shared.config.max_bytes as f64 / DISK_AMPLIFICATION) as u64;
    let disk_bytes = || shared.store().ok().and_then(|s| s.db.size_on_disk().ok()).unwrap_or(0);
    match shared.volume.payload_limit(disk_bytes) {
        Some(disk) if disk < configured => (disk, true),
        _ => (configured, false),
    }
}

/// Whether the queue holds more than `limit` payload bytes with `incoming` more; retained
/// records count, as they take the same disk.
fn over(shared: &Shared, incoming: u64, limit: u64) -> bool {
    let stats = shared.stats();
    stats.payload_bytes + stats.retained_bytes + incoming > limit
}

/// Gives up retained records, oldest first, until `incoming` more bytes fit: keeping
/// acknowledged points for a broker's power cut never costs a point not yet delivered.
async fn evict_retained(shared: &Arc<Shared>, incoming: u64, limit: u64) {
    let shared2 = Arc::clone(shared);
    let evicted: Result<u64, QueueError> = blocking(move || {
        let store = shared2.store()?;
        let mut records = 0;
        remove_retained(&shared2, &store, |_| {
            let take = over(&shared2, incoming, limit);
            records += u64::from(take);
            take
        })?;
        Ok(records)
    })
    .await;
    match evicted {
        Ok(0) => {}
        Ok(records) => {
            shared.stats().retained_evicted += records;
            warn!(
                records,
                "queue full: gave up acknowledged records before their retention ended; a broker power cut now could lose them"
            );
        }
        Err(e) => error!(error = %e, "queue full, and giving up retained records failed"),
    }
}

/// Whether `incoming` more payload bytes fit, and the limit they were held against
/// (blocking: see [`payload_limit`]); notes whether the disk is what is full.
fn fits(shared: &Shared, incoming: u64) -> (bool, u64) {
    let (limit, by_disk) = payload_limit(shared);
    let fits = !over(shared, incoming, limit);
    shared.stats().disk_full = by_disk && !fits;
    (fits, limit)
}

/// Applies the full policy before `incoming` payload bytes are written.
async fn make_room(shared: &Arc<Shared>, incoming: u64, rx: &mut mpsc::Receiver<Append>) {
    // Whether `incoming` fits, once retained records gave way if they must.
    let fits_after_eviction = async |shared: &Arc<Shared>| {
        let check = |shared: &Arc<Shared>| {
            let shared = Arc::clone(shared);
            blocking(move || fits(&shared, incoming))
        };
        let (fit, limit) = check(shared).await;
        if fit || shared.stats().retained_records == 0 {
            return (fit, limit);
        }
        evict_retained(shared, incoming, limit).await;
        check(shared).await
    };
    let (fit, limit) = fits_after_eviction(shared).await;
    if fit {
        let shared = Arc::clone(shared);
        blocking(move || shared.volume.ensure_reserve()).await;
        return;
    }
    match shared.config.policy {
        FullPolicy::DropOldest => {
            let shared2 = Arc::clone(shared);
            let dropped = blocking(move || {
                let over = |s: &Shared| over(s, incoming, limit);
                let store = shared2.store()?;
                remove_head(&shared2, &store, |_| over(&shared2), true, |_, _| Ok(()))
            })
            .await;
            match dropped {
                Ok(freed) => warn!(
                    freed_bytes = freed,
                    disk_full = shared.stats().disk_full,
                    "queue full: dropped the oldest points (policy dropOldest)"
                ),
                Err(e) => error!(error = %e, "queue full, and dropping the oldest points failed"),
            }
        }
        FullPolicy::PausePolling => {
            shared.stats().paused = true;
            warn!(
                disk_full = shared.stats().disk_full,
                "queue full: holding new points until the broker takes some (policy pausePolling)"
            );
            while !fits_after_eviction(shared).await.0 {
                // Appends wait in the channel meanwhile; when it fills, pollers wait too.
                let room = shared.room.notified();
                if rx.is_closed() || shared.failed.load(Ordering::Acquire) || shared.stopping.load(Ordering::Acquire) {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), room).await;
            }
            shared.stats().paused = false;
            info!("queue has room again; polling resumes");
        }
    }
}

/// Counts one record in the queue's figures.
fn count(shared: &Shared, points: u64, bytes: u64, enqueued_ns: i64) {
    let mut stats = shared.stats();
    stats.records += 1;
    stats.points += points;
    stats.payload_bytes += bytes;
    stats.oldest_enqueued_ns.get_or_insert(enqueued_ns);
}

/// Takes one record out of the queue's figures.
fn uncount(shared: &Shared, points: u64, bytes: u64) {
    let mut stats = shared.stats();
    stats.records = stats.records.saturating_sub(1);
    stats.points = stats.points.saturating_sub(points);
    stats.payload_bytes = stats.payload_bytes.saturating_sub(bytes);
}
