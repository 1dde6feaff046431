//! One Modbus connection (TCP, RTU over TCP or RTU on a serial port) and one read on it.
//!
//! tokio-modbus has no timeouts: every call here is bounded by the device's `timeout`.
//! Its result nests the device's exception inside the transport's result; they are told
//! apart here because they call for different handling (an exception leaves the
//! connection usable, a transport error does not).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tagstream_crds::device::{Connection, ConnectionKind, Parity, RegisterKind, TcpEndpoint};
use tokio::net::TcpStream;
use tokio_modbus::{
    ExceptionCode, Request, Response, Slave,
    client::{Client as _, Context, rtu, tcp},
    slave::SlaveContext as _,
};
use tokio_serial::SerialPortBuilderExt as _;

use super::{
    plan::Read,
    transport::{Framing, Shared, Transport},
};

/// The data of a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// Why a request (a read or a write) failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The device answered with an exception; the connection is still good.
    #[error("exception {}: {}", u8::from(*.0), .0)]
    Exception(ExceptionCode),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("transport error: {0}")]
    Transport(String),
    /// The device answered something that does not fit the request.
    #[error("bad response: {0}")]
    Garbage(String),
}

impl RequestError {
    /// Whether the connection must be dropped: after garbage the framing cannot be
    /// trusted, and a transport error leaves nothing to keep. A timeout leaves it open
    /// (the transport drops or drains the late answer, see `transport`), unless the link
    /// has gone silent ([`Link::usable`]).
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, Self::Exception(_) | Self::Timeout(_))
    }
}

/// An open connection to a device.
pub struct Link {
    context: Context,
    framing: Framing,
    shared: Arc<Shared>,
    /// Requests in a row that got no answer within their timeout.
    unanswered: u32,
    /// Requests sent again after a timeout, not yet taken by [`Link::take_retried`].
    retried: u64,
    /// Nothing answers on this connection any more: it is reopened before the next request.
    silent: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("framing", &self.framing)
            .field("shared", &self.shared)
            .field("unanswered", &self.unanswered)
            .field("silent", &self.silent)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Addresses the next requests to `unit` (several units share a gateway's link).
    pub fn set_unit(&mut self, unit: u8) {
        self.context.set_slave(Slave(unit));
    }

    /// Whether the connection can take the next request: the device has not closed it and
    /// it has not gone silent.
    pub fn usable(&self) -> bool {
        !self.silent && !self.shared.closed.load(Ordering::Relaxed)
    }

    /// Requests in a row that got no answer within their timeout.
    pub fn unanswered(&self) -> u32 {
        self.unanswered
    }

    /// Notes that nothing answers on this connection any more (a half-open TCP
    /// connection to a gateway that restarted, a cable pulled): it is reopened.
    pub fn mark_silent(&mut self) {
        self.silent = true;
    }

    /// Notes a request sent again after a timeout.
    pub fn note_retry(&mut self) {
        self.retried += 1;
    }

    /// The requests sent again after a timeout since the last call.
    pub fn take_retried(&mut self) -> u64 {
        std::mem::take(&mut self.retried)
    }

    /// Closes the connection, bounded by one second.
    pub async fn disconnect(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.context.disconnect()).await;
    }
}

/// Opens a connection to `connection`, addressed to `unit`.
pub async fn connect(connection: &Connection, unit: u8, timeout: Duration) -> Result<Link, RequestError> {
    let slave = Slave(unit);
    let shared = Arc::new(Shared::default());
    let framing = match connection.kind() {
        Some(ConnectionKind::Tcp(_)) => Framing::Mbap,
        _ => Framing::Rtu,
    };
    let watched = |stream| Transport::new(stream, framing, Arc::clone(&shared));
    let context = match connection.kind() {
        Some(ConnectionKind::Tcp(endpoint)) => tcp::attach_slave(watched(open_tcp(endpoint, timeout).await?), slave),
        Some(ConnectionKind::RtuOverTcp(endpoint)) => {
            rtu::attach_slave(watched(open_tcp(endpoint, timeout).await?), slave)
        }
        Some(ConnectionKind::Rtu(port)) => {
            let parity = match port.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            let data_bits = if port.data_bits == 7 {
                tokio_serial::DataBits::Seven
            } else {
                tokio_serial::DataBits::Eight
            };
            let stop_bits = if port.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            };
            let stream = tokio_serial::new(&port.path, port.baud_rate)
                .parity(parity)
                .data_bits(data_bits)
                .stop_bits(stop_bits)
                .open_native_async()
                .map_err(|e| RequestError::Connect(format!("{}: {e}", port.path)))?;
            rtu::attach_slave(Transport::new(stream, framing, Arc::clone(&shared)), slave)
        }
        None => return Err(RequestError::Connect("no connection kind set".into())),
    };
    Ok(Link {
        context,
        framing,
        shared,
        unanswered: 0,
        retried: 0,
        silent: false,
    })
}

