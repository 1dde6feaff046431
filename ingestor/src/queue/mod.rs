//! The queue between acquisition and publishing: memory first, sled for what JetStream
//! does not acknowledge within the flush interval.
//!
//! # Invariants
//! - A point is safe once JetStream acknowledged it **or** the queue flushed it to sled
//!   (a sled flush that covers it and an fsync of sled's file), and `append` returns `Ok`
//!   only then. A record is published from memory ([`memory`]) as soon as it is appended;
//!   at each group commit the writer writes to sled only the records JetStream has not
//!   acknowledged by then. A SIGKILL or a power cut loses at most what was appended
//!   within about one flush interval and not acknowledged. sled's own flush ends in
//!   `sync_file_range`, which neither writes the file's size nor empties the disk's
//!   cache: a power cut lost what it had covered (found with `tests/power_cut.rs`'s
//!   filesystem, which keeps only what was fsynced).
//! - Records are keyed by a big-endian `u64` sequence that only grows within an epoch,
//!   also across restarts and after the queue drained, so a `(epoch, sequence)` never
//!   names two different records. Sequences are handed out from a block reserved on disk
//!   first (`next_seq` in `meta` holds the end of the block, fsynced before any sequence
//!   of it is used; reopening starts after it): a record published from memory and lost
//!   with the process never has its message id reused by new points, which JetStream
//!   would drop as duplicates.
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
//! An append packs its batches into records of up to about [`QueueConfig::record_bytes`]
//! and puts them in memory. One writer task commits a flush interval after the oldest
//! record in memory only: it writes the records of that age or at least half an interval
//! old that are still unacknowledged, and the acknowledged ones `ackedRetention` keeps,
//! then flushes once. Records of a few KiB keep sled's memory flat (see
//! `../shared/DESIGN.md`: tiny records cost ~25 B of RAM each, records of tens of KiB
//! balloon RSS); an appender waits until its points are safe, so while the broker is
//! behind, appends gather a flush interval's points each as they did before.
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
//! A group being written again after a failure keeps its records and sequences: they may
//! have been published from memory already, and JetStream drops the repeat.
//!
//! # Corruption
//! A database sled cannot open is moved aside to `<dir>.corrupt-<unix seconds>` and a
//! fresh queue (new epoch) is started, reported in [`Opened::moved_aside`]. A record that
//! does not decode is skipped and counted as lost; it never stops the queue.

mod memory;
pub mod record;
pub mod retained;
mod summary;
pub mod volume;

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tagstream_crds::site::FullPolicy;
use tokio::sync::{Notify, oneshot};
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
    /// Most bytes of records held in memory (encoded): the unacknowledged ones, and the
    /// acknowledged ones waiting for `retained`.
    pub memory_bytes: usize,
}

impl QueueConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: 1 << 30,
            policy: FullPolicy::DropOldest,
            flush_interval: Duration::from_millis(20),
            cache_bytes: 32 << 20,
            record_bytes: 8 << 10,
            acked_retention: Duration::from_secs(150),
            memory_bytes: 4 << 20,
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
    /// Records held in memory (unacknowledged; some also in sled), and their bytes.
    pub memory_records: u64,
    pub memory_bytes: u64,
    /// Records written to sled because JetStream had not acknowledged them in time.
    pub records_written: u64,
    /// Group writes (each one sled flush and fsync).
    pub groups_written: u64,
    /// Records JetStream acknowledged before any write.
    pub records_acked_from_memory: u64,
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
    /// The records not yet acknowledged, the sequences and the appenders' answers.
    memory: Mutex<memory::Memory>,
    /// Held while a group's records are inserted and while acknowledged records are
    /// removed, so that a removal never comes before the insert it removes.
    sled_records: Mutex<()>,
    /// Held while a block of sequences is reserved on disk.
    reserving: Mutex<()>,
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
    /// Figures of the records in sled (memory's are added by [`Queue::stats`]).
    stats: Mutex<QueueStats>,
    /// Woken when the publisher frees room (for `pausePolling`).
    room: Notify,
    /// Woken when records were appended (for the publisher).
    appended: Notify,
    /// Wakes the writer: records arrived in an empty memory, or memory is full.
    commit_due: Notify,
    /// Woken when memory has room again (for appenders).
    memory_room: Notify,
    /// Cancelled by `close`: the writer writes what memory holds, then ends.
    closing: CancellationToken,
    /// The writer task, awaited by `close`.
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A handle to the queue; clones share it.
#[derive(Clone, Debug)]
pub struct Queue {
    shared: Arc<Shared>,
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

