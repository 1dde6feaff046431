//! Setpoint writes against real peers: the simulator over loopback TCP and over a real
//! serial line (a socat pty pair), a Modbus server written by someone else (pymodbus), and
//! the running ingestor taking requests over a real nats-server.

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use prost::Message as _;
use tagstream_core::{point::PointValue, report::DeviceHealth};
use tagstream_crds::{
    Device, SiteSpec,
    device::{ByteOrder, RegisterKind},
    site::FullPolicy,
};
use tagstream_ingestor::{
    acquisition::{
        connection,
        poller::{self, NamedWrite},
        write::{self, Outcome, TagWrite, WriteReport},
    },
    publish::PublisherConfig,
    queue::{Queue, QueueConfig},
    service::{self, RunOptions, state::SiteState},
    simulate::{self, Faults, Framing, SimulatedEndpoint},
    write_cmd::{self, Asked, NatsWrite},
    writes::{Route, WriteRoutes, WriteService},
};
use tagstream_proto::v1::{PointBatch, SourceKind, WriteOutcome, WriteReply};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_modbus::ExceptionCode;
use tokio_util::sync::CancellationToken;

use support::{
    http::http_get,
    nats::{Nats, free_port},
    pty::PtyPair,
    stream::assert_exactly_once_in_order,
};

fn device(yaml: &str) -> Device {
    serde_yaml::from_str(yaml).unwrap()
}

/// Serves `devices` on a free loopback port; returns the port and the endpoint.
async fn simulator(devices: &[&Device], faults: Faults, shutdown: &CancellationToken) -> (u16, Arc<SimulatedEndpoint>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let endpoint = SimulatedEndpoint::new(devices, faults);
    tokio::spawn(simulate::serve_tcp(
        listener,
        Arc::clone(&endpoint),
        Framing::Tcp,
        shutdown.clone(),
    ));
    (port, endpoint)
}

/// Writes `value` to tag `name` of `device` on a connection of its own.
async fn write_once(device: &Device, name: &str, value: PointValue, expected: Option<PointValue>) -> WriteReport {
    let spec = &device.spec;
    let index = spec.tags.iter().position(|t| t.name == name).unwrap();
    let mut link = connection::connect(&spec.connection, spec.unit_id, spec.timeout.get())
        .await
        .unwrap();
    let report = write::write_tag(
        &mut link,
        spec,
        &poller::layouts(spec),
        index,
        &value,
        expected.as_ref(),
    )
    .await
    .unwrap();
    link.disconnect().await;
    report
}

/// What `read` decodes for tag `name` now.
async fn read_tag(device: &Device, name: &str) -> Option<PointValue> {
    let index = device.spec.tags.iter().position(|t| t.name == name).unwrap();
    let readings = tagstream_ingestor::read::read_device(device).await.unwrap();
    readings.into_iter().find(|r| r.tag == index).unwrap().sample.value
}

/// Every writable type, under `order`, with its host and port left to fill in.
const WRITABLE: &str = r"
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {name: panel}
spec:
  site: s
  connection: {tcp: {host: 127.0.0.1, port: PORT}}
  unitId: 3
  timeout: 2s
  byteOrder: ORDER
  tags:
    - {name: setpoint, register: holding, address: 0, type: int16, scale: 0.1, unit: degC, writable: true, min: -50, max: 150, simulation: {waveform: constant, min: 0, max: 0}}
    - {name: count, register: holding, address: 1, type: uint16, writable: true}
    - {name: offset, register: holding, address: 2, type: int32, writable: true}
    - {name: total, register: holding, address: 4, type: uint32, scale: 0.01, writable: true}
    - {name: position, register: holding, address: 6, type: int64, writable: true}
    - {name: serial, register: holding, address: 10, type: uint64, writable: true}
    - {name: ratio, register: holding, address: 14, type: float32, writable: true}
    - {name: energy, register: holding, address: 16, type: float64, writable: true}
    - {name: recipe, register: holding, address: 20, type: string, length: 4, writable: true}
    - {name: pump_on, register: holding, address: 24, type: bit, bit: 0, writable: true, simulation: {waveform: constant, min: 0, max: 0}}
    - {name: valve_open, register: holding, address: 24, type: bit, bit: 5, writable: true}
    - {name: reset, register: coil, address: 3, type: bool, writable: true}
    - {name: measured, register: holding, address: 30, type: uint16}
";

fn values_to_write() -> Vec<(&'static str, PointValue)> {
    vec![
        ("setpoint", PointValue::Double(-21.5)),
        ("count", PointValue::UInt(65_535)),
        ("offset", PointValue::Int(-1_030_000_123)),
        ("total", PointValue::Double(123_456.78)),
        ("position", PointValue::Int(-9_000_000_000_000_000_001)),
        ("serial", PointValue::UInt(18_000_000_000_000_000_001)),
        ("ratio", PointValue::Double(0.95)),
        ("energy", PointValue::Double(12_345.678_901_234)),
        ("recipe", PointValue::String("PLA-7".into())),
        ("pump_on", PointValue::Bool(true)),
        ("valve_open", PointValue::Bool(true)),
        ("reset", PointValue::Bool(true)),
    ]
}

