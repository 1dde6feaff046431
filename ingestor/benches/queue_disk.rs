//! The queue's file size under steady traffic while the publisher keeps it drained: what
//! a claim holds after hours of a running site, compressed into one run.
//!
//! Run: `cargo bench -p tagstream-ingestor --bench queue_disk -- [--records N] [--points P] [--samples S] [--dir D]`
//! (default 200,000 records of 20 points, 20 samples, in a temporary directory under
//! `D`, default the system's; `--dir /dev/shm` makes the flushes free, so a day of
//! traffic takes minutes: sled writes the same files either way). Each record is appended on its own
//! (one group commit, as a poll cycle is) and acknowledged right after, as the publisher
//! does while the broker keeps up. The example plant appends about 12 records a second,
//! so 200,000 records are about 4.6 hours of it.

use std::time::Instant;

use tagstream_ingestor::queue::{Acked, Queue, QueueConfig};
use tagstream_proto::v1::{Point, PointBatch, point::Value};

fn batch(n: u64, points: usize) -> PointBatch {
    PointBatch {
        source: format!("dev{}", n % 3),
        points: (0..points)
            .map(|t| Point {
                tag: format!("tag{t:03}"),
                timestamp_ns: n as i64,
                value: Some(Value::DoubleValue(n as f64 + t as f64)),
                quality: 1,
                ..Point::default()
            })
            .collect(),
        ..PointBatch::default()
    }
}

/// Bytes of every file under `dir`, as `du --apparent-size` counts them.
fn files_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|entry| match entry.metadata() {
                Ok(meta) if meta.is_dir() => files_bytes(&entry.path()),
                Ok(meta) => meta.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let records = arg("--records", 200_000);
    let points = arg("--points", 20) as usize;
    let samples = arg("--samples", 20).max(1);
    let parent = std::env::args()
        .skip_while(|a| a != "--dir")
        .nth(1)
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let dir = tempfile::tempdir_in(parent).expect("temp dir");
    let path = dir.path().join("queue");
    let mut config = QueueConfig::new(&path);
    // One append per group as in the ingestor, without waiting out the group window for
    // appends that never come: the same writes and flushes, sooner.
    config.flush_interval = std::time::Duration::ZERO;
    // Acknowledged records kept for a broker's power cut (the Site's `ackedRetention`);
    // the default is the product's.
    config.acked_retention = std::time::Duration::from_secs(arg("--acked-retention-secs", 150));
    let queue = Queue::open(config).expect("open the queue").queue;
    println!(
        "| records appended and acked | hours at 12 records/s | files on disk (bytes) | sled size_on_disk (bytes) |"
    );
    println!("| ---: | ---: | ---: | ---: |");
    let started = Instant::now();
    let mut acked = 0u64;
    for n in 0..records {
        queue.append(vec![batch(n, points)]).await.expect("append");
        let head = queue.read(None, 16).await.expect("read");
        if !head.is_empty() {
            let acks = head.iter().map(|stored| Acked {
                sequence: stored.sequence,
                stream_sequences: vec![stored.sequence + 1],
            });
            queue.ack(acks.collect()).await.expect("ack");
            acked += head.len() as u64;
        }
        if (n + 1) % (records / samples).max(1) == 0 {
            let stats = queue.measured_stats().await;
            println!(
                "| {} | {:.1} | {} | {} |",
                n + 1,
                (n + 1) as f64 / 12.0 / 3600.0,
                files_bytes(&path),
                stats.disk_bytes
            );
        }
    }
    let stats = queue.measured_stats().await;
    queue.close().await.expect("close");
    println!(
        "\n{records} records of {points} points in {:.1} s; {acked} acked; {} left in the queue",
        started.elapsed().as_secs_f64(),
        stats.records
    );
}