    fn memory(&self) -> std::sync::MutexGuard<'_, memory::Memory> {
        self.memory.lock().expect("memory lock")
    }

    /// Reserves on disk every sequence below `through` (and a block more), unless it is
    /// already (blocking: a sled write and a flush, once per [`SEQUENCE_BLOCK`] records).
    fn reserve(&self, through: u64) -> Result<(), QueueError> {
        let _one_at_a_time = self.reserving.lock().expect("reserving lock");
        if through <= self.memory().reserved {
            return Ok(());
        }
        let end = through + SEQUENCE_BLOCK;
        let store = self.store()?;
        let err = self.storage_error();
        store.meta.insert("next_seq", &end.to_be_bytes()).map_err(&err)?;
        store.flush().map_err(&err)?;
        self.memory().reserved = end;
        Ok(())
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
        let shared = Arc::new(Shared {
            config,
            store: RwLock::new(Some(Arc::new(store))),
            volume,
            epoch,
            memory: Mutex::new(memory::Memory::new(next, totals)),
            sled_records: Mutex::new(()),
            reserving: Mutex::new(()),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            unflushed_drops: Mutex::new(Vec::new()),
            stats: Mutex::new(stats),
            room: Notify::new(),
            appended: Notify::new(),
            commit_due: Notify::new(),
            memory_room: Notify::new(),
            closing: CancellationToken::new(),
            writer: Mutex::new(None),
        });
        let task = tokio::spawn(writer(Arc::clone(&shared)));
        *shared.writer.lock().expect("writer lock") = Some(task);
        Ok(Opened {
            queue: Self { shared },
            moved_aside,
        })
    }

    /// The queue's epoch (random, fixed for its life).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// The queue's figures, from memory: the disk's (`disk_bytes`,
    /// `volume_available_bytes`) are as of the writer's last measure, at most
    /// [`DISK_MEASURE_PERIOD`] old. Records, points and the oldest point count both tiers;
    /// `payload_bytes` is sled's.
    pub fn stats(&self) -> QueueStats {
        let (unwritten, unwritten_points, oldest, held, bytes, acked_from_memory) = {
            let memory = self.shared.memory();
            let (records, points) = memory.unwritten();
            (
                records,
                points,
                memory.oldest_unwritten_ns(),
                memory.held() as u64,
                memory.bytes() as u64,
                memory.acked_unwritten,
            )
        };
        let mut stats = self.shared.stats().clone();
        stats.records += unwritten;
        stats.points += unwritten_points;
        stats.oldest_enqueued_ns = stats.oldest_enqueued_ns.or(oldest);
        stats.memory_records = held;
        stats.memory_bytes = bytes;
        stats.records_acked_from_memory = acked_from_memory;
        stats
    }

    /// [`Queue::stats`] with the disk's figures measured now (on the blocking pool).
    pub async fn measured_stats(&self) -> QueueStats {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.measure_disk()).await;
        self.stats()
    }

    /// Records not yet acknowledged.
    pub fn records(&self) -> u64 {
        self.shared.stats().records + self.shared.memory().unwritten().0
    }

    /// Whether `pausePolling` is holding appends back.
    pub fn is_paused(&self) -> bool {
        self.shared.stats().paused
    }

    /// Queues `batches`: the publisher may send them at once. Returns once they are safe:
    /// acknowledged by JetStream, or flushed to sled.
    pub async fn append<B: Into<StoredBatch>>(&self, batches: impl IntoIterator<Item = B>) -> Result<(), QueueError> {
        let batches: Vec<StoredBatch> = batches.into_iter().map(Into::into).collect();
        if batches.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        let limit = shared.config.memory_bytes;
        // Memory full: the writer writes what is due and the publisher's acks free the
        // rest; appenders wait meanwhile (and through the bounded channels, the pollers).
        loop {
            let room = shared.memory_room.notified();
            let full = {
                let mut memory = shared.memory();
                memory.evict(limit);
                memory.bytes() >= limit
            };
            if !full || shared.stopping.load(Ordering::Acquire) {
                break;
            }
            shared.commit_due.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(100), room).await;
        }
        let now = now_ns();
        let (done, wait) = oneshot::channel();
        loop {
            let needed = {
                let mut memory = shared.memory();
                if memory.closed {
                    return Err(QueueError::Closed);
                }
                let (records, totals) = pack(&batches, shared.config.record_bytes, now, memory.totals);
                let through = memory.next + records.len() as u64;
                if through <= memory.reserved {
                    let first_in_memory = memory.unwritten().0 == 0;
                    memory.totals = totals;
                    memory.push(records, done);
                    memory.evict(limit);
                    drop(memory);
                    shared.appended.notify_waiters();
                    if first_in_memory {
                        shared.commit_due.notify_one();
                    }
                    break;
                }
                through
            };
            let reserving = Arc::clone(shared);
            if let Err(e) = blocking(move || reserving.reserve(needed)).await {
                if shared.stopping.load(Ordering::Acquire) || shared.closing.is_cancelled() {
                    return Err(e);
                }
                warn!(error = %e, "cannot reserve queue sequences; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(QueueError::Storage {
                path: shared.config.dir.clone(),
                source: sled::Error::Io(std::io::Error::other(message)),
            }),
            Err(_) => Err(QueueError::Closed),
        }
    }

    /// Up to `max` records with a sequence above `after` (from the first unacknowledged
    /// one when `None`), in order: from memory when it holds them, else from sled, whose
    /// records are all older than memory's. Memory is bounded by `max`, whatever the backlog.
    pub async fn read(&self, after: Option<u64>, max: usize) -> Result<Vec<Stored>, QueueError> {
        let (start, sled_end) = {
            let memory = self.shared.memory();
            let start = after.or(memory.acked_through).map_or(0, |s| s.saturating_add(1));
            if let Some(records) = memory.read(start, max) {
                return Ok(records);
            }
            (start, memory.first_held())
        };
        let shared = Arc::clone(&self.shared);
        let from_sled = blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            let mut out = Vec::with_capacity(max.min(1024));
            for entry in store
                .records
                .range(start.to_be_bytes()..sled_end.to_be_bytes())
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
            Ok::<_, QueueError>(out)
        })
        .await?;
        if !from_sled.is_empty() {
            return Ok(from_sled);
        }
        // Acknowledged or evicted between the two looks: memory has what follows.
        Ok(self.shared.memory().read(sled_end, max).unwrap_or_default())
    }

    /// Waits until records are appended, or `at_most` passes.
    pub async fn wait_for_records(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.shared.appended.notified()).await;
    }

    /// Takes the publisher's acknowledged prefix: every record up to and including the
    /// last of `acked` (in sequence order) leaves the queue. With a retention it goes to
    /// `retained` with its parts' stream sequences (one never written waits in memory for
    /// the next group write), and retained records acknowledged longer ago than the
    /// retention leave.
    ///
    /// Records acknowledged before any write leave memory only, on the caller's thread.
    /// Records in sled leave on the blocking pool: with a retention every one is written
    /// again, and sled's writes wait for its log buffers, so on a slow disk the
    /// publisher's runtime thread would wait too.
    pub async fn ack(&self, acked: Vec<Acked>) -> Result<(), QueueError> {
        let Some(last) = acked.last().map(|a| a.sequence) else {
            return Ok(());
        };
        let shared = &self.shared;
        let retain = !shared.config.acked_retention.is_zero() && !shared.stats().disk_full;
        let claimed = shared.memory().ack(last, &acked, retain, now_ns());
        shared.memory_room.notify_waiters();
        if claimed || shared.stats().records > 0 {
            let shared = Arc::clone(shared);
            blocking(move || ack_through(&shared, &acked, last)).await?;
            self.shared.room.notify_waiters();
        }
        Ok(())
    }

    /// Up to `max` retained records from `from` through `through`, decoded, each with its
    /// ack, in one pass (one that does not decode is logged and left out).
    pub async fn read_retained(
        &self,
        from: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<(Stored, RetainedAck)>, QueueError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let err = shared.storage_error();
            let mut out = Vec::new();
            for entry in store
                .retained
                .range(from.to_be_bytes()..=through.to_be_bytes())
                .take(max)
            {
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

    /// How many records are retained from `from` through `through` (sequences skip after
    /// a crash, so their difference does not tell).
    pub async fn retained_count(&self, from: u64, through: u64) -> Result<u64, QueueError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let store = shared.store()?;
            let mut count = 0;
            for key in store.retained.range(from.to_be_bytes()..=through.to_be_bytes()).keys() {
                key.map_err(shared.storage_error())?;
                count += 1;
            }
            Ok(count)
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

    /// Shuts the queue down: the writer writes what memory holds unacknowledged (past the
    /// size limit if it must, as at [`Queue::stop_waiting`]) and ends (appends through any
    /// handle fail with `Closed` from then on), and a last flush covers the deletions of
    /// acknowledged records. When no other handle is left, the database's file lock is
    /// released on return and the queue can be opened again.
    pub async fn close(self) -> Result<(), QueueError> {
        let Self { shared } = self;
        shared.stopping.store(true, Ordering::Release);
        shared.room.notify_waiters();
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

/// Sequences reserved on disk at a time: one sled write and fsync per this many records
/// (under 20 minutes at 100k points/s in records of 100 points), and at most this many
/// sequences skipped after a crash (of 2^64).
const SEQUENCE_BLOCK: u64 = 1 << 20;

/// How often the writer measures the disk's figures for [`Queue::stats`].
pub const DISK_MEASURE_PERIOD: Duration = Duration::from_secs(1);

/// Removes the head records through `last`, moving them to the retained tree (with the
/// stream sequences `acked` lists) unless there is no retention (blocking).
fn ack_through(shared: &Shared, acked: &[Acked], last: u64) -> Result<(), QueueError> {
    let store = shared.store()?;
    let _after_inserts = shared.sled_records.lock().expect("sled records lock");
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
        expire_retained(shared, &store, now)?;
    }
    Ok(())
}

/// Removes the retained records acknowledged longer ago than the retention.
fn expire_retained(shared: &Shared, store: &Store, now: i64) -> Result<(), QueueError> {
    let retention = i64::try_from(shared.config.acked_retention.as_nanos()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(retention);
    remove_retained(shared, store, |ack| ack.acked_ns < cutoff).map(drop)
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
        if dropped {
            shared.memory().dropped_through(sequence);
        }
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

/// The writer task: commits a flush interval after the oldest record written nowhere
/// (see [`commit`]) and at once when memory is full; at close it writes every record
/// memory holds unacknowledged, then answers whoever still waits.
async fn writer(shared: Arc<Shared>) {
    let interval = shared.config.flush_interval;
    let half = i64::try_from(interval.as_nanos() / 2).unwrap_or(i64::MAX);
    let mut measure = tokio::time::interval(DISK_MEASURE_PERIOD);
    measure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (due, full) = {
            let memory = shared.memory();
            let due = memory.oldest_unwritten_or_unretained_ns().map(|oldest| {
                let wait = oldest.saturating_add(2 * half).saturating_sub(now_ns()).max(0);
                tokio::time::Instant::now() + Duration::from_nanos(wait.unsigned_abs())
            });
            let full = memory.bytes() >= shared.config.memory_bytes && memory.claimable_bytes(i64::MAX) > 0;
            (due, full)
        };
        tokio::select! {
            biased;
            () = shared.closing.cancelled() => break,
            () = std::future::ready(()), if full => commit(&shared, i64::MAX).await,
            _ = measure.tick() => {
                let measuring = Arc::clone(&shared);
                blocking(move || measuring.measure_disk()).await;
                // A read or an acknowledgement found sled failed while no group was due.
                if shared.failed.load(Ordering::Acquire) {
                    reopen_until_open(&shared, None).await;
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                commit(&shared, now_ns().saturating_sub(half)).await;
            }
            () = shared.commit_due.notified() => {}
        }
    }
    shared.memory().closed = true;
    commit(&shared, i64::MAX).await;
    // A clean stop gives back the sequences reserved and not used, so that the next start
    // follows on without a gap (`close` flushes this).
    let releasing = Arc::clone(&shared);
    let released = blocking(move || {
        let next = releasing.memory().next;
        let store = releasing.store()?;
        store
            .meta
            .insert("next_seq", &next.to_be_bytes())
            .map_err(releasing.storage_error())
    })
    .await;
    if let Err(e) = released {
        warn!(error = %e, "cannot record where the queue's sequences stopped; the next start skips the rest of the block");
    }
    shared
        .memory()
        .fail_waiters("the queue closed before these points could be written");
}

/// What one group write takes from memory.
#[derive(Debug)]
struct Claim {
    records: Vec<Stored>,
    retain: Vec<memory::Retain>,
    /// Every sequence below it is in this claim, in an earlier group, or acknowledged.
    through: u64,
}

/// A group commit: claims from memory the unacknowledged records enqueued at or before
/// `cutoff_ns` and the acknowledged ones waiting for `retained`, applies the full policy,
/// writes them and flushes once. A write that fails is made again from the same claim
/// (less what JetStream acknowledged meanwhile) once sled is reopened; only shutdown
/// gives up.
async fn commit(shared: &Arc<Shared>, cutoff_ns: i64) {
    let incoming = shared.memory().claimable_bytes(cutoff_ns);
    if incoming == 0 {
        return;
    }
    let mut claim = None;
    loop {
        let failure = match write_with_room(shared, cutoff_ns, incoming, &mut claim).await {
            Ok(()) => {
                shared.stats().write_error = None;
                break;
            }
            Err(failure) => failure,
        };
        error!(error = %failure, "cannot write to the queue; reopening it and writing the same points again");
        {
            let mut stats = shared.stats();
            stats.write_error = Some(failure.clone());
            stats.write_failures += 1;
        }
        if shared.stopping.load(Ordering::Acquire) {
            error!(error = %failure, "shutting down with a group the queue could not write; its points are lost unless JetStream has them");
            shared.memory().fail_waiters(&failure);
            break;
        }
        let from = claim.as_ref().and_then(|c| c.records.first()).map(|s| s.sequence);
        reopen_until_open(shared, from).await;
    }
    shared.memory().evict(shared.config.memory_bytes);
    shared.memory_room.notify_waiters();
}

/// Applies the full policy for `incoming` bytes, then writes the group; returns why the
/// write failed. `claim` keeps what was claimed for a write made again.
async fn write_with_room(
    shared: &Arc<Shared>,
    cutoff_ns: i64,
    incoming: u64,
    claim: &mut Option<Claim>,
) -> Result<(), String> {
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
    let mut held = claim.take();
    let (held, written) = blocking(move || {
        if let Some(failure) = failed(&shared2) {
            return (held, Some(Err(failure)));
        }
        if !fits(&shared2, incoming).0 {
            return (held, None);
        }
        shared2.volume.ensure_reserve();
        let written = write_group(&shared2, cutoff_ns, &mut held).map_err(|e| e.to_string());
        (held, Some(written))
    })
    .await;
    *claim = held;
    if let Some(written) = written {
        return written;
    }
    make_room(shared, incoming).await;
    if let Some(failure) = failed(shared) {
        return Err(failure);
    }
    let shared2 = Arc::clone(shared);
    let mut held = claim.take();
    let (held, written) = blocking(move || {
        let written = write_group(&shared2, cutoff_ns, &mut held).map_err(|e| e.to_string());
        (held, written)
    })
    .await;
    *claim = held;
    written
}

/// Batches as records of about `record_bytes` each, each after the totals of the ones
/// before it; returns them and the totals after the last.
fn pack(
    batches: &[StoredBatch],
    record_bytes: usize,
    now: i64,
    mut totals: record::Totals,
) -> (Vec<Record>, record::Totals) {
    let mut records = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, batch) in batches.iter().enumerate() {
        bytes += record::batch_size(batch);
        if bytes >= record_bytes || i + 1 == batches.len() {
            let part = &batches[start..=i];
            let points: u64 = part.iter().map(|b| u64::from(b.points)).sum();
            let value_bytes = record::encoded_len(part, totals) as u64;
            records.push(Record {
                points: u32::try_from(points).unwrap_or(u32::MAX),
                enqueued_ns: now,
                batches: part.to_vec(),
                before: Some(totals),
            });
            totals = totals.then(points, value_bytes);
            start = i + 1;
            bytes = 0;
        }
    }
    (records, totals)
}

/// Claims the group (unless `claim` holds one being written again), inserts its records
/// and retained entries, flushes, and only then answers its appenders. Records are
/// counted as they are inserted, before an acknowledgement can remove them.
fn write_group(shared: &Shared, cutoff_ns: i64, claim: &mut Option<Claim>) -> Result<(), QueueError> {
    let err = shared.storage_error();
    let store = shared.store()?;
    let now = now_ns();
    let group = {
        let _before_removals = shared.sled_records.lock().expect("sled records lock");
        // A group written again leaves out what JetStream acknowledged since its failure
        // (its removal could not be made, and reopening removed the acknowledged records).
        // A new claim keeps everything: an acknowledgement that comes now waits for this
        // lock and then moves its records to `retained` with their stream sequences.
        let again = claim.is_some();
        let group = claim.get_or_insert_with(|| {
            let mut memory = shared.memory();
            let (records, retain) = memory.claim(cutoff_ns);
            Claim {
                records,
                retain,
                through: memory.unwritten,
            }
        });
        if again && let Some(acked) = shared.memory().acked_through {
            group.records.retain(|s| s.sequence > acked);
        }
        for stored in &group.records {
            let value = memory::value(&stored.record);
            store
                .records
                .insert(stored.sequence.to_be_bytes(), value.as_slice())
                .map_err(&err)?;
            count(
                shared,
                u64::from(stored.record.points),
                value.len() as u64,
                stored.record.enqueued_ns,
            );
        }
        for retain in &group.retain {
            let entry = retained::encode(
                retain.acked_ns,
                &retain.stream_sequences,
                &memory::value(&retain.record),
            );
            let bytes = entry.len() as u64;
            store
                .retained
                .insert(retain.sequence.to_be_bytes(), entry)
                .map_err(&err)?;
            let mut stats = shared.stats();
            stats.retained_records += 1;
            stats.retained_bytes += bytes;
        }
        group
    };
    if !group.retain.is_empty() {
        expire_retained(shared, &store, now)?;
    }
    store.flush().map_err(&err)?;
    shared.commit_drops();
    {
        let mut stats = shared.stats();
        stats.records_written += group.records.len() as u64;
        stats.groups_written += 1;
    }
    shared.memory().flushed_through(group.through);
    *claim = None;
    Ok(())
}

fn next_sequence(store: &Store) -> Result<u64, sled::Error> {
    let stored = u64_at(&store.meta, "next_seq")?.unwrap_or(0);
    let after_last = store.records.last()?.map_or(0, |(k, _)| sequence_of(&k) + 1);
    Ok(stored.max(after_last))
}

/// Reopens sled after a failed write, once a second until it opens or the queue shuts
/// down. Records at or after `next_seq` were never flushed as a group nor seen by the
/// publisher: whatever of them sled kept is removed, and the group is written again.
async fn reopen_until_open(shared: &Arc<Shared>, failed_group: Option<u64>) {
    loop {
        let shared2 = Arc::clone(shared);
        match blocking(move || reopen(&shared2, failed_group)).await {
            Ok(()) => {
                info!(queue = %shared.config.dir.display(), "queue reopened after a failed write");
                return;
            }
            Err(e) => {
                error!(error = %e, "cannot reopen the queue; trying again in a second");
                shared.stats().write_error = Some(e.to_string());
            }
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long reopening waits for readers to let go of the failed store.
const STORE_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Reopens sled after a failure. The records of a group whose write failed (from
/// `failed_group` on) are removed, to be written again whole; so are records JetStream
/// acknowledged whose removal sled had not flushed (it recovers a prefix of its
/// operations), which the publisher, starting after the acknowledged ones, would never
/// remove.
fn reopen(shared: &Shared, failed_group: Option<u64>) -> Result<(), QueueError> {
    let err = storage(&shared.config.dir);
    let old = shared.store.write().expect("store lock").take();
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
    let acked = shared.memory().acked_through;
    let unflushed = failed_group.map(|from| store.records.range(from.to_be_bytes()..));
    let acknowledged = acked.map(|through| store.records.range(..=through.to_be_bytes()));
    let stale: Vec<sled::IVec> = unflushed
        .into_iter()
        .chain(acknowledged)
        .flat_map(sled::Iter::keys)
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    for key in &stale {
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
    let (stats, _) = summary::summarize(&store.records, &store.meta, &store.db).map_err(&err)?;
    let (retained_records, retained_bytes) = retained::summarize(&store.retained).map_err(&err)?;
    {
        let mut current = shared.stats();
        *current = QueueStats {
            dropped_points: current.dropped_points + dropped,
            corrupt_records: current.corrupt_records,
            write_error: current.write_error.take(),
            write_failures: current.write_failures,
            retained_evicted: current.retained_evicted,
            records_written: current.records_written,
            groups_written: current.groups_written,
            retained_records,
            retained_bytes,
            ..stats
        };
    }
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
async fn make_room(shared: &Arc<Shared>, incoming: u64) {
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
                if shared.failed.load(Ordering::Acquire) || shared.stopping.load(Ordering::Acquire) {
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
