//! The operator binary at plant scale, started against objects that already exist (an
//! upgrade, a leader hand-over, an eviction): how long until every site's ConfigMap holds
//! all its members, what it writes once converged, and its memory.
//!
//! ```sh
//! cargo bench -p tagstream-operator --bench converge
//! # -- --sites 100 --devices-per-site 100 --latency-ms 2 --idle-secs 60 --operator PATH
//! #    --deadline-secs 300
//! scripts/control-plane.sh run 1.37 -- cargo bench -p tagstream-operator --bench converge -- --real
//! ```
//!
//! The fake API server of the tests serves the fleet over HTTP on loopback from this
//! process (pages of 500, a latency per request, watches from a `resourceVersion`); the
//! operator is the real `tagstream-operator` binary in a child process, with only a
//! kubeconfig, so its RSS is its own. `--operator` measures another build (e.g. an older
//! commit's) with the same fleet and server. The ingestors never answer, as when the
//! operator starts before its ingestors are up.
//!
//! `--real` runs the same fleet on the control plane of `TAGSTREAM_KUBECONFIG` (a real
//! kube-apiserver from `scripts/control-plane.sh`) in a namespace of its own, removed
//! afterwards. There the requests cannot be recorded: a watch on the rendered `ConfigMap`s
//! sees every version written, and the writes at rest are the objects whose
//! `resourceVersion` moved, and the events added.

#[path = "../tests/support/api.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod api;
#[path = "../tests/support/cluster.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod cluster;
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

/// A run taking longer than this is far off every target: it is stopped. A real API
/// server settles the statuses slower than the fake (about 150 status writes a second
/// on the project's machines), so `--real` waits three times as long.
fn deadline() -> Duration {
    let real = std::env::args().any(|a| a == "--real");
    Duration::from_secs(number("--deadline-secs", if real { 900 } else { 300 }))
}

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

/// Where the operator finds its API server.
enum ApiServerAt {
    /// The fake of the tests, served from this process.
    Fake(std::net::SocketAddr),
    /// A real one, through its kubeconfig.
    Kubeconfig(PathBuf),
}

/// The operator binary in a child process, with its log in a temporary directory.
struct Operator {
    child: std::process::Child,
    pid: u32,
    started: Instant,
    dir: tempfile::TempDir,
}

impl Operator {
    /// Starts `binary` against `api`.
    fn start(binary: &str, api: ApiServerAt, image: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = match api {
            ApiServerAt::Fake(address) => kubeconfig(dir.path(), address),
            ApiServerAt::Kubeconfig(path) => path,
        };
        let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
        let started = Instant::now();
        let mut command = std::process::Command::new(binary);
        if let Some(image) = image {
            command.env("TAGSTREAM_INGESTOR_IMAGE", image);
        }
        let child = command
            .args(["--leader-election", "false", "--http", "127.0.0.1:0"])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Self {
            pid: child.id(),
            child,
            started,
            dir,
        }
    }

    /// Gives up on a run that takes longer than any target: the child is killed first.
    fn give_up_after_deadline(&mut self, what: impl FnOnce() -> String) {
        if let Some(exit) = self.child.try_wait().unwrap() {
            panic!("the operator exited ({exit}):\n{}", self.log());
        }
        if self.started.elapsed() > deadline() {
            let (rss, peak) = memory_mib(self.pid);
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{} after {} s (RSS {rss:.0} MiB, peak {peak:.0} MiB)",
                what(),
                deadline().as_secs()
            );
        }
    }

    /// SIGTERM, then how long it took to exit.
    async fn stop(&mut self) -> Duration {
        std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        let stopping = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if stopping.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the operator did not stop within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stopping.elapsed()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }
}

/// A run's phase: when it ended, what was requested in it, the RSS at its end.
struct Phase {
    at: Duration,
    requests: Vec<api::Recorded>,
    rss: f64,
}

impl Phase {
    fn writes(&self) -> usize {
        self.requests.iter().filter(|r| r.is_write()).count()
    }
}

