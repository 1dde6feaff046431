//! The publisher against a real three-node JetStream cluster (three `nats-server -js`
//! processes routed on loopback, each with its own store) and a stream with three
//! replicas. Under a steady load the stream's leader, then a follower, then the server the
//! publisher is connected to are killed (SIGKILL) and restarted; every point ends in the
//! stream once and in order. The publish rate and the pause at each failover are printed
//! (`cargo test -p tagstream-ingestor --test jetstream_cluster -- --nocapture`; figures in
//! BENCHMARKS.md).

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use tagstream_core::report::PublisherStatus;
use tagstream_crds::site::{Broker, Stream};
use tagstream_ingestor::{
    publish::PublisherConfig,
    queue::{Queue, QueueConfig},
};
use tagstream_proto::v1::{Point, PointBatch, point::Value};
use tokio_util::sync::CancellationToken;

use support::{
    cluster::NatsCluster,
    http::http_get,
    nats::servers,
    points::counter_values,
    publisher::{self, RunningPublisher},
    stream::{assert_exactly_once_in_order, stream_contents},
};

/// Points per append, and the pause between appends: 5,000 points/s offered.
const POINTS: u64 = 50;
const EVERY: Duration = Duration::from_millis(10);

fn publisher_config(urls: Vec<String>) -> PublisherConfig {
    let stream = serde_json::from_value::<Stream>(serde_json::json!({"replicas": 3})).unwrap();
    PublisherConfig {
        broker: Broker {
            urls,
            credentials: None,
            tls: None,
        },
        stream,
        namespace: "default".into(),
        site: "cluster".into(),
        credentials_dir: PathBuf::from("/nonexistent"),
        tls_dir: PathBuf::from("/nonexistent"),
        max_in_flight: 256,
        chunk_records: 64,
    }
}

fn batch(first: u64) -> PointBatch {
    PointBatch {
        source: "counter".into(),
        points: (first..first + POINTS)
            .map(|n| Point {
                tag: "n".into(),
                timestamp_ns: n as i64,
                value: Some(Value::UintValue(n)),
                ..Point::default()
            })
            .collect(),
        ..PointBatch::default()
    }
}

/// `future`'s output, or a panic naming `what` after `limit`: no wait is unbounded.
async fn bounded<T>(what: &str, limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took more than {limit:?}"))
}

/// The stream's leader, as any node that answers says.
async fn stream_leader(cluster: &NatsCluster) -> Option<String> {
    for url in cluster.urls() {
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(&url)).await else {
            continue;
        };
        let context = jetstream::new(client);
        let info = tokio::time::timeout(Duration::from_secs(2), async {
            context.get_stream("TAGSTREAM").await.ok()?.info().await.ok().cloned()
        })
        .await;
        if let Ok(Some(info)) = info
            && let Some(leader) = info.cluster.and_then(|c| c.leader)
        {
            return Some(leader);
        }
    }
    None
}

