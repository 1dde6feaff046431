//! The queue on a real small filesystem (a tmpfs mounted with `size=`, as root): filled by
//! the queue itself and from outside, under both full policies. Nothing handed to the queue
//! is lost without being counted, nothing stored is corrupted, and the queue goes on by
//! itself when space returns.
//!
//! Mounting needs root: elsewhere these tests say SKIPPED, and `TAGSTREAM_REQUIRE_ROOT=1`
//! (CI) makes that a failure.

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use tagstream_crds::site::FullPolicy;
use tagstream_ingestor::queue::{Acked, Queue, QueueConfig};
use tagstream_proto::v1::{Point, PointBatch, point::Value as PointValue};

use support::{
    child::KilledOnDrop,
    http::http_get,
    nats::{Nats, free_port},
    points::stored_values,
    stream::{assert_exactly_once_in_order, stream_contents},
};

/// A tmpfs of a given size on a temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<Self> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !root {
            assert!(
                std::env::var("TAGSTREAM_REQUIRE_ROOT").as_deref() != Ok("1"),
                "mounting a tmpfs needs root, and TAGSTREAM_REQUIRE_ROOT=1"
            );
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed");
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Another writer takes every free byte: a file written until the filesystem refuses.
    fn fill_from_outside(&self) -> PathBuf {
        let path = self.path().join("neighbour");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![1u8; 64 << 10];
        let mut size = chunk.len();
        while size > 0 {
            if file.write_all(&chunk[..size]).is_err() {
                size /= 2;
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// One append's worth: `batches` batches of 40 points, about 1.3 KiB each, numbered from
/// `first` on.
fn batches(first: u64, batches: u64) -> Vec<PointBatch> {
    (0..batches)
        .map(|b| PointBatch {
            source: "dev".into(),
            points: (0..40)
                .map(|p| {
                    let n = first + b * 40 + p;
                    Point {
                        tag: format!("tag{p}"),
                        timestamp_ns: n as i64,
                        value: Some(PointValue::UintValue(n)),
                        ..Point::default()
                    }
                })
                .collect(),
            ..PointBatch::default()
        })
        .collect()
}

const POINTS_PER_APPEND: u64 = 16 * 40;

fn config(disk: &SmallDisk, policy: FullPolicy) -> QueueConfig {
    let mut config = QueueConfig::new(disk.path().join("queue"));
    // Far beyond the disk: the filesystem, not maxSize, is what fills.
    config.max_bytes = 1 << 30;
    config.policy = policy;
    config.flush_interval = Duration::from_millis(1);
    config
}

/// Appends `appends` groups from number `first` on, each within `limit`.
async fn append_all(queue: &Queue, first: u64, appends: u64, limit: Duration) {
    for a in 0..appends {
        let n = first + a * POINTS_PER_APPEND;
        tokio::time::timeout(limit, queue.append(batches(n, 16)))
            .await
            .unwrap_or_else(|_| panic!("append {a} waited more than {limit:?}: {:?}", queue.stats()))
            .unwrap_or_else(|e| panic!("append {a} failed: {e}"));
    }
}

/// Reopens the queue and checks what it holds: not moved aside, every record readable, a
/// run of consecutive sequences holding the newest points up to `last`, in order.
async fn assert_intact(config: QueueConfig, last: u64) -> u64 {
    let opened = Queue::open(config).unwrap();
    assert!(opened.moved_aside.is_none(), "the queue was found corrupt");
    let queue = opened.queue;
    let stored = queue.read(None, usize::MAX).await.unwrap();
    assert_eq!(queue.stats().corrupt_records, 0);
    let sequences: Vec<u64> = stored.iter().map(|s| s.sequence).collect();
    assert!(sequences.windows(2).all(|w| w[1] == w[0] + 1), "a gap inside the queue");
    let numbers = stored_values(&stored);
    assert!(!numbers.is_empty(), "the queue kept nothing");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "points missing or out of order"
    );
    assert_eq!(
        *numbers.last().unwrap(),
        last,
        "the newest points are not the last ones"
    );
    let held = numbers.len() as u64;
    queue.close().await.unwrap();
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_a_queue_that_fills_its_disk_writing() {
    let Some(disk) = SmallDisk::mount(24 << 20) else { return };
    let config = config(&disk, FullPolicy::DropOldest);
    let queue = Queue::open(config.clone()).unwrap().queue;
    // About 60 MiB of records onto 24 MiB.
    let appends = 3000;
    append_all(&queue, 0, appends, Duration::from_secs(10)).await;
    let stats = queue.stats();
    eprintln!("self-filled: {stats:?}");
    assert!(stats.disk_full, "{stats:?}");
    assert!(stats.dropped_points > 0, "{stats:?}");
    assert_eq!(stats.write_error, None);
    assert_eq!(
        stats.points + stats.dropped_points,
        appends * POINTS_PER_APPEND,
        "every point is queued or counted as dropped: {stats:?}"
    );
    assert!(disk.available() > 0, "the queue took the last byte");
    queue.close().await.unwrap();
    let held = assert_intact(config, appends * POINTS_PER_APPEND - 1).await;
    assert_eq!(held, stats.points);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_polling_on_a_full_disk_waits_for_the_publisher_and_drops_nothing() {
    let Some(disk) = SmallDisk::mount(24 << 20) else { return };
    let config = config(&disk, FullPolicy::PausePolling);
    let queue = Queue::open(config.clone()).unwrap().queue;
    let mut appended = 0;
    let held = loop {
        let mut append = Box::pin(queue.append(batches(appended * POINTS_PER_APPEND, 16)));
        match tokio::time::timeout(Duration::from_secs(2), &mut append).await {
            Ok(done) => done.unwrap(),
            Err(_) => break append,
        }
        appended += 1;
        assert!(appended < 3000, "the queue never paused: {:?}", queue.stats());
    };
    let stats = queue.stats();
    assert!(stats.paused && stats.disk_full, "{stats:?}");
    assert_eq!(stats.dropped_points, 0);

    // The publisher takes everything: the held append goes through by itself. On a full
    // disk acknowledged records are not kept for a broker's power cut: moving them would
    // write them again.
    let stored = queue.read(None, usize::MAX).await.unwrap();
    queue
        .ack(vec![Acked {
            sequence: stored.last().unwrap().sequence,
            stream_sequences: Vec::new(),
        }])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the append still waits after the publisher freed the queue")
        .unwrap();
    let stats = queue.stats();
    assert!(!stats.paused && !stats.disk_full, "{stats:?}");
    assert_eq!(stats.dropped_points, 0);
    assert_eq!(stats.retained_records, 0, "{stats:?}");
    queue.close().await.unwrap();
    assert_intact(config, (appended + 1) * POINTS_PER_APPEND - 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_from_outside_keeps_the_queue_going_and_it_recovers_when_space_returns() {
    for policy in [FullPolicy::DropOldest, FullPolicy::PausePolling] {
        let Some(disk) = SmallDisk::mount(32 << 20) else { return };
        let config = config(&disk, policy);
        let queue = Queue::open(config.clone()).unwrap().queue;
        let reserve = config.dir.join("tagstream-reserve");
        assert!(reserve.exists(), "no reserve file on an empty disk");
        // A backlog of about 4 MiB, then a neighbour takes every free byte.
        append_all(&queue, 0, 200, Duration::from_secs(10)).await;
        let neighbour = disk.fill_from_outside();
        let mut next = 200 * POINTS_PER_APPEND;
        match policy {
            FullPolicy::DropOldest => {
                // sled needs free space to delete as well, so dropping cannot always make
                // room on a disk full to the last byte: the queue may have to hold new
                // points until space returns. Either way none is refused or lost.
                let appending = tokio::spawn({
                    let queue = queue.clone();
                    async move { append_all(&queue, next, 400, Duration::from_secs(60)).await }
                });
                // The queue says the disk is full while it is; once dropping made room
                // for the last group it rightly stops saying so, so it is sampled
                // throughout, and a failed write (counted for good) tells too.
                let deadline = Instant::now() + Duration::from_secs(8);
                let mut said_full = false;
                while !appending.is_finished() && Instant::now() < deadline {
                    let stats = queue.stats();
                    said_full |= stats.disk_full || stats.write_error.is_some();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let during = queue.stats();
                eprintln!(
                    "DropOldest on the full disk (finished: {}): {during:?}",
                    appending.is_finished()
                );
                assert!(said_full || during.disk_full || during.write_failures > 0, "{during:?}");
                assert!(during.dropped_points > 0, "dropOldest dropped nothing: {during:?}");
                std::fs::remove_file(&neighbour).unwrap();
                appending.await.unwrap();
                next += 400 * POINTS_PER_APPEND;
                let stats = queue.stats();
                assert_eq!(stats.points + stats.dropped_points, next, "{stats:?}");
            }
            FullPolicy::PausePolling => {
                let held = queue.append(batches(next, 16));
                tokio::pin!(held);
                assert!(
                    tokio::time::timeout(Duration::from_secs(3), &mut held).await.is_err(),
                    "an append went through on a full disk under pausePolling: {:?}",
                    queue.stats()
                );
                assert!(queue.stats().paused, "{:?}", queue.stats());
                std::fs::remove_file(&neighbour).unwrap();
                tokio::time::timeout(Duration::from_secs(10), held)
                    .await
                    .expect("the append still waits after space returned")
                    .unwrap();
                next += POINTS_PER_APPEND;
                assert_eq!(queue.stats().dropped_points, 0);
            }
        }
        let _ = std::fs::remove_file(&neighbour);
        append_all(&queue, next, 10, Duration::from_secs(10)).await;
        next += 10 * POINTS_PER_APPEND;
        let stats = queue.stats();
        assert!(
            !stats.disk_full && !stats.paused && stats.write_error.is_none(),
            "{stats:?}"
        );
        assert!(reserve.exists(), "the reserve file was not made again: {stats:?}");
        queue.close().await.unwrap();
        let held = assert_intact(config, next - 1).await;
        assert_eq!(held, stats.points, "{policy:?}");
    }
}

/// A site of three simulated devices of 100 tags each every 10 ms (30,000 points/s).
fn busy_site(dir: &Path, broker: &str) {
    use std::fmt::Write as _;
    let mut text = format!(
        "apiVersion: tagstream.io/v1alpha1
kind: Site
metadata: {{name: full}}
spec:
  broker: {{urls: [\"{broker}\"]}}
  queue: {{flushInterval: 2ms, maxSize: 1Gi, fullPolicy: dropOldest}}
  storage: {{size: 2Gi}}
"
    );
    for d in 0..3 {
        let port = free_port();
        let _ = write!(
            text,
            "---
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {{name: d{d}}}
spec:
  site: full
  connection: {{tcp: {{host: 127.0.0.1, port: {port}}}}}
  pollInterval: 10ms
  tags:
"
        );
        for t in 0..100 {
            let _ = writeln!(
                text,
                "    - {{name: a-rather-long-tag-name-{t}, register: holding, address: {t}, type: uint16, \
                 simulation: {{waveform: ramp, min: 0, max: 1000, period: 1s}}}}"
            );
        }
    }
    std::fs::write(dir.join("site.yaml"), text).unwrap();
}

/// The ingestor on `manifests` with its queue in `queue`, answering on `http`.
fn ingestor(manifests: &Path, queue: &Path, http: SocketAddr, nats_url: Option<&str>) -> KilledOnDrop {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"));
    command
        .args([
            "run",
            "--simulate",
            "--reload-interval",
            "1h",
            "--http",
            &http.to_string(),
            "-f",
        ])
        .arg(manifests)
        .arg("--queue-dir")
        .arg(queue)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(url) = nats_url {
        command.args(["--nats-url", url]);
    }
    KilledOnDrop(command.spawn().unwrap())
}

/// `/status` once it satisfies `done`, within `limit`.
async fn status_when(address: SocketAddr, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(status) = http_get(address, "/status")
            .await
            .and_then(|b| serde_json::from_str(&b).ok())
        {
            if done(&status) {
                return status;
            }
            last = status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out after {limit:?} waiting for {what}; last /status: {}",
        last["queue"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingestor_on_a_full_disk_reports_it_keeps_running_and_delivers_what_it_kept() {
    let Some(disk) = SmallDisk::mount(16 << 20) else { return };
    let dir = tempfile::tempdir().unwrap();
    // No broker yet: the queue fills its disk.
    let nobody = format!("nats://127.0.0.1:{}", free_port());
    busy_site(dir.path(), &nobody);
    let queue = disk.path().join("queue");
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut first = ingestor(dir.path(), &queue, http, None);
    let full = status_when(http, "a full disk", Duration::from_secs(90), |s| {
        s["queue"]["diskFull"] == true && s["queue"]["droppedPoints"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(full["pointsLost"], 0, "{}", full["queue"]);
    let metrics = http_get(http, "/metrics").await.unwrap();
    assert!(metrics.contains("tagstream_queue_disk_full 1"), "{metrics}");
    assert!(
        !metrics.contains("tagstream_queue_dropped_points_total 0\n"),
        "{metrics}"
    );
    // It stays up and keeps going: more polled, more dropped, nothing lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the ingestor exited on a full disk"
    );
    let later = status_when(http, "more polls", Duration::from_secs(10), |s| {
        s["pointsPolled"].as_u64() > full["pointsPolled"].as_u64()
    })
    .await;
    assert_eq!(later["pointsLost"], 0, "{}", later["queue"]);
    assert!(later["queue"]["droppedPoints"].as_u64() > full["queue"]["droppedPoints"].as_u64());
    drop(first);

    // Killed on the full disk, started again, now with a broker: the queue opens as it
    // was, drains, and every record it kept is delivered once and in order.
    let nats = Nats::start();
    let second = ingestor(dir.path(), &queue, http, Some(&nats.url()));
    let reopened = status_when(http, "the restarted ingestor", Duration::from_secs(30), |s| {
        s["queue"].is_object()
    })
    .await;
    assert_eq!(reopened["queue"]["movedAside"], Value::Null);
    assert_eq!(reopened["queue"]["corruptRecords"], 0);
    status_when(http, "the backlog to drain", Duration::from_secs(90), |s| {
        s["publisher"]["ackedRecords"].as_u64() > Some(100) && s["queue"]["points"].as_u64() < Some(50_000)
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &second.0.id().to_string()])
        .status()
        .unwrap();
    let mut second = second;
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = stream_contents(async_nats::connect(nats.url()).await.unwrap(), "TAGSTREAM").await;
    // The records dropped were the oldest, before the broker came: the stream starts
    // after them and has no gap from there but the one the kill made (the rest of the
    // first run's block of sequences).
    assert_exactly_once_in_order(&stored, 1);
    assert!(stored[0].1.sequence > 0, "the oldest records were not the ones dropped");
}
