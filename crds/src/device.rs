//! `Device`: one Modbus device (a unit id behind a TCP endpoint or on a serial bus) and its tag map.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, condition::Conditions};

/// Desired state of a Modbus device: where it is, how to poll it, and which tags to read.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tagstream.io",
    version = "v1alpha1",
    kind = "Device",
    namespaced,
    derive = "PartialEq",
    status = "DeviceStatus",
    shortname = "dev",
    category = "tagstream",
    doc = "A Modbus device polled by its site's ingestor: connection, unit id and tag map.",
    printcolumn(name = "Site", type_ = "string", json_path = ".spec.site"),
    printcolumn(name = "Connected", type_ = "string", json_path = ".status.conditions[?(@.type==\"Connected\")].status"),
    printcolumn(name = "Tags", type_ = "integer", json_path = ".status.tagCount"),
    printcolumn(name = "Last Poll", type_ = "date", json_path = ".status.lastPollTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63")
        .message("metadata.name: a Device name is used as a NATS subject token and must be a DNS label (lowercase letters, digits and '-', no dots, at most 63 characters)"),
)]
#[x_kube(
    validation = Rule::new("!(has(self.connection.rtu) || has(self.connection.rtuOverTcp)) || (self.unitId >= 1 && self.unitId <= 247)")
        .message("spec.unitId: on a serial bus (rtu, rtuOverTcp) the unit id must be 1..247")
        .field_path(".unitId"),
    validation = Rule::new("self.addressing != 'oneBased' || self.tags.all(t, t.address >= 1)")
        .message("spec.tags[].address: with oneBased addressing every address must be at least 1")
        .field_path(".tags"),
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Name of the Site (same namespace) whose ingestor polls this device. The operator
    /// creates the Site with default settings when it does not exist yet.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub site: String,

    /// How to reach the device: exactly one of `tcp`, `rtu` or `rtuOverTcp`.
    pub connection: Connection,

    /// Modbus unit id (slave address). 0..255 over TCP (many devices addressed directly over
    /// TCP expect 255 or 1; gateways route by it); 1..247 on a serial bus.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,

    /// How often every tag is read, unless a tag sets its own `pollInterval`. At least 10ms.
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10ms')").message("must be at least 10ms"))]
    pub poll_interval: Duration,

    /// How long to wait for one response before the request counts as failed. At least 10ms.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10ms')").message("must be at least 10ms"))]
    pub timeout: Duration,

    /// How many times a request that got no answer within `timeout` is sent again before
    /// the poll counts as failed (its tags go Bad and the device backs off): one lost reply
    /// on an RS-485 line or a cellular link is not an outage. Only a device that answered
    /// its last poll is retried; one already failing is probed once per backoff, so a dead
    /// unit behind a gateway costs its neighbours one timeout per probe.
    #[serde(default = "default_retries")]
    #[schemars(range(max = 10))]
    pub retries: u8,

    /// Default byte and word order of multi-register values; a tag may override it.
    #[serde(default)]
    pub byte_order: ByteOrder,

    /// Whether the addresses in `tags` count from 0 (protocol addresses, the default) or
    /// from 1 (as many device manuals print them: address 1 is protocol address 0).
    #[serde(default)]
    pub addressing: Addressing,

    /// How tags are grouped into requests.
    #[serde(default)]
    pub reads: ReadPlanning,

    /// Workarounds for devices that do not behave like the specification says.
    #[serde(default)]
    pub quirks: Quirks,

    /// The values to read. Tag names are unique within a device.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub tags: Vec<Tag>,
}

const fn default_unit_id() -> u8 {
    1
}

const fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

const fn default_retries() -> u8 {
    1
}

const fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Exactly one connection kind.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    cel,
    validation = Rule::new("(has(self.tcp) ? 1 : 0) + (has(self.rtu) ? 1 : 0) + (has(self.rtuOverTcp) ? 1 : 0) == 1")
        .message("exactly one of tcp, rtu or rtuOverTcp must be set"),
)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// Modbus TCP (MBAP framing) to a device or a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpEndpoint>,
    /// Modbus RTU on a local serial port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtu: Option<SerialPort>,
    /// Modbus RTU frames carried over a TCP socket (serial-to-Ethernet converters in
    /// transparent mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtu_over_tcp: Option<TcpEndpoint>,
}

