//! The operator binary at plant scale, started against objects that already exist (an
//! upgrade, a leader hand-over, an eviction): how long until every site's ConfigMap holds
//! all its members, what it writes once converged, and its memory.
//!
//! ```sh
//! cargo bench -p tagstream-operator --bench converge
//! # -- --sites 100 --devices-per-site 100 --latency-ms 2 --idle-secs 60 --operator PATH
//! ```
//!
//! The fake API server of the tests serves the fleet over HTTP on loopback from this
//! process (pages of 500, a latency per request, watches from a `resourceVersion`); the
//! operator is the real `tagstream-operator` binary in a child process, with only a
//! kubeconfig, so its RSS is its own. `--operator` measures another build (e.g. an older
//! commit's) with the same fleet and server. The ingestors never answer, as when the
//! operator starts before its ingestors are up.

#[path = "../tests/support/api.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod api;
#[path = "../tests/support/plant.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod plant;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use api::{ApiServer, ConfigMapWrite};
use kube::{Resource, ResourceExt};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn number(name: &str, default: u64) -> u64 {
    arg(name).map_or(default, |v| v.parse().expect("a number"))
}

fn path<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "/apis/tagstream.io/v1alpha1/namespaces/plant/{}/{}",
        K::plural(&()),
        object.name_any()
    )
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn kubeconfig(dir: &Path, server: std::net::SocketAddr) -> PathBuf {
    let file = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters: [{{name: fake, cluster: {{server: 'http://{server}'}}}}]\n\
         users: [{{name: fake, user: {{}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: plant}}}}]\n"
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// Whether every site's last ConfigMap write holds all its members; and how many writes
/// held fewer.
fn progress(writes: &[ConfigMapWrite], sites: usize, per_site: usize) -> (bool, usize) {
    let full = |w: &ConfigMapWrite| w.devices == per_site && w.formulas == per_site;
    let latest: BTreeMap<_, _> = writes.iter().map(|w| (w.name.as_str(), w)).collect();
    let complete = latest.len() == sites && latest.values().all(|w| full(w));
    (complete, writes.iter().filter(|w| !full(w)).count())
}

/// No write for this long (two of the operator's default status periods): the statuses
/// have settled.
const QUIET: Duration = Duration::from_secs(20);

/// How many writes of each kind: `PATCH devices/status`, `POST events`, ...
fn writes_by_kind(requests: &[api::Recorded]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for request in requests.iter().filter(|r| r.is_write()) {
        *kinds.entry(kind_of(request)).or_default() += 1;
    }
    kinds
}

/// `PATCH devices/status`, `POST events`, ...: a write's method and resource.
fn kind_of(request: &api::Recorded) -> String {
    let path = request.uri.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').collect();
    let resource = segments
        .iter()
        .position(|s| *s == "namespaces")
        .and_then(|i| segments.get(i + 2))
        .copied()
        .unwrap_or(path);
    let status = if path.ends_with("/status") { "/status" } else { "" };
    format!("{} {resource}{status}", request.method)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let sites = usize::try_from(number("--sites", 100)).unwrap();
    let per_site = usize::try_from(number("--devices-per-site", 100)).unwrap();
    let latency = Duration::from_millis(number("--latency-ms", 2));
    let idle = Duration::from_secs(number("--idle-secs", 60));
    let binary = arg("--operator").unwrap_or_else(|| env!("CARGO_BIN_EXE_tagstream-operator").to_owned());

    let fleet = plant::fleet(sites, per_site);
    let server = ApiServer::with_latency(latency);
    for site in &fleet.sites {
        server.insert(&path(site), site);
    }
    for device in &fleet.devices {
        server.insert(&path(device), device);
    }
    for formula in &fleet.formulas {
        server.insert(&path(formula), formula);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener));
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();

    let started = Instant::now();
    let mut child = std::process::Command::new(&binary)
        .args(["--leader-election", "false", "--http", "127.0.0.1:0"])
        .env("KUBECONFIG", kubeconfig(dir.path(), address))
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let pid = child.id();

    let deadline = started + Duration::from_secs(300);
    let converged = loop {
        let (complete, _) = progress(&server.config_map_writes(), sites, per_site);
        if complete {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "not converged in 300 s: {} ConfigMap writes",
                server.config_map_writes().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let converging = server.take_requests();
    let (rss_converged, _) = memory_mib(pid);

    // The statuses follow the renderings (every Formula's validity, every Device's
    // readiness): settled once no write came for two status periods.
    let mut settling = Vec::new();
    let mut quiet_since = Instant::now();
    let settled = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let requests = server.take_requests();
        if requests.iter().any(api::Recorded::is_write) {
            quiet_since = Instant::now();
        }
        settling.extend(requests);
        if quiet_since.elapsed() >= QUIET {
            break started.elapsed() - QUIET;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("statuses still written after 300 s");
        }
    };
    let (rss_settled, _) = memory_mib(pid);

    // Steady state: ingestors unreachable, nothing changes. Sample RSS to see growth.
    let mut samples = Vec::new();
    let idle_started = Instant::now();
    while idle_started.elapsed() < idle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(memory_mib(pid).0);
    }
    let (rss_idle, peak) = memory_mib(pid);
    let idle_requests = server.take_requests();
    let idle_writes = idle_requests.iter().filter(|r| r.is_write()).count();
    let idle_by_kind = writes_by_kind(&idle_requests);

    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let stopping = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if stopping.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the operator did not stop within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped = stopping.elapsed();

    let writes = server.config_map_writes();
    let (_, short) = progress(&writes, sites, per_site);
    let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
    let level = |level: &str| log.lines().filter(|l| l.contains(level)).count();

    println!(
        "{sites} Sites, {} Devices, {} Formulas present before start; {} ms per request; {binary}",
        fleet.devices.len(),
        fleet.formulas.len(),
        latency.as_millis()
    );
    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| every ConfigMap complete after | {:.1} s |", converged.as_secs_f64());
    println!("| ConfigMap writes / with fewer members | {} / {short} |", writes.len());
    println!(
        "| requests / writes until converged | {} / {} |",
        converging.len(),
        converging.iter().filter(|r| r.is_write()).count()
    );
    println!("| statuses settled after | {:.1} s |", settled.as_secs_f64());
    println!("| writes while settling | {:?} |", writes_by_kind(&settling));
    println!(
        "| requests / writes in {} s of steady state | {} / {idle_writes} |",
        idle.as_secs(),
        idle_requests.len()
    );
    if !idle_by_kind.is_empty() {
        println!("| steady-state writes | {idle_by_kind:?} |");
    }
    println!(
        "| RSS converged / settled / after steady state / peak | {rss_converged:.0} / {rss_settled:.0} / {rss_idle:.0} / {peak:.0} MiB |"
    );
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let seconds = samples.len().saturating_sub(1).max(1) as f64;
        println!("| RSS growth in steady state | {:.3} MiB/s |", (last - first) / seconds);
    }
    println!("| stopped after SIGTERM in | {:.2} s |", stopped.as_secs_f64());
    println!(
        "| log lines: total / WARN / ERROR | {} / {} / {} |",
        log.lines().count(),
        level("WARN"),
        level("ERROR")
    );
}