async fn open_tcp(endpoint: &TcpEndpoint, timeout: Duration) -> Result<TcpStream, RequestError> {
    let what = format!("{}:{}", endpoint.host, endpoint.port);
    let stream = tokio::time::timeout(timeout, TcpStream::connect((endpoint.host.as_str(), endpoint.port)))
        .await
        .map_err(|_| RequestError::Connect(format!("{what}: no answer within {timeout:?}")))?
        .map_err(|e| RequestError::Connect(format!("{what}: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| RequestError::Connect(format!("{what}: {e}")))?;
    Ok(stream)
}

/// Sends one request, bounded by `timeout`, and tells the device's exception apart from
/// a transport or protocol failure. After a timeout on an RTU line, the line is given one
/// more `timeout` to go quiet and is drained before the next request: a late answer is
/// not taken for the next request's.
pub async fn call(link: &mut Link, request: Request<'_>, timeout: Duration) -> Result<Response, RequestError> {
    let Ok(answer) = tokio::time::timeout(timeout, link.context.call(request)).await else {
        link.unanswered += 1;
        if link.framing == Framing::Rtu {
            tokio::time::sleep(timeout).await;
            link.shared.drain_before_write.store(true, Ordering::Relaxed);
        }
        return Err(RequestError::Timeout(timeout));
    };
    link.unanswered = 0;
    match answer {
        Err(tokio_modbus::Error::Transport(_)) if link.shared.closed.load(Ordering::Relaxed) => {
            Err(RequestError::Transport("the device closed the connection".into()))
        }
        Err(tokio_modbus::Error::Transport(e)) => Err(RequestError::Transport(e.to_string())),
        Err(tokio_modbus::Error::Protocol(e)) => Err(RequestError::Garbage(e.to_string())),
        Ok(Err(exception)) => Err(RequestError::Exception(exception)),
        Ok(Ok(response)) => Ok(response),
    }
}

/// Performs one read, bounded by `timeout`, and checks the answer's length.
pub async fn execute(link: &mut Link, read: &Read, timeout: Duration) -> Result<Data, RequestError> {
    let (start, count) = (read.start, read.count);
    // `Client::call` rather than the `Reader` helpers: those assert on the answer's length,
    // and a device's wrong answer must be an error, never a panic.
    let request = match read.kind {
        RegisterKind::Coil => Request::ReadCoils(start, count),
        RegisterKind::DiscreteInput => Request::ReadDiscreteInputs(start, count),
        RegisterKind::Holding => Request::ReadHoldingRegisters(start, count),
        RegisterKind::Input => Request::ReadInputRegisters(start, count),
    };
    let data = match call(link, request, timeout).await? {
        Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => Data::Bits(bits),
        Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => Data::Registers(words),
        other => return Err(RequestError::Garbage(format!("unexpected answer {other:?}"))),
    };
    let wanted = usize::from(count);
    match data {
        // Bit responses are padded to whole bytes.
        Data::Bits(mut bits) if bits.len() >= wanted => {
            bits.truncate(wanted);
            Ok(Data::Bits(bits))
        }
        Data::Registers(registers) if registers.len() == wanted => Ok(Data::Registers(registers)),
        Data::Bits(bits) => Err(RequestError::Garbage(format!(
            "asked for {wanted} bits, got {}",
            bits.len()
        ))),
        Data::Registers(registers) => Err(RequestError::Garbage(format!(
            "asked for {wanted} registers, got {}",
            registers.len()
        ))),
    }
}
