//! `tagstream-operator`: runs in the cluster from the Helm chart, or on a developer's
//! machine against the cluster of the current kubeconfig (`cargo run -p tagstream-operator`).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::registry::Registry;
use tagstream_core::config::parse_duration;
use tagstream_crds::SiteSpec;
use tagstream_operator::{
    controller::{OperatorSettings, run},
    render::Settings,
    report::ReportSource,
    status_loop::StatusSettings,
};
use tokio_util::sync::CancellationToken;

/// tagstream's Kubernetes operator: one ingestor per Site, with status from the ingestors.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Image of the per-site ingestor; by default the ingestor of this operator's version.
    #[arg(long, env = "TAGSTREAM_INGESTOR_IMAGE", default_value = DEFAULT_INGESTOR_IMAGE)]
    ingestor_image: String,
    /// A Secret the ingestor pods pull their image with (repeat for several); it must
    /// exist in each Site's namespace.
    #[arg(long = "ingestor-image-pull-secret")]
    ingestor_image_pull_secrets: Vec<String>,
    /// YAML file with the spec of the Site created for a Device or Formula naming a missing
    /// one (a Site's `spec`); without it, the Site API's defaults.
    #[arg(long)]
    default_site: Option<PathBuf>,
    /// URL template of the ingestors' `/status` with `{service}`, `{namespace}`, `{site}`
    /// and `{port}`, e.g. `http://{service}.{namespace}.svc:{port}/status`. Without it the
    /// operator goes through the API server's service proxy, which also works from outside
    /// the cluster.
    #[arg(long)]
    status_endpoint: Option<String>,
    /// How often the ingestors are asked for their status.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    status_period: Duration,
    /// Poll counters and queue figures that only moved are written at most this often.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    status_heartbeat: Duration,
    /// How long the objects of one `kubectl apply` may take to arrive. A Site named by a
    /// Device or Formula is created from the default spec only when still missing after
    /// this (the user's own Site, later in the same apply, wins), and a new Formula whose
    /// input does not exist yet is reported only after this.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    apply_window: Duration,
    /// Sites reconciled, and ingestors asked, at the same time.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Hold a Lease before acting, so that replicas take turns; off for a single developer
    /// run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in events (in a pod: its name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

const LEASE_NAME: &str = "tagstream-operator";
const DEFAULT_INGESTOR_IMAGE: &str = concat!("ghcr.io/tagstream/tagstream-ingestor:", env!("CARGO_PKG_VERSION"));
/// kube's client logs every failed request at ERROR (`kube_client::client::builder`),
/// e.g. each `/status` read of an ingestor not up yet through the service proxy: 3,000
/// lines in 15 s at 100 sites. The operator reports those failures itself, once per
/// transition, with the object they concern.
const DEFAULT_LOG_FILTER: &str = "info,kube=warn,kube_client=warn,kube_client::client::builder=off";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tagstream_core::logging::init(args.log_json, DEFAULT_LOG_FILTER);
    let default_site = match &args.default_site {
        Some(path) => tagstream_operator::default_site::load(path)?,
        None => SiteSpec::default(),
    };
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME").unwrap_or_else(|_| format!("tagstream-operator-{}", std::process::id()))
    });
    let source = match &args.status_endpoint {
        Some(template) => ReportSource::direct(template),
        None => ReportSource::ApiServerProxy(client.clone()),
    };
    let settings = OperatorSettings {
        render: Settings {
            ingestor_image: args.ingestor_image.clone(),
            image_pull_secrets: args.ingestor_image_pull_secrets.clone(),
        },
        default_site,
        status: StatusSettings {
            source,
            period: args.status_period,
            timeout: args.status_period.min(Duration::from_secs(5)),
            heartbeat: args.status_heartbeat,
            concurrency: usize::from(args.concurrency),
        },
        instance: Some(identity.clone()),
        concurrency: args.concurrency,
        apply_window: args.apply_window,
    };

    let shutdown = tagstream_core::logging::shutdown_on_signal();
    let mut registry = Registry::default();
    let metrics = Arc::new(tagstream_operator::metrics::Metrics::default());
    metrics.register(&mut registry);
    let bound = tagstream_operator::http::serve(args.http, registry, shutdown.clone())
        .await
        .with_context(|| format!("cannot listen on {}", args.http))?;
    tracing::info!(http = %bound, identity, "tagstream-operator starting");

    if !args.leader_election {
        run(client, settings, metrics, shutdown).await;
        return Ok(());
    }
    let lease = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .build()
        .await
        .context("cannot set up leader election")?;
    let (mut leader, lease_task) = lease.watch().await;
    tracing::info!(lease = LEASE_NAME, namespace = %args.lease_namespace, "waiting to lead");
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        changed = leader.wait_for(|leading| *leading) => {
            changed.context("leader election stopped")?;
        }
    }
    tracing::info!("leading");
    let running = CancellationToken::new();
    let operator = tokio::spawn(run(client, settings, metrics, running.clone()));
    let lost = tokio::select! {
        () = shutdown.cancelled() => false,
        _ = leader.wait_for(|leading| !*leading) => true,
    };
    running.cancel();
    operator.await.context("the operator task failed")?;
    drop(leader);
    let _ = lease_task.await;
    if lost {
        // Another replica may already act; exiting (and restarting) is the safe way back.
        bail!("lost the leader lease");
    }
    Ok(())
}