/// The one kind of connection a [`Connection`] holds, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionKind<'a> {
    Tcp(&'a TcpEndpoint),
    Rtu(&'a SerialPort),
    RtuOverTcp(&'a TcpEndpoint),
}

impl Connection {
    /// The connection kind, or `None` when not exactly one is set (the schema forbids that).
    pub fn kind(&self) -> Option<ConnectionKind<'_>> {
        match (&self.tcp, &self.rtu, &self.rtu_over_tcp) {
            (Some(t), None, None) => Some(ConnectionKind::Tcp(t)),
            (None, Some(s), None) => Some(ConnectionKind::Rtu(s)),
            (None, None, Some(t)) => Some(ConnectionKind::RtuOverTcp(t)),
            _ => None,
        }
    }

    /// The endpoint devices share a connection on: `tcp://host:port` or the serial path.
    /// Devices with the same endpoint are polled over one connection, one request at a time.
    pub fn endpoint(&self) -> Option<String> {
        self.kind().map(|kind| match kind {
            ConnectionKind::Tcp(t) => format!("tcp://{}:{}", t.host, t.port),
            ConnectionKind::RtuOverTcp(t) => format!("rtu+tcp://{}:{}", t.host, t.port),
            ConnectionKind::Rtu(s) => format!("rtu://{}", s.path),
        })
    }
}

/// A TCP endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TcpEndpoint {
    /// Host name or IP address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port; 502 is the Modbus default.
    #[serde(default = "default_modbus_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

const fn default_modbus_port() -> u16 {
    502
}

/// A serial port and its line settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SerialPort {
    /// Device path on the node, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/...`.
    #[schemars(length(min = 1, max = 255), regex(pattern = "^/"))]
    pub path: String,
    /// Line speed in baud.
    #[serde(default = "default_baud_rate")]
    #[schemars(range(min = 300, max = 921_600))]
    pub baud_rate: u32,
    /// Parity bit.
    #[serde(default)]
    pub parity: Parity,
    /// Data bits per character.
    #[serde(default = "default_data_bits")]
    #[schemars(range(min = 7, max = 8))]
    pub data_bits: u8,
    /// Stop bits per character.
    #[serde(default = "default_stop_bits")]
    #[schemars(range(min = 1, max = 2))]
    pub stop_bits: u8,
}

const fn default_baud_rate() -> u32 {
    9600
}
const fn default_data_bits() -> u8 {
    8
}
const fn default_stop_bits() -> u8 {
    1
}

/// Serial parity.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// Order of the bytes of a multi-register value, named by where the most significant byte
/// `A` lands. For 64-bit values the same four orders extend naturally: `ABCD` is
/// ABCDEFGH (big-endian), `DCBA` is HGFEDCBA (little-endian), `BADC` is BADCFEHG (bytes
/// swapped in each register) and `CDAB` is GHEFCDAB (registers in reverse order).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ByteOrder {
    /// Big-endian: most significant register first, high byte first (the Modbus norm).
    #[default]
    ABCD,
    /// Little-endian: everything reversed.
    DCBA,
    /// Registers in order, the two bytes inside each register swapped.
    BADC,
    /// Registers in reverse order ("word swapped"), bytes inside each register big-endian.
    CDAB,
}

impl ByteOrder {
    pub const ALL: [Self; 4] = [Self::ABCD, Self::DCBA, Self::BADC, Self::CDAB];
}

/// Where the addresses in the manifest start counting.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Addressing {
    /// Addresses are protocol addresses, starting at 0.
    #[default]
    ZeroBased,
    /// Addresses start at 1, as many manuals print them; 1 is sent as 0.
    OneBased,
}

/// How tags are grouped into read requests.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReadPlanning {
    /// Most registers one request may read (the protocol allows 125; some devices less).
    #[serde(default = "default_max_registers")]
    #[schemars(range(min = 1, max = 125))]
    pub max_registers: u16,
    /// Most coils or discrete inputs one request may read (the protocol allows 2000).
    #[serde(default = "default_max_bits")]
    #[schemars(range(min = 1, max = 2000))]
    pub max_bits: u16,
    /// Largest run of unused addresses a request may bridge to join two tags into one read.
    /// 0 joins only adjacent tags. Raise it to save requests when the gap is readable.
    #[serde(default)]
    #[schemars(range(max = 124))]
    pub max_gap: u16,
    /// Read every tag with a request of its own (for devices that refuse reads spanning
    /// several values).
    #[serde(default)]
    pub request_per_tag: bool,
}

const fn default_max_registers() -> u16 {
    125
}
const fn default_max_bits() -> u16 {
    2000
}

