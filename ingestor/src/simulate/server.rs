//! The simulator's Modbus server: every simulated device behind an endpoint answers on its
//! unit id with registers encoded exactly as its manifest says, plus injected faults.
//! Writes (function codes 5, 6, 15, 16) to the registers and coils of writable tags are
//! kept: the written registers hold their value instead of the waveform's, as a setpoint
//! does. A write touching anything else is refused with exception 2, as a device refuses
//! a write to a read-only address.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tagstream_crds::{Device, device::RegisterKind};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_modbus::{
    ExceptionCode, Request, Response, SlaveRequest,
    server::{Service, rtu, rtu_over_tcp, tcp},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::waveform::Signal;
use crate::acquisition::decode::{self, Layout};

/// Faults to inject, for tests and demos of failure handling.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Delay before every answer.
    pub latency: Duration,
    /// Protocol addresses whose reads are refused with exception 2 (illegal data address).
    pub exception_at: BTreeSet<(RegisterKind, u16)>,
    /// Unit ids that never answer, like a dead device behind a gateway.
    pub silent_units: BTreeSet<u8>,
    /// Unit ids that answer this much later than the others (after `latency`): a slow
    /// unit whose replies come after the poller's timeout.
    pub slow_units: BTreeMap<u8, Duration>,
    /// Unit ids that leave every Nth request unanswered: a lossy line.
    pub lossy_units: BTreeMap<u8, u64>,
    /// Close every connection this long after it was opened.
    pub drop_after: Option<Duration>,
}

/// A simulated device.
#[derive(Debug)]
struct SimulatedDevice {
    tags: Vec<(tagstream_crds::device::Tag, Layout, Signal, u16)>,
    /// Addresses of writable tags' registers and coils.
    writable: BTreeSet<(RegisterKind, u16)>,
    /// What was written, by address: it holds instead of the waveform.
    written: Mutex<BTreeMap<(RegisterKind, u16), u16>>,
}

impl SimulatedDevice {
    /// Keeps a write of `values` from `start`, when every address is writable.
    fn write(&self, kind: RegisterKind, start: u16, values: &[u16]) -> Result<(), ExceptionCode> {
        let addresses = (u32::from(start)..u32::from(start) + values.len() as u32).map(|a| (kind, a as u16));
        if values.is_empty()
            || u32::from(start) + values.len() as u32 > 65536
            || !addresses.clone().all(|a| self.writable.contains(&a))
        {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        self.written
            .lock()
            .expect("written lock")
            .extend(addresses.zip(values.iter().copied()));
        Ok(())
    }
}

/// The devices served on one endpoint, by unit id, and the faults to inject.
#[derive(Debug)]
pub struct SimulatedEndpoint {
    devices: BTreeMap<u8, SimulatedDevice>,
    faults: Faults,
    started: Instant,
    /// Connections accepted so far (TCP endpoints).
    connections: AtomicU64,
    /// Write requests taken so far.
    writes: AtomicU64,
    /// Requests to each lossy unit so far.
    lossy_counts: BTreeMap<u8, AtomicU64>,
}

impl SimulatedEndpoint {
    pub fn new(devices: &[&Device], faults: Faults) -> Arc<Self> {
        let devices = devices
            .iter()
            .map(|d| {
                let spec = &d.spec;
                let offset = u16::from(spec.addressing == tagstream_crds::device::Addressing::OneBased);
                let tags = spec
                    .tags
                    .iter()
                    .map(|t| {
                        (
                            t.clone(),
                            Layout::of(t, spec.byte_order),
                            Signal::new(t),
                            t.address - offset,
                        )
                    })
                    .collect::<Vec<_>>();
                let writable = tags
                    .iter()
                    .filter(|(tag, ..)| tag.writable)
                    .flat_map(|(tag, _, _, address)| {
                        (0..tag.register_count()).map(move |i| (tag.register, address + i))
                    })
                    .collect();
                let device = SimulatedDevice {
                    tags,
                    writable,
                    written: Mutex::default(),
                };
                (spec.unit_id, device)
            })
            .collect();
        Arc::new(Self {
            devices,
            lossy_counts: faults
                .lossy_units
                .keys()
                .map(|unit| (*unit, AtomicU64::new(0)))
                .collect(),
            faults,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// Write requests this endpoint took so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Connections this endpoint accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    fn answer(&self, unit: u8, request: &Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        if self.faults.silent_units.contains(&unit) || self.loses(unit) {
            return Ok(None);
        }
        let Some(device) = self.devices.get(&unit) else {
            return Ok(None);
        };
        let written = match request {
            Request::WriteSingleCoil(at, on) => Some((RegisterKind::Coil, *at, vec![u16::from(*on)])),
            Request::WriteMultipleCoils(at, bits) => {
                Some((RegisterKind::Coil, *at, bits.iter().map(|b| u16::from(*b)).collect()))
            }
            Request::WriteSingleRegister(at, word) => Some((RegisterKind::Holding, *at, vec![*word])),
            Request::WriteMultipleRegisters(at, words) => Some((RegisterKind::Holding, *at, words.to_vec())),
            _ => None,
        };
        if let Some((kind, start, values)) = written {
            self.refuse_faulty(kind, start, values.len() as u16)?;
            device.write(kind, start, &values)?;
            self.writes.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(match request {
                Request::WriteSingleCoil(at, on) => Response::WriteSingleCoil(*at, *on),
                Request::WriteSingleRegister(at, word) => Response::WriteSingleRegister(*at, *word),
                Request::WriteMultipleCoils(at, _) => Response::WriteMultipleCoils(*at, values.len() as u16),
                _ => Response::WriteMultipleRegisters(start, values.len() as u16),
            }));
        }
        let (kind, start, count) = match *request {
            Request::ReadCoils(start, count) => (RegisterKind::Coil, start, count),
            Request::ReadDiscreteInputs(start, count) => (RegisterKind::DiscreteInput, start, count),
            Request::ReadHoldingRegisters(start, count) => (RegisterKind::Holding, start, count),
            Request::ReadInputRegisters(start, count) => (RegisterKind::Input, start, count),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        self.refuse_faulty(kind, start, count)?;
        let end = u32::from(start) + u32::from(count);
        let elapsed = self.started.elapsed();
        let mut registers = vec![0u16; usize::from(count)];
        for (tag, layout, signal, address) in device.tags.iter().filter(|t| t.0.register == kind) {
            let words = decode::encode_registers(&signal.value(elapsed, tag.scale, tag.offset), layout);
            for (i, word) in words.into_iter().enumerate() {
                let at = u32::from(*address) + i as u32;
                if (u32::from(start)..end).contains(&at) {
                    registers[(at - u32::from(start)) as usize] = word;
                }
            }
        }
        for ((_, at), word) in device
            .written
            .lock()
            .expect("written lock")
            .range((kind, start)..)
            .take_while(|((k, at), _)| *k == kind && u32::from(*at) < end)
        {
            registers[usize::from(at - start)] = *word;
        }
        Ok(Some(if kind.is_bit_table() {
            let bits = registers.iter().map(|r| *r != 0).collect();
            if kind == RegisterKind::Coil {
                Response::ReadCoils(bits)
            } else {
                Response::ReadDiscreteInputs(bits)
            }
        } else if kind == RegisterKind::Holding {
            Response::ReadHoldingRegisters(registers)
        } else {
            Response::ReadInputRegisters(registers)
        }))
    }
}

impl SimulatedEndpoint {
    /// The `lossy_units` fault: whether this request to `unit` goes unanswered.
    fn loses(&self, unit: u8) -> bool {
        match (self.faults.lossy_units.get(&unit), self.lossy_counts.get(&unit)) {
            (Some(every), Some(count)) => (count.fetch_add(1, Ordering::Relaxed) + 1) % (*every).max(1) == 0,
            _ => false,
        }
    }

