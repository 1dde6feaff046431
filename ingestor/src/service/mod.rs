//! `tagstream-ingestor run`: the service. Acquisition feeds the calculation DAG and the
//! persistent queue through bounded channels; the publisher drains the queue to
//! JetStream; `/status` and `/metrics` report it all. The configuration files are polled
//! for changes (the operator's ConfigMap mount swaps a symlink, so content is compared,
//! not mtimes): only the endpoints whose devices changed are restarted, formulas are
//! recompiled where they changed, and the queue is never touched.
//!
//! With `writes.enabled`, a write service takes setpoint requests over NATS and hands
//! them to the endpoint tasks ([`crate::writes`]).
//!
//! Shutdown (SIGTERM): answer the writes in progress, stop polling, persist what was
//! polled, publish what is queued until the queue is empty or the drain deadline passes,
//! close the queue.

mod encode;
pub mod http;
pub(crate) mod pipeline;
pub mod state;

use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tagstream_crds::{
    Device,
    manifest::{load_report, yaml_files},
};
use tokio::{
    sync::{Mutex, mpsc},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::{pipeline::Derivation, state::SiteState};
use tagstream_core::config::{self, SiteConfig, quantity_bytes};

use crate::{
    acquisition::poller::{self, PolledBatch, WriteJob},
    publish::{self, PublisherConfig},
    queue::{Queue, QueueConfig},
    simulate::{self, Faults},
    writes::{Route, WriteRoutes, WriteService},
};

/// How `run` is started (also its command-line arguments).
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Manifest files or directories (the operator mounts the rendered site here).
    #[arg(short = 'f', long = "filename", required = true)]
    pub paths: Vec<PathBuf>,
    /// The site to run when the manifests hold several.
    #[arg(long)]
    pub site: Option<String>,
    /// The queue's directory (the PVC in Kubernetes).
    #[arg(long, default_value = "/var/lib/tagstream/queue")]
    pub queue_dir: PathBuf,
    /// Where the broker credentials Secret is mounted.
    #[arg(long, default_value = "/etc/tagstream/credentials")]
    pub credentials_dir: PathBuf,
    /// Where the broker TLS Secret is mounted.
    #[arg(long, default_value = "/etc/tagstream/tls")]
    pub tls_dir: PathBuf,
    /// Address of /metrics, /healthz, /readyz and /status.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub http: SocketAddr,
    /// Serve the site's devices from an in-process simulator on 127.0.0.1 (their manifest
    /// ports) and poll that.
    #[arg(long)]
    pub simulate: bool,
    /// NATS URLs to use instead of the Site's (comma-separated; local runs).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// How often the manifests are checked for changes.
    #[arg(long, value_parser = tagstream_core::config::parse_duration, default_value = "2s")]
    pub reload_interval: Duration,
    /// On SIGTERM, how long to keep publishing queued points before exiting.
    #[arg(long, value_parser = tagstream_core::config::parse_duration, default_value = "20s")]
    pub drain_deadline: Duration,
}

/// The site from the manifests.
fn load_site(options: &RunOptions) -> anyhow::Result<SiteConfig> {
    let report = load_report(&options.paths)?;
    for diagnostic in &report.diagnostics {
        warn!(%diagnostic, "manifest problem; the object is left out");
    }
    let mut sites = config::sites(&report);
    let site = match &options.site {
        Some(name) => sites
            .into_iter()
            .find(|s| &s.name == name)
            .with_context(|| format!("no site {name:?} in the manifests"))?,
        None if sites.len() == 1 => sites.remove(0),
        None => {
            let names: Vec<String> = sites.iter().map(|s| format!("{}/{}", s.namespace, s.name)).collect();
            anyhow::bail!(
                "the manifests hold {} sites ({}); choose one with --site",
                names.len(),
                names.join(", ")
            );
        }
    };
    Ok(site)
}

/// A hash of the manifests' content, file by file as the loader reads them: what tells a
/// reload whether anything changed (a log or an editor's file beside them does not).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        for file in yaml_files(path).unwrap_or_default() {
            file.hash(&mut hasher);
            std::fs::read(&file).ok().hash(&mut hasher);
        }
    }
    hasher.finish()
}