/// Until every site's ConfigMap holds all its members.
async fn until_converged(operator: &mut Operator, server: &ApiServer, sites: usize, per_site: usize) -> Phase {
    while !progress(&server.config_map_writes(), sites, per_site).0 {
        operator.give_up_after_deadline(|| {
            let writes = server.config_map_writes();
            let short = progress(&writes, sites, per_site).1;
            format!(
                "not every ConfigMap complete: {} writes, {short} with fewer members",
                writes.len()
            )
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = operator.started.elapsed();
    Phase {
        at,
        requests: server.take_requests(),
        rss: memory_mib(operator.pid).0,
    }
}

/// Until the statuses that follow the renderings (every Formula's validity, every
/// Device's readiness) are written: no write for [`QUIET`].
async fn until_settled(operator: &mut Operator, server: &ApiServer) -> Phase {
    let mut requests = Vec::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < QUIET {
        operator.give_up_after_deadline(|| "statuses still written".to_owned());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let new = server.take_requests();
        if new.iter().any(api::Recorded::is_write) {
            quiet_since = Instant::now();
        }
        requests.extend(new);
    }
    Phase {
        at: operator.started.elapsed().saturating_sub(QUIET),
        requests,
        rss: memory_mib(operator.pid).0,
    }
}

/// `duration` of steady state (ingestors unreachable, nothing changes), and the RSS growth
/// over it in MiB/s.
async fn steady_state(operator: &Operator, server: &ApiServer, duration: Duration) -> (Phase, f64) {
    let first = memory_mib(operator.pid).0;
    tokio::time::sleep(duration).await;
    let rss = memory_mib(operator.pid).0;
    let phase = Phase {
        at: operator.started.elapsed(),
        requests: server.take_requests(),
        rss,
    };
    (phase, (rss - first) / duration.as_secs_f64().max(1.0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let sites = usize::try_from(number("--sites", 100)).unwrap();
    let per_site = usize::try_from(number("--devices-per-site", 100)).unwrap();
    let latency = Duration::from_millis(number("--latency-ms", 2));
    let idle = Duration::from_secs(number("--idle-secs", 60));
    let other = arg("--operator");
    let binary = other
        .clone()
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tagstream-operator").to_owned());
    if std::env::args().any(|a| a == "--real") {
        real::run(&binary, sites, per_site, idle).await;
        return;
    }

    let fleet = plant::fleet(sites, per_site);
    let server = ApiServer::with_latency(latency);
    server.insert_all(fleet.objects());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener));

    // This build runs with only a kubeconfig; older ones need the ingestor image.
    let image = other.is_some().then_some("ghcr.io/tagstream/tagstream-ingestor:0.1.0");
    let mut operator = Operator::start(&binary, ApiServerAt::Fake(address), image);
    let converged = until_converged(&mut operator, &server, sites, per_site).await;
    let settled = until_settled(&mut operator, &server).await;
    let (steady, growth) = steady_state(&operator, &server, idle).await;
    let peak = memory_mib(operator.pid).1;
    let stopped = operator.stop().await;

    let writes = server.config_map_writes();
    let (_, short) = progress(&writes, sites, per_site);
    let log = operator.log();
    let level = |level: &str| log.lines().filter(|l| l.contains(level)).count();

    println!(
        "{sites} Sites, {} Devices, {} Formulas present before start; {} ms per request; {binary}",
        fleet.devices.len(),
        fleet.formulas.len(),
        latency.as_millis()
    );
    println!("| figure | value |");
    println!("| --- | --- |");
    println!(
        "| every ConfigMap complete after | {:.1} s |",
        converged.at.as_secs_f64()
    );
    println!("| ConfigMap writes / with fewer members | {} / {short} |", writes.len());
    println!(
        "| requests / writes until then | {} / {} |",
        converged.requests.len(),
        converged.writes()
    );
    println!("| statuses settled after | {:.1} s |", settled.at.as_secs_f64());
    println!("| writes while settling | {:?} |", writes_by_kind(&settled.requests));
    println!(
        "| requests / writes in {} s of steady state | {} / {} {:?} |",
        idle.as_secs(),
        steady.requests.len(),
        steady.writes(),
        writes_by_kind(&steady.requests)
    );
    println!(
        "| RSS converged / settled / after steady state / peak | {:.0} / {:.0} / {:.0} / {peak:.0} MiB |",
        converged.rss, settled.rss, steady.rss
    );
    println!("| RSS growth in steady state | {growth:.3} MiB/s |");
    println!("| stopped after SIGTERM in | {:.2} s |", stopped.as_secs_f64());
    println!(
        "| log lines: total / WARN / ERROR | {} / {} / {} |",
        log.lines().count(),
        level("WARN"),
        level("ERROR")
    );
}

/// The same fleet and phases on a real API server.
mod real {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use tokio_util::sync::CancellationToken;

    use super::{
        ApiServerAt, Operator, QUIET,
        cluster::{Cluster, Renderings, changed, snapshot},
        memory_mib, plant,
    };

    /// Writes by kind, from [`changed`]'s `Kind name: before -> after` lines.
    fn by_kind(changes: &[String]) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for change in changes {
            *kinds
                .entry(change.split(' ').next().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        kinds
    }

    pub async fn run(binary: &str, sites: usize, per_site: usize, idle: Duration) {
        let cluster = Cluster::connect()
            .await
            .expect("--real needs TAGSTREAM_KUBECONFIG: run through scripts/control-plane.sh");
        let namespace = cluster.namespace(&format!("converge-{}", std::process::id())).await;
        let fleet = plant::fleet(sites, per_site);
        let creating = Instant::now();
        cluster.create_all(&namespace, &fleet.sites).await;
        cluster.create_all(&namespace, &fleet.devices).await;
        cluster.create_all(&namespace, &fleet.formulas).await;
        let created = creating.elapsed();
        let watching = CancellationToken::new();
        let renderings = Renderings::watch(&cluster, &namespace, watching.clone());

        let kubeconfig = std::env::var_os("TAGSTREAM_KUBECONFIG").unwrap().into();
        let mut operator = Operator::start(binary, ApiServerAt::Kubeconfig(kubeconfig), None);
        while renderings.complete(per_site).0 < sites {
            operator.give_up_after_deadline(|| {
                let (complete, written) = renderings.complete(per_site);
                format!("{complete} of {written} ConfigMaps complete")
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let converged = (operator.started.elapsed(), memory_mib(operator.pid).0);

        let mut last = snapshot(&cluster, &namespace).await;
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < QUIET {
            operator.give_up_after_deadline(|| "statuses still written".to_owned());
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = snapshot(&cluster, &namespace).await;
            if now != last {
                quiet_since = Instant::now();
            }
            last = now;
        }
        let settled = (
            operator.started.elapsed().saturating_sub(QUIET),
            memory_mib(operator.pid).0,
        );
        tokio::time::sleep(idle).await;
        let at_rest = by_kind(&changed(&last, &snapshot(&cluster, &namespace).await));
        let peak = memory_mib(operator.pid).1;
        let stopped = operator.stop().await;
        watching.cancel();
        let all = renderings.all();
        let short = all
            .iter()
            .filter(|r| r.devices != per_site || r.formulas != per_site)
            .count();
        let version = cluster.client.apiserver_version().await.unwrap().git_version;

        println!(
            "{sites} Sites, {} Devices, {} Formulas created in {:.1} s before start; kube-apiserver {version}; {binary}",
            fleet.devices.len(),
            fleet.formulas.len(),
            created.as_secs_f64()
        );
        println!("| figure | value |");
        println!("| --- | --- |");
        println!(
            "| every ConfigMap complete after | {:.1} s |",
            converged.0.as_secs_f64()
        );
        println!("| ConfigMap writes / with fewer members | {} / {short} |", all.len());
        println!("| statuses settled after | {:.1} s |", settled.0.as_secs_f64());
        println!("| writes in {} s at rest | {at_rest:?} |", idle.as_secs());
        println!(
            "| RSS converged / settled / peak | {:.0} / {:.0} / {peak:.0} MiB |",
            converged.1, settled.1
        );
        println!("| stopped after SIGTERM in | {:.2} s |", stopped.as_secs_f64());
        drop(namespace);
    }
}
