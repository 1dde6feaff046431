//! Acquisition against real peers: the simulator over loopback TCP, RTU framing over TCP,
//! RTU over a pty pair made by socat, a hand-written misbehaving server, and a server
//! written by someone else (pymodbus, in `support/pymodbus_server.py`).

#[allow(dead_code, reason = "these tests use part of the test support")]
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tagstream_core::point::{PointValue, QualityLevel};
use tagstream_crds::{Device, device::RegisterKind};
use tagstream_ingestor::{
    acquisition::{
        connection,
        plan::{self, Read, TagSlot},
        poller::{self, PolledBatch, TagReading},
    },
    simulate::{self, Faults, Framing, SimulatedEndpoint},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use support::pty::PtyPair;

fn device(yaml: &str) -> Device {
    serde_yaml::from_str(yaml).unwrap()
}

/// Serves `devices` on a free loopback port; returns the port. Stops with `shutdown`.
async fn simulator(devices: &[Device], faults: Faults, framing: Framing, shutdown: &CancellationToken) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refs: Vec<&Device> = devices.iter().collect();
    let endpoint = SimulatedEndpoint::new(&refs, faults);
    tokio::spawn(simulate::serve_tcp(listener, endpoint, framing, shutdown.clone()));
    port
}

fn with_port(device: &Device, port: u16) -> Device {
    let mut device = device.clone();
    for endpoint in [
        &mut device.spec.connection.tcp,
        &mut device.spec.connection.rtu_over_tcp,
    ]
    .into_iter()
    .flatten()
    {
        endpoint.port = port;
    }
    device
}

fn values(readings: &[TagReading]) -> Vec<Option<PointValue>> {
    readings.iter().map(|r| r.sample.value.clone()).collect()
}

const EVERY_TYPE: &str = r"
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {name: panel}
spec:
  site: s
  connection: {tcp: {host: 127.0.0.1, port: 1}}
  timeout: 2s
  byteOrder: CDAB
  tags:
    - {name: temp, register: holding, address: 0, type: float32, simulation: {waveform: constant, min: 61.5, max: 61.5}}
    - {name: volts, register: input, address: 0, type: int32, scale: 0.1, byteOrder: ABCD, simulation: {waveform: constant, min: 230.5, max: 230.5}}
    - {name: count, register: holding, address: 2, type: uint16, simulation: {waveform: constant, min: 4242, max: 4242}}
    - {name: delta, register: holding, address: 3, type: int16, simulation: {waveform: constant, min: -12, max: -12}}
    - {name: energy, register: holding, address: 4, type: float64, byteOrder: DCBA, simulation: {waveform: constant, min: 12345.678, max: 12345.678}}
    - {name: serial, register: holding, address: 8, type: uint64, byteOrder: BADC, simulation: {waveform: constant, min: 9007199254740993, max: 9007199254740993}}
    - {name: alarm, register: holding, address: 12, type: bit, bit: 5, simulation: {waveform: constant, min: 1, max: 1}}
    - {name: code, register: holding, address: 20, type: string, length: 5}
    - {name: label, register: holding, address: 30, type: string, length: 4, charsPerRegister: 1}
    - {name: running, register: coil, address: 7, type: bool, simulation: {waveform: constant, min: 1, max: 1}}
    - {name: door, register: discreteInput, address: 3, type: bool, simulation: {waveform: constant, min: 0, max: 0}}
";

/// The every-type panel served by a fault-free simulator, pointed at it.
async fn simulated_panel(shutdown: &CancellationToken) -> Device {
    let template = device(EVERY_TYPE);
    let port = simulator(
        std::slice::from_ref(&template),
        Faults::default(),
        Framing::Tcp,
        shutdown,
    )
    .await;
    with_port(&template, port)
}