impl Default for ReadPlanning {
    fn default() -> Self {
        Self {
            max_registers: default_max_registers(),
            max_bits: default_max_bits(),
            max_gap: 0,
            request_per_tag: false,
        }
    }
}

/// Device workarounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(
    cel,
    validation = Rule::new("!(has(self.writeSingle) && self.writeSingle && has(self.writeMultiple) && self.writeMultiple)")
        .message("writeSingle and writeMultiple exclude each other"),
)]
#[serde(rename_all = "camelCase")]
pub struct Quirks {
    /// Pause after opening the connection before the first request (some gateways drop
    /// requests that arrive too early).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_delay: Option<Duration>,
    /// Pause between two requests on the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_delay: Option<Duration>,
    /// Close the connection after every poll cycle (devices that accept one connection and
    /// must be shared with another master).
    #[serde(default)]
    pub close_after_poll: bool,
    /// How many times to retry a request the device answers with exception 6 (server busy).
    #[serde(default)]
    #[schemars(range(max = 10))]
    pub busy_retries: u8,
    /// Write multi-register values one register at a time with function code 6, for
    /// devices that refuse function code 16. The registers of one value are then written
    /// in separate requests, so the device holds a half-written value in between.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_single: bool,
    /// Write single coils and registers with function codes 15 and 16, for devices that
    /// implement only the multiple-write codes (5 and 6 are used otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub write_multiple: bool,
}

/// The four Modbus data tables.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum RegisterKind {
    /// Read/write bits (function code 1).
    Coil,
    /// Read-only bits (function code 2).
    DiscreteInput,
    /// Read/write 16-bit registers (function code 3).
    Holding,
    /// Read-only 16-bit registers (function code 4).
    Input,
}

impl RegisterKind {
    /// Whether this table holds single bits rather than 16-bit registers.
    pub const fn is_bit_table(self) -> bool {
        matches!(self, Self::Coil | Self::DiscreteInput)
    }
}

/// How the raw registers of a tag are interpreted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum DataType {
    /// A coil or discrete input.
    Bool,
    /// One bit (`bit`) of a holding or input register.
    Bit,
    Int16,
    Uint16,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Float32,
    Float64,
    /// Text of `length` registers (`charsPerRegister` characters each), trailing NULs trimmed.
    String,
}

impl DataType {
    /// Registers a value of this type occupies; strings use the tag's `length`.
    pub const fn fixed_registers(self) -> Option<u16> {
        match self {
            Self::Bool | Self::Bit | Self::Int16 | Self::Uint16 => Some(1),
            Self::Int32 | Self::Uint32 | Self::Float32 => Some(2),
            Self::Int64 | Self::Uint64 | Self::Float64 => Some(4),
            Self::String => None,
        }
    }

    /// Whether the decoded value is a number (scale, offset and deadband apply).
    pub const fn is_numeric(self) -> bool {
        !matches!(self, Self::Bool | Self::Bit | Self::String)
    }
}

