//! Store and forward figures against a real nats-server on loopback.
//!
//! Run: `cargo bench -p tagstream-ingestor --bench store_and_forward -- [SECTION...] [--backlog N]`
//! with sections `append`, `publish`, `replay`, `e2e` (default: all; `--backlog` is the
//! replay backlog in points, default 10,000,000).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, reason = "the benchmark uses part of the test support")]
mod support;

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use futures_util::StreamExt as _;
use prost::Message as _;
use support::nats::{Nats, free_port};
use tagstream_core::report::PublisherStatus;
use tagstream_crds::site::Broker;
use tagstream_ingestor::{
    publish::{self, PublisherConfig},
    queue::{Queue, QueueConfig},
    service::{self, RunOptions},
};
use tagstream_proto::v1::{Point, PointBatch, point::Value};
use tokio_util::sync::CancellationToken;

/// A poll of a 100-tag device.
fn device_batch(n: u64) -> PointBatch {
    PointBatch {
        source: format!("dev{}", n % 50),
        points: (0..100)
            .map(|t| Point {
                tag: format!("tag{t:03}"),
                timestamp_ns: n as i64,
                value: Some(Value::DoubleValue(n as f64 + f64::from(t))),
                quality: 1,
                unit: "degC".into(),
                ..Point::default()
            })
            .collect(),
        ..PointBatch::default()
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn publisher_config(url: &str) -> PublisherConfig {
    PublisherConfig {
        broker: Broker {
            urls: vec![url.to_owned()],
            credentials: None,
            tls: None,
        },
        stream: tagstream_crds::site::Stream::default(),
        namespace: "bench".into(),
        site: "bench".into(),
        credentials_dir: "/nonexistent".into(),
        tls_dir: "/nonexistent".into(),
        max_in_flight: 256,
        chunk_records: 64,
    }
}

fn queue_at(dir: &std::path::Path) -> Queue {
    let mut config = QueueConfig::new(dir.join("q"));
    config.max_bytes = 64 << 30;
    Queue::open(config).expect("queue").queue
}

/// Appends from `writers` tasks until `points` are queued; returns the seconds taken.
async fn fill(queue: &Queue, points: u64, writers: u64) -> f64 {
    let start = Instant::now();
    let batches = points / 100;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut n = w;
                while n < batches {
                    let group: Vec<PointBatch> = (0..10).map(|k| device_batch(n + k * writers)).collect();
                    queue.append(group).await.expect("append");
                    n += 10 * writers;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    start.elapsed().as_secs_f64()
}

/// Appends as the ingestor's pipeline does while the broker is away: one appender, each
/// append what the pollers read while the last one was written (160 batches of 100
/// points here). Concurrent appenders no longer share records since the queue publishes
/// from memory (issue 25), so [`fill`]'s 16 writers make smaller records than a real
/// backlog has (535 against 472 MiB on disk at 10 M points, and 152 against 92 MiB peak
/// RSS while filling). Returns the seconds taken.
async fn fill_as_the_pipeline(queue: &Queue, points: u64) -> f64 {
    let start = Instant::now();
    let batches = points / 100;
    let mut n = 0;
    while n < batches {
        let group: Vec<PointBatch> = (0..160).map(|k| device_batch(n + k)).collect();
        queue.append(group).await.expect("append");
        n += 160;
    }
    start.elapsed().as_secs_f64()
}

async fn append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = queue_at(dir.path());
    let points = 2_000_000;
    let seconds = fill(&queue, points, 16).await;
    let stats = queue.measured_stats().await;
    println!(
        "| queue append, 16 writers, 100-point batches | {:.0} points/s | {:.0} records/s | {:.1} KiB per record | {:.1} MiB on disk for {:.1} MiB payload |",
        points as f64 / seconds,
        stats.records as f64 / seconds,
        stats.payload_bytes as f64 / stats.records as f64 / 1024.0,
        stats.disk_bytes as f64 / 1_048_576.0,
        stats.payload_bytes as f64 / 1_048_576.0
    );
}

/// Drains `queue` with the publisher; returns (seconds, RSS samples).
async fn drain(queue: &Queue, url: &str) -> (f64, Vec<f64>) {
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn(publish::run(queue.clone(), publisher_config(url), status, stop.clone()));
    let mut rss = Vec::new();
    while queue.records() > 0 {
        rss.push(rss_mib());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.cancel();
    task.await.expect("publisher");
    (seconds, rss)
}

/// The same messages published straight with async-nats: the ceiling of this server.
async fn raw_ceiling(url: &str, batches: u64) -> f64 {
    let client = async_nats::connect(url).await.expect("connect");
    let context = jetstream::ContextBuilder::new().max_ack_inflight(1024).build(client);
    context
        .get_or_create_stream(jetstream::stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    let start = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for n in 0..batches {
        let payload = device_batch(n).encode_to_vec();
        let message = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("raw-{n}"));
        acks.push_back(
            context
                .send_publish(format!("raw.dev{}", n % 50), message)
                .await
                .expect("publish"),
        );
        if acks.len() > 256 {
            acks.pop_front().expect("ack").await.expect("ack");
        }
    }
    for ack in acks {
        ack.await.expect("ack");
    }
    batches as f64 / start.elapsed().as_secs_f64()
}

async fn publish_throughput() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = queue_at(dir.path());
    let points = 1_000_000;
    fill(&queue, points, 16).await;
    let (seconds, _) = drain(&queue, &nats.url()).await;
    let ours = points as f64 / 100.0 / seconds;
    let raw = raw_ceiling(&nats.url(), points / 100).await;
    println!(
        "| publish 10,000 batches of 100 points from the queue | {ours:.0} batches/s = {:.0} points/s | raw async-nats, same server, same messages: {raw:.0} batches/s | {:.0}% of the ceiling |",
        ours * 100.0,
        ours / raw * 100.0
    );
}

async fn replay(backlog: u64) {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = queue_at(dir.path());
    let sampler_stop = CancellationToken::new();
    let peak = Arc::new(Mutex::new(0.0f64));
    let sampler = tokio::spawn({
        let (stop, peak) = (sampler_stop.clone(), Arc::clone(&peak));
        async move {
            while !stop.is_cancelled() {
                {
                    let mut p = peak.lock().expect("peak");
                    *p = p.max(rss_mib());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let fill_seconds = fill_as_the_pipeline(&queue, backlog).await;
    let fill_peak = *peak.lock().expect("peak");
    let disk = queue.measured_stats().await.disk_bytes as f64 / 1_048_576.0;
    // What a restarted pod pays before it polls again: opening the queue counts the
    // backlog's records.
    queue.close().await.expect("close");
    let reopen = Instant::now();
    let queue = queue_at(dir.path());
    let open_seconds = reopen.elapsed().as_secs_f64();
    let open_rss = rss_mib();
    let (drain_seconds, rss_samples) = drain(&queue, &nats.url()).await;
    sampler_stop.cancel();
    sampler.await.expect("sampler");
    let drain_peak = rss_samples.iter().copied().fold(0.0, f64::max);
    println!(
        "| backlog of {backlog} points | fill {:.0} points/s, peak RSS {fill_peak:.0} MiB, {disk:.0} MiB on disk | reopen {open_seconds:.1} s, RSS after {open_rss:.0} MiB | replay {:.0} points/s, peak RSS {drain_peak:.0} MiB |",
        backlog as f64 / fill_seconds,
        backlog as f64 / drain_seconds
    );
}

async fn end_to_end(devices: usize, tags: usize, interval_ms: u64) {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut manifest = format!(
        "apiVersion: tagstream.io/v1alpha1\nkind: Site\nmetadata: {{name: e2e}}\nspec:\n  broker: {{urls: [\"{}\"]}}\n",
        nats.url()
    );
    for d in 0..devices {
        let _ = write!(
            manifest,
            "---\napiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: dev{d}}}\nspec:\n  site: e2e\n  connection: {{tcp: {{host: 127.0.0.1, port: {}}}}}\n  pollInterval: {interval_ms}ms\n  tags:\n",
            free_port()
        );
        for t in 0..tags {
            let _ = writeln!(
                manifest,
                "    - {{name: t{t}, register: holding, address: {t}, type: uint16}}"
            );
        }
    }
    std::fs::write(dir.path().join("site.yaml"), manifest).expect("manifest");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut subscription = client.subscribe("tagstream.default.e2e.>").await.expect("subscribe");
    let options = RunOptions {
        paths: vec![dir.path().join("site.yaml")],
        site: None,
        queue_dir: dir.path().join("queue"),
        credentials_dir: "/nonexistent".into(),
        tls_dir: "/nonexistent".into(),
        http: "127.0.0.1:0".parse().expect("address"),
        simulate: true,
        nats_url: None,
        reload_interval: Duration::from_secs(3600),
        drain_deadline: Duration::from_secs(10),
    };
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(service::run(options, shutdown.clone(), None));
    let warmup = Instant::now() + Duration::from_secs(3);
    let window = Duration::from_secs(10);
    let mut latencies = Vec::new();
    let mut points = 0u64;
    let mut started = None;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await {
        let now = Instant::now();
        if now < warmup {
            continue;
        }
        let start = *started.get_or_insert(now);
        if now - start > window {
            break;
        }
        let batch = PointBatch::decode(message.payload.as_ref()).expect("batch");
        let wall = tagstream_core::point::now_ns();
        for point in &batch.points {
            latencies.push((wall - point.timestamp_ns) as f64 / 1e6);
        }
        points += batch.points.len() as u64;
    }
    shutdown.cancel();
    let _ = service.await;
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let offered = (devices * tags) as f64 * 1000.0 / interval_ms as f64;
    println!(
        "| {devices} devices x {tags} tags every {interval_ms} ms (offered {offered:.0} points/s) | {:.0} points/s received by a subscriber on the site's subjects | poll-to-receipt p50 {:.1} ms, p99 {:.1} ms |",
        points as f64 / window.as_secs_f64(),
        pick(0.5),
        pick(0.99)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let backlog = args
        .iter()
        .position(|a| a == "--backlog")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10_000_000);
    let sections: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["append", "publish", "replay", "e2e"].contains(a))
        .collect();
    let wants = |s: &str| sections.is_empty() || sections.contains(&s);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if wants("append") {
            append().await;
        }
        if wants("publish") {
            publish_throughput().await;
        }
        if wants("replay") {
            replay(backlog).await;
        }
        if wants("e2e") {
            for (devices, tags, interval) in [(20, 100, 50), (50, 125, 10), (80, 125, 10)] {
                end_to_end(devices, tags, interval).await;
            }
        }
    });
}