#[tokio::test]
async fn every_type_and_order_decodes_as_the_manifest_says() {
    let shutdown = CancellationToken::new();
    let panel = simulated_panel(&shutdown).await;
    let readings = tagstream_ingestor::read::read_device(&panel).await.unwrap();
    assert_eq!(
        values(&readings),
        [
            Some(PointValue::Double(61.5)),
            Some(PointValue::Double(230.5)),
            Some(PointValue::UInt(4242)),
            Some(PointValue::Int(-12)),
            Some(PointValue::Double(12345.678)),
            // The simulator works in f64, so 2^53 + 1 arrives as 2^53: within float precision.
            Some(PointValue::UInt(9_007_199_254_740_992)),
            Some(PointValue::Bool(true)),
            Some(PointValue::String("CODE".into())),
            Some(PointValue::String("LABE".into())),
            Some(PointValue::Bool(true)),
            Some(PointValue::Bool(false)),
        ]
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_refused_coalesced_read_is_split_and_the_good_tags_keep_flowing() {
    let shutdown = CancellationToken::new();
    let template = device(EVERY_TYPE);
    let faults = Faults {
        exception_at: [(RegisterKind::Holding, 3)].into(),
        ..Faults::default()
    };
    let port = simulator(std::slice::from_ref(&template), faults, Framing::Tcp, &shutdown).await;
    let panel = with_port(&template, port);
    let spec = &panel.spec;
    let mut context = connection::connect(&spec.connection, spec.unit_id, spec.timeout.get())
        .await
        .unwrap();
    let layouts = poller::layouts(spec);
    let mut reads: Vec<Read> = plan::plan(spec).remove(0).reads;
    let holding_reads = |reads: &[Read]| reads.iter().filter(|r| r.kind == RegisterKind::Holding).count();
    let before = holding_reads(&reads);

    let readings = poller::poll_reads(&mut context, spec, &layouts, &mut reads, 0, true, 0)
        .await
        .unwrap();
    let by_name = |name: &str| {
        readings
            .iter()
            .find(|r| spec.tags[r.tag].name == name)
            .unwrap()
            .sample
            .clone()
    };
    assert_eq!(by_name("delta").quality.level, QualityLevel::Bad);
    assert_eq!(
        by_name("delta").quality.reason.as_deref(),
        Some("exception 2: Illegal data address")
    );
    assert_eq!(
        by_name("count").value,
        Some(PointValue::UInt(4242)),
        "its neighbour in the same read"
    );
    assert_eq!(by_name("temp").value, Some(PointValue::Double(61.5)));
    assert!(
        holding_reads(&reads) > before,
        "the plan keeps the split for later polls"
    );
    shutdown.cancel();
}

const GATEWAY: &str = r"
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {name: NAME}
spec:
  site: s
  connection: {tcp: {host: 127.0.0.1, port: 1}}
  unitId: UNIT
  pollInterval: 100ms
  timeout: 100ms
  tags:
    - {name: value, register: holding, address: 0, type: uint16, simulation: {waveform: constant, min: UNIT, max: UNIT}}
";

async fn collect(rx: &mut mpsc::Receiver<PolledBatch>, window: Duration) -> Vec<PolledBatch> {
    let deadline = tokio::time::Instant::now() + window;
    let mut batches = Vec::new();
    while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        batches.push(batch);
    }
    batches
}

/// The line a simulated gateway's units share.
#[derive(Clone, Copy, Debug)]
enum Line {
    /// Modbus TCP to a gateway: one connection for every unit.
    Tcp,
    /// Modbus RTU on a serial line (a pty pair from socat).
    Pty,
}

/// What polling a simulated gateway's units for a while gave.
struct GatewayRun {
    batches: Vec<PolledBatch>,
    health: poller::HealthMap,
    /// Connections the gateway accepted (TCP only: a serial line has none).
    connections: u64,
    window: Duration,
}

impl GatewayRun {
    fn of(&self, name: &str) -> Vec<&PolledBatch> {
        self.batches.iter().filter(|b| b.device.name == name).collect()
    }

    /// Polls of `name` as a share of its interval's cycles over the window.
    fn rate(&self, name: &str) -> f64 {
        self.of(name).len() as f64 / (self.window.as_millis() / 100) as f64
    }

    fn bad_points(&self, name: &str) -> usize {
        self.of(name)
            .iter()
            .flat_map(|b| &b.points)
            .filter(|(_, s)| s.quality.level == QualityLevel::Bad)
            .count()
    }

    fn health(&self, name: &str) -> tagstream_core::report::DeviceHealth {
        self.health[name].lock().unwrap().clone()
    }
}

/// Polls `units` (name, unit id) with `retries` each, polled every 100 ms with a 100 ms
/// timeout, behind one simulated gateway with `faults`, for `window`.
async fn poll_gateway(line: Line, units: &[(&str, u8)], retries: u8, faults: Faults, window: Duration) -> GatewayRun {
    // The gateway outlives the pollers: a poll cut short by its stop is no failure.
    let (shutdown, gateway_stop) = (CancellationToken::new(), CancellationToken::new());
    let pty = matches!(line, Line::Pty).then(PtyPair::new);
    let devices: Vec<Device> = units
        .iter()
        .map(|(name, unit)| {
            let mut yaml = GATEWAY
                .replace("NAME", name)
                .replace("UNIT", &unit.to_string())
                .replace("timeout: 100ms", &format!("timeout: 100ms\n  retries: {retries}"));
            if let Some(pty) = &pty {
                yaml = yaml.replace(
                    "tcp: {host: 127.0.0.1, port: 1}",
                    &format!("rtu: {{path: {}, baudRate: 115200}}", pty.b),
                );
            }
            device(&yaml)
        })
        .collect();
    let refs: Vec<&Device> = devices.iter().collect();
    let endpoint = SimulatedEndpoint::new(&refs, faults);
    let devices = match &pty {
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(simulate::serve_tcp(
                listener,
                Arc::clone(&endpoint),
                Framing::Tcp,
                gateway_stop.clone(),
            ));
            devices.iter().map(|d| with_port(d, port)).collect()
        }
        Some(pty) => {
            let (path, endpoint, shutdown) = (pty.a.clone(), Arc::clone(&endpoint), gateway_stop.clone());
            tokio::spawn(async move { simulate::serve_rtu(&path, 115_200, endpoint, shutdown).await });
            devices
        }
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let (tasks, health) = poller::spawn(&devices, &tx, &shutdown);
    assert_eq!(tasks.len(), 1, "one line, one owner");
    let batches = collect(&mut rx, window).await;
    shutdown.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the endpoint task stops")
            .unwrap();
    }
    gateway_stop.cancel();
    GatewayRun {
        batches,
        health,
        connections: endpoint.connections(),
        window,
    }
}

