//! `tagstream-ingestor simulate`: serve Device manifests as Modbus servers, with values
//! moving as deterministic waveforms and faults to inject.

mod server;
mod waveform;

use std::collections::BTreeMap;

use tagstream_crds::{Device, device::ConnectionKind};

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
