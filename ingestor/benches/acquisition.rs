//! Acquisition throughput over one loopback connection to the simulator, and how many
//! requests a poll cycle of the example plant takes with and without coalescing.
//! Run: `cargo bench -p tagstream-ingestor --bench acquisition`.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use tagstream_crds::{Device, DeviceSpec, manifest::load};
use tagstream_ingestor::{
    acquisition::{connection, plan, poller},
    simulate::{self, Faults, Framing, SimulatedEndpoint},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn requests_per_cycle(spec: &DeviceSpec) -> usize {
    plan::plan(spec).iter().map(|g| g.reads.len()).sum()
}

fn example_plant() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let report = load(&[examples]).expect("the example plant loads");
    println!("| example device | tags | requests per cycle, coalesced | one request per tag |");
    println!("| --- | --- | --- | --- |");
    let (mut coalesced, mut per_tag) = (0, 0);
    for device in &report.devices {
        let mut spec = device.object.spec.clone();
        let joined = requests_per_cycle(&spec);
        spec.reads.request_per_tag = true;
        let single = requests_per_cycle(&spec);
        println!("| {} | {} | {joined} | {single} |", device.name(), spec.tags.len());
        coalesced += joined;
        per_tag += single;
    }
    println!("| plant | | {coalesced} | {per_tag} |\n");
}

/// A device of `tags` float32 values packed from address 0.
fn wide_device(port: u16, tags: usize, per_tag: bool) -> Device {
    let mut tag_lines = String::new();
    for i in 0..tags {
        let _ = writeln!(
            tag_lines,
            "    - {{name: t{i}, register: holding, address: {}, type: float32}}",
            i * 2
        );
    }
    serde_yaml::from_str(&format!(
        "apiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: wide}}\nspec:\n  site: s\n  connection: {{tcp: {{host: 127.0.0.1, port: {port}}}}}\n  reads: {{requestPerTag: {per_tag}}}\n  tags:\n{tag_lines}"
    ))
    .expect("the bench device parses")
}

async fn points_per_second(tags: usize, per_tag: bool, window: Duration) -> (f64, f64) {
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let device = wide_device(port, tags, per_tag);
    let endpoint = SimulatedEndpoint::new(&[&device], Faults::default());
    tokio::spawn(simulate::serve_tcp(listener, endpoint, Framing::Tcp, shutdown.clone()));
    let spec = &device.spec;
    let mut context = connection::connect(&spec.connection, spec.unit_id, spec.timeout.get())
        .await
        .expect("connect");
    let layouts = poller::layouts(spec);
    let mut reads = plan::plan(spec).remove(0).reads;
    let (mut points, mut cycles) = (0usize, 0usize);
    let start = Instant::now();
    while start.elapsed() < window {
        points += poller::poll_reads(&mut context, spec, &layouts, &mut reads, 0, false, 0)
            .await
            .expect("poll")
            .len();
        cycles += 1;
    }
    shutdown.cancel();
    let seconds = start.elapsed().as_secs_f64();
    (points as f64 / seconds, cycles as f64 / seconds)
}

fn main() {
    example_plant();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!("| one connection, 120 float32 tags (240 registers) | points/s | cycles/s |");
    println!("| --- | --- | --- |");
    for (label, per_tag) in [
        ("coalesced (2 requests per cycle)", false),
        ("one request per tag (120 per cycle)", true),
    ] {
        let (points, cycles) = runtime.block_on(points_per_second(120, per_tag, Duration::from_secs(5)));
        println!("| {label} | {points:.0} | {cycles:.0} |");
    }
}