#[tokio::test]
async fn a_dead_unit_behind_a_gateway_does_not_slow_its_neighbours() {
    for line in [Line::Tcp, Line::Pty] {
        let faults = Faults {
            silent_units: [2].into(),
            ..Faults::default()
        };
        let units = [("left", 1), ("dead", 2), ("right", 3)];
        let run = poll_gateway(line, &units, 1, faults, Duration::from_secs(3)).await;
        for name in ["left", "right"] {
            eprintln!(
                "{line:?}: {name} polled at {:.0}% of its cycles beside a dead unit",
                run.rate(name) * 100.0
            );
            assert!(
                run.rate(name) >= 0.7,
                "{line:?}: {name} polled at {:.2}",
                run.rate(name)
            );
            assert_eq!(run.bad_points(name), 0, "{line:?}: {name}");
        }
        // The dead unit produced one Bad point when it went down, then backed off.
        let dead = run.of("dead");
        assert_eq!(dead.len(), 1, "{line:?}");
        assert_eq!(dead[0].points[0].1.quality.level, QualityLevel::Bad, "{line:?}");
        let dead_health = run.health("dead");
        assert!(!dead_health.connected, "{line:?}");
        assert!(dead_health.consecutive_failures >= 2, "{line:?}: {dead_health:?}");
        assert!(
            dead_health.failed_polls < 10,
            "{line:?}: backoff keeps retries rare: {dead_health:?}"
        );
        assert!(run.health("left").connected, "{line:?}");
        if let Line::Tcp = line {
            assert_eq!(run.connections, 1, "the neighbours answer: the connection stays open");
        }
    }
}