fn local(mut devices: Vec<Device>) -> Vec<Device> {
    for device in &mut devices {
        let connection = &mut device.spec.connection;
        for endpoint in [&mut connection.tcp, &mut connection.rtu_over_tcp]
            .into_iter()
            .flatten()
        {
            endpoint.host = "127.0.0.1".into();
        }
    }
    devices
}

async fn start_simulator(devices: &[Device], shutdown: &CancellationToken) -> anyhow::Result<()> {
    // A serial device in-process would be the very port the poller opens.
    let (serial, tcp): (Vec<Device>, Vec<Device>) =
        devices.iter().cloned().partition(|d| d.spec.connection.rtu.is_some());
    if !serial.is_empty() {
        warn!(
            devices = serial.len(),
            "RTU devices cannot be simulated in-process; use `simulate --rtu-path`"
        );
    }
    let localhost = std::net::Ipv4Addr::LOCALHOST.into();
    let mut tasks = simulate::serve_all(&tcp, localhost, None, &Faults::default(), shutdown)
        .await
        .context("starting the in-process simulator")?;
    // The endpoints run until `shutdown`; nothing waits for them.
    tasks.detach_all();
    Ok(())
}

fn queue_config(site: &SiteConfig, dir: &PathBuf) -> QueueConfig {
    let mut config = QueueConfig::new(dir);
    config.max_bytes = quantity_bytes(&site.spec.queue.max_size.0).unwrap_or(config.max_bytes);
    config.policy = site.spec.queue.full_policy;
    config.flush_interval = site.spec.queue.flush_interval.get();
    config.acked_retention = site.spec.queue.acked_retention.get();
    config.memory_bytes = quantity_bytes(&site.spec.queue.memory_size.0)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(config.memory_bytes);
    config
}

fn publisher_config(site: &SiteConfig, options: &RunOptions) -> PublisherConfig {
    let mut broker = site.spec.broker.clone();
    if let Some(url) = &options.nats_url {
        broker.urls = url.split(',').map(str::to_owned).collect();
    }
    PublisherConfig {
        broker,
        stream: site.spec.stream.clone(),
        namespace: site.namespace.clone(),
        site: site.name.clone(),
        credentials_dir: options.credentials_dir.clone(),
        tls_dir: options.tls_dir.clone(),
        max_in_flight: 256,
        chunk_records: 64,
    }
}

/// The devices behind one endpoint and the task polling them.
struct EndpointPoller {
    devices: Vec<Device>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    writes: mpsc::Sender<WriteJob>,
}

/// The longest a reload waits for a replaced endpoint's poller to end.
const ENDPOINT_STOP_LIMIT: Duration = Duration::from_secs(30);

/// The polling tasks, one per endpoint, each with its own stop token, and where each
/// device's writes go.
struct Pollers {
    endpoints: BTreeMap<String, EndpointPoller>,
    routes: WriteRoutes,
}

impl Pollers {
    async fn start(devices: &[Device], out: &mpsc::Sender<PolledBatch>, state: &SiteState) -> Self {
        let mut pollers = Self {
            endpoints: BTreeMap::new(),
            routes: WriteRoutes::default(),
        };
        pollers.apply(devices, out, state).await;
        pollers
    }

    /// Restarts the endpoints whose devices changed; leaves the others polling. A
    /// replaced endpoint's task has ended before its successor starts: one task owns a
    /// bus (a serial line, a gateway) at a time, and the old one polls no more after the
    /// reload (issue 28: it was cancelled but not awaited, and could poll once more).
    async fn apply(&mut self, devices: &[Device], out: &mpsc::Sender<PolledBatch>, state: &SiteState) -> usize {
        let wanted = poller::by_endpoint(devices);
        let mut restarted = 0;
        let mut stopped = Vec::new();
        let endpoints = std::mem::take(&mut self.endpoints);
        for (endpoint, running) in endpoints {
            if wanted.get(&endpoint) == Some(&running.devices) {
                self.endpoints.insert(endpoint, running);
            } else {
                running.stop.cancel();
                stopped.push((endpoint, running.task));
            }
        }
        for (endpoint, task) in stopped {
            // A poll in flight ends within its device's timeout; the bound is for a task
            // stuck anyway, which is then left behind rather than blocking the reload.
            if tokio::time::timeout(ENDPOINT_STOP_LIMIT, task).await.is_err() {
                warn!(%endpoint, limit = ?ENDPOINT_STOP_LIMIT, "a replaced endpoint's poller did not stop in time; starting its successor anyway");
            }
        }
        let mut health = state.devices.lock().expect("devices lock");
        health.retain(|name, _| devices.iter().any(|d| d.metadata.name.as_deref() == Some(name)));
        for (endpoint, group) in wanted {
            if self.endpoints.contains_key(&endpoint) {
                continue;
            }
            let stop = CancellationToken::new();
            let started = poller::spawn_endpoint(&group, out, &stop);
            health.extend(started.health);
            self.endpoints.insert(
                endpoint,
                EndpointPoller {
                    devices: group,
                    stop,
                    task: started.task,
                    writes: started.writes,
                },
            );
            restarted += 1;
        }
        *self.routes.write().expect("routes lock") = self
            .endpoints
            .values()
            .flat_map(|running| {
                running.devices.iter().map(|device| {
                    let route = Route {
                        jobs: running.writes.clone(),
                        spec: device.spec.clone(),
                    };
                    (device.metadata.name.clone().unwrap_or_default(), route)
                })
            })
            .collect();
        restarted
    }

