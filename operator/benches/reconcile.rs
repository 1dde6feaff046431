//! Reconcile throughput and memory for many sites, against the mocked API server of the
//! tests (no cluster): `cargo bench -p tagstream-operator --bench reconcile`
//! (`-- --sites N --devices-per-site M`, default 100 x 100 = 10,000 Devices).
//!
//! Three passes over every site, each the operator's real reconcile:
//! 1. first apply: every site's ConfigMap, StatefulSet and Service written, every status;
//! 2. steady state: nothing changed, so only reads (the compare-before-write path);
//! 3. one device changed in every site: one ConfigMap write and one status per site.
//!
//! The baseline, in the same process, is the same reconcile with compare-before-write
//! defeated (every object applied every time), which is what a controller without it
//! costs on every resync.

#[path = "../tests/support/api.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod api;
#[path = "../tests/support/plant.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod plant;

use std::{sync::Arc, time::Instant};

use api::ApiServer;
use kube::{
    Resource, ResourceExt,
    runtime::{reflector, watcher::Event},
};
use plant::{Fleet, path};
use tagstream_crds::{Site, SiteSpec};
use tagstream_operator::{
    context::{Context, Stores},
    controller::slim,
    reconcile::reconcile,
};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn store<K>(server: &ApiServer, objects: &[K]) -> (reflector::Store<K>, reflector::store::Writer<K>)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&Event::Init);
    for object in objects {
        let live = server.get(&path(object)).unwrap();
        writer.apply_watcher_event(&Event::InitApply(serde_json::from_value(live).unwrap()));
    }
    writer.apply_watcher_event(&Event::InitDone);
    (reader, writer)
}

struct Pass {
    seconds: f64,
    requests: usize,
    writes: usize,
}

async fn pass(server: &ApiServer, ctx: &Arc<Context>, sites: &[Site]) -> Pass {
    let started = Instant::now();
    for site in sites {
        let live: Site = serde_json::from_value(server.get(&path(site)).unwrap()).unwrap();
        reconcile(Arc::new(live), Arc::clone(ctx)).await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests = server.take_requests();
    let writes = requests.iter().filter(|r| r.method != "GET").count();
    Pass {
        seconds,
        requests: requests.len(),
        writes,
    }
}

fn context(server: &ApiServer, fleet: &Fleet) -> Arc<Context> {
    Arc::new(Context::new(
        server.client(),
        plant::settings(),
        SiteSpec::default(),
        Stores {
            sites: store(server, &fleet.sites).0,
            devices: store(server, &fleet.devices).0,
            formulas: store(server, &fleet.formulas).0,
        },
        None,
        Arc::default(),
        // No Site goes missing and every Formula's inputs exist: the window plays no part.
        std::time::Duration::ZERO,
    ))
}

fn insert_all(server: &ApiServer, fleet: &Fleet) {
    server.insert_all(fleet.objects());
}

fn row(name: &str, sites: usize, devices: usize, pass: &Pass) {
    println!(
        "| {name} | {:.2} s | {:.0} sites/s | {:.0} devices/s | {} | {} |",
        pass.seconds,
        sites as f64 / pass.seconds,
        devices as f64 / pass.seconds,
        pass.requests,
        pass.writes
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let sites = arg("--sites", 100);
    let per_site = arg("--devices-per-site", 100);
    let devices = sites * per_site;
    let rss_start = rss_mib();
    // As the operator's stores hold them; the fake API server's cost per request grows
    // with the object, and this bench measures the operator's.
    let mut fleet = plant::fleet(sites, per_site);
    fleet.sites.iter_mut().for_each(slim);
    fleet.devices.iter_mut().for_each(slim);
    fleet.formulas.iter_mut().for_each(slim);
    let server = ApiServer::default();
    insert_all(&server, &fleet);
    let rss_loaded = rss_mib();
    let ctx = context(&server, &fleet);
    let rss_stores = rss_mib();

    println!("{sites} sites x {per_site} devices (+1 formula each) = {devices} Devices, mocked API server");
    println!("| pass | time | sites/s | devices/s | requests | writes |");
    println!("|---|---|---|---|---|---|");
    let first = pass(&server, &ctx, &fleet.sites).await;
    row("first apply", sites, devices, &first);

    // What the watches would show after the first pass: the statuses it wrote.
    let ctx = context(&server, &fleet);
    let steady = pass(&server, &ctx, &fleet.sites).await;
    row("steady state (nothing changed)", sites, devices, &steady);

    // One device per site gets a new spec.
    let mut changed = fleet.devices.clone();
    for device in changed.iter_mut().step_by(per_site) {
        device.spec.tags.pop();
        device.metadata.generation = Some(2);
        server.insert(&path(device), device);
    }
    let ctx = context(&server, &fleet);
    let one = pass(&server, &ctx, &fleet.sites).await;
    row("one device changed per site", sites, devices, &one);

    // Baseline: the same reconcile writing every object every time (no rendered hash on
    // the live objects, so every comparison fails).
    for site in &fleet.sites {
        for prefix in [
            "/api/v1/namespaces/plant/configmaps",
            "/apis/apps/v1/namespaces/plant/statefulsets",
            "/api/v1/namespaces/plant/services",
        ] {
            let key = format!("{prefix}/tagstream-{}", site.name_any());
            if let Some(mut object) = server.get(&key) {
                object["metadata"]["annotations"] = serde_json::json!({});
                server.insert(&key, &object);
            }
        }
    }
    let ctx = context(&server, &fleet);
    let baseline = pass(&server, &ctx, &fleet.sites).await;
    row("baseline: apply everything (no compare)", sites, devices, &baseline);
    let rss_end = rss_mib();

    println!();
    println!(
        "steady state vs baseline: {:.1}x faster, {} vs {} writes",
        baseline.seconds / steady.seconds,
        steady.writes,
        baseline.writes
    );
    println!(
        "RSS: {rss_start:.0} MiB at start, {rss_loaded:.0} MiB with the fake API server's objects, \
         {rss_stores:.0} MiB with the operator's stores ({:.0} MiB for the stores), {rss_end:.0} MiB at the end",
        rss_stores - rss_loaded
    );
}
