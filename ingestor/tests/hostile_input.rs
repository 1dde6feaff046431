//! Input nobody planned for, fuzzed on stable Rust with proptest: register answers fed to
//! the decoder, whole Modbus answers (TCP, and RTU with and without a valid CRC) fed to the
//! connection layer over loopback and RTU answers on a real serial line (a pty pair), queue
//! records read back after random byte flips and truncation, and manifests mutated at
//! random or built to hurt (YAML bombs, deep nesting, huge strings, unicode names,
//! numbers out of range). Nothing may panic or hang; every bad input is an error; the
//! process's address space is bounded (3 GiB), so an allocation sized by a hostile length
//! aborts the run.
//!
//! `scripts/test.sh` runs 256 cases per property; longer:
//! `TAGSTREAM_FUZZ_CASES=100000 cargo test --release -p tagstream-ingestor --test hostile_input`.

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{path::Path, sync::OnceLock, time::Duration};

use proptest::{prelude::*, test_runner::TestRunner};
use tagstream_crds::{
    device::{ByteOrder, Connection, DataType, Parity, RegisterKind, SerialPort, TcpEndpoint},
    manifest::{Report, parse_into},
};
use tagstream_ingestor::{
    acquisition::{
        connection,
        decode::{Layout, Scaling, decode_registers},
        plan::Read,
    },
    queue::record::{self, Totals},
};
use tagstream_proto::v1::{Point, PointBatch, point::Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_serial::SerialPortBuilderExt as _;

use support::pty::PtyPair;

/// Bounds the test process's address space once, so that an allocation sized by a
/// hostile length field (a `u32` of 4 GiB, say) aborts the run instead of passing
/// unnoticed: every property calls this first. 3 GiB leaves room for the runtime's
/// threads and malloc's per-thread arenas, which reserve address space they never use.
fn bound_memory() {
    static BOUND: OnceLock<()> = OnceLock::new();
    BOUND.get_or_init(|| {
        let limit = 3 << 30;
        rustix::process::setrlimit(
            rustix::process::Resource::As,
            rustix::process::Rlimit {
                current: Some(limit),
                maximum: None,
            },
        )
        .expect("setrlimit");
    });
}

fn cases() -> u32 {
    std::env::var("TAGSTREAM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn any_type() -> impl Strategy<Value = DataType> {
    prop::sample::select(vec![
        DataType::Bool,
        DataType::Bit,
        DataType::Int16,
        DataType::Uint16,
        DataType::Int32,
        DataType::Uint32,
        DataType::Int64,
        DataType::Uint64,
        DataType::Float32,
        DataType::Float64,
        DataType::String,
    ])
}

fn any_layout() -> impl Strategy<Value = Layout> {
    (
        any_type(),
        prop::sample::select(ByteOrder::ALL.to_vec()),
        any::<u8>(),
        0u16..300,
        0u8..4,
    )
        .prop_map(|(data_type, order, bit, length, chars_per_register)| Layout {
            data_type,
            order,
            bit,
            length,
            chars_per_register,
            scaling: Scaling::default(),
        })
}

fn record_bytes(points: usize) -> Vec<u8> {
    let batch = PointBatch {
        source: "boiler".into(),
        points: (0..points)
            .map(|t| Point {
                tag: format!("t{t}"),
                timestamp_ns: t as i64,
                value: Some(Value::DoubleValue(t as f64)),
                unit: "degC".into(),
                ..Point::default()
            })
            .collect(),
        ..PointBatch::default()
    };
    record::encode(&[(&batch).into(), batch.into()], 42, Totals::default())
}

/// The example plant's manifests, as text, to mutate.
fn example_manifests() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/plant");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    files.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect()
}

fn parse(text: &str) -> Report {
    let mut report = Report::default();
    parse_into(&mut report, Path::new("fuzz.yaml"), text);
    report
}

/// A text edit: replace the byte range with the inserted text.
#[derive(Clone, Debug)]
struct Edit {
    at: prop::sample::Index,
    remove: usize,
    insert: String,
}

fn any_edit() -> impl Strategy<Value = Edit> {
    let pieces = prop::sample::select(vec![
        String::new(),
        "\n".into(),
        ": ".into(),
        "- ".into(),
        "{".into(),
        "]".into(),
        "&a ".into(),
        "*a".into(),
        "!!binary ".into(),
        "18446744073709551616".into(),
        "-9223372036854775809".into(),
        "1e400".into(),
        ".nan".into(),
        "ünïcødé-名前".into(),
        "\u{202e}".into(),
        "\t".into(),
        "\"".into(),
        "x".repeat(70_000),
    ]);
    (any::<prop::sample::Index>(), 0usize..40, pieces).prop_map(|(at, remove, insert)| Edit { at, remove, insert })
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for edit in edits {
        let at = edit.at.index(bytes.len() + 1);
        let end = (at + edit.remove).min(bytes.len());
        bytes.splice(at..end, edit.insert.bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One runtime for every case of the connection property.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

/// How a fuzzed answer is put on the wire.
#[derive(Clone, Copy, Debug)]
enum Framing {
    /// Modbus TCP, the bytes alone.
    TcpRaw,
    /// Modbus TCP, behind a valid MBAP header echoing the request's transaction.
    Mbap,
    /// RTU over TCP, the bytes alone.
    RtuRaw,
    /// RTU over TCP, behind the unit id and with a valid CRC, so parsing goes past it.
    RtuCrc,
}

/// CRC-16/Modbus of `bytes`.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0xFFFF, |crc, byte| {
        (0..8).fold(crc ^ u16::from(*byte), |crc, _| {
            if crc & 1 == 1 { (crc >> 1) ^ 0xA001 } else { crc >> 1 }
        })
    })
}

/// What a fuzzed device sends back for `request`: `answer`, framed as `framing` says.
fn frame(answer: Vec<u8>, framing: Framing, request: &[u8]) -> Vec<u8> {
    match framing {
        Framing::TcpRaw | Framing::RtuRaw => answer,
        Framing::Mbap => {
            let length = u16::try_from(answer.len() + 1).unwrap_or(u16::MAX);
            [&request[..4], &length.to_be_bytes(), &[request[6]], &answer].concat()
        }
        Framing::RtuCrc => {
            let body = [&[request[0]], answer.as_slice()].concat();
            [body.as_slice(), &crc16(&body).to_le_bytes()].concat()
        }
    }
}

/// A read of four registers or bits of `kind` from address 0.
fn read_of(kind: RegisterKind) -> Read {
    Read {
        kind,
        start: 0,
        count: 4,
        tags: Vec::new(),
    }
}

/// What is accepted fits the request: four registers or four bits.
fn fits_the_request(result: Result<connection::Data, connection::RequestError>) -> Result<(), TestCaseError> {
    match result {
        Ok(connection::Data::Registers(r)) => prop_assert_eq!(r.len(), 4),
        Ok(connection::Data::Bits(b)) => prop_assert_eq!(b.len(), 4),
        Err(_) => {}
    }
    Ok(())
}

/// Serves one connection that answers the first request with `answer`, framed as
/// `framing` says, then closes; polls it once and returns what the connection layer made
/// of it.
async fn answered_with(
    answer: Vec<u8>,
    framing: Framing,
    kind: RegisterKind,
) -> Result<connection::Data, connection::RequestError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let rtu = matches!(framing, Framing::RtuRaw | Framing::RtuCrc);
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // An MBAP read request is 12 bytes; an RTU one 8 (unit, function, 4, CRC).
        let mut request = vec![0u8; if rtu { 8 } else { 12 }];
        if stream.read_exact(&mut request).await.is_err() {
            return;
        }
        let _ = stream.write_all(&frame(answer, framing, &request)).await;
        let _ = stream.shutdown().await;
    });
    let endpoint = TcpEndpoint {
        host: "127.0.0.1".into(),
        port,
    };
    let connection = if rtu {
        Connection {
            rtu_over_tcp: Some(endpoint),
            ..Connection::default()
        }
    } else {
        Connection {
            tcp: Some(endpoint),
            ..Connection::default()
        }
    };
    let mut link = connection::connect(&connection, 1, Duration::from_secs(2))
        .await
        .unwrap();
    let result = connection::execute(&mut link, &read_of(kind), Duration::from_millis(300)).await;
    server.abort();
    result
}