    /// The `exception_at` fault: refuses a request covering one of its addresses.
    fn refuse_faulty(&self, kind: RegisterKind, start: u16, count: u16) -> Result<(), ExceptionCode> {
        let span = u32::from(start)..u32::from(start) + u32::from(count);
        if self
            .faults
            .exception_at
            .iter()
            .any(|(k, a)| *k == kind && span.contains(&u32::from(*a)))
        {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        Ok(())
    }
}

/// The tokio-modbus service over an endpoint.
#[derive(Clone, Debug)]
pub struct SimulatorService(pub Arc<SimulatedEndpoint>);

impl Service for SimulatorService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Exception>> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let answer = self.0.answer(request.slave, &request.request);
        let faults = &self.0.faults;
        let latency = faults.latency + faults.slow_units.get(&request.slave).copied().unwrap_or_default();
        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            answer
        })
    }
}

/// A connection that reads end-of-file once its time is up: the `drop_after` fault.
struct Dropping {
    stream: TcpStream,
    deadline: Option<Instant>,
}

impl AsyncRead for Dropping {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dropping {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How an endpoint frames its messages on TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Modbus TCP (MBAP header).
    Tcp,
    /// RTU frames over a TCP socket.
    RtuOverTcp,
}

/// Serves an endpoint on `listener` until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    endpoint: Arc<SimulatedEndpoint>,
    framing: Framing,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let drop_after = endpoint.faults.drop_after;
    let on_connected = move |stream: TcpStream, peer: SocketAddr| {
        let endpoint = Arc::clone(&endpoint);
        async move {
            debug!(%peer, "simulator connection");
            endpoint.connections.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let transport = Dropping {
                stream,
                deadline: drop_after.map(|d| Instant::now() + d),
            };
            Ok(Some((SimulatorService(endpoint), transport)))
        }
    };
    let on_error = |e: io::Error| warn!(error = %e, "simulator connection failed");
    let abort = shutdown.cancelled_owned();
    match framing {
        Framing::Tcp => {
            tcp::Server::new(listener)
                .serve_until(&on_connected, on_error, abort)
                .await?
        }
        Framing::RtuOverTcp => {
            rtu_over_tcp::Server::new(listener)
                .serve_until(&on_connected, on_error, abort)
                .await?
        }
    };
    Ok(())
}

/// Serves an endpoint as Modbus RTU on a serial device (or one end of a pty pair).
pub async fn serve_rtu(
    path: &str,
    baud_rate: u32,
    endpoint: Arc<SimulatedEndpoint>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let server = rtu::Server::new_from_path(path, baud_rate)?;
    server
        .serve_until(SimulatorService(endpoint), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
