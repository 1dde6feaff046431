//! `tagstream-ingestor simulate`: serve Device manifests as Modbus servers, with values
//! moving as deterministic waveforms and faults to inject.

mod server;
mod waveform;

use std::{collections::BTreeMap, io, net::IpAddr};

use tagstream_crds::{Device, device::ConnectionKind};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use server::{Faults, Framing, SimulatedEndpoint, SimulatorService, serve_rtu, serve_tcp};
pub use waveform::Signal;

/// Where the simulator serves a group of devices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Listen {
    /// A TCP port with the framing the devices use.
    Tcp { port: u16, rtu_framing: bool },
    /// A serial device path.
    Serial { path: String, baud_rate: u32 },
}

/// Groups devices by where they expect their server: devices sharing a port (or serial
/// path) are unit ids behind one endpoint.
pub fn endpoints(devices: &[Device]) -> BTreeMap<Listen, Vec<&Device>> {
    let mut map: BTreeMap<Listen, Vec<&Device>> = BTreeMap::new();
    for device in devices {
        let listen = match device.spec.connection.kind() {
            Some(ConnectionKind::Tcp(t)) => Listen::Tcp {
                port: t.port,
                rtu_framing: false,
            },
            Some(ConnectionKind::RtuOverTcp(t)) => Listen::Tcp {
                port: t.port,
                rtu_framing: true,
            },
            Some(ConnectionKind::Rtu(s)) => Listen::Serial {
                path: s.path.clone(),
                baud_rate: s.baud_rate,
            },
            None => continue,
        };
        map.entry(listen).or_default().push(device);
    }
    map
}

/// Binds every endpoint the devices need and serves them until `shutdown`: TCP ports on
/// `listen`, serial devices on `rtu_path` when given, else on their manifest path.
pub async fn serve_all(
    devices: &[Device],
    listen: IpAddr,
    rtu_path: Option<&str>,
    faults: &Faults,
    shutdown: &CancellationToken,
) -> io::Result<JoinSet<io::Result<()>>> {
    let mut tasks = JoinSet::new();
    for (endpoint, group) in endpoints(devices) {
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
        let simulated = SimulatedEndpoint::new(&group, faults.clone());
        match endpoint {
            Listen::Tcp { port, rtu_framing } => {
                let listener = TcpListener::bind((listen, port))
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {listen}:{port}: {e}")))?;
                let framing = if rtu_framing { Framing::RtuOverTcp } else { Framing::Tcp };
                info!(address = %listener.local_addr()?, ?framing, devices = ?names, "simulating");
                tasks.spawn(serve_tcp(listener, simulated, framing, shutdown.clone()));
            }
            Listen::Serial { path, baud_rate } => {
                let path = rtu_path.map_or(path, str::to_owned);
                info!(%path, baud_rate, devices = ?names, "simulating RTU");
                let shutdown = shutdown.clone();
                tasks.spawn(async move { serve_rtu(&path, baud_rate, simulated, shutdown).await });
            }
        }
    }
    Ok(tasks)
}