/// Writes every value to `panel` and checks the reports, a fresh read, and that the bits
/// of one register were each kept (read-modify-write).
async fn write_every_type(panel: &Device, context: &str) {
    for (name, value) in values_to_write() {
        let report = write_once(panel, name, value.clone(), None).await;
        assert_eq!(report.outcome, Outcome::Written, "{context} {name}: {report:?}");
        assert_eq!(report.detail, "", "{context} {name}: {report:?}");
        assert_eq!(report.read_back.as_ref(), Some(&value), "{context} {name}");
        assert_eq!(read_tag(panel, name).await, Some(value), "{context} {name}");
    }
    assert_eq!(
        read_tag(panel, "pump_on").await,
        Some(PointValue::Bool(true)),
        "{context}"
    );
    let report = write_once(panel, "pump_on", PointValue::Bool(false), None).await;
    assert_eq!(report.previous, Some(PointValue::Bool(true)), "{context}");
    assert_eq!(
        read_tag(panel, "valve_open").await,
        Some(PointValue::Bool(true)),
        "{context}"
    );
    assert_eq!(
        read_tag(panel, "pump_on").await,
        Some(PointValue::Bool(false)),
        "{context}"
    );
}

#[tokio::test]
async fn every_writable_type_and_byte_order_reads_back_as_written() {
    let shutdown = CancellationToken::new();
    for order in ByteOrder::ALL {
        let yaml = WRITABLE.replace("ORDER", &format!("{order:?}"));
        let template = device(&yaml.replace("PORT", "1"));
        let (port, endpoint) = simulator(&[&template], Faults::default(), &shutdown).await;
        let panel = device(&yaml.replace("PORT", &port.to_string()));
        write_every_type(&panel, &format!("{order:?}")).await;
        // One request per value, two for the register the two bits share (read-modify-write
        // is one write), none for refusals.
        assert_eq!(endpoint.writes(), 13, "{order:?}");
        let refusals = [
            ("setpoint", PointValue::Double(150.1), Outcome::OutOfRange),
            ("setpoint", PointValue::Double(21.55), Outcome::OutOfRange),
            ("count", PointValue::Int(-1), Outcome::OutOfRange),
            ("count", PointValue::String("ten".into()), Outcome::Invalid),
            (
                "recipe",
                PointValue::String("TOO-LONG-NAME".into()),
                Outcome::OutOfRange,
            ),
            ("measured", PointValue::UInt(1), Outcome::NotWritable),
        ];
        for (name, value, outcome) in refusals {
            let report = write_once(&panel, name, value.clone(), None).await;
            assert_eq!(report.outcome, outcome, "{order:?} {name} {value}: {report:?}");
        }
        assert_eq!(endpoint.writes(), 13, "a refused value reached the device");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_compare_and_set_writes_only_over_the_expected_value() {
    let shutdown = CancellationToken::new();
    let yaml = WRITABLE.replace("ORDER", "ABCD");
    let template = device(&yaml.replace("PORT", "1"));
    let (port, endpoint) = simulator(&[&template], Faults::default(), &shutdown).await;
    let panel = device(&yaml.replace("PORT", &port.to_string()));
    let first = write_once(&panel, "setpoint", PointValue::Double(60.0), None).await;
    assert_eq!(first.outcome, Outcome::Written);
    let stale = write_once(&panel, "setpoint", PointValue::Double(70.0), Some(PointValue::Int(55))).await;
    assert_eq!(stale.outcome, Outcome::ExpectedMismatch, "{stale:?}");
    assert_eq!(stale.previous, Some(PointValue::Double(60.0)));
    let current = write_once(&panel, "setpoint", PointValue::Double(70.0), Some(PointValue::Int(60))).await;
    assert_eq!(current.outcome, Outcome::Written, "{current:?}");
    assert_eq!(endpoint.writes(), 2);
    assert_eq!(read_tag(&panel, "setpoint").await, Some(PointValue::Double(70.0)));
    shutdown.cancel();
}

#[tokio::test]
async fn a_device_that_refuses_a_write_is_reported_with_its_exception() {
    let shutdown = CancellationToken::new();
    let yaml = WRITABLE.replace("ORDER", "ABCD");
    // The device's own map: `count` is read-only there, and address 0 is faulty.
    let on_device = device(
        &yaml
            .replace("PORT", "1")
            .replace("type: uint16, writable: true", "type: uint16"),
    );
    let faults = Faults {
        exception_at: [(RegisterKind::Coil, 3)].into_iter().collect(),
        ..Faults::default()
    };
    let (port, endpoint) = simulator(&[&on_device], faults, &shutdown).await;
    let panel = device(&yaml.replace("PORT", &port.to_string()));
    let refused = write_once(&panel, "count", PointValue::UInt(7), None).await;
    assert_eq!(
        refused.outcome,
        Outcome::Refused(ExceptionCode::IllegalDataAddress),
        "{refused:?}"
    );
    assert_eq!(refused.detail, "exception 2: Illegal data address");
    assert!(refused.previous.is_some(), "{refused:?}");
    // The coil cannot even be read: no compare-and-set is possible, and the write is refused.
    let coil = write_once(&panel, "reset", PointValue::Bool(true), None).await;
    assert_eq!(
        coil.outcome,
        Outcome::Refused(ExceptionCode::IllegalDataAddress),
        "{coil:?}"
    );
    assert_eq!(endpoint.writes(), 0);
    shutdown.cancel();
}

/// Writes `tags` (name, value, expected) of `device` together, as a recipe, on a
/// connection of its own.
async fn write_recipe(device: &Device, tags: &[(&str, PointValue, Option<PointValue>)]) -> WriteReport {
    let spec = &device.spec;
    let writes: Vec<TagWrite> = tags
        .iter()
        .map(|(name, value, expected)| TagWrite {
            index: spec.tags.iter().position(|t| t.name == *name).unwrap(),
            value: value.clone(),
            expected: expected.clone(),
        })
        .collect();
    let mut link = connection::connect(&spec.connection, spec.unit_id, spec.timeout.get())
        .await
        .unwrap();
    let report = write::write_tags(&mut link, spec, &poller::layouts(spec), &writes)
        .await
        .unwrap();
    link.disconnect().await;
    report
}

/// A recipe is checked whole before anything is written (bounds, then every expected
/// value), goes out as one request per run of contiguous registers or coils, and reads
/// every tag back.
#[tokio::test]
async fn a_recipe_is_checked_whole_then_written_in_as_few_requests_as_its_addresses_allow() {
    let shutdown = CancellationToken::new();
    let yaml = WRITABLE.replace("ORDER", "CDAB");
    let template = device(&yaml.replace("PORT", "1"));
    let (port, endpoint) = simulator(&[&template], Faults::default(), &shutdown).await;
    let panel = device(&yaml.replace("PORT", &port.to_string()));
    let contiguous = [
        ("setpoint", PointValue::Double(42.5), None),
        ("count", PointValue::UInt(7), None),
        ("offset", PointValue::Int(-70_000), None),
        ("total", PointValue::Double(1234.56), None),
    ];
    let report = write_recipe(&panel, &contiguous).await;
    assert_eq!(report.outcome, Outcome::Written, "{report:?}");
    assert_eq!(endpoint.writes(), 1, "registers 0 to 5 in one write multiple registers");
    let read_back: Vec<_> = report
        .tags
        .iter()
        .map(|t| (t.tag.as_str(), t.read_back.clone()))
        .collect();
    let asked: Vec<_> = contiguous.iter().map(|(n, v, _)| (*n, Some(v.clone()))).collect();
    assert_eq!(read_back, asked);
    assert_eq!(report.tags[0].previous, Some(PointValue::Double(0.0)));

    // Anything refused refuses the whole recipe, before a byte is sent.
    let out_of_range = write_recipe(
        &panel,
        &[
            ("setpoint", PointValue::Double(10.0), None),
            ("count", PointValue::Int(-1), None),
        ],
    )
    .await;
    assert_eq!(out_of_range.outcome, Outcome::OutOfRange, "{out_of_range:?}");
    assert!(
        out_of_range.detail.starts_with("tag count: ") && out_of_range.detail.ends_with("nothing was written"),
        "{}",
        out_of_range.detail
    );
    let stale = write_recipe(
        &panel,
        &[
            ("setpoint", PointValue::Double(10.0), Some(PointValue::Double(42.5))),
            ("count", PointValue::UInt(8), Some(PointValue::UInt(6))),
        ],
    )
    .await;
    assert_eq!(stale.outcome, Outcome::ExpectedMismatch, "{stale:?}");
    assert!(
        stale.detail.contains("tag count: the tag reads 7, not the expected 6"),
        "{}",
        stale.detail
    );
    assert_eq!(endpoint.writes(), 1, "a refused recipe reached the device");
    assert_eq!(read_tag(&panel, "setpoint").await, Some(PointValue::Double(42.5)));

    // Two bits of one register are one read-modify-write; a coil and a float elsewhere
    // are a request each.
    let spread = write_recipe(
        &panel,
        &[
            ("pump_on", PointValue::Bool(true), None),
            ("valve_open", PointValue::Bool(true), None),
            ("reset", PointValue::Bool(true), None),
            ("ratio", PointValue::Double(0.5), None),
        ],
    )
    .await;
    assert_eq!(spread.outcome, Outcome::Written, "{spread:?}");
    assert_eq!(endpoint.writes(), 4, "register 24, coil 3, registers 14-15");
    for tag in ["pump_on", "valve_open", "reset"] {
        assert_eq!(read_tag(&panel, tag).await, Some(PointValue::Bool(true)), "{tag}");
    }
    shutdown.cancel();
}

/// A one-tag device on the pymodbus server, holding table from address 0.
fn pymodbus_device(port: u16, tag: &str, quirk: &str) -> Device {
    device(&format!(
        "apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {{name: pymodbus}}
spec:
  site: s
  connection: {{tcp: {{host: 127.0.0.1, port: {port}}}}}
  unitId: 1
  timeout: 2s
  quirks: {{{quirk}}}
  tags:
    - {tag}
"
    ))
}

/// Checks the layout of a float32 written under `order`, read back as plain registers:
/// 21.5f32 is 0x41AC0000.
async fn assert_float_layout(port: u16, order: ByteOrder, quirk: &str) {
    let float =
        format!("{{name: t, register: holding, address: 0, type: float32, writable: true, byteOrder: {order:?}}}");
    write_once(
        &pymodbus_device(port, &float, quirk),
        "t",
        PointValue::Double(21.5),
        None,
    )
    .await;
    let raw = device(&format!(
        "apiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: raw}}\nspec:\n  site: s\n  connection: {{tcp: {{host: 127.0.0.1, port: {port}}}}}\n  tags:\n    - {{name: r0, register: holding, address: 0, type: uint16}}\n    - {{name: r1, register: holding, address: 1, type: uint16}}\n"
    ));
    let expected = match order {
        ByteOrder::ABCD => [0x41AC, 0x0000],
        ByteOrder::CDAB => [0x0000, 0x41AC],
        ByteOrder::BADC => [0xAC41, 0x0000],
        ByteOrder::DCBA => [0x0000, 0xAC41],
    };
    let registers = [read_tag(&raw, "r0").await, read_tag(&raw, "r1").await];
    assert_eq!(
        registers,
        expected.map(|r| Some(PointValue::UInt(r))),
        "{quirk} {order:?}: 21.5 as float32"
    );
}

/// Every writable type and byte order written to a Modbus server written by someone else,
/// with both write quirks, and its refusal of an address it does not have.
/// `scripts/test.sh` names pymodbus's python in `TAGSTREAM_PYMODBUS_PYTHON`.
#[tokio::test]
async fn a_pymodbus_server_takes_every_type_and_order() {
    let Some((_server, port)) = support::pymodbus::start().await else {
        return;
    };
    let cases = [
        (
            "{name: t, register: holding, address: 0, type: int16, scale: 0.1, writable: true}",
            PointValue::Double(-21.5),
        ),
        (
            "{name: t, register: holding, address: 0, type: uint16, writable: true}",
            PointValue::UInt(65_535),
        ),
        (
            "{name: t, register: holding, address: 0, type: int32, writable: true}",
            PointValue::Int(-1_030_000_123),
        ),
        (
            "{name: t, register: holding, address: 0, type: uint32, writable: true}",
            PointValue::UInt(4_000_000_001),
        ),
        (
            "{name: t, register: holding, address: 0, type: int64, writable: true}",
            PointValue::Int(-9_000_000_000_000_000_001),
        ),
        (
            "{name: t, register: holding, address: 0, type: uint64, writable: true}",
            PointValue::UInt(18_000_000_000_000_000_001),
        ),
        (
            "{name: t, register: holding, address: 0, type: float32, writable: true}",
            PointValue::Double(21.5),
        ),
        (
            "{name: t, register: holding, address: 0, type: float64, writable: true}",
            PointValue::Double(-0.000_123_4),
        ),
        (
            "{name: t, register: holding, address: 0, type: string, length: 3, writable: true}",
            PointValue::String("ABCDE".into()),
        ),
        (
            "{name: t, register: holding, address: 5, type: bit, bit: 9, writable: true}",
            PointValue::Bool(true),
        ),
        (
            "{name: t, register: coil, address: 2, type: bool, writable: true}",
            PointValue::Bool(true),
        ),
    ];
    for quirk in ["", "writeSingle: true", "writeMultiple: true"] {
        for order in ByteOrder::ALL {
            for (tag, value) in &cases {
                let tag = tag.replace("writable: true", &format!("writable: true, byteOrder: {order:?}"));
                let tag = if tag.contains("coil") {
                    tag.replace(&format!(", byteOrder: {order:?}"), "")
                } else {
                    tag
                };
                let target = pymodbus_device(port, &tag, quirk);
                let context = format!("{quirk} {order:?} {tag}");
                let report = write_once(&target, "t", value.clone(), None).await;
                assert_eq!(report.outcome, Outcome::Written, "{context}: {report:?}");
                assert_eq!(report.detail, "", "{context}");
                assert_eq!(read_tag(&target, "t").await.as_ref(), Some(value), "{context}");
            }
            assert_float_layout(port, order, quirk).await;
        }
    }
    let missing = pymodbus_device(
        port,
        "{name: t, register: holding, address: 50, type: uint16, writable: true}",
        "",
    );
    let report = write_once(&missing, "t", PointValue::UInt(1), None).await;
    assert_eq!(
        report.outcome,
        Outcome::Refused(ExceptionCode::IllegalDataAddress),
        "{report:?}"
    );
    // A recipe of an int16, the float32 after it and a coil, under each write quirk.
    for quirk in ["", "writeSingle: true", "writeMultiple: true"] {
        let tags = "{name: a, register: holding, address: 6, type: int16, writable: true}\n    - {name: b, register: holding, address: 7, type: float32, writable: true}\n    - {name: c, register: coil, address: 4, type: bool, writable: true}";
        let target = pymodbus_device(port, tags, quirk);
        let asked = [
            ("a", PointValue::Int(-5), None),
            ("b", PointValue::Double(0.25), None),
            ("c", PointValue::Bool(true), None),
        ];
        let report = write_recipe(&target, &asked).await;
        assert_eq!(report.outcome, Outcome::Written, "{quirk}: {report:?}");
        for (name, value, _) in &asked {
            assert_eq!(read_tag(&target, name).await.as_ref(), Some(value), "{quirk} {name}");
        }
    }
}

/// Has the endpoint task behind `writes` write `tags` of device `panel` together.
async fn perform(writes: &mpsc::Sender<poller::WriteJob>, tags: &[(&str, PointValue)]) -> WriteReport {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let job = poller::WriteJob {
        device: "panel".into(),
        tags: tags
            .iter()
            .map(|(name, value)| NamedWrite {
                tag: (*name).into(),
                value: value.clone(),
                expected: None,
            })
            .collect(),
        deadline: Instant::now() + Duration::from_secs(5),
        reply,
    };
    writes.send(job).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), outcome)
        .await
        .unwrap()
        .unwrap()
}

