//! `tagstream-ingestor tail` as users run it: under the NATS authorization of
//! docs/writes.md, and piped into a reader that stops early (`tail | head`).

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use prost::Message as _;
use support::{child::KilledOnDrop, nats::Nats};
use tagstream_proto::v1::{Point, PointBatch, point::Value};

fn batch(n: u64) -> bytes::Bytes {
    PointBatch {
        namespace: "default".into(),
        site: "plant-a".into(),
        source: "boiler".into(),
        points: vec![Point {
            tag: "temperature_out".into(),
            timestamp_ns: 1_795_358_891_640_806_645,
            value: Some(Value::DoubleValue(n as f64)),
            ..Point::default()
        }],
        ..PointBatch::default()
    }
    .encode_to_vec()
    .into()
}

/// Users as docs/writes.md's authorization has them, reduced to what `tail` needs.
const USERS: &str = "authorization { users: [
  {user: historian, password: historian-pw, permissions: {subscribe: \"tagstream.>\"}},
  {user: tagstream, password: ingest-pw, permissions: {publish: \"tagstream.>\"}}
] }
";

fn tail(url: &str) -> KilledOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
        .args(["tail", "--nats-url", url, "--subject", "tagstream.>"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    KilledOnDrop(child)
}

/// Publishes a batch every 50 ms as the ingestor's user until `until` holds (at most 20 s).
async fn publish_until(nats: &Nats, mut until: impl FnMut() -> bool) {
    let options = async_nats::ConnectOptions::with_user_and_password("tagstream".into(), "ingest-pw".into());
    let client = options.connect(nats.url()).await.unwrap();
    let started = Instant::now();
    let mut n = 0;
    while !until() {
        assert!(started.elapsed() < Duration::from_secs(20), "gave up after 20 s");
        client
            .publish("tagstream.default.plant-a.boiler", batch(n))
            .await
            .unwrap();
        client.flush().await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The user and password in the URL authenticate, as they do for `write`; then the
/// reader goes away and `tail` ends quietly (it panicked: "failed printing to stdout").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_authenticates_from_the_url_and_ends_quietly_when_its_reader_goes() {
    let nats = Nats::start_with(Some(USERS));
    let mut child = tail(&format!("nats://historian:historian-pw@127.0.0.1:{}", nats.port));
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        // The header and the first point, then the reader goes, as `head -2` does.
        for _ in 0..2 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            lines_tx.send(line).unwrap();
        }
    });
    let mut seen = Vec::new();
    publish_until(&nats, || {
        seen.extend(lines.try_iter());
        seen.len() >= 2
    })
    .await;
    reader.join().unwrap();
    assert!(
        seen[1].contains("default/plant-a") && seen[1].contains("temperature_out"),
        "{seen:?}"
    );
    // The pipe's reading end is closed now: more points make `tail` write into it.
    let mut status = None;
    publish_until(&nats, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    })
    .await;
    let status = status.unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