/// The same over a real serial line: the device's end of `pty` answers the first RTU
/// request with `answer`. A serial line has no end of stream, so a cut answer ends in
/// the read timeout, kept short.
async fn answered_on_a_serial_line(
    pty: &PtyPair,
    answer: Vec<u8>,
    framing: Framing,
    kind: RegisterKind,
) -> Result<connection::Data, connection::RequestError> {
    let mut device = tokio_serial::new(&pty.b, 115_200).open_native_async().unwrap();
    let connection = Connection {
        rtu: Some(SerialPort {
            path: pty.a.clone(),
            baud_rate: 115_200,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
        }),
        ..Connection::default()
    };
    let mut link = connection::connect(&connection, 1, Duration::from_secs(2))
        .await
        .unwrap();
    let device_side = async {
        let mut request = [0u8; 8];
        let asked = tokio::time::timeout(Duration::from_secs(2), device.read_exact(&mut request)).await;
        if matches!(asked, Ok(Ok(_))) {
            let _ = device.write_all(&frame(answer, framing, &request)).await;
        }
    };
    let read = read_of(kind);
    let poll = connection::execute(&mut link, &read, Duration::from_millis(100));
    tokio::join!(device_side, poll).1
}

/// Fuzzed RTU answers on a real serial line (a socat pty pair per case, reaped after
/// it): raw, or behind the unit id and a valid CRC. A quarter of the cases of the
/// properties below: each costs a pty pair and, for a cut answer, the read timeout.
#[test]
fn any_rtu_answer_on_a_serial_line_is_data_or_an_error() {
    bound_memory();
    let mut runner = TestRunner::new(ProptestConfig::with_cases((cases() / 4).max(16)));
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..300),
        prop::sample::select(vec![Framing::RtuRaw, Framing::RtuCrc]),
        any_kind(),
    );
    runner
        .run(&strategy, |(answer, framing, kind)| {
            let pty = PtyPair::new();
            fits_the_request(runtime().block_on(answered_on_a_serial_line(&pty, answer, framing, kind)))
        })
        .unwrap();
}

