//! `tagstream-ingestor simulate`: serve every Device of the manifests until stopped.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context as _;
use tagstream_crds::{Device, manifest::load};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::simulate::{self, Faults, Framing, Listen, SimulatedEndpoint};

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct SimulateOptions {
    pub listen: IpAddr,
    /// Serve RTU devices on this path instead of the one in their manifest (one end of a
    /// pty pair whose other end the poller opens).
    pub rtu_path: Option<String>,
    pub faults: Faults,
}

/// Binds every endpoint the devices need and serves them until `shutdown`.
pub async fn simulate(paths: &[PathBuf], options: SimulateOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let report = load(paths)?;
    let devices: Vec<Device> = report.devices.into_iter().map(|d| d.object).collect();
    anyhow::ensure!(!devices.is_empty(), "no Device in the manifests");
    let mut tasks = JoinSet::new();
    for (listen, group) in simulate::endpoints(&devices) {
        let names: Vec<String> = group
            .iter()
            .map(|d| {
                format!(
                    "{} (unit {})",
                    d.metadata.name.as_deref().unwrap_or_default(),
                    d.spec.unit_id
                )
            })
            .collect();
        let endpoint = SimulatedEndpoint::new(&group, options.faults.clone());
        match listen {
            Listen::Tcp { port, rtu_framing } => {
                let listener = TcpListener::bind((options.listen, port))
                    .await
                    .with_context(|| format!("cannot listen on {}:{port}", options.listen))?;
                let framing = if rtu_framing { Framing::RtuOverTcp } else { Framing::Tcp };
                info!(address = %listener.local_addr()?, ?framing, devices = ?names, "simulating");
                tasks.spawn(simulate::serve_tcp(listener, endpoint, framing, shutdown.clone()));
            }
            Listen::Serial { path, baud_rate } => {
                let path = options.rtu_path.clone().unwrap_or(path);
                info!(%path, baud_rate, devices = ?names, "simulating RTU");
                let shutdown = shutdown.clone();
                tasks.spawn(async move { simulate::serve_rtu(&path, baud_rate, endpoint, shutdown).await });
            }
        }
    }
    while let Some(result) = tasks.join_next().await {
        result
            .context("simulator task panicked")?
            .context("simulator endpoint failed")?;
    }
    Ok(())
}
