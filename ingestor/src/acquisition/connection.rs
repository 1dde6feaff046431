//! One Modbus connection (TCP, RTU over TCP or RTU on a serial port) and one read on it.
//!
//! tokio-modbus has no timeouts: every call here is bounded by the device's `timeout`.
//! Its result nests the device's exception inside the transport's result; they are told
//! apart here because they call for different handling (an exception leaves the
//! connection usable, a transport error does not).

use std::time::Duration;

use tagstream_crds::device::{Connection, ConnectionKind, Parity, RegisterKind, TcpEndpoint};
use tokio::net::TcpStream;
use tokio_modbus::{
    ExceptionCode, Request, Response, Slave,
    client::{Client as _, Context, rtu, tcp},
};
use tokio_serial::SerialPortBuilderExt as _;

use super::plan::Read;

/// The data of a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// Why a read failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
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

impl ReadError {
    /// Whether the connection must be dropped: after a timeout a late answer could be
    /// taken for the next request's, and after garbage the framing cannot be trusted.
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, Self::Exception(_))
    }
}

/// Opens a connection to `connection`, addressed to `unit`.
pub async fn connect(connection: &Connection, unit: u8, timeout: Duration) -> Result<Context, ReadError> {
    let slave = Slave(unit);
    match connection.kind() {
        Some(ConnectionKind::Tcp(endpoint)) => Ok(tcp::attach_slave(open_tcp(endpoint, timeout).await?, slave)),
        Some(ConnectionKind::RtuOverTcp(endpoint)) => Ok(rtu::attach_slave(open_tcp(endpoint, timeout).await?, slave)),
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
                .map_err(|e| ReadError::Connect(format!("{}: {e}", port.path)))?;
            Ok(rtu::attach_slave(stream, slave))
        }
        None => Err(ReadError::Connect("no connection kind set".into())),
    }
}

async fn open_tcp(endpoint: &TcpEndpoint, timeout: Duration) -> Result<TcpStream, ReadError> {
    let what = format!("{}:{}", endpoint.host, endpoint.port);
    let stream = tokio::time::timeout(timeout, TcpStream::connect((endpoint.host.as_str(), endpoint.port)))
        .await
        .map_err(|_| ReadError::Connect(format!("{what}: no answer within {timeout:?}")))?
        .map_err(|e| ReadError::Connect(format!("{what}: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| ReadError::Connect(format!("{what}: {e}")))?;
    Ok(stream)
}

/// Performs one read, bounded by `timeout`, and checks the answer's length.
pub async fn execute(context: &mut Context, read: &Read, timeout: Duration) -> Result<Data, ReadError> {
    let (start, count) = (read.start, read.count);
    // `Client::call` rather than the `Reader` helpers: those assert on the answer's length,
    // and a device's wrong answer must be an error, never a panic.
    let request = match read.kind {
        RegisterKind::Coil => Request::ReadCoils(start, count),
        RegisterKind::DiscreteInput => Request::ReadDiscreteInputs(start, count),
        RegisterKind::Holding => Request::ReadHoldingRegisters(start, count),
        RegisterKind::Input => Request::ReadInputRegisters(start, count),
    };
    let data = match tokio::time::timeout(timeout, context.call(request)).await {
        Err(_) => return Err(ReadError::Timeout(timeout)),
        Ok(Err(tokio_modbus::Error::Transport(e))) => return Err(ReadError::Transport(e.to_string())),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => return Err(ReadError::Garbage(e.to_string())),
        Ok(Ok(Err(exception))) => return Err(ReadError::Exception(exception)),
        Ok(Ok(Ok(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits)))) => Data::Bits(bits),
        Ok(Ok(Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)))) => {
            Data::Registers(words)
        }
        Ok(Ok(Ok(other))) => return Err(ReadError::Garbage(format!("unexpected answer {other:?}"))),
    };
    let wanted = usize::from(count);
    match data {
        // Bit responses are padded to whole bytes.
        Data::Bits(mut bits) if bits.len() >= wanted => {
            bits.truncate(wanted);
            Ok(Data::Bits(bits))
        }
        Data::Registers(registers) if registers.len() == wanted => Ok(Data::Registers(registers)),
        Data::Bits(bits) => Err(ReadError::Garbage(format!(
            "asked for {wanted} bits, got {}",
            bits.len()
        ))),
        Data::Registers(registers) => Err(ReadError::Garbage(format!(
            "asked for {wanted} registers, got {}",
            registers.len()
        ))),
    }
}