/// Writes sent to the endpoint task of a serial bus polled every 10 ms: each goes out
/// between two polls, so no frame of a write meets a frame of a poll on the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_polls_on_one_serial_bus_never_collide() {
    let pty = PtyPair::new();
    let shutdown = CancellationToken::new();
    let yaml = WRITABLE
        .replace("ORDER", "CDAB")
        .replace(
            "tcp: {host: 127.0.0.1, port: PORT}",
            &format!("rtu: {{path: {}, baudRate: 115200}}", pty.a),
        )
        .replace("timeout: 2s", "timeout: 500ms\n  pollInterval: 10ms");
    let panel = device(&yaml);
    let endpoint = SimulatedEndpoint::new(&[&panel], Faults::default());
    let server = tokio::spawn({
        let (path, shutdown, endpoint) = (pty.b.clone(), shutdown.clone(), Arc::clone(&endpoint));
        async move { simulate::serve_rtu(&path, 115_200, endpoint, shutdown).await }
    });
    let (tx, mut polled) = mpsc::channel(1024);
    // Polling stops before the device does, or the last poll would time out on a gone device.
    let polling = CancellationToken::new();
    let started = poller::spawn_endpoint(std::slice::from_ref(&panel), &tx, &polling);
    let health: Arc<Mutex<DeviceHealth>> = Arc::clone(&started.health["panel"]);
    let collector = tokio::spawn(async move {
        let mut bad = Vec::new();
        let mut last_setpoint = None;
        while let Some(batch) = polled.recv().await {
            for (index, sample) in &batch.points {
                if !sample.quality.is_good() {
                    bad.push(sample.quality.to_string());
                }
                if *index == 0 {
                    last_setpoint.clone_from(&sample.value);
                }
            }
        }
        (bad, last_setpoint)
    });
    let mut written = 0;
    let started_writing = Instant::now();
    let mut slowest = Duration::ZERO;
    for round in 0..40u32 {
        // Three single writes and a recipe of two contiguous tags (one request).
        let recipe = vec![
            ("count", PointValue::UInt(u64::from(round))),
            ("offset", PointValue::Int(-i64::from(round))),
        ];
        for tags in [
            vec![("setpoint", PointValue::Double(f64::from(round) / 2.0))],
            vec![("pump_on", PointValue::Bool(round % 2 == 0))],
            vec![("energy", PointValue::Double(f64::from(round) * 1.25))],
            recipe,
        ] {
            let asked = Instant::now();
            let report = perform(&started.writes, &tags).await;
            slowest = slowest.max(asked.elapsed());
            assert_eq!(report.outcome, Outcome::Written, "round {round} {tags:?}: {report:?}");
            if let [(_, value)] = tags.as_slice() {
                assert_eq!(report.read_back.as_ref(), Some(value), "round {round} {tags:?}");
            } else {
                let read_back: Vec<_> = report.tags.iter().map(|t| t.read_back.clone()).collect();
                let asked: Vec<_> = tags.iter().map(|(_, v)| Some(v.clone())).collect();
                assert_eq!(read_back, asked, "round {round}");
            }
            written += 1;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await;
    }
    let writing = started_writing.elapsed();
    // Polls go on after the writes and read the last setpoint written.
    let polls = health.lock().unwrap().polls;
    let deadline = Instant::now() + Duration::from_secs(5);
    while health.lock().unwrap().polls < polls + 10 {
        assert!(Instant::now() < deadline, "polling stopped after the writes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    polling.cancel();
    started.task.await.unwrap();
    shutdown.cancel();
    drop(tx);
    let (bad, last_setpoint) = collector.await.unwrap();
    let health = health.lock().unwrap().clone();
    println!(
        "serial bus: {written} writes in {:.0?} (slowest {slowest:.1?}) beside {} polls every 10 ms, {} cycles skipped",
        writing, health.polls, health.poll_cycles_skipped
    );
    assert_eq!(written, 160);
    assert_eq!(
        endpoint.writes(),
        160,
        "a recipe of contiguous registers is one request"
    );
    assert!(health.polls > 20, "only {} polls beside the writes", health.polls);
    assert_eq!(health.failed_polls, 0, "a poll failed: {:?}", health.last_error);
    assert!(bad.is_empty(), "bad points while writing: {bad:?}");
    assert_eq!(last_setpoint, Some(PointValue::Double(19.5)));
    server.abort();
}

/// A site whose device is simulated in-process on `port`, publishing to `broker` (a
/// Site's `broker` as YAML).
fn write_site(dir: &Path, broker: &str, port: u16, writes_enabled: bool) {
    std::fs::write(
        dir.join("site.yaml"),
        format!(
            "apiVersion: tagstream.io/v1alpha1
kind: Site
metadata: {{name: works}}
spec:
  broker: {broker}
  queue: {{flushInterval: 2ms}}
  writes: {{enabled: {writes_enabled}}}
---
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {{name: boiler}}
spec:
  site: works
  connection: {{tcp: {{host: 127.0.0.1, port: {port}}}}}
  pollInterval: 20ms
  tags:
    - {{name: setpoint, register: holding, address: 0, type: int16, scale: 0.1, unit: degC, writable: true, min: 40, max: 90, simulation: {{waveform: constant, min: 70, max: 70}}}}
    - {{name: temperature, register: holding, address: 1, type: int16, simulation: {{waveform: constant, min: 65, max: 65}}}}
    - {{name: limit, register: holding, address: 2, type: int16, writable: true, min: 0, max: 100, simulation: {{waveform: constant, min: 50, max: 50}}}}
"
        ),
    )
    .unwrap();
}

fn request(url: &str, subject: &str, id: &str, value: PointValue) -> NatsWrite {
    NatsWrite {
        url: url.to_owned(),
        subject: subject.to_owned(),
        asked: Asked::Tag { value, expected: None },
        request_id: id.to_owned(),
        requested_by: "operator-7".to_owned(),
        credentials_file: None,
        timeout: Duration::from_secs(15),
    }
}

async fn status(address: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http_get(address, "/status").await.unwrap()).unwrap()
}

/// Every message of the stream with its subject.
async fn stream_with_subjects(url: &str, options: async_nats::ConnectOptions) -> Vec<(String, String, PointBatch)> {
    let client = options.connect(url).await.unwrap();
    let stream = jetstream::new(client).get_stream("TAGSTREAM").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(ToString::to_string)
            .unwrap_or_default();
        let batch = PointBatch::decode(message.payload.as_ref()).unwrap();
        out.push((message.subject.to_string(), id, batch));
    }
    out
}

