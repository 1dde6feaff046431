//! Store and forward against a real `nats-server -js` (Debian's package) on a free
//! loopback port: broker outages, killed ingestors (SIGKILL), authentication, and reloads.

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tagstream_core::report::PublisherStatus;
use tagstream_crds::site::{Broker, BrokerCredentials, CredentialsKind};
use tagstream_ingestor::{
    publish::{self, PublisherConfig},
    queue::{Queue, QueueConfig},
    service::{self, RunOptions},
};
use tagstream_proto::v1::{Point, PointBatch, point::Value};
use tokio_util::sync::CancellationToken;

use support::{
    http::http_get,
    nats::{Nats, free_port, servers},
    points::counter_values,
    publisher::{self, RunningPublisher},
    stream::{assert_exactly_once_in_order, stream_contents},
};

fn publisher_config(url: &str, site: &str) -> PublisherConfig {
    PublisherConfig {
        broker: Broker {
            urls: vec![url.to_owned()],
            credentials: None,
            tls: None,
        },
        stream: tagstream_crds::site::Stream::default(),
        namespace: "default".into(),
        site: site.into(),
        credentials_dir: PathBuf::from("/nonexistent"),
        tls_dir: PathBuf::from("/nonexistent"),
        max_in_flight: 64,
        chunk_records: 16,
    }
}

fn counter_batch(n: u64) -> PointBatch {
    PointBatch {
        source: "counter".into(),
        points: vec![Point {
            tag: "n".into(),
            timestamp_ns: n as i64,
            value: Some(Value::UintValue(n)),
            ..Point::default()
        }],
        ..PointBatch::default()
    }
}

/// Every message of the stream, decoded, with its message id, in stream order.
async fn read_stream(url: &str, options: async_nats::ConnectOptions) -> Vec<(String, PointBatch)> {
    stream_contents(options.connect(url).await.unwrap(), "TAGSTREAM").await
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TOTAL: u64 = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_keeps_the_order() {
    for server in servers() {
        broker_outage(&server).await;
    }
}

async fn broker_outage(server: &Path) {
    let mut nats = Nats::start_in(None, server, None);
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("q"));
    config.flush_interval = Duration::from_millis(2);
    let queue = Queue::open(config).unwrap().queue;
    let RunningPublisher {
        status,
        stop,
        task: publisher,
    } = publisher::start(&queue, publisher_config(&nats.url(), "outage"));

    let feeder = tokio::spawn({
        let queue = queue.clone();
        async move {
            for n in 0..TOTAL {
                queue.append(vec![counter_batch(n)]).await.unwrap();
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    nats.kill();
    // Longer than the 5 s ack timeout, so in-flight publishes fail and the publisher
    // resumes from the queue's head rather than the client quietly re-sending.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let queued_during_outage = queue.stats().points;
    nats.restart();
    feeder.await.unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while queue.stats().records > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the queue did not drain after the outage: {:?} {:?}",
        queue.stats(),
        status.lock().unwrap()
    );
    stop.cancel();
    publisher.await.unwrap();

    let stored = read_stream(&nats.url(), async_nats::ConnectOptions::new()).await;
    let values = counter_values(stored.iter().map(|(_, b)| b));
    assert_eq!(values, (0..TOTAL).collect::<Vec<_>>(), "every point once, in order");
    assert!(
        queued_during_outage > 0,
        "points were buffered while the broker was down"
    );
    let ids: BTreeSet<&String> = stored.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), stored.len(), "message ids are unique");
    assert!(status.lock().unwrap().failures > 0, "the outage was noticed");
}

/// Connected and with its stream, a publisher with nothing to publish says it is
/// connected (found on a real cluster: `connected: false` until the first publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_publisher_reports_connected_once_its_stream_exists() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueConfig::new(dir.path().join("q"))).unwrap().queue;
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish::run(
        queue.clone(),
        publisher_config(&nats.url(), "idle"),
        Arc::clone(&status),
        stop.clone(),
    ));
    let s = Arc::clone(&status);
    wait_until("the publisher to say it is connected", Duration::from_secs(15), || {
        s.lock().unwrap().connected
    })
    .await;
    stop.cancel();
    publisher.await.unwrap();
    let status = status.lock().unwrap();
    assert_eq!(status.acked_records, 0, "nothing was published");
    assert_eq!(status.last_error, None);
}

