//! One Modbus connection (TCP, RTU over TCP or RTU on a serial port) and one read on it.
//!
//! tokio-modbus has no timeouts: every call here is bounded by the device's `timeout`.
//! Its result nests the device's exception inside the transport's result; they are told
//! apart here because they call for different handling (an exception leaves the
//! connection usable, a transport error does not).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{self, Poll},
    time::Duration,
};

use tagstream_crds::device::{Connection, ConnectionKind, Parity, RegisterKind, TcpEndpoint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_modbus::{
    ExceptionCode, Request, Response, Slave,
    client::{Client as _, Context, rtu, tcp},
    slave::SlaveContext as _,
};
use tokio_serial::SerialPortBuilderExt as _;

use super::plan::Read;

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
    /// Whether the connection must be dropped: after a timeout a late answer could be
    /// taken for the next request's, and after garbage the framing cannot be trusted.
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, Self::Exception(_))
    }
}

/// An open connection to a device.
pub struct Link {
    context: Context,
    /// Set when the device closed the connection (a read returned end of stream).
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Addresses the next requests to `unit` (several units share a gateway's link).
    pub fn set_unit(&mut self, unit: u8) {
        self.context.set_slave(Slave(unit));
    }

    /// Closes the connection, bounded by one second.
    pub async fn disconnect(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.context.disconnect()).await;
    }
}

/// Opens a connection to `connection`, addressed to `unit`.
pub async fn connect(connection: &Connection, unit: u8, timeout: Duration) -> Result<Link, RequestError> {
    let slave = Slave(unit);
    let closed = Arc::new(AtomicBool::new(false));
    let watched = |stream: TcpStream| Watched {
        inner: stream,
        closed: Arc::clone(&closed),
    };
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
            rtu::attach_slave(stream, slave)
        }
        None => return Err(RequestError::Connect("no connection kind set".into())),
    };
    Ok(Link { context, closed })
}

/// A TCP stream that notes when the device closes it. tokio-modbus 0.17.0 reports that
/// as `io::Error::last_os_error()`, whatever errno the thread last left ("Success (os
/// error 0)", "Operation now in progress (os error 115)"), which says nothing; this is
/// how the ingestor tells what happened (slowtec/tokio-modbus#360 fixes it upstream, not
/// in a release yet).
#[derive(Debug)]
struct Watched {
    inner: TcpStream,
    closed: Arc<AtomicBool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before && buf.remaining() > 0 {
            self.closed.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut task::Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
/// a transport or protocol failure.
pub async fn call(link: &mut Link, request: Request<'_>, timeout: Duration) -> Result<Response, RequestError> {
    match tokio::time::timeout(timeout, link.context.call(request)).await {
        Err(_) => Err(RequestError::Timeout(timeout)),
        Ok(Err(tokio_modbus::Error::Transport(_))) if link.closed.load(Ordering::Relaxed) => {
            Err(RequestError::Transport("the device closed the connection".into()))
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => Err(RequestError::Transport(e.to_string())),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(RequestError::Garbage(e.to_string())),
        Ok(Ok(Err(exception))) => Err(RequestError::Exception(exception)),
        Ok(Ok(Ok(response))) => Ok(response),
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