/// One reply in ten lost on the line: with a retry the unit never goes Bad and its
/// neighbour keeps its rate; without one, each loss is a failed poll.
#[tokio::test]
async fn a_lost_reply_is_retried_not_an_outage() {
    for line in [Line::Tcp, Line::Pty] {
        for retries in [0, 1] {
            let faults = Faults {
                lossy_units: [(1, 10)].into(),
                ..Faults::default()
            };
            let units = [("lossy", 1), ("neighbour", 2)];
            let run = poll_gateway(line, &units, retries, faults, Duration::from_secs(3)).await;
            let (lossy, neighbour) = (run.health("lossy"), run.health("neighbour"));
            eprintln!(
                "{line:?}, retries {retries}: lossy unit polled at {:.0}% ({} Bad points, {} requests retried), neighbour at {:.0}%",
                run.rate("lossy") * 100.0,
                run.bad_points("lossy"),
                lossy.requests_retried,
                run.rate("neighbour") * 100.0
            );
            if retries == 0 {
                assert!(run.bad_points("lossy") >= 1, "{line:?}: {lossy:?}");
                assert!(lossy.failed_polls >= 1, "{line:?}: {lossy:?}");
            } else {
                assert_eq!(run.bad_points("lossy"), 0, "{line:?}: {lossy:?}");
                assert_eq!(lossy.failed_polls, 0, "{line:?}: {lossy:?}");
                assert!(lossy.requests_retried >= 1, "{line:?}: {lossy:?}");
            }
            assert_eq!(run.bad_points("neighbour"), 0, "{line:?}: {neighbour:?}");
            assert!(run.rate("neighbour") >= 0.75, "{line:?}: {neighbour:?}");
            if let Line::Tcp = line {
                assert_eq!(run.connections, 1, "a lost reply leaves the connection open");
            }
        }
    }
}

/// A unit answering after its timeout: its late answer is dropped (Modbus TCP: by its
/// transaction id) or drained (RTU), never taken for the neighbour's.
#[tokio::test]
async fn a_late_reply_is_not_taken_for_a_neighbours() {
    for line in [Line::Tcp, Line::Pty] {
        let faults = Faults {
            slow_units: [(1, Duration::from_millis(120))].into(),
            ..Faults::default()
        };
        let units = [("late", 1), ("neighbour", 2)];
        let run = poll_gateway(line, &units, 1, faults, Duration::from_secs(3)).await;
        let neighbour = run.health("neighbour");
        eprintln!(
            "{line:?}: neighbour of a late unit polled at {:.0}%",
            run.rate("neighbour") * 100.0
        );
        assert!(run.health("late").failed_polls >= 1, "{line:?}");
        assert_eq!(neighbour.failed_polls, 0, "{line:?}: {neighbour:?}");
        assert!(run.rate("neighbour") >= 0.7, "{line:?}: {neighbour:?}");
        let values: Vec<_> = run
            .of("neighbour")
            .iter()
            .map(|b| b.points[0].1.value.clone())
            .collect();
        assert!(
            values.iter().all(|v| *v == Some(PointValue::UInt(2))),
            "{line:?}: the neighbour read its own register only: {values:?}"
        );
        if let Line::Tcp = line {
            assert_eq!(run.connections, 1, "a late reply leaves the connection open");
        }
    }
}

/// Nothing answers on the connection any more (a gateway that restarted behind a
/// half-open connection): after a second unanswered poll it is opened again.
#[tokio::test]
async fn a_connection_where_nothing_answers_is_reopened() {
    let faults = Faults {
        silent_units: [1].into(),
        ..Faults::default()
    };
    let run = poll_gateway(Line::Tcp, &[("gone", 1)], 1, faults, Duration::from_secs(3)).await;
    assert!(
        run.connections >= 2,
        "{} connections, {:?}",
        run.connections,
        run.health("gone")
    );
}

