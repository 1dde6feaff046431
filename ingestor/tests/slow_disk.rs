//! A disk that answers slowly must not stall the ingestor's runtime: the queue's
//! filesystem calls (statvfs, sled's size on disk, the reserve file) run on the blocking
//! pool, and its figures, asked every second by the publisher's watchdog and `/status`
//! and every 50 ms by the drain at shutdown, come from memory (issue 28, item 5: they
//! ran on the runtime's threads).

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::time::Duration;

use support::forgetful_fs::ForgetfulMount;
use tagstream_ingestor::queue::{Queue, QueueConfig};
use tagstream_proto::v1::{Point, PointBatch, point::Value};
use tokio::time::Instant;

/// How long the filesystem takes to answer a `statfs`.
const STATFS_DELAY: Duration = Duration::from_millis(500);
/// The runtime's ticks every 10 ms: how late the latest came is how long something else
/// held its only thread.
const TICK: Duration = Duration::from_millis(10);

fn batch(n: u64) -> PointBatch {
    PointBatch {
        source: "dev".into(),
        points: vec![Point {
            tag: "counter".into(),
            timestamp_ns: n as i64,
            value: Some(Value::UintValue(n)),
            ..Point::default()
        }],
        ..PointBatch::default()
    }
}

#[test]
fn a_filesystem_that_answers_slowly_does_not_stall_the_runtime() {
    let dirs = tempfile::tempdir().unwrap();
    let (backing, mountpoint) = (dirs.path().join("backing"), dirs.path().join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = ForgetfulMount::mount(&backing, &mountpoint);
    // One thread: whatever blocks it stops every task, as a busy runtime would.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let worst = runtime.block_on(async {
        let queue = Queue::open(QueueConfig::new(mountpoint.join("queue"))).unwrap().queue;
        mount.slow_statfs(STATFS_DELAY);
        let ticks = tokio::spawn(async {
            let mut worst = Duration::ZERO;
            let mut next = Instant::now() + TICK;
            for _ in 0..300 {
                tokio::time::sleep_until(next).await;
                worst = worst.max(Instant::now() - next);
                next = Instant::now() + TICK;
            }
            worst
        });
        // The ingestor meanwhile: appends (the writer checks for room on the disk) and
        // its figures asked for.
        for n in 0..6 {
            tokio::time::timeout(Duration::from_secs(30), queue.append([batch(n)]))
                .await
                .expect("an append within 30 s")
                .unwrap();
            for _ in 0..4 {
                let stats = queue.stats();
                assert_eq!(stats.records, n + 1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let worst = ticks.await.unwrap();
        mount.slow_statfs(Duration::ZERO);
        queue.close().await.unwrap();
        worst
    });
    assert!(
        worst < STATFS_DELAY / 2,
        "the runtime's only thread was held for {worst:?} (statfs takes {STATFS_DELAY:?})"
    );
}
