//! `tagstream-ingestor simulate`: serve every Device of the manifests until stopped.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context as _;
use tagstream_crds::{Device, manifest::load};
use tokio_util::sync::CancellationToken;

use crate::simulate::{self, Faults};

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
    let mut tasks = simulate::serve_all(
        &devices,
        options.listen,
        options.rtu_path.as_deref(),
        &options.faults,
        &shutdown,
    )
    .await?;
    while let Some(result) = tasks.join_next().await {
        result
            .context("simulator task panicked")?
            .context("simulator endpoint failed")?;
    }
    Ok(())
}