/// A device answering slower than its poll interval: the cycles it overruns are skipped
/// (keeping the cadence) and counted, so a pipeline falling behind says so.
#[tokio::test]
async fn cycles_a_slow_device_overruns_are_skipped_and_counted() {
    let shutdown = CancellationToken::new();
    let yaml = GATEWAY
        .replace("NAME", "slow")
        .replace("UNIT", "1")
        .replace("timeout: 100ms", "timeout: 2s");
    let slow = device(&yaml);
    let faults = Faults {
        latency: Duration::from_millis(250),
        ..Faults::default()
    };
    let port = simulator(std::slice::from_ref(&slow), faults, Framing::Tcp, &shutdown).await;
    let on_time = device(&GATEWAY.replace("NAME", "prompt").replace("UNIT", "2"));
    let prompt_port = simulator(
        std::slice::from_ref(&on_time),
        Faults::default(),
        Framing::Tcp,
        &shutdown,
    )
    .await;
    let devices = [with_port(&slow, port), with_port(&on_time, prompt_port)];
    let (tx, mut rx) = mpsc::channel(1024);
    let (_tasks, health) = poller::spawn(&devices, &tx, &shutdown);
    collect(&mut rx, Duration::from_secs(2)).await;
    shutdown.cancel();

    let slow = health["slow"].lock().unwrap().clone();
    assert_eq!(slow.failed_polls, 0, "{slow:?}");
    // About 8 polls of 250 ms in 2 s at a 100 ms interval: about 2 cycles skipped each.
    assert!(slow.polls >= 4, "{slow:?}");
    assert!(slow.poll_cycles_skipped >= slow.polls, "{slow:?}");
    let prompt = health["prompt"].lock().unwrap().clone();
    assert!(prompt.polls >= 10, "{prompt:?}");
    assert_eq!(prompt.poll_cycles_skipped, 0, "{prompt:?}");
}

#[tokio::test]
async fn dropped_connections_are_reopened() {
    let shutdown = CancellationToken::new();
    let unit = device(&GATEWAY.replace("NAME", "flaky").replace("UNIT", "1"));
    let faults = Faults {
        drop_after: Some(Duration::from_millis(250)),
        ..Faults::default()
    };
    let port = simulator(std::slice::from_ref(&unit), faults, Framing::Tcp, &shutdown).await;
    let (tx, mut rx) = mpsc::channel(1024);
    let (_tasks, health) = poller::spawn(&[with_port(&unit, port)], &tx, &shutdown);
    let batches = collect(&mut rx, Duration::from_secs(3)).await;
    shutdown.cancel();
    let good = batches
        .iter()
        .flat_map(|b| &b.points)
        .filter(|(_, s)| s.quality.is_good())
        .count();
    let health = health["flaky"].lock().unwrap().clone();
    assert!(
        health.failed_polls >= 2,
        "the connection was dropped under it: {health:?}"
    );
    assert!(
        good >= 10,
        "polling resumed after each drop: {good} good points, {health:?}"
    );
}

#[tokio::test]
async fn rtu_framing_over_tcp() {
    let shutdown = CancellationToken::new();
    let template = device(&EVERY_TYPE.replace(
        "tcp: {host: 127.0.0.1, port: 1}",
        "rtuOverTcp: {host: 127.0.0.1, port: 1}",
    ));
    let port = simulator(
        std::slice::from_ref(&template),
        Faults::default(),
        Framing::RtuOverTcp,
        &shutdown,
    )
    .await;
    let readings = tagstream_ingestor::read::read_device(&with_port(&template, port))
        .await
        .unwrap();
    assert_eq!(readings[0].sample.value, Some(PointValue::Double(61.5)));
    assert_eq!(readings[7].sample.value, Some(PointValue::String("CODE".into())));
    shutdown.cancel();
}