/// The stream after the NATS test: exactly once and in order, one audit per attempt with
/// the exchange, and the polled setpoint following the writes.
fn assert_audited(stored: &[(String, String, PointBatch)], first: &WriteReply) {
    let batches: Vec<(String, PointBatch)> = stored.iter().map(|(_, id, b)| (id.clone(), b.clone())).collect();
    assert_exactly_once_in_order(&batches, 0);
    let audits: Vec<&(String, String, PointBatch)> = stored
        .iter()
        .filter(|(_, _, b)| b.source_kind == i32::from(SourceKind::Write))
        .collect();
    // Every attempt on the site's device once; the repeated r-1 is not a second attempt.
    assert_eq!(audits.len(), 9, "{audits:#?}");
    for (subject, _, batch) in &audits {
        assert_eq!(subject, "tagstream.default.works.boiler.write");
        let audit = batch.write.as_ref().unwrap();
        // A point per tag written: the recipe's two, none for a value sent to the
        // device's subject (it names no tag).
        let tags = match audit.request_id.as_str() {
            "recipe-1" => 2,
            "r-5" => 0,
            _ => 1,
        };
        assert_eq!(batch.points.len(), tags, "{audit:?}");
    }
    let recipe = audits
        .iter()
        .find_map(|(_, _, b)| b.write.as_ref().filter(|w| w.request_id == "recipe-1"))
        .unwrap();
    let asked: Vec<&str> = recipe.requested_tags.iter().map(|t| t.tag.as_str()).collect();
    let replied: Vec<&str> = recipe
        .reply
        .as_ref()
        .unwrap()
        .tags
        .iter()
        .map(|t| t.tag.as_str())
        .collect();
    assert_eq!(
        (recipe.tag.as_str(), asked, replied),
        ("", vec!["setpoint", "limit"], vec!["setpoint", "limit"])
    );
    let ids: Vec<&str> = audits
        .iter()
        .map(|(_, _, b)| b.write.as_ref().unwrap().request_id.as_str())
        .collect();
    assert_eq!(ids.iter().filter(|id| **id == "r-1").count(), 2, "{ids:?}");
    let first_audit = &audits[0].2;
    let audit = first_audit.write.as_ref().unwrap();
    assert_eq!(
        (
            audit.request_id.as_str(),
            audit.requested_by.as_str(),
            audit.tag.as_str()
        ),
        ("r-1", "operator-7", "setpoint")
    );
    let reply = audit.reply.as_ref().unwrap();
    assert_eq!(reply, first);
    let point = &first_audit.points[0];
    assert_eq!((point.tag.as_str(), point.unit.as_str()), ("setpoint", "degC"));
    assert_eq!(point.value, Some(tagstream_proto::v1::point::Value::DoubleValue(72.5)));
    let out_of_range = audits
        .iter()
        .find(|(_, _, b)| b.write.as_ref().unwrap().request_id == "r-2")
        .unwrap();
    assert_eq!(out_of_range.2.points[0].value, None);
    assert!(
        out_of_range.2.points[0]
            .quality_reason
            .contains("above the tag's max 90"),
        "{:?}",
        out_of_range.2.points[0]
    );
    // The device's polled points show each written value, in order.
    let setpoints: Vec<f64> = stored
        .iter()
        .filter(|(_, _, b)| b.source_kind == i32::from(SourceKind::Device))
        .flat_map(|(_, _, b)| b.points.iter().filter(|p| p.tag == "setpoint"))
        .filter_map(|p| match p.value {
            Some(tagstream_proto::v1::point::Value::DoubleValue(v)) => Some(v),
            _ => None,
        })
        .collect();
    let mut changes: Vec<f64> = setpoints.clone();
    changes.dedup();
    // 55 may be overwritten by the recipe within one poll interval (20 ms) and never seen.
    changes.retain(|v| (*v - 55.0).abs() > 1e-9);
    assert_eq!(changes, [70.0, 72.5, 60.0], "polled setpoints: {:?}", setpoints.len());
    let kinds: BTreeSet<i32> = stored.iter().map(|(_, _, b)| b.source_kind).collect();
    assert_eq!(kinds.len(), 2);
}