    async fn stop(self) {
        for running in self.endpoints.into_values() {
            running.stop.cancel();
            let _ = running.task.await;
        }
    }
}

fn record_formulas(state: &SiteState, derivation: &Derivation) {
    *state.formulas.lock().expect("formulas lock") = derivation.calc.order().map(|f| f.name.clone()).collect();
    *state.formula_issues.lock().expect("issues lock") = derivation
        .calc
        .issues()
        .iter()
        .map(|(name, issue)| (name.clone(), issue.to_string()))
        .collect();
    for (name, issue) in derivation.calc.issues() {
        warn!(formula = %name, %issue, "formula left out");
    }
}

/// A running site: what a reload changes and what shutdown stops.
struct Runtime {
    options: RunOptions,
    site: SiteConfig,
    fingerprint: u64,
    queue: Queue,
    state: Arc<SiteState>,
    derivation: Arc<Mutex<Derivation>>,
    pollers: Pollers,
    polled: mpsc::Sender<PolledBatch>,
    publisher: JoinHandle<()>,
    publisher_stop: CancellationToken,
    /// The write service, when the Site enables writes.
    writes: Option<(JoinHandle<()>, CancellationToken)>,
}

impl Runtime {
    fn spawn_writes(&mut self) {
        if !self.site.spec.writes.enabled {
            return;
        }
        let stop = CancellationToken::new();
        let service = WriteService {
            broker: publisher_config(&self.site, &self.options),
            writes: self.site.spec.writes.clone(),
            routes: Arc::clone(&self.pollers.routes),
            queue: self.queue.clone(),
            state: Arc::clone(&self.state),
        };
        self.writes = Some((tokio::spawn(service.run(stop.clone())), stop));
    }

    /// Stops the write service, once the writes handed to devices are answered.
    async fn stop_writes(&mut self) {
        if let Some((task, stop)) = self.writes.take() {
            stop.cancel();
            let _ = task.await;
        }
    }

    fn spawn_publisher(&mut self) {
        self.publisher_stop = CancellationToken::new();
        let config = publisher_config(&self.site, &self.options);
        let status = Arc::clone(&self.state.publisher);
        self.publisher = tokio::spawn(publish::run(
            self.queue.clone(),
            config,
            status,
            self.publisher_stop.clone(),
        ));
    }