#[tokio::test]
async fn rtu_over_a_pty_pair() {
    let pty = PtyPair::new();
    let shutdown = CancellationToken::new();
    let yaml = EVERY_TYPE
        .replace(
            "tcp: {host: 127.0.0.1, port: 1}",
            &format!("rtu: {{path: {}, baudRate: 115200}}", pty.b),
        )
        .replace("byteOrder: CDAB", "byteOrder: CDAB\n  unitId: 7");
    let panel = device(&yaml);
    let endpoint = SimulatedEndpoint::new(&[&panel], Faults::default());
    let server = tokio::spawn({
        let (path, shutdown) = (pty.a.clone(), shutdown.clone());
        async move { simulate::serve_rtu(&path, 115_200, endpoint, shutdown).await }
    });
    let readings = tagstream_ingestor::read::read_device(&panel).await.unwrap();
    assert_eq!(readings[0].sample.value, Some(PointValue::Double(61.5)));
    assert_eq!(readings[1].sample.value, Some(PointValue::Double(230.5)));
    assert_eq!(readings[9].sample.value, Some(PointValue::Bool(true)));
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// How the hand-written server misbehaves.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    WrongByteCount,
    Garbage,
    Silence,
    Slow,
    Exception(u8),
    /// Exception 6 (server busy) to the first request, then good answers.
    BusyFirst,
    /// Reads the request and closes the connection.
    Hangup,
}

/// A Modbus TCP server that answers every request wrongly, in one chosen way.
async fn misbehaving_server(how: Misbehaviour) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut request = [0u8; 12];
        let mut answered = 0;
        while stream.read_exact(&mut request).await.is_ok() {
            answered += 1;
            let (transaction, unit, function) = ([request[0], request[1]], request[6], request[7]);
            let answer: Vec<u8> = match how {
                // Two registers asked, three sent.
                Misbehaviour::WrongByteCount => {
                    [&transaction[..], &[0, 0, 0, 9, unit, function, 6, 0, 1, 0, 2, 0, 3]].concat()
                }
                Misbehaviour::Garbage => vec![0xde, 0xad, 0xbe, 0xef, 0, 3, 1, 2, 3],
                Misbehaviour::Silence => continue,
                Misbehaviour::Hangup => return,
                Misbehaviour::Slow => {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    [&transaction[..], &[0, 0, 0, 7, unit, function, 4, 0, 1, 0, 2]].concat()
                }
                Misbehaviour::Exception(code) => {
                    [&transaction[..], &[0, 0, 0, 3, unit, function | 0x80, code]].concat()
                }
                Misbehaviour::BusyFirst if answered == 1 => {
                    [&transaction[..], &[0, 0, 0, 3, unit, function | 0x80, 6]].concat()
                }
                Misbehaviour::BusyFirst => [&transaction[..], &[0, 0, 0, 7, unit, function, 4, 0, 1, 0, 2]].concat(),
            };
            if stream.write_all(&answer).await.is_err() {
                return;
            }
        }
    });
    port
}