/// One value read from the device.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("(self.register == 'coil' || self.register == 'discreteInput') == (self.type == 'bool')")
        .message("type bool is for coils and discrete inputs, and coils and discrete inputs must have type bool"),
    validation = Rule::new("has(self.bit) == (self.type == 'bit')")
        .message("bit is required for type bit and allowed only with it").field_path(".bit"),
    validation = Rule::new("has(self.length) == (self.type == 'string')")
        .message("length (in registers) is required for type string and allowed only with it").field_path(".length"),
    validation = Rule::new("!has(self.charsPerRegister) || self.type == 'string'")
        .message("charsPerRegister applies only to type string").field_path(".charsPerRegister"),
    validation = Rule::new("self.type in ['int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', 'float32', 'float64'] || !(has(self.scale) || has(self.offset) || has(self.deadband))")
        .message("scale, offset and deadband apply only to numeric types"),
    validation = Rule::new("!has(self.writable) || !self.writable || self.register == 'holding' || self.register == 'coil'")
        .message("only holding registers and coils can be written").field_path(".writable"),
    validation = Rule::new("(has(self.writable) && self.writable) || !(has(self.min) || has(self.max))")
        .message("min and max bound writes and apply only to writable tags"),
    validation = Rule::new("self.type in ['int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', 'float32', 'float64'] || !(has(self.min) || has(self.max))")
        .message("min and max apply only to numeric types"),
    validation = Rule::new("!(has(self.min) && has(self.max)) || self.min <= self.max")
        .message("a writable tag's max must not be below its min").field_path(".max"),
    // `has(self.length)`: a string tag without its length is refused by the rule above;
    // without the guard this one fails to evaluate, and the API server adds "no such key".
    validation = Rule::new("self.address + (self.type == 'string' ? (has(self.length) ? self.length : 0) : self.type in ['int64', 'uint64', 'float64'] ? 4 : self.type in ['int32', 'uint32', 'float32'] ? 2 : 1) <= 65536")
        .message("the value runs past the last register address (65535)").field_path(".address"),
)]
#[serde(rename_all = "camelCase")]
pub struct Tag {
    /// Tag name, unique within the device. Points are published as `<device>/<name>`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"))]
    pub name: String,
    /// Which data table the value lives in.
    pub register: RegisterKind,
    /// Address of the first register or bit (see the device's `addressing`).
    pub address: u16,
    /// How the raw registers are decoded.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Bit number (0 = least significant) for type `bit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 15))]
    pub bit: Option<u8>,
    /// Length in registers for type `string`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 125))]
    pub length: Option<u16>,
    /// Characters per register for type `string`: 2 (packed, the default) or 1 (one
    /// character in the low byte of each register, as some devices store text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub chars_per_register: Option<u8>,
    /// Byte order for this tag, overriding the device's `byteOrder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_order: Option<ByteOrder>,
    /// Multiplier applied to the raw number: value = raw * scale + offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Added after scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
    /// Engineering unit, carried with every point (e.g. `degC`, `kW`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub unit: Option<String>,
    /// Publish a numeric value only when it moved by more than this since the last
    /// published value (in engineering units). Booleans and strings publish on change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub deadband: Option<f64>,
    /// With a deadband or publish-on-change, still publish at least this often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("must be at least 1s"))]
    pub heartbeat: Option<Duration>,
    /// Poll this tag at its own interval instead of the device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10ms')").message("must be at least 10ms"))]
    pub poll_interval: Option<Duration>,
    /// Whether the value may be written (setpoints, reset coils, recipe values): only
    /// holding registers and coils, and only through an ingestor whose Site sets
    /// `writes.enabled`. Bits of a register are written by read-modify-write.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub writable: bool,
    /// Lowest value a write may set, in engineering units (after scale and offset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Highest value a write may set, in engineering units (after scale and offset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// How `tagstream-ingestor simulate` makes this value move. Ignored when polling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulation: Option<Simulation>,
}

/// A deterministic waveform for the simulator, in engineering units.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.max >= self.min").message("max must not be below min"))]
#[serde(rename_all = "camelCase")]
pub struct Simulation {
    /// Shape of the signal.
    pub waveform: Waveform,
    /// Lowest value.
    #[serde(default)]
    pub min: f64,
    /// Highest value.
    #[serde(default = "default_sim_max")]
    pub max: f64,
    /// Time for one full cycle (sine, ramp) or between steps (random walk).
    #[serde(default = "default_sim_period")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1ms')").message("must be at least 1ms"))]
    pub period: Duration,
}

const fn default_sim_max() -> f64 {
    100.0
}
const fn default_sim_period() -> Duration {
    Duration::from_secs(60)
}

/// Simulated signal shapes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Waveform {
    /// Sine between min and max.
    Sine,
    /// Sawtooth from min to max.
    Ramp,
    /// Bounded random walk between min and max, seeded by the tag name (repeatable).
    RandomWalk,
    /// Always `min`.
    Constant,
}

impl Tag {
    /// Registers (or bits) this tag occupies.
    pub fn register_count(&self) -> u16 {
        self.data_type
            .fixed_registers()
            .unwrap_or_else(|| self.length.unwrap_or(1))
    }
}

/// Observed state of a device, written by the operator from its ingestor's report.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// `Connected` (the last poll reached the device) and `Ready` (the spec is deployed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Conditions")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of tags deployed for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_count: Option<u32>,
    /// Time of the last successful poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Poll cycles completed since the ingestor started.
    #[serde(default)]
    pub polls: u64,
    /// Poll cycles that failed since the ingestor started.
    #[serde(default)]
    pub failed_polls: u64,
    /// Poll cycles skipped since the ingestor started because the previous cycle was still
    /// running: the device, or its bus, answers slower than `pollInterval`.
    #[serde(default)]
    pub poll_cycles_skipped: u64,
    /// The most recent error, if the last poll failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