    /// Applies changed manifests: restarts changed endpoints, recompiles changed
    /// formulas, restarts the publisher when the broker or stream changed.
    async fn reload(&mut self) {
        // Validating the manifests (schema and CEL rules) costs far more than reading
        // them, and they rarely change: only changed content is loaded.
        let current = fingerprint(&self.options.paths);
        if current == self.fingerprint {
            return;
        }
        // Set before loading: an unusable change is reported once, not at every check.
        self.fingerprint = current;
        let mut next = match load_site(&self.options) {
            Ok(loaded) => loaded,
            Err(e) => {
                error!(error = %format!("{e:#}"), "the new configuration cannot be used; the running one stays");
                return;
            }
        };
        if self.options.simulate {
            next.devices = local(next.devices);
        }
        let restarted = self.pollers.apply(&next.devices, &self.polled, &self.state).await;
        let reconfigured = {
            let mut derivation = self.derivation.lock().await;
            let outcome = derivation.reconfigure(&next);
            record_formulas(&self.state, &derivation);
            outcome
        };
        pipeline::flush_reconfigured(&self.derivation, &self.queue).await;
        let publisher_changed = next.spec.broker != self.site.spec.broker || next.spec.stream != self.site.spec.stream;
        let writes_changed = next.spec.broker != self.site.spec.broker || next.spec.writes != self.site.spec.writes;
        if next.spec.queue != self.site.spec.queue {
            warn!("queue settings changed; they apply when the ingestor restarts");
        }
        self.site = next;
        if publisher_changed {
            self.publisher_stop.cancel();
            let _ = (&mut self.publisher).await;
            self.spawn_publisher();
            warn!("broker or stream settings changed: the publisher was restarted");
        }
        if writes_changed {
            self.stop_writes().await;
            self.spawn_writes();
            info!(enabled = self.site.spec.writes.enabled, "write settings changed");
        }
        self.state.reloads.fetch_add(1, Ordering::Relaxed);
        info!(
            restarted_endpoints = restarted,
            compiled_formulas = reconfigured.compiled,
            reused_formulas = reconfigured.reused,
            "configuration reloaded"
        );
    }

    /// Stops polling, persists what was polled, publishes until the queue is empty or the
    /// drain deadline passes, and closes the queue.
    async fn stop(mut self, pipeline: JoinHandle<()>) -> anyhow::Result<()> {
        info!("stopping: polling stops, queued points are published until the drain deadline");
        // A paused queue (pausePolling, no broker) would hold the pipeline, and through the
        // full channel the pollers, forever.
        self.queue.stop_waiting();
        // Before the pollers: the writes they were handed are answered and audited.
        self.stop_writes().await;
        self.pollers.stop().await;
        drop(self.polled);
        let _ = pipeline.await;
        let deadline = Instant::now() + self.options.drain_deadline;
        while self.queue.records() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.queue.stats().points;
        if left > 0 {
            warn!(
                points = left,
                "drain deadline passed; the points stay queued for the next start"
            );
        }
        self.publisher_stop.cancel();
        let _ = self.publisher.await;
        drop(self.state);
        self.queue.close().await?;
        info!("stopped");
        Ok(())
    }
}

/// Runs the site until `shutdown`; sends the address of `/status` and `/metrics` to
/// `bound` as soon as it listens.
pub async fn run(
    options: RunOptions,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    // Taken before loading, as a reload does: a change made while loading shows at the
    // next check.
    let fingerprint = fingerprint(&options.paths);
    let mut site = load_site(&options)?;
    let simulator = CancellationToken::new();
    let _simulator_guard = simulator.clone().drop_guard();
    if options.simulate {
        site.devices = local(site.devices);
        start_simulator(&site.devices, &simulator).await?;
    }
    let opened = Queue::open(queue_config(&site, &options.queue_dir))
        .with_context(|| format!("opening the queue in {}", options.queue_dir.display()))?;
    let queue = opened.queue;
    let state = Arc::new(SiteState::new(
        &site.namespace,
        &site.name,
        queue.clone(),
        opened.moved_aside,
    ));
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    let address = http::serve(options.http, Arc::clone(&state), http_stop).await?;
    info!(%address, site = %format!("{}/{}", site.namespace, site.name), devices = site.devices.len(), formulas = site.formulas.len(), "ingestor running; /status and /metrics are served");
    if let Some(bound) = bound {
        let _ = bound.send(address);
    }

    let derivation = Arc::new(Mutex::new(Derivation::new(&site)));
    record_formulas(&state, &*derivation.lock().await);
    let (polled, rx) = mpsc::channel::<PolledBatch>(4096);
    let pollers = Pollers::start(&site.devices, &polled, &state).await;
    let pipeline = tokio::spawn(pipeline::run(
        rx,
        Arc::clone(&derivation),
        queue.clone(),
        Arc::clone(&state),
    ));
    let mut runtime = Runtime {
        options,
        site,
        fingerprint,
        queue,
        state,
        derivation,
        pollers,
        polled,
        publisher: tokio::spawn(async {}),
        publisher_stop: CancellationToken::new(),
        writes: None,
    };
    runtime.spawn_publisher();
    runtime.spawn_writes();
    runtime.state.ready.store(true, Ordering::Relaxed);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(runtime.options.reload_interval) => runtime.reload().await,
        }
    }
    runtime.stop(pipeline).await
}