/// A stream the broker refuses (its subjects overlap another stream's, as the chart's
/// edge example and the example plant once made) is reported as a configuration problem,
/// not as an unreachable broker; the publisher connects once the clash is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_subjects_overlap_another_is_reported_as_refused_settings() {
    let nats = Nats::start();
    let context = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PLANT".into(),
            subjects: vec!["tagstream.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueConfig::new(dir.path().join("q"))).unwrap().queue;
    let publisher = support::publisher::start(&queue, publisher_config(&nats.url(), "clash"));
    let s = Arc::clone(&publisher.status);
    wait_until("the refusal to be reported", Duration::from_secs(15), || {
        s.lock().unwrap().config_error.is_some()
    })
    .await;
    {
        let status = publisher.status.lock().unwrap();
        let refusal = status.config_error.clone().unwrap();
        assert!(
            refusal.contains("refuses stream TAGSTREAM") && refusal.contains("overlap"),
            "{refusal}"
        );
        assert!(!status.connected);
    }
    context.delete_stream("PLANT").await.unwrap();
    wait_until("the publisher to connect", Duration::from_secs(30), || {
        let status = s.lock().unwrap();
        status.connected && status.config_error.is_none()
    })
    .await;
    publisher.stop.cancel();
    publisher.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_serves_every_site_and_namespace_without_an_update() {
    let nats = Nats::start();
    let context = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut other_namespace = publisher_config(&nats.url(), "line-2");
    other_namespace.namespace = "packaging".into();
    let sites = [
        publisher_config(&nats.url(), "line-1"),
        publisher_config(&nats.url(), "line-2"),
        other_namespace,
    ];
    let mut seen = Vec::new();
    for site in &sites {
        publish::ensure_stream(&context, site).await.unwrap();
        let mut stream = context.get_stream("TAGSTREAM").await.unwrap();
        let info = stream.info().await.unwrap();
        seen.push((info.config.subjects.clone(), info.config.duplicate_window));
    }
    for (subjects, duplicate_window) in &seen {
        assert_eq!(subjects, &["tagstream.>"], "after each site: {seen:?}");
        assert_eq!(*duplicate_window, Duration::from_secs(120));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_queued_before_any_broker_exists_are_delivered_when_it_appears() {
    let mut nats = Nats::start();
    nats.kill();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueConfig::new(dir.path().join("q"))).unwrap().queue;
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish::run(
        queue.clone(),
        publisher_config(&nats.url(), "late"),
        Arc::clone(&status),
        stop.clone(),
    ));
    for n in 0..50 {
        queue.append(vec![counter_batch(n)]).await.unwrap();
    }
    let s = Arc::clone(&status);
    wait_until(
        "the publisher to report the missing broker",
        Duration::from_secs(15),
        || s.lock().unwrap().last_error.is_some(),
    )
    .await;
    assert_eq!(queue.stats().points, 50, "everything stays queued");
    nats.restart();
    let q = queue.clone();
    wait_until("the buffered points to be delivered", Duration::from_secs(30), || {
        q.stats().points == 0
    })
    .await;
    stop.cancel();
    publisher.await.unwrap();
    assert_eq!(
        read_stream(&nats.url(), async_nats::ConnectOptions::new()).await.len(),
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_from_the_mounted_secret() {
    let nats = Nats::start_with(Some("authorization { user: tagstream, password: s3cret }\n"));
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("username"), "tagstream\n").unwrap();
    std::fs::write(secrets.path().join("password"), "s3cret\n").unwrap();
    let mut config = publisher_config(&nats.url(), "auth");
    config.broker.credentials = Some(BrokerCredentials {
        secret_name: "nats-auth".into(),
        kind: CredentialsKind::UserPassword,
    });
    config.credentials_dir = secrets.path().to_path_buf();

    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueConfig::new(dir.path().join("q"))).unwrap().queue;
    queue.append(vec![counter_batch(7)]).await.unwrap();

    // A wrong password: nothing is sent, nothing leaves the queue, the error says why.
    let wrong = tempfile::tempdir().unwrap();
    std::fs::write(wrong.path().join("username"), "tagstream").unwrap();
    std::fs::write(wrong.path().join("password"), "nope").unwrap();
    let mut wrong_config = config.clone();
    wrong_config.credentials_dir = wrong.path().to_path_buf();
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(publish::run(
        queue.clone(),
        wrong_config,
        Arc::clone(&status),
        stop.clone(),
    ));
    let s = Arc::clone(&status);
    wait_until("the authorization error", Duration::from_secs(15), || {
        s.lock().unwrap().last_error.is_some()
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let error = status.lock().unwrap().last_error.clone().unwrap();
    assert!(error.to_lowercase().contains("auth"), "{error}");
    assert_eq!(
        status.lock().unwrap().config_error.as_ref(),
        Some(&error),
        "a wrong password is the Site's to fix"
    );
    assert_eq!(queue.stats().points, 1);

    // The Secret not mounted (the pod mounts it optionally, so that it starts and queues).
    let missing = tempfile::tempdir().unwrap();
    let mut missing_config = config.clone();
    missing_config.credentials_dir = missing.path().to_path_buf();
    let publisher = support::publisher::start(&queue, missing_config);
    let s = Arc::clone(&publisher.status);
    wait_until(
        "the missing credentials to be reported",
        Duration::from_secs(15),
        || s.lock().unwrap().config_error.is_some(),
    )
    .await;
    publisher.stop.cancel();
    publisher.task.await.unwrap();
    let error = publisher.status.lock().unwrap().config_error.clone().unwrap();
    assert!(error.contains("cannot read broker credentials"), "{error}");
    assert_eq!(queue.stats().points, 1);

    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(publish::run(queue.clone(), config, Arc::clone(&status), stop.clone()));
    let q = queue.clone();
    wait_until("the point to be published", Duration::from_secs(15), || {
        q.stats().points == 0
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let stored = read_stream(
        &nats.url(),
        async_nats::ConnectOptions::with_user_and_password("tagstream".into(), "s3cret".into()),
    )
    .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1.site, "auth");
}

/// A site with one simulated device on a free port, publishing to `url`.
fn site_manifests(dir: &Path, url: &str, device_port: u16, extra: &str) {
    std::fs::write(
        dir.join("site.yaml"),
        format!(
            "apiVersion: tagstream.io/v1alpha1
kind: Site
metadata: {{name: crashy}}
spec:
  broker: {{urls: [\"{url}\"]}}
  queue: {{flushInterval: 2ms}}
---
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {{name: pump}}
spec:
  site: crashy
  connection: {{tcp: {{host: 127.0.0.1, port: {device_port}}}}}
  pollInterval: 10ms
  tags:
    - {{name: speed, register: holding, address: 0, type: uint16, simulation: {{waveform: ramp, min: 0, max: 1000, period: 1s}}}}
    - {{name: temp, register: holding, address: 1, type: int16, simulation: {{waveform: sine, min: 10, max: 90, period: 2s}}}}
{extra}"
        ),
    )
    .unwrap();
}

fn ingestor(manifests: &Path, queue: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
        .args([
            "run",
            "--simulate",
            "--http",
            "127.0.0.1:0",
            "--reload-interval",
            "1h",
            "-f",
        ])
        .arg(manifests)
        .arg("--queue-dir")
        .arg(queue)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until a batch of points polled after `since` is published.
async fn until_publishing(published: &mut async_nats::Subscriber, since: i64) {
    let first = async {
        while let Some(message) = futures_util::StreamExt::next(published).await {
            let batch = <PointBatch as prost::Message>::decode(message.payload).unwrap();
            if batch.points.first().is_some_and(|p| p.timestamp_ns > since) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the ingestor publishes within 30 s of its start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ingestors_deliver_every_record_exactly_once() {
    for server in servers() {
        killed_ingestors(&server).await;
    }
}

/// Five SIGKILLs and a SIGTERM: every record once and in order, at most one gap per kill,
/// and what a kill lost is the last moments before it (the time from the last point in
/// the stream polled before the kill to the kill is printed, and bounded loosely here:
/// a starved process polls nothing, so it is no measure of loss alone).
async fn killed_ingestors(server: &Path) {
    let nats = Nats::start_in(None, server, None);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    site_manifests(&manifests, &nats.url(), free_port(), "");
    let queue = dir.path().join("queue");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut published = client.subscribe("tagstream.>").await.unwrap();
    let mut kills = Vec::new();
    for round in 0..5u64 {
        let started = tagstream_core::point::now_ns();
        let mut child = ingestor(&manifests, &queue);
        // Killed while it publishes: a fixed wait after the spawn killed a child still
        // starting on a loaded machine, before it had polled anything.
        until_publishing(&mut published, started).await;
        tokio::time::sleep(Duration::from_millis(100 + round * 150)).await;
        kills.push(tagstream_core::point::now_ns());
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // A last run, stopped with SIGTERM, drains what the killed ones left queued.
    let mut child = ingestor(&manifests, &queue);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the ingestor did not stop within 30s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stored = read_stream(&nats.url(), async_nats::ConnectOptions::new()).await;
    assert!(stored.len() > 50, "only {} messages", stored.len());
    assert_exactly_once_in_order(&stored, kills.len());
    let polled: Vec<i64> = stored
        .iter()
        .filter(|(_, b)| b.source == "pump")
        .filter_map(|(_, b)| b.points.first().map(|p| p.timestamp_ns))
        .collect();
    let windows: Vec<f64> = kills
        .iter()
        .map(|kill| {
            let last = polled
                .iter()
                .filter(|t| *t < kill)
                .max()
                .expect("points before each kill");
            (kill - last) as f64 / 1e6
        })
        .collect();
    println!(
        "{}: ms from the last point stored to each SIGKILL (polls every 10 ms, flushInterval 2ms): {windows:.0?}",
        server.display()
    );
    assert!(
        windows.iter().all(|w| *w < 1000.0),
        "a kill lost more than its last moments: {windows:?} ms"
    );
}

async fn status(address: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http_get(address, "/status").await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_manifest_is_applied_without_a_restart() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let port = free_port();
    site_manifests(&manifests, &nats.url(), port, "");
    let options = RunOptions {
        paths: vec![manifests.clone()],
        site: None,
        queue_dir: dir.path().join("queue"),
        credentials_dir: PathBuf::from("/nonexistent"),
        tls_dir: PathBuf::from("/nonexistent"),
        http: "127.0.0.1:0".parse().unwrap(),
        simulate: true,
        nats_url: None,
        reload_interval: Duration::from_millis(200),
        drain_deadline: Duration::from_secs(5),
    };
    let shutdown = CancellationToken::new();
    let (bound, address) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(service::run(options, shutdown.clone(), Some(bound)));
    let address = address.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(address).await["devices"]["pump"]["polls"].as_u64().unwrap_or(0) < 5 {
        assert!(Instant::now() < deadline, "the device was never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let polls_before = status(address).await["devices"]["pump"]["polls"].as_u64().unwrap();

    // A file the loader does not read (a log beside the manifests) changes nothing.
    std::fs::write(manifests.join("run.log"), "a log line\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let metrics = http_get(address, "/metrics").await.unwrap();
    assert!(metrics.contains("tagstream_config_reloads_total{} 0"), "{metrics}");

    // Add a formula and a broken one; the device stays as it was.
    let formulas = "---
apiVersion: tagstream.io/v1alpha1
kind: Formula
metadata: {name: speed-pct}
spec: {site: crashy, inputs: {s: pump/speed}, expression: s / 10}
---
apiVersion: tagstream.io/v1alpha1
kind: Formula
metadata: {name: broken}
spec: {site: crashy, inputs: {s: pump/speed}, expression: s +}
";
    site_manifests(&manifests, &nats.url(), port, formulas);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(address).await;
        if s["formulas"]["speed-pct"]["valid"] == true {
            assert_eq!(s["formulas"]["broken"]["valid"], false);
            assert!(s["formulas"]["broken"]["error"].as_str().unwrap().contains("operand"));
            let polls_after = s["devices"]["pump"]["polls"].as_u64().unwrap();
            assert!(
                polls_after >= polls_before,
                "the unchanged device was restarted: polls went {polls_before} -> {polls_after}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the reload never happened: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new formula's latest result shows in /status (the operator's Last Value).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(address).await;
        let speed = &s["formulas"]["speed-pct"];
        if let Some(value) = speed["lastValue"].as_str() {
            assert!(value.parse::<f64>().is_ok(), "{speed}");
            assert!(speed["lastValueNs"].as_i64().unwrap() > 0, "{speed}");
            assert!(s["formulas"]["broken"]["lastValue"].is_null());
            break;
        }
        assert!(Instant::now() < deadline, "no result in /status: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http_get(address, "/metrics").await.unwrap();
    assert!(metrics.contains("tagstream_formulas_invalid{} 1.0"), "{metrics}");
    assert!(metrics.contains("tagstream_config_reloads_total{} 1"), "{metrics}");
    assert!(
        metrics.contains("# TYPE tagstream_poll_cycles_skipped counter")
            && metrics.contains("tagstream_poll_cycles_skipped_total{device="),
        "{metrics}"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let derived = read_stream(&nats.url(), async_nats::ConnectOptions::new())
        .await
        .into_iter()
        .filter(|(_, b)| b.source == "speed-pct")
        .count();
    assert!(derived > 0, "the new formula's results reached JetStream");
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with openssl.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            status.expect("openssl is needed for the TLS test").success(),
            "openssl {args:?} failed"
        );
    };
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=tagstream-test-ca",
    ]);
    for (name, subject) in [("server", "/CN=localhost"), ("tls", "/CN=tagstream-ingestor")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ]);
        let ext = if name == "server" { "server.ext" } else { "client.ext" };
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "1",
            "-extfile",
            ext,
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let pki = tempfile::tempdir().unwrap();
    certificates(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let nats = Nats::start_with(Some(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}\n",
        p("server.crt"),
        p("server.key"),
        p("ca.crt")
    )));
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let mut config = publisher_config(&url, "tls");
    config.broker.tls = Some(tagstream_crds::site::BrokerTls {
        secret_name: "nats-tls".into(),
        client_certificate: true,
    });
    config.tls_dir = pki.path().to_path_buf();

    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueConfig::new(dir.path().join("q"))).unwrap().queue;
    queue.append(vec![counter_batch(42)]).await.unwrap();
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(publish::run(
        queue.clone(),
        config.clone(),
        Arc::clone(&status),
        stop.clone(),
    ));
    let q = queue.clone();
    let s = Arc::clone(&status);
    wait_until("the point to be published over TLS", Duration::from_secs(20), || {
        q.stats().points == 0
            || s.lock()
                .unwrap()
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("certificate"))
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(queue.stats().points, 0, "{:?}", status.lock().unwrap());
    let reader = publish::connect_options(&config).await.unwrap();
    let stored = read_stream(&url, reader).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1.site, "tls");
}

/// Publishes one point with `kind` credentials from `files` to a server with `auth`.
async fn publish_with(auth: &str, kind: CredentialsKind, files: &[(&str, &str)]) {
    let nats = Nats::start_with(Some(auth));
    let secrets = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(secrets.path().join(name), content).unwrap();
    }
    let mut config = publisher_config(&nats.url(), "auth");
    config.broker.credentials = Some(BrokerCredentials {
        secret_name: "nats-auth".into(),
        kind,
    });
    config.credentials_dir = secrets.path().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueConfig::new(dir.path().join("q"))).unwrap().queue;
    queue.append(vec![counter_batch(1)]).await.unwrap();
    let status = Arc::new(Mutex::new(PublisherStatus::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(publish::run(queue.clone(), config, Arc::clone(&status), stop.clone()));
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while queue.stats().points > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    assert!(drained.is_ok(), "{kind:?}: not published: {:?}", status.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_nkey_from_the_mounted_secret() {
    publish_with(
        "authorization { token: \"t0ken-s3cret\" }\n",
        CredentialsKind::Token,
        &[("token", "t0ken-s3cret\n")],
    )
    .await;
    let user = nkeys::KeyPair::new_user();
    let server = format!("authorization {{ users: [ {{ nkey: {} }} ] }}\n", user.public_key());
    publish_with(&server, CredentialsKind::Nkey, &[("nkey", &user.seed().unwrap())]).await;
}

/// The boiler with `t_in` and `t_out` in the order given, and `delta = t_out - t_in`:
/// always 20 K, whatever the order of the tags.
fn reordered_boiler(dir: &Path, url: &str, port: u16, out_first: bool) {
    let t_in = "{name: t_in, register: holding, address: 0, type: uint16, simulation: {waveform: constant, min: 20}}";
    let t_out = "{name: t_out, register: holding, address: 1, type: uint16, simulation: {waveform: constant, min: 40}}";
    let (first, second) = if out_first { (t_out, t_in) } else { (t_in, t_out) };
    std::fs::write(
        dir.join("site.yaml"),
        format!(
            "apiVersion: tagstream.io/v1alpha1
kind: Site
metadata: {{name: boiler-room}}
spec:
  broker: {{urls: [\"{url}\"]}}
  queue: {{flushInterval: 2ms}}
---
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {{name: boiler}}
spec:
  site: boiler-room
  connection: {{tcp: {{host: 127.0.0.1, port: {port}}}}}
  pollInterval: 10ms
  tags:
    - {first}
    - {second}
---
apiVersion: tagstream.io/v1alpha1
kind: Formula
metadata: {{name: delta}}
spec: {{site: boiler-room, inputs: {{a: boiler/t_in, b: boiler/t_out}}, expression: b - a}}
"
        ),
    )
    .unwrap();
}

/// Issue 28: batches polled before a reload that reordered a device's tags were mapped
/// through the new tag order, so formulas computed from the wrong tags with quality Good
/// (`delta` published as -20). Rewritten 60 times under load, every result is 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_a_devices_tags_under_load_never_feeds_a_formula_the_wrong_tag() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let port = free_port();
    reordered_boiler(&manifests, &nats.url(), port, false);
    let options = RunOptions {
        paths: vec![manifests.clone()],
        site: None,
        queue_dir: dir.path().join("queue"),
        credentials_dir: PathBuf::from("/nonexistent"),
        tls_dir: PathBuf::from("/nonexistent"),
        http: "127.0.0.1:0".parse().unwrap(),
        simulate: true,
        nats_url: None,
        reload_interval: Duration::from_millis(20),
        drain_deadline: Duration::from_secs(5),
    };
    let shutdown = CancellationToken::new();
    let (bound, address) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(service::run(options, shutdown.clone(), Some(bound)));
    let address = address.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(address).await["devices"]["boiler"]["polls"]
        .as_u64()
        .unwrap_or(0)
        < 20
    {
        assert!(
            Instant::now() < deadline,
            "the boiler was never polled: {}",
            status(address).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for round in 0..60 {
        reordered_boiler(&manifests, &nats.url(), port, round % 2 == 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let deltas: Vec<Point> = read_stream(&nats.url(), async_nats::ConnectOptions::new())
        .await
        .into_iter()
        .filter(|(_, b)| b.source == "delta")
        .flat_map(|(_, b)| b.points)
        .collect();
    assert!(deltas.len() > 100, "only {} results", deltas.len());
    let wrong: Vec<&Point> = deltas
        .iter()
        .filter(|p| match p.value {
            Some(Value::IntValue(v)) => v != 20,
            Some(Value::DoubleValue(v)) => (v - 20.0).abs() > 1e-9,
            _ => true,
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} results were computed from the wrong tags, e.g. {:?}",
        wrong.len(),
        deltas.len(),
        wrong.first()
    );
}

/// Issue 28: with `fullPolicy: pausePolling`, a full queue and no broker, SIGTERM hung:
/// the pollers waited on a full channel, the pipeline on the paused writer, and the
/// writer for room nobody would free. It must stop within its drain deadline, with
/// every record it had stored still in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_paused_full_queue_and_no_broker_stops_and_keeps_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mut yaml = format!(
        "apiVersion: tagstream.io/v1alpha1
kind: Site
metadata: {{name: paused}}
spec:
  broker: {{urls: [\"nats://127.0.0.1:{}\"]}}
  queue: {{maxSize: 17Mi, fullPolicy: pausePolling}}
",
        free_port()
    );
    for d in 0..8 {
        let _ = write!(
            yaml,
            "---
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {{name: d{d}}}
spec:
  site: paused
  connection: {{tcp: {{host: 127.0.0.1, port: {}}}}}
  pollInterval: 10ms
  tags:
",
            free_port()
        );
        for t in 0..60 {
            let _ = writeln!(
                yaml,
                "    - {{name: t{t}, register: holding, address: {t}, type: uint16, simulation: {{waveform: ramp, min: 0, max: 60000, period: 1s}}}}"
            );
        }
    }
    std::fs::write(manifests.join("site.yaml"), yaml).unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let queue_dir = dir.path().join("queue");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
        .args([
            "run",
            "--simulate",
            "--reload-interval",
            "1h",
            "--drain-deadline",
            "2s",
            "--http",
        ])
        .arg(http.to_string())
        .arg("-f")
        .arg(&manifests)
        .arg("--queue-dir")
        .arg(&queue_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let stored = loop {
        if let Some(body) = http_get(http, "/status").await
            && let Ok(s) = serde_json::from_str::<serde_json::Value>(&body)
            && s["queue"]["paused"] == true
        {
            break s["queue"]["records"].as_u64().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the queue never filled and paused within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("SIGTERM with a paused full queue: still running 15 s later (drain deadline 2 s)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = Queue::open(QueueConfig::new(&queue_dir)).unwrap().queue;
    let kept = queue.stats().records;
    assert!(
        kept >= stored,
        "{stored} records were stored when SIGTERM came, {kept} are left"
    );
    queue.close().await.unwrap();
}