#[tokio::test]
async fn misbehaving_devices_are_errors_not_crashes() {
    let read = Read {
        kind: RegisterKind::Holding,
        start: 0,
        count: 2,
        tags: vec![TagSlot {
            tag: 0,
            offset: 0,
            count: 2,
        }],
    };
    let cases = [
        (Misbehaviour::WrongByteCount, "asked for 2 registers, got 3"),
        (Misbehaviour::Garbage, ""),
        (Misbehaviour::Silence, "no response within 300ms"),
        (Misbehaviour::Slow, "no response within 300ms"),
        (Misbehaviour::Exception(4), "exception 4: Server device failure"),
        (Misbehaviour::Hangup, "the device closed the connection"),
    ];
    for (how, expected) in cases {
        let port = misbehaving_server(how).await;
        let template = device(&GATEWAY.replace("NAME", "odd").replace("UNIT", "1"));
        let spec = with_port(&template, port).spec;
        let mut context = connection::connect(&spec.connection, 1, Duration::from_secs(2))
            .await
            .unwrap();
        let error = connection::execute(&mut context, &read, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(error.to_string().contains(expected), "{how:?}: {error}");
        assert!(!error.to_string().contains("os error"), "{how:?}: {error}");
        // An exception or a timeout leaves the connection to the unit's neighbours.
        let keeps = matches!(
            how,
            Misbehaviour::Exception(_) | Misbehaviour::Silence | Misbehaviour::Slow
        );
        assert_eq!(error.breaks_connection(), !keeps, "{how:?}: {error}");
    }
}

#[tokio::test]
async fn the_read_command_prints_raw_registers_and_every_byte_order() {
    let shutdown = CancellationToken::new();
    let panel = simulated_panel(&shutdown).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("panel.yaml");
    std::fs::write(&file, serde_yaml::to_string(&panel).unwrap()).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
        .args(["read", "--all-orders", "-f"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let temp = text.lines().find(|l| l.trim_start().starts_with("temp ")).unwrap();
    // 61.5f32 is 0x42760000; CDAB puts the low word first.
    assert!(temp.contains("0000 4276"), "{temp}");
    assert!(temp.contains("61.5"), "{temp}");
    assert!(text.lines().next().unwrap().contains("byte order CDAB"), "{text}");
    assert!(
        text.contains("ABCD") && text.contains("DCBA") && text.contains("BADC"),
        "{text}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_busy_device_is_asked_again_when_the_manifest_allows_it() {
    for (retries, expected) in [(0, None), (2, Some(PointValue::UInt(0x0001_0002)))] {
        let port = misbehaving_server(Misbehaviour::BusyFirst).await;
        let yaml = GATEWAY
            .replace("NAME", "busy")
            .replace("UNIT", "1")
            .replace("type: uint16", "type: uint32")
            .replace(
                "  pollInterval: 100ms",
                &format!("  pollInterval: 100ms\n  quirks: {{busyRetries: {retries}}}"),
            );
        let spec = with_port(&device(&yaml), port).spec;
        let mut context = connection::connect(&spec.connection, 1, Duration::from_secs(2))
            .await
            .unwrap();
        let mut reads = plan::plan(&spec).remove(0).reads;
        let readings = poller::poll_reads(&mut context, &spec, &poller::layouts(&spec), &mut reads, 0, true, 0)
            .await
            .unwrap();
        assert_eq!(
            readings[0].sample.value, expected,
            "busyRetries {retries}: {:?}",
            readings[0].sample
        );
        if retries == 0 {
            assert_eq!(
                readings[0].sample.quality.reason.as_deref(),
                Some("exception 6: Server device busy")
            );
        }
    }
}

#[tokio::test]
async fn close_after_poll_opens_a_connection_per_cycle() {
    for (close, expect_many) in [(false, false), (true, true)] {
        let shutdown = CancellationToken::new();
        let yaml = GATEWAY.replace("NAME", "shy").replace("UNIT", "1").replace(
            "  pollInterval: 100ms",
            &format!("  pollInterval: 50ms\n  quirks: {{closeAfterPoll: {close}}}"),
        );
        let template = device(&yaml);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = SimulatedEndpoint::new(&[&template], Faults::default());
        tokio::spawn(simulate::serve_tcp(
            listener,
            Arc::clone(&endpoint),
            Framing::Tcp,
            shutdown.clone(),
        ));
        let (tx, mut rx) = mpsc::channel(1024);
        let _pollers = poller::spawn(&[with_port(&template, port)], &tx, &shutdown);
        let polls = collect(&mut rx, Duration::from_secs(1)).await.len();
        shutdown.cancel();
        let connections = endpoint.connections();
        if expect_many {
            assert!(
                connections as usize + 2 >= polls,
                "closeAfterPoll: {connections} connections for {polls} polls"
            );
        } else {
            assert_eq!(connections, 1, "{polls} polls on one connection");
        }
        assert!(polls >= 10, "{polls} polls in 1s at 50ms");
    }
}

#[tokio::test]
async fn connect_and_request_delays_are_honoured() {
    let shutdown = CancellationToken::new();
    let yaml = r"
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {name: slowpoke}
spec:
  site: s
  connection: {tcp: {host: 127.0.0.1, port: 1}}
  pollInterval: 100ms
  reads: {requestPerTag: true}
  quirks: {connectDelay: 300ms, requestDelay: 150ms}
  tags:
    - {name: a, register: holding, address: 0, type: uint16}
    - {name: b, register: holding, address: 1, type: uint16}
    - {name: c, register: holding, address: 2, type: uint16}
";
    let template = device(yaml);
    let port = simulator(
        std::slice::from_ref(&template),
        Faults::default(),
        Framing::Tcp,
        &shutdown,
    )
    .await;
    let (tx, mut rx) = mpsc::channel(16);
    let started = Instant::now();
    let _pollers = poller::spawn(&[with_port(&template, port)], &tx, &shutdown);
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let elapsed = started.elapsed();
    shutdown.cancel();
    assert_eq!(first.points.len(), 3);
    // 300 ms after connecting, then two 150 ms pauses between the three requests.
    assert!(elapsed >= Duration::from_millis(600), "first poll after {elapsed:?}");
}

const PYMODBUS_DEVICE: &str = r"
apiVersion: tagstream.io/v1alpha1
kind: Device
metadata: {name: pymodbus-UNIT}
spec:
  site: s
  connection: {tcp: {host: 127.0.0.1, port: PORT}}
  unitId: UNIT
  timeout: 2s
  tags:
    - {name: temp, register: holding, address: 0, type: float32, byteOrder: ORDER}
    - {name: count, register: holding, address: 2, type: uint16}
    - {name: delta, register: holding, address: 3, type: int16}
    - {name: volts, register: input, address: 0, type: uint16, scale: 0.1}
    - {name: running, register: coil, address: 0, type: bool}
    - {name: stopped, register: coil, address: 1, type: bool}
    - {name: door, register: discreteInput, address: 1, type: bool}
    - {name: missing, register: holding, address: 50, type: uint16}
";

/// Holding, input, coil and discrete-input tags of two units of a pymodbus server, and an
/// exception answer. `scripts/test.sh` makes a virtualenv with pymodbus from `PyPI` and
/// names its python in `TAGSTREAM_PYMODBUS_PYTHON`; without it the test says SKIPPED.
#[tokio::test]
async fn a_pymodbus_server_reads_as_its_tables_say() {
    let Some((_server, port)) = support::pymodbus::start().await else {
        return;
    };

    let expected = [
        (1, "ABCD", 1234, -2, 230.5, [true, false, true]),
        (2, "CDAB", 4321, -3, 111.1, [false, true, false]),
    ];
    for (unit, order, count, delta, volts, [running, stopped, door]) in expected {
        let yaml = PYMODBUS_DEVICE
            .replace("UNIT", &unit.to_string())
            .replace("PORT", &port.to_string())
            .replace("ORDER", order);
        let spec = device(&yaml).spec;
        let mut context = connection::connect(&spec.connection, spec.unit_id, spec.timeout.get())
            .await
            .unwrap();
        let mut reads: Vec<Read> = plan::plan(&spec).into_iter().flat_map(|g| g.reads).collect();
        let readings = poller::poll_reads(&mut context, &spec, &poller::layouts(&spec), &mut reads, 0, true, 0)
            .await
            .unwrap();
        let value = |name: &str| {
            let reading = readings.iter().find(|r| spec.tags[r.tag].name == name).unwrap();
            (reading.sample.value.clone(), reading.sample.quality.reason.clone())
        };
        assert_eq!(value("temp").0, Some(PointValue::Double(21.5)), "unit {unit}");
        assert_eq!(value("count").0, Some(PointValue::UInt(count)), "unit {unit}");
        assert_eq!(value("delta").0, Some(PointValue::Int(delta)), "unit {unit}");
        assert_eq!(value("volts").0, Some(PointValue::Double(volts)), "unit {unit}");
        assert_eq!(value("running").0, Some(PointValue::Bool(running)), "unit {unit}");
        assert_eq!(value("stopped").0, Some(PointValue::Bool(stopped)), "unit {unit}");
        assert_eq!(value("door").0, Some(PointValue::Bool(door)), "unit {unit}");
        assert_eq!(
            value("missing"),
            (None, Some("exception 2: Illegal data address".to_owned())),
            "unit {unit}"
        );
    }
}