/// Requests the running ingestor of site `works` refuses, each with its outcome.
async fn assert_refusals(url: &str) {
    let subject = "tagstream-write.default.works.boiler.setpoint";
    let outcomes = [
        ("r-2", subject, PointValue::Double(95.0), WriteOutcome::OutOfRange),
        (
            "r-3",
            "tagstream-write.default.works.boiler.temperature",
            PointValue::Int(1),
            WriteOutcome::NotWritable,
        ),
        (
            "r-4",
            "tagstream-write.default.works.boiler.nosuch",
            PointValue::Int(1),
            WriteOutcome::NotWritable,
        ),
        ("", subject, PointValue::Double(50.0), WriteOutcome::Invalid),
        // A value on the device's subject, where a recipe's tags go: refused and audited.
        (
            "r-5",
            "tagstream-write.default.works.boiler",
            PointValue::Int(1),
            WriteOutcome::Invalid,
        ),
        // Answered, not audited: no device of the site is named.
        (
            "r-6",
            "tagstream-write.default.works.nosuch.t",
            PointValue::Int(1),
            WriteOutcome::NotWritable,
        ),
    ];
    for (id, subject, value, outcome) in outcomes {
        let reply = write_cmd::write_via_nats(&request(url, subject, id, value))
            .await
            .unwrap();
        assert_eq!(reply.outcome, i32::from(outcome), "{subject} {id}: {reply:?}");
    }
}

