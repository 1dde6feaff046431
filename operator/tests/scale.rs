//! The whole operator at plant scale against the fake API server: 100 Sites, 10,000
//! Devices and 10,000 Formulas, listed in pages of 500 with a latency per request, as a
//! real API server serves them.
//!
//! The invariant: a site's ConfigMap, which its ingestor polls from, never holds fewer
//! members than the operator could know. Found on a real API server: every ConfigMap was
//! written empty while the Device list was still paging in, and never again.
//!
//! The fake stays here for what a real server cannot be made to do on demand: a chosen
//! latency per request, and a watch expired (`410`) at a chosen moment. The restart and
//! arriving cases also run against a real kube-apiserver in `control_plane.rs`.

#[path = "support/api.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod api;
#[path = "support/plant.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod plant;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use api::{ApiServer, ConfigMapWrite};
use kube::ResourceExt;
use plant::{Fleet, fleet, operator_settings, path};
use tagstream_operator::{context::Context, controller::run};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SITES: usize = 100;
const PER_SITE: usize = 100;
const LATENCY: Duration = Duration::from_millis(2);

fn start(server: &ApiServer) -> (CancellationToken, JoinHandle<Arc<Context>>) {
    let client = server.client();
    let settings = operator_settings(&client, Duration::from_secs(3600), Duration::from_secs(3600));
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(run(client, settings, Arc::default(), shutdown.clone()));
    (shutdown, operator)
}

async fn stop(shutdown: CancellationToken, operator: JoinHandle<Arc<Context>>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await
        .expect("the operator stops on shutdown")
        .unwrap();
}

/// The last write of each ConfigMap.
fn latest(writes: &[ConfigMapWrite]) -> BTreeMap<String, ConfigMapWrite> {
    writes.iter().map(|w| (w.name.clone(), w.clone())).collect()
}

fn complete(write: &ConfigMapWrite) -> bool {
    write.devices == PER_SITE && write.formulas == PER_SITE
}

/// Waits until every site's ConfigMap holds all its members.
async fn until_complete(server: &ApiServer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let latest = latest(&server.config_map_writes());
        if latest.len() == SITES && latest.values().all(complete) {
            return;
        }
        let incomplete: Vec<_> = latest.values().filter(|w| !complete(w)).take(3).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {SITES} ConfigMaps written, incomplete: {incomplete:?}",
            latest.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every Site's status counts its members: the status writes follow the
/// renderings of every site.
async fn until_statuses_written(server: &ApiServer, fleet: &Fleet) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let written = |site: &tagstream_crds::Site| {
        server.get(&path(site)).unwrap()["status"]["devices"] == serde_json::json!(PER_SITE)
    };
    while !fleet.sites.iter().all(written) {
        assert!(tokio::time::Instant::now() < deadline, "Site statuses not written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every Site's status counts its members, and no Formula was called invalid.
fn assert_statuses(server: &ApiServer, fleet: &Fleet) {
    for site in &fleet.sites {
        let live = server.get(&path(site)).unwrap();
        assert_eq!(
            (&live["status"]["devices"], &live["status"]["formulas"]),
            (&PER_SITE.into(), &PER_SITE.into()),
            "{}",
            site.name_any()
        );
    }
    for formula in fleet.formulas.iter().step_by(97) {
        let live = server.get(&path(formula)).unwrap();
        let valid = &live["status"]["conditions"][0];
        assert_eq!(
            (&valid["type"], &valid["status"]),
            (&"Valid".into(), &"True".into()),
            "{live}"
        );
    }
}

/// The restart case: the objects exist before the operator starts (an upgrade, a leader
/// hand-over, an eviction). Every ConfigMap is written complete, the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_listed_at_start_are_all_in_every_first_rendering() {
    let fleet = fleet(SITES, PER_SITE);
    let server = ApiServer::with_latency(LATENCY);
    server.insert_all(fleet.objects());
    let (shutdown, operator) = start(&server);
    until_complete(&server).await;
    until_statuses_written(&server, &fleet).await;
    stop(shutdown, operator).await;

    let writes = server.config_map_writes();
    let short: Vec<_> = writes.iter().filter(|w| !complete(w)).collect();
    assert!(short.is_empty(), "ConfigMaps written with fewer members: {short:?}");
    assert_eq!(writes.len(), SITES, "one write per site");
    let requests = server.take_requests();
    let lists = requests
        .iter()
        .filter(|r| r.uri.contains("/devices?") && r.uri.contains("limit=500") && !r.uri.contains("watch"))
        .count();
    assert_eq!(lists, SITES * PER_SITE / 500, "the Device list came in pages of 500");
    let unknown_inputs = requests
        .iter()
        .filter(|r| r.line().contains("/events") && r.body["reason"] == "UnknownInput")
        .count();
    assert_eq!(unknown_inputs, 0, "no Formula was called invalid");
    assert_statuses(&server, &fleet);
}

/// Objects applied while the operator runs: Sites first, then each site's Devices and
/// Formulas in batches. A ConfigMap may grow while they arrive, never shrink, and ends
/// complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_arriving_while_running_only_ever_add_to_a_rendering() {
    let fleet = fleet(SITES, PER_SITE);
    let server = ApiServer::with_latency(LATENCY);
    let (shutdown, operator) = start(&server);
    for site in &fleet.sites {
        server.insert(&path(site), site);
    }
    for (devices, formulas) in fleet.devices.chunks(250).zip(fleet.formulas.chunks(250)) {
        for device in devices {
            server.insert(&path(device), device);
        }
        for formula in formulas {
            server.insert(&path(formula), formula);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until_complete(&server).await;
    // Longer, until the statuses are written: a late reconcile must not take anything
    // away.
    until_statuses_written(&server, &fleet).await;
    stop(shutdown, operator).await;

    let mut last: BTreeMap<String, ConfigMapWrite> = BTreeMap::new();
    for write in server.config_map_writes() {
        if let Some(before) = last.get(&write.name) {
            assert!(
                write.devices >= before.devices && write.formulas >= before.formulas,
                "{} shrank from {before:?} to {write:?}",
                write.name
            );
        }
        last.insert(write.name.clone(), write);
    }
    assert!(last.values().all(complete));
    assert_statuses(&server, &fleet);
}

/// A watch that falls behind the API server's window of changes gets `410 Gone` and lists
/// again; the objects changed meanwhile reach their sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_the_watch_expired_brings_every_change() {
    let small = fleet(4, 20);
    let server = ApiServer::with_latency(LATENCY);
    for site in &small.sites {
        server.insert(&path(site), site);
    }
    let (shutdown, operator) = start(&server);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while latest(&server.config_map_writes()).len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "sites not rendered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Changes arrive faster than the kept window: the watches must list again.
    server.keep_changes(10);
    server.take_requests();
    let members = small.objects().into_iter().skip(small.sites.len());
    server.insert_all(members);
    loop {
        let latest = latest(&server.config_map_writes());
        if latest.values().all(|w| w.devices == 20 && w.formulas == 20) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every change arrived: {latest:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(shutdown, operator).await;
    let relists = server
        .take_requests()
        .iter()
        .filter(|r| r.uri.contains("/devices?") && !r.uri.contains("watch"))
        .count();
    assert!(relists >= 1, "the Device watch expired and listed again");
}