/// Asks the stream's leader to step down until another node than `node` leads, so that
/// killing the leader and killing the publisher's server are different failures.
async fn move_leader_off(cluster: &NatsCluster, node: usize) {
    let client = client(cluster).await;
    for _ in 0..10 {
        let leader = stream_leader(cluster).await.expect("the stream has a leader");
        if cluster.index_of(&leader) != node {
            return;
        }
        let stepdown = client.request("$JS.API.STREAM.LEADER.STEPDOWN.TAGSTREAM", "".into());
        let _ = bounded("a leader stepdown", Duration::from_secs(15), stepdown).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the stream's leader stayed on n{node}");
}

/// The node the publisher is connected to, from each node's `/connz`.
async fn publisher_node(cluster: &NatsCluster) -> Option<usize> {
    for i in 0..3 {
        if let Some(connz) = http_get(cluster.monitor(i), "/connz").await
            && connz.contains("tagstream-ingestor default/cluster")
        {
            return Some(i);
        }
    }
    None
}

/// Waits until the stream has a leader and every node is current again.
async fn wait_healthy(cluster: &NatsCluster, status: &Mutex<PublisherStatus>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut healthy = 0;
        for i in 0..3 {
            if http_get(cluster.monitor(i), "/healthz?js-enabled-only=true")
                .await
                .is_some_and(|b| b.contains("ok"))
            {
                healthy += 1;
            }
        }
        if healthy == 3 && stream_leader(cluster).await.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not recover within 60 s: {healthy} nodes healthy; publisher {:?}",
            status.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Acked records over time, sampled every 10 ms.
#[derive(Default)]
struct Samples(Vec<(Instant, u64)>);

impl Samples {
    /// The longest time without a new ack between `from` and `to`.
    fn longest_pause(&self, from: Instant, to: Instant) -> Duration {
        let mut last_change = from;
        let mut last = None;
        let mut longest = Duration::ZERO;
        for &(at, acked) in self.0.iter().filter(|(at, _)| *at >= from && *at <= to) {
            if last != Some(acked) {
                longest = longest.max(at - last_change);
                last_change = at;
                last = Some(acked);
            }
        }
        longest
    }

    /// Acked records per second between `from` and `to`.
    fn rate(&self, from: Instant, to: Instant) -> f64 {
        let inside: Vec<_> = self.0.iter().filter(|(at, _)| *at >= from && *at <= to).collect();
        match (inside.first(), inside.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// A client on any node of the cluster.
async fn client(cluster: &NatsCluster) -> async_nats::Client {
    bounded(
        "connecting",
        Duration::from_secs(10),
        Box::pin(async_nats::connect(cluster.urls())),
    )
    .await
    .unwrap()
}

/// One killed and restarted node.
struct Failover {
    which: &'static str,
    victim: usize,
    leader: usize,
    connected: usize,
    from: Instant,
    to: Instant,
}

/// Kills `which` node (after moving the stream's leader off the publisher's server, so
/// the three failures differ), restarts it after 5 s, and waits until the cluster is
/// whole again.
async fn fail_over(cluster: &mut NatsCluster, which: &'static str, status: &Mutex<PublisherStatus>) -> Failover {
    let connected = publisher_node(cluster).await.expect("the publisher is connected");
    Box::pin(move_leader_off(cluster, connected)).await;
    let leader = cluster.index_of(&stream_leader(cluster).await.expect("the stream has a leader"));
    let victim = match which {
        "the stream's leader" => leader,
        "a follower" => (0..3).find(|i| *i != leader && *i != connected).unwrap(),
        _ => connected,
    };
    let from = Instant::now();
    cluster.kill(victim);
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.restart(victim);
    wait_healthy(cluster, status).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Failover {
        which,
        victim,
        leader,
        connected,
        from,
        to: Instant::now(),
    }
}

/// Appends `POINTS` counter values every `EVERY` until `feeding` is cancelled; returns
/// how many were appended.
fn feed(queue: Queue, feeding: CancellationToken) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut next = 0;
        let mut tick = tokio::time::interval(EVERY);
        while !feeding.is_cancelled() {
            tick.tick().await;
            queue.append(vec![batch(next)]).await.unwrap();
            next += POINTS;
        }
        next
    })
}

/// Samples the publisher's acked records every 10 ms until `stop`.
fn sample(status: Arc<Mutex<PublisherStatus>>, stop: CancellationToken) -> tokio::task::JoinHandle<Samples> {
    tokio::spawn(async move {
        let mut samples = Samples::default();
        while !stop.is_cancelled() {
            let acked = status.lock().unwrap().acked_records;
            samples.0.push((Instant::now(), acked));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples
    })
}

/// Every point `0..offered` once, in order, and every record once, whole, in order.
fn audit(stored: &[(String, PointBatch)], offered: u64) {
    assert_exactly_once_in_order(stored, 0);
    let values = counter_values(stored.iter().map(|(_, b)| b));
    let unique: BTreeSet<u64> = values.iter().copied().collect();
    assert_eq!(unique.len(), values.len(), "a point is in the stream twice");
    assert_eq!(values, (0..offered).collect::<Vec<_>>(), "every point once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_under_load_lose_and_duplicate_nothing() {
    for server in servers() {
        println!("{}:", server.display());
        failovers_under_load(&server).await;
    }
}

async fn failovers_under_load(server: &Path) {
    let mut cluster = NatsCluster::start(server);
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.flush_interval = Duration::from_millis(5);
    let queue = Queue::open(config).unwrap().queue;
    let RunningPublisher {
        status,
        stop,
        task: publisher,
    } = publisher::start(&queue, publisher_config(cluster.urls()));
    let feeding = CancellationToken::new();
    let started = Instant::now();
    let feeder = feed(queue.clone(), feeding.clone());
    let acks = sample(Arc::clone(&status), stop.clone());

    wait_healthy(&cluster, &status).await;
    // What queued while the cluster elected its first leaders goes first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue.stats().points > 4 * POINTS {
        assert!(
            Instant::now() < deadline,
            "the first backlog did not drain: {:?}",
            queue.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steady = (Instant::now(), Instant::now() + Duration::from_secs(4));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut failovers = Vec::new();
    for which in ["the stream's leader", "a follower", "the publisher's server"] {
        failovers.push(fail_over(&mut cluster, which, &status).await);
    }
    feeding.cancel();
    let offered = bounded("the feeder's last append", Duration::from_secs(30), feeder)
        .await
        .unwrap();
    let offered_rate = offered as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue.stats().records > 0 {
        assert!(
            Instant::now() < deadline,
            "the queue did not drain: {:?} {:?}",
            queue.stats(),
            status.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    bounded("the publisher's shutdown", Duration::from_secs(30), publisher)
        .await
        .unwrap();
    let samples = bounded("the sampler's end", Duration::from_secs(5), acks)
        .await
        .unwrap();

    let client = client(&cluster).await;
    let mut stream = jetstream::new(client.clone()).get_stream("TAGSTREAM").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);
    let stored = bounded(
        "reading the stream",
        Duration::from_secs(120),
        stream_contents(client, "TAGSTREAM"),
    )
    .await;
    audit(&stored, offered);

    let status = status.lock().unwrap().clone();
    let points_per_record = offered as f64 / status.acked_records.max(1) as f64;
    println!(
        "offered {offered} points at {offered_rate:.0} points/s; steady publish rate {:.0} points/s; \
         {} duplicates dropped by JetStream; {} reordered",
        samples.rate(steady.0, steady.1) * points_per_record,
        status.duplicates,
        status.reordered
    );
    println!(
        "| killed | node | leader before | publisher on | longest pause without an ack | rate over the failover |"
    );
    for f in failovers {
        println!(
            "| {} | n{} | n{} | n{} | {:.2} s | {:.0} points/s |",
            f.which,
            f.victim,
            f.leader,
            f.connected,
            samples.longest_pause(f.from, f.to).as_secs_f64(),
            samples.rate(f.from, f.to) * points_per_record
        );
    }
}