/// `run` on the manifests with the devices simulated in-process; its task and the address
/// of `/status`.
async fn start_ingestor(
    manifests: &Path,
    work: &Path,
    shutdown: &CancellationToken,
) -> (tokio::task::JoinHandle<anyhow::Result<()>>, std::net::SocketAddr) {
    let options = RunOptions {
        paths: vec![manifests.to_path_buf()],
        site: None,
        queue_dir: work.join("queue"),
        credentials_dir: work.join("credentials"),
        tls_dir: PathBuf::from("/nonexistent"),
        http: "127.0.0.1:0".parse().unwrap(),
        simulate: true,
        nats_url: None,
        reload_interval: Duration::from_millis(200),
        drain_deadline: Duration::from_secs(5),
    };
    let (bound, address) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(service::run(options, shutdown.clone(), Some(bound)));
    (service, address.await.unwrap())
}

/// Stops `run` as SIGTERM does and waits for it.
async fn stop_ingestor(shutdown: &CancellationToken, service: tokio::task::JoinHandle<anyhow::Result<()>>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `tagstream-ingestor write ARGS`, as a person would type it: what it printed, once it
/// succeeded.
fn write_command(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
        .arg("write")
        .args(args)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed
}

/// The reply to the first request: the write service subscribes right after the ingestor
/// starts, so the first request may find nobody yet.
async fn first_reply(write: &NatsWrite) -> WriteReply {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match write_cmd::write_via_nats(write).await {
            Ok(reply) => return reply,
            Err(e) if e.to_string().contains("no ingestor takes writes") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_running_ingestor_are_performed_once_and_audited() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let device_port = free_port();
    let broker = format!("{{urls: [\"{}\"]}}", nats.url());
    write_site(&manifests, &broker, device_port, true);
    let shutdown = CancellationToken::new();
    let (service, address) = start_ingestor(&manifests, dir.path(), &shutdown).await;
    let subject = "tagstream-write.default.works.boiler.setpoint";
    let url = nats.url();
    let first = first_reply(&request(&url, subject, "r-1", PointValue::Double(72.5))).await;
    let first_report = tagstream_ingestor::writes::wire::report(&first);
    assert_eq!(first_report.outcome, Outcome::Written, "{first:?}");
    assert_eq!(first_report.previous, Some(PointValue::Double(70.0)));
    assert_eq!(first_report.read_back, Some(PointValue::Double(72.5)));

    // The same request again: the first outcome, not a second write.
    let again = write_cmd::write_via_nats(&request(&url, subject, "r-1", PointValue::Double(72.5)))
        .await
        .unwrap();
    assert_eq!(again, first);
    let reused = write_cmd::write_via_nats(&request(&url, subject, "r-1", PointValue::Double(80.0)))
        .await
        .unwrap();
    assert_eq!(reused.outcome, i32::from(WriteOutcome::Invalid), "{reused:?}");
    assert_refusals(&url).await;
    // The write command, as a person would type it.
    let printed = write_command(&["--nats-url", &url, "--subject", subject, "--requested-by", "cli", "55"]);
    assert_eq!(printed, "written; was 72.5; reads back 55");
    // A recipe on the device's subject: both tags in one request, one audit.
    let printed = write_command(&[
        "--nats-url",
        &url,
        "--subject",
        "tagstream-write.default.works.boiler",
        "--request-id",
        "recipe-1",
        "--tag",
        "setpoint",
        "60",
        "--tag",
        "limit",
        "80",
        "--expect",
        "limit",
        "50",
    ]);
    assert_eq!(
        printed,
        "written\n  setpoint; was 55; reads back 60\n  limit; was 50; reads back 80"
    );

    // The polls see the written value.
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = status(address).await["writes"].clone();
    assert_eq!(
        written,
        serde_json::json!({"written": 3, "invalid": 3, "out_of_range": 1, "not_writable": 2}),
    );
    let metrics = http_get(address, "/metrics").await.unwrap();
    assert!(
        metrics.contains("tagstream_writes_total{outcome=\"written\"} 3"),
        "{metrics}"
    );

    // Writes disabled by a reload: nobody answers any more (asked about a device the site
    // does not have, which is answered without an audit while writes are on).
    write_site(&manifests, &broker, device_port, false);
    let elsewhere = "tagstream-write.default.works.nosuch.setpoint";
    loop {
        match write_cmd::write_via_nats(&request(&url, elsewhere, "r-9", PointValue::Double(60.0))).await {
            Err(e) if e.to_string().contains("no ingestor takes writes") => break,
            other => assert!(
                Instant::now() < deadline,
                "writes still taken after the reload: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_ingestor(&shutdown, service).await;

    assert_audited(
        &stream_with_subjects(&url, async_nats::ConnectOptions::new()).await,
        &first,
    );
}

/// The `authorization` block of docs/writes.md, with passwords for its variables.
fn documented_permissions() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/writes.md")).unwrap();
    let start = doc
        .find("authorization {")
        .expect("docs/writes.md shows the permissions");
    let block = &doc[start..];
    let end = block.find("\n```").unwrap();
    block[..end]
        .replace("$TAGSTREAM_PASSWORD", "ingest-pw")
        .replace("$OPERATORS_PASSWORD", "operators-pw")
        .replace("$HISTORIAN_PASSWORD", "historian-pw")
}

/// The NATS permissions docs/writes.md shows, on a real nats-server: the ingestor's user
/// publishes and takes writes, the operators write to their site only, the historian
/// cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_nats_permissions_let_only_the_operators_write() {
    let nats = Nats::start_with(Some(&documented_permissions()));
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("username"), "tagstream").unwrap();
    std::fs::write(credentials.join("password"), "ingest-pw").unwrap();
    let broker = format!(
        "{{urls: [\"{}\"], credentials: {{secretName: nats, type: userPassword}}}}",
        nats.url()
    );
    write_site(&manifests, &broker, free_port(), true);
    // The documented operators may write to site plant-a.
    let site = manifests.join("site.yaml");
    let text = std::fs::read_to_string(&site).unwrap().replace("works", "plant-a");
    std::fs::write(&site, text).unwrap();
    let shutdown = CancellationToken::new();
    let (service, address) = start_ingestor(&manifests, dir.path(), &shutdown).await;
    let as_user = |user: &str| format!("nats://{user}:{user}-pw@127.0.0.1:{}", nats.port);
    let subject = "tagstream-write.default.plant-a.boiler.setpoint";
    let operators = request(&as_user("operators"), subject, "p-1", PointValue::Double(60.0));
    let reply = first_reply(&operators).await;
    assert_eq!(reply.outcome, i32::from(WriteOutcome::Written), "{reply:?}");

    let quick = |mut write: NatsWrite| {
        write.timeout = Duration::from_secs(2);
        write
    };
    // Refused at once with the server's reason, not after the 15 s timeout.
    let historian = request(&as_user("historian"), subject, "p-2", PointValue::Double(61.0));
    let refused = write_cmd::write_via_nats(&historian)
        .await
        .expect_err("the historian wrote");
    assert!(
        refused.to_string().to_lowercase().contains("permissions violation"),
        "{refused:#}"
    );
    let other_site = "tagstream-write.default.elsewhere.boiler.setpoint";
    let elsewhere = quick(request(
        &as_user("operators"),
        other_site,
        "p-3",
        PointValue::Double(61.0),
    ));
    assert!(write_cmd::write_via_nats(&elsewhere).await.is_err());
    assert_eq!(status(address).await["writes"], serde_json::json!({"written": 1}));
    // The ingestor's user still publishes: the audit of the write reached the stream.
    stop_ingestor(&shutdown, service).await;
    let historian = async_nats::ConnectOptions::with_user_and_password("historian".into(), "historian-pw".into());
    let stored = stream_with_subjects(&nats.url(), historian).await;
    let audits = stored
        .iter()
        .filter(|(_, _, batch)| batch.source_kind == i32::from(SourceKind::Write))
        .count();
    assert_eq!(audits, 1);
}

/// With the queue full under pausePolling a write's audit could not be stored: the write
/// is refused and never reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_is_sent_while_the_queue_cannot_keep_its_audit() {
    let mut nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = QueueConfig::new(dir.path().join("queue"));
    config.max_bytes = 64 << 10;
    config.policy = FullPolicy::PausePolling;
    let queue = Queue::open(config).unwrap().queue;
    let filler = tokio::spawn({
        let queue = queue.clone();
        async move {
            loop {
                let batch = PointBatch {
                    source: "boiler".into(),
                    points: vec![tagstream_proto::v1::Point::default(); 100],
                    ..PointBatch::default()
                };
                queue.append(vec![batch]).await.unwrap();
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !queue.stats().paused {
        assert!(Instant::now() < deadline, "the queue never filled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spec = device(&WRITABLE.replace("ORDER", "ABCD").replace("PORT", "1")).spec;
    let (jobs, mut sent) = mpsc::channel(16);
    let routes = WriteRoutes::default();
    routes.write().unwrap().insert("boiler".into(), Route { jobs, spec });
    let mut site = SiteSpec::default();
    site.broker.urls = vec![nats.url()];
    let service = WriteService {
        broker: PublisherConfig {
            broker: site.broker.clone(),
            stream: site.stream.clone(),
            namespace: "default".into(),
            site: "works".into(),
            credentials_dir: PathBuf::from("/nonexistent"),
            tls_dir: PathBuf::from("/nonexistent"),
            max_in_flight: 1,
            chunk_records: 1,
        },
        writes: site.writes.clone(),
        routes,
        queue: queue.clone(),
        state: Arc::new(SiteState::new("default", "works", queue.clone(), None)),
    };
    let stop = CancellationToken::new();
    let running = tokio::spawn(service.run(stop.clone()));
    let subject = "tagstream-write.default.works.boiler.setpoint";
    let reply = first_reply(&request(&nats.url(), subject, "q-1", PointValue::Double(20.0))).await;
    assert_eq!(reply.outcome, i32::from(WriteOutcome::Failed), "{reply:?}");
    assert!(reply.detail.contains("queue is full"), "{reply:?}");
    assert!(sent.try_recv().is_err(), "the write was handed to the device");
    // With the broker gone the service still stops at once (SIGTERM hung on it before).
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the write service did not stop without its broker")
        .unwrap();
    filler.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_command_writes_directly_from_a_manifest() {
    let shutdown = CancellationToken::new();
    let yaml = WRITABLE.replace("ORDER", "ABCD");
    let template = device(&yaml.replace("PORT", "1"));
    let (port, endpoint) = simulator(&[&template], Faults::default(), &shutdown).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("panel.yaml");
    std::fs::write(&manifest, yaml.replace("PORT", &port.to_string())).unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
            .arg("write")
            .arg("-f")
            .arg(&manifest)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        )
    };
    assert_eq!(
        run(&["--tag", "setpoint", "21.5"]),
        (Some(0), "written; was 0; reads back 21.5".to_owned(), String::new())
    );
    assert_eq!(
        run(&["--tag", "pump_on", "on"]),
        (Some(0), "written; was false; reads back true".to_owned(), String::new())
    );
    assert_eq!(
        run(&["--tag", "setpoint", "200"]),
        (
            Some(1),
            "out of range: 200 is above the tag's max 150".to_owned(),
            String::new()
        )
    );
    let (code, _, error) = run(&["--tag", "nosuch", "1"]);
    assert_eq!(
        (code, error.as_str()),
        (Some(2), "error: device panel has no tag \"nosuch\"")
    );
    assert_eq!(endpoint.writes(), 2);
    shutdown.cancel();
}