fn any_kind() -> impl Strategy<Value = RegisterKind> {
    prop::sample::select(vec![
        RegisterKind::Holding,
        RegisterKind::Input,
        RegisterKind::Coil,
        RegisterKind::DiscreteInput,
    ])
}

/// The framings reach the parser: a well-formed answer behind each is data, over TCP and
/// on a serial line.
#[test]
fn well_formed_answers_behind_each_framing_are_data() {
    let holding = vec![0x03, 8, 0, 1, 0, 2, 0, 3, 0, 4];
    for framing in [Framing::Mbap, Framing::RtuCrc] {
        let data = runtime()
            .block_on(answered_with(holding.clone(), framing, RegisterKind::Holding))
            .unwrap_or_else(|e| panic!("{framing:?}: {e}"));
        assert_eq!(data, connection::Data::Registers(vec![1, 2, 3, 4]), "{framing:?}");
    }
    let pty = PtyPair::new();
    let data = runtime()
        .block_on(answered_on_a_serial_line(
            &pty,
            holding,
            Framing::RtuCrc,
            RegisterKind::Holding,
        ))
        .unwrap_or_else(|e| panic!("RTU on a serial line: {e}"));
    assert_eq!(
        data,
        connection::Data::Registers(vec![1, 2, 3, 4]),
        "RTU on a serial line"
    );
}

#[test]
fn the_crc_is_the_modbus_one() {
    // The example from the Modbus over serial line specification: 02 07 -> CRC 0x1241.
    assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_modbus_answer_is_data_or_an_error(
        answer in prop::collection::vec(any::<u8>(), 0..300),
        framing in prop::sample::select(vec![Framing::TcpRaw, Framing::Mbap, Framing::RtuRaw, Framing::RtuCrc]),
        kind in any_kind(),
    ) {
        bound_memory();
        fits_the_request(runtime().block_on(answered_with(answer, framing, kind)))?;
    }

    #[test]
    fn any_register_answer_decodes_or_is_refused(registers in prop::collection::vec(any::<u16>(), 0..300), layout in any_layout()) {
        bound_memory();
        let _ = decode_registers(&registers, &layout);
    }

    #[test]
    fn a_damaged_queue_record_is_an_error_never_a_panic(
        points in 1usize..50,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        keep in any::<prop::sample::Index>(),
    ) {
        bound_memory();
        let mut bytes = record_bytes(points);
        for (at, value) in &flips {
            let index = at.index(bytes.len());
            bytes[index] ^= value;
        }
        bytes.truncate(keep.index(bytes.len() + 1));
        let _ = record::header(&bytes);
        if let Ok(decoded) = record::decode(&bytes) {
            // Whatever decodes is a whole record: its counts add up.
            let points: u32 = decoded.batches.iter().map(|b| b.points).sum();
            prop_assert_eq!(points, decoded.points);
            // ... and every batch decodes as a consumer will decode it.
            for batch in &decoded.batches {
                let whole = <PointBatch as prost::Message>::decode(batch.encoded.clone());
                prop_assert!(whole.is_ok(), "{:?}", whole);
                prop_assert_eq!(whole.unwrap().points.len(), batch.points as usize);
            }
        }
    }

    #[test]
    fn a_mutated_manifest_loads_or_is_reported(file in any::<prop::sample::Index>(), edits in prop::collection::vec(any_edit(), 1..6)) {
        bound_memory();
        let manifests = example_manifests();
        let text = apply(&manifests[file.index(manifests.len())], &edits);
        let _ = parse(&text);
    }
}

#[test]
fn yaml_bombs_and_deep_nesting_are_refused_quickly() {
    bound_memory();
    let laughs = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n\
                  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n\
                  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n\
                  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n\
                  h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n";
    let deep = format!("a: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge_name = format!(
        "apiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: {}}}\nspec: {{site: s}}\n",
        "d".repeat(1 << 20)
    );
    for (what, text) in [
        ("billion laughs", laughs.to_owned()),
        ("deep nesting", deep),
        ("huge name", huge_name),
    ] {
        let started = std::time::Instant::now();
        let report = parse(&text);
        assert!(report.has_errors(), "{what}: accepted");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}

/// Found by the fuzzing above: a record cut between its batches parsed as a shorter
/// valid record, and its missing points vanished without being counted as corrupt.
#[test]
fn a_record_cut_between_its_batches_is_corrupt() {
    let whole = record_bytes(2);
    let one_batch = record::encode(
        &[record::decode(&whole).unwrap().batches[0].decode().into()],
        42,
        Totals::default(),
    );
    // The first batch's bytes end where the one-batch record's body does (minus the totals).
    let cut = &whole[..one_batch.len() - 4];
    let error = record::decode(cut).unwrap_err().to_string();
    assert!(
        error.contains("the header counts 4 points, the body holds 2"),
        "{error}"
    );
}
