//! The operator against a real Kubernetes control plane: etcd, kube-apiserver and
//! kube-controller-manager started by `scripts/control-plane.sh` (see
//! `support/cluster.rs`). What the fake API server of the other tests models (paging,
//! watches, server-side apply, status, owner references), the real one does here; the
//! garbage collector and the StatefulSet controller are kube-controller-manager's own.
//!
//! The fake stays only where a real server cannot be made to misbehave on demand: a
//! chosen latency per request and a `410 Gone` at a chosen moment (`scale.rs`,
//! `controller.rs`).

#[path = "support/cluster.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod cluster;
#[path = "support/plant.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod plant;

use std::{
    collections::{BTreeMap, HashMap},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use cluster::{Cluster, Rendering, Renderings, TestNamespace, changed, snapshot, wait_for};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::StatefulSet,
        coordination::v1::Lease,
        core::v1::{ConfigMap, PersistentVolumeClaim},
        events::v1::Event,
    },
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        reflector::{self, Store},
        watcher,
    },
};
use plant::{fleet, large_site, operator_settings, plant, settings};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tagstream_crds::{
    Device, Formula, Site, SiteSpec,
    condition_types::{BROKER_DURABLE, CONNECTED, READY, VALID},
};
use tagstream_operator::{
    context::{Context, Stores},
    controller::run,
    metrics::Metrics,
    reconcile::reconcile,
    report::ReportSource,
    status_loop::{StatusLoop, StatusSettings},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The operator, in this process, against the control plane.
struct Operator {
    shutdown: CancellationToken,
    task: JoinHandle<Arc<Context>>,
    metrics: Arc<Metrics>,
}

impl Operator {
    fn start(cluster: &Cluster, apply_window: Duration) -> Self {
        // The ingestors never answer: every report read through the service proxy fails,
        // as it does while an ingestor pod is pending.
        let client = cluster.client.clone();
        let settings = operator_settings(&client, Duration::from_secs(1), apply_window);
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let task = tokio::spawn(run(client, settings, Arc::clone(&metrics), shutdown.clone()));
        Self {
            shutdown,
            task,
            metrics,
        }
    }

    async fn stop(self) -> Arc<Context> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the operator stops on shutdown")
            .unwrap()
    }
}

/// Waits until `sites` rendered `ConfigMap`s each hold `members` Devices and as many
/// Formulas.
async fn until_complete(renderings: &Renderings, sites: usize, members: usize) {
    wait_for(
        &format!("{sites} ConfigMaps of {members} Devices and Formulas"),
        Duration::from_secs(300),
        || async { (renderings.complete(members).0 == sites).then_some(()) },
    )
    .await;
}
/// Waits until a snapshot of `namespace` stays the same over `quiet`: the operator is at
/// rest. Returns that snapshot.
async fn at_rest(cluster: &Cluster, namespace: &str, quiet: Duration) -> BTreeMap<String, String> {
    let started = std::time::Instant::now();
    let mut last = snapshot(cluster, namespace).await;
    loop {
        tokio::time::sleep(quiet).await;
        let now = snapshot(cluster, namespace).await;
        if now == last {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the operator did not come to rest: {:#?}",
            changed(&last, &now)
        );
        last = now;
    }
}

fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn live<K>(cluster: &Cluster, namespace: &str, name: &str) -> Value
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(cluster.client.clone(), namespace);
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

/// The restart case at plant scale: 100 Sites, 10,000 Devices and 10,000 Formulas exist
/// before the operator starts. Every ConfigMap is written once, complete; the operator
/// comes to rest; a second operator start writes nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_present_at_start_is_rendered_complete_once_and_a_restart_writes_nothing() {
    const SITES: usize = 100;
    const PER_SITE: usize = 100;
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let namespace = cluster.namespace("fleet-at-start").await;
    let fleet = fleet(SITES, PER_SITE);
    cluster.create_all(&namespace, &fleet.sites).await;
    cluster.create_all(&namespace, &fleet.devices).await;
    cluster.create_all(&namespace, &fleet.formulas).await;

    let watching = CancellationToken::new();
    let renderings = Renderings::watch(&cluster, &namespace, watching.clone());
    let operator = Operator::start(&cluster, Duration::from_secs(3600));
    until_complete(&renderings, SITES, PER_SITE).await;
    let rest = at_rest(&cluster, &namespace, Duration::from_secs(3)).await;
    operator.stop().await;

    let all = renderings.all();
    let short: Vec<&Rendering> = all
        .iter()
        .filter(|r| r.devices != PER_SITE || r.formulas != PER_SITE)
        .collect();
    assert!(short.is_empty(), "ConfigMaps written with fewer members: {short:?}");
    assert_eq!(all.len(), SITES, "one write per site: {all:?}");
    for site in fleet.sites.iter().step_by(9) {
        let site = live::<Site>(&cluster, &namespace, &site.name_any()).await;
        assert_eq!(
            (&site["status"]["devices"], &site["status"]["formulas"]),
            (&json!(PER_SITE), &json!(PER_SITE)),
            "{site}"
        );
    }
    for formula in fleet.formulas.iter().step_by(97) {
        let formula = live::<Formula>(&cluster, &namespace, &formula.name_any()).await;
        assert_eq!(condition(&formula, VALID).unwrap()["status"], "True", "{formula}");
    }

    let operator = Operator::start(&cluster, Duration::from_secs(3600));
    wait_for(
        "the restarted operator to reconcile every site",
        Duration::from_secs(120),
        || async { (operator.metrics.reconciles.get() >= SITES as u64).then_some(()) },
    )
    .await;
    // Two status passes more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    operator.stop().await;
    let after = snapshot(&cluster, &namespace).await;
    watching.cancel();
    // This once rewrote a few Site statuses (4 of 100 in one run of three at 1.37): the
    // reconcile and the status loop both wrote a Site's conditions as JSON merge patches.
    assert_eq!(changed(&rest, &after), Vec::<String>::new(), "a restart wrote");
    assert_eq!(renderings.all().len(), SITES, "a restart wrote a ConfigMap");
}

/// The example plant, applied in a new namespace `name`; its Devices.
async fn example_plant(cluster: &Cluster, name: &str) -> (TestNamespace, Vec<Device>) {
    let namespace = cluster.namespace(name).await;
    let (site, devices, formulas) = plant();
    cluster.create_all(&namespace, &[site]).await;
    cluster.create_all(&namespace, &devices).await;
    cluster.create_all(&namespace, &formulas).await;
    (namespace, devices)
}

/// The example plant: its workload, the status of every kind, and no write once at rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_plant_is_deployed_with_its_status_and_then_nothing_is_written() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let (namespace, devices) = example_plant(&cluster, "example-plant").await;
    let operator = Operator::start(&cluster, Duration::ZERO);
    let rendered = |snapshot: &BTreeMap<String, String>| {
        ["ConfigMap", "Service", "StatefulSet"]
            .iter()
            .all(|kind| snapshot.contains_key(&format!("{kind} tagstream-plant-a")))
    };
    wait_for("the site's workload", Duration::from_secs(60), || async {
        rendered(&snapshot(&cluster, &namespace).await).then_some(())
    })
    .await;
    let rest = at_rest(&cluster, &namespace, Duration::from_secs(3)).await;
    let site = live::<Site>(&cluster, &namespace, "plant-a").await;
    assert_eq!(
        (&site["status"]["devices"], &site["status"]["formulas"]),
        (&json!(3), &json!(5)),
        "{site}"
    );
    assert_eq!(condition(&site, READY).unwrap()["reason"], "IngestorNotReady", "{site}");
    let efficiency = live::<Formula>(&cluster, &namespace, "boiler-efficiency").await;
    assert_eq!(condition(&efficiency, VALID).unwrap()["status"], "True", "{efficiency}");
    assert_eq!(
        efficiency["status"]["dependencyOrder"],
        json!(["boiler-delta-t", "boiler-heat-output"])
    );
    for device in &devices {
        let device = live::<Device>(&cluster, &namespace, &device.name_any()).await;
        let ready = condition(&device, READY).unwrap();
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("IngestorNotReady")),
            "{device}"
        );
        assert_eq!(device["status"]["observedGeneration"], 1);
    }

    // Several status passes (one a second) and resyncs later: still nothing written.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = snapshot(&cluster, &namespace).await;
    operator.stop().await;
    assert_eq!(changed(&rest, &later), Vec::<String>::new(), "written at rest");
}

/// Stores holding what `namespace` holds now, never updated after: the cache of an
/// operator whose watches lag behind its own writes.
async fn stale_stores(cluster: &Cluster, namespace: &str) -> Stores {
    async fn store<K>(cluster: &Cluster, namespace: &str) -> Store<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let api: Api<K> = Api::namespaced(cluster.client.clone(), namespace);
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in api.list(&ListParams::default()).await.unwrap() {
            writer.apply_watcher_event(&watcher::Event::InitApply(object));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        store
    }
    Stores {
        sites: store(cluster, namespace).await,
        devices: store(cluster, namespace).await,
        formulas: store(cluster, namespace).await,
    }
}

/// Serves `report` as an ingestor's `/status` on loopback; its URL.
async fn serve_report(report: Arc<Mutex<String>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/status", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let report = Arc::clone(&report);
            async move { report.lock().unwrap().clone() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The reconcile and the status loop share each object's status. A reconcile acting on a
/// cached Site and Devices older than the status loop's last write must leave that write
/// standing (issue 28: the reconcile's "awaiting the ingestor" conditions replaced the
/// ingestor's fresh ones), and a queue figure the ingestor stops reporting (a drained
/// queue has no oldest point) must go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_from_a_stale_cache_leaves_the_status_loops_write_standing() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let (namespace, devices) = example_plant(&cluster, "two-writers").await;
    let stores = stale_stores(&cluster, &namespace).await;
    let stale_site = stores.sites.state().into_iter().next().unwrap();
    let (client, metrics) = (cluster.client.clone(), Arc::default());
    let ctx = Arc::new(Context::new(
        client,
        settings(),
        SiteSpec::default(),
        stores,
        Some("test".into()),
        metrics,
        Duration::ZERO,
    ));
    let report = Arc::new(Mutex::new(plant::report(true)));
    let status_settings = StatusSettings {
        source: ReportSource::direct(&serve_report(Arc::clone(&report)).await),
        period: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        heartbeat: Duration::from_secs(3600),
        concurrency: 1,
    };
    StatusLoop::new(Arc::clone(&ctx), status_settings.clone()).pass().await;
    let running = (json!("True"), json!("IngestorRunning"));
    let ready = |site: &Value| {
        let ready = condition(site, READY).cloned().unwrap_or_default();
        (ready["status"].clone(), ready["reason"].clone())
    };
    let site = live::<Site>(&cluster, &namespace, "plant-a").await;
    assert_eq!(ready(&site), running, "{site}");

    reconcile(stale_site, Arc::clone(&ctx)).await.unwrap();
    let site = live::<Site>(&cluster, &namespace, "plant-a").await;
    assert_eq!(
        ready(&site),
        running,
        "the reconcile undid the status loop's write: {site}"
    );
    assert!(condition(&site, BROKER_DURABLE).is_some(), "{site}");
    assert_eq!(
        (&site["status"]["devices"], &site["status"]["formulas"]),
        (&json!(3), &json!(5))
    );
    for device in &devices {
        let device = live::<Device>(&cluster, &namespace, &device.name_any()).await;
        let connected = condition(&device, CONNECTED).cloned().unwrap_or_default();
        assert_eq!(connected["status"], "True", "{device}");
        assert_eq!(
            device["status"]["tagCount"],
            json!(device["spec"]["tags"].as_array().unwrap().len())
        );
    }

    let mut drained: Value = serde_json::from_str(&plant::report(true)).unwrap();
    drained["queue"]["points"] = json!(0);
    drained["queue"]["oldestAgeSeconds"] = Value::Null;
    *report.lock().unwrap() = drained.to_string();
    StatusLoop::new(Arc::clone(&ctx), status_settings).pass().await;
    let site = live::<Site>(&cluster, &namespace, "plant-a").await;
    assert_eq!(site["status"]["queue"]["depth"], 0, "{site}");
    assert!(site["status"]["queue"].get("oldestAgeSeconds").is_none(), "{site}");
    assert_eq!(ready(&site), running, "{site}");
}

/// Deleting a Site: kube-controller-manager's garbage collector removes the ConfigMap,
/// StatefulSet, Service and pod it owns; the queue's claim, which the StatefulSet
/// controller made from the claim template with `whenDeleted: Retain`, stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sites_workload_is_collected_and_its_queue_claim_kept() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let (namespace, _) = example_plant(&cluster, "site-deletion").await;
    let operator = Operator::start(&cluster, Duration::ZERO);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), &namespace);
    let claim = wait_for(
        "the StatefulSet controller to make the queue's claim",
        Duration::from_secs(60),
        || async { claims.list(&ListParams::default()).await.ok()?.items.into_iter().next() },
    )
    .await;

    let sites: Api<Site> = Api::namespaced(cluster.client.clone(), &namespace);
    sites.delete("plant-a", &DeleteParams::background()).await.unwrap();
    wait_for(
        "the garbage collector to remove the site's workload",
        Duration::from_secs(60),
        || async {
            let snapshot = snapshot(&cluster, &namespace).await;
            let left: Vec<&String> = snapshot
                .keys()
                .filter(|k| {
                    k.starts_with("ConfigMap tagstream-") || k.starts_with("Service ") || k.starts_with("StatefulSet ")
                })
                .collect();
            left.is_empty().then_some(())
        },
    )
    .await;
    // A second or two for the operator to have seen the deletion: it must not bring the
    // Site back for the Devices that still name it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    operator.stop().await;
    assert!(sites.get_opt("plant-a").await.unwrap().is_none(), "the Site came back");
    let kept = claims.get_opt(&claim.name_any()).await.unwrap();
    assert!(
        kept.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
        "the queue's claim was deleted"
    );
}

/// A new storage size is an immutable change to the StatefulSet's claim template: the
/// operator deletes the StatefulSet with its pod and claim orphaned and applies it again.
/// The API server keeps the old one, terminating, until the garbage collector has
/// orphaned the pod; the operator waits for that instead of failing against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_storage_size_recreates_the_stateful_set_without_a_failed_reconcile() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let (namespace, _) = example_plant(&cluster, "storage-resize").await;
    let operator = Operator::start(&cluster, Duration::ZERO);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), &namespace);
    let claim_size = |set: &StatefulSet| {
        let templates = set.spec.as_ref()?.volume_claim_templates.as_ref()?;
        let requests = templates
            .first()?
            .spec
            .as_ref()?
            .resources
            .as_ref()?
            .requests
            .as_ref()?;
        requests.get("storage").map(|q| q.0.clone())
    };
    let first = wait_for("the site's StatefulSet", Duration::from_secs(60), || async {
        stateful_sets.get_opt("tagstream-plant-a").await.unwrap()
    })
    .await;
    assert_eq!(claim_size(&first).as_deref(), Some("1Gi"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), &namespace);
    let claim = wait_for(
        "the StatefulSet controller to make the queue's claim",
        Duration::from_secs(60),
        || async { claims.list(&ListParams::default()).await.ok()?.items.into_iter().next() },
    )
    .await;

    let sites: Api<Site> = Api::namespaced(cluster.client.clone(), &namespace);
    let resize = json!({"spec": {"storage": {"size": "2Gi"}}});
    sites
        .patch("plant-a", &PatchParams::default(), &Patch::Merge(&resize))
        .await
        .unwrap();
    let second = wait_for("the re-created StatefulSet", Duration::from_secs(60), || async {
        let set = stateful_sets.get_opt("tagstream-plant-a").await.unwrap()?;
        (set.uid() != first.uid() && claim_size(&set).as_deref() == Some("2Gi")).then_some(set)
    })
    .await;
    assert!(second.metadata.deletion_timestamp.is_none());
    let errors = operator.metrics.reconcile_errors.get();
    operator.stop().await;
    assert_eq!(
        errors, 0,
        "a reconcile failed while the old StatefulSet was terminating"
    );
    let kept = claims.get_opt(&claim.name_any()).await.unwrap();
    assert!(
        kept.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
        "the queue's claim was deleted"
    );
}

/// A site over Kubernetes' 1 MiB per ConfigMap is rendered into several, all mounted in
/// the pod's one configuration directory; when it shrinks back, the ConfigMaps it no
/// longer needs are deleted and the pod mounts the one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_over_one_config_map_is_split_and_shrinks_back() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let namespace = cluster.namespace("large-site").await;
    let (site, devices, _) = large_site(200);
    cluster.create_all(&namespace, &[site]).await;
    cluster.create_all(&namespace, &devices).await;
    let operator = Operator::start(&cluster, Duration::ZERO);
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &namespace);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), &namespace);
    let mounted = |set: &StatefulSet| -> Vec<String> {
        let volumes = set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref()?.volumes.clone());
        let config = volumes.unwrap_or_default().into_iter().find(|v| v.name == "config");
        match config {
            Some(v) if v.projected.is_some() => v
                .projected
                .and_then(|p| p.sources)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|s| Some(s.config_map?.name))
                .collect(),
            Some(v) => v.config_map.map(|c| c.name).into_iter().collect(),
            None => Vec::new(),
        }
    };
    let names = || async {
        let mut names: Vec<String> = config_maps
            .list(&ListParams::default().labels("app.kubernetes.io/instance=plant-a"))
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        names.sort();
        names
    };
    let split = wait_for("every device rendered", Duration::from_secs(120), || async {
        let set = stateful_sets.get_opt("tagstream-plant-a").await.unwrap()?;
        let site = live::<Site>(&cluster, &namespace, "plant-a").await;
        (site["status"]["devices"] == json!(200)).then(|| mounted(&set))
    })
    .await;
    assert!(split.len() >= 3, "{split:?}");
    let mut listed = names().await;
    let mut expected = split.clone();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected, "one ConfigMap per mounted source");
    let site = live::<Site>(&cluster, &namespace, "plant-a").await;
    assert!(site["status"]["configBytes"].as_u64().unwrap() > 2 << 20, "{site}");

    // Down to 5 devices: one ConfigMap again.
    let device_api: Api<Device> = Api::namespaced(cluster.client.clone(), &namespace);
    for device in &devices[5..] {
        device_api
            .delete(&device.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for(
        "the site to shrink to one ConfigMap",
        Duration::from_secs(120),
        || async {
            let set = stateful_sets.get_opt("tagstream-plant-a").await.unwrap()?;
            (mounted(&set) == ["tagstream-plant-a"] && names().await == ["tagstream-plant-a"]).then_some(())
        },
    )
    .await;
    let errors = operator.metrics.reconcile_errors.get();
    operator.stop().await;
    assert_eq!(errors, 0);
}

/// A Device naming a Site nobody applied gets one made from the defaults once the apply
/// window has passed; a Site the user applies within the window is the user's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_device_gets_a_site_and_a_users_site_within_the_window_wins() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let namespace = cluster.namespace("site-creation").await;
    let (site, devices, _) = plant();
    let operator = Operator::start(&cluster, Duration::from_secs(3));
    let sites: Api<Site> = Api::namespaced(cluster.client.clone(), &namespace);

    // The user's own: the Devices first, the Site a moment later, as `kubectl apply -f
    // dir/` sends them when the Device files sort first.
    cluster.create_all(&namespace, &devices[..1]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.create_all(&namespace, std::slice::from_ref(&site)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let users = sites.get("plant-a").await.unwrap();
    assert_eq!(users.spec, site.spec, "the user's Site was changed");
    assert!(
        users
            .managed_fields()
            .iter()
            .all(|f| f.manager.as_deref() != Some("tagstream-operator") || f.subresource.as_deref() == Some("status")),
        "the operator wrote the user's Site spec: {:?}",
        users.managed_fields()
    );

    // A lone Device naming a missing Site.
    let mut lone = devices[1].clone();
    lone.spec.site = "lone".into();
    cluster.create_all(&namespace, &[lone]).await;
    let created = wait_for("the missing Site to be created", Duration::from_secs(30), || async {
        sites.get_opt("lone").await.unwrap()
    })
    .await;
    assert_eq!(created.spec, SiteSpec::default());
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), &namespace);
    wait_for("the SiteCreated event", Duration::from_secs(10), || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("SiteCreated")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("lone")
            })
            .then_some(())
    })
    .await;
    let configs: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &namespace);
    wait_for("the created Site to be rendered", Duration::from_secs(30), || async {
        configs.get_opt("tagstream-lone").await.unwrap()
    })
    .await;
    operator.stop().await;
}

/// Objects applied while the operator runs: Sites first, then their Devices and Formulas
/// in batches. A ConfigMap may grow while they arrive, never shrink, and ends complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_arriving_while_running_only_ever_add_to_a_rendering() {
    const SITES: usize = 20;
    const PER_SITE: usize = 50;
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let namespace = cluster.namespace("fleet-arriving").await;
    let fleet = fleet(SITES, PER_SITE);
    let watching = CancellationToken::new();
    let renderings = Renderings::watch(&cluster, &namespace, watching.clone());
    let operator = Operator::start(&cluster, Duration::from_secs(3600));
    cluster.create_all(&namespace, &fleet.sites).await;
    for (devices, formulas) in fleet.devices.chunks(100).zip(fleet.formulas.chunks(100)) {
        cluster.create_all(&namespace, devices).await;
        cluster.create_all(&namespace, formulas).await;
    }
    until_complete(&renderings, SITES, PER_SITE).await;
    at_rest(&cluster, &namespace, Duration::from_secs(2)).await;
    operator.stop().await;
    watching.cancel();

    let mut last: HashMap<String, Rendering> = HashMap::new();
    for rendering in renderings.all() {
        if let Some(before) = last.get(&rendering.name) {
            assert!(
                rendering.devices >= before.devices && rendering.formulas >= before.formulas,
                "{} shrank from {before:?} to {rendering:?}",
                rendering.name
            );
        }
        last.insert(rendering.name.clone(), rendering);
    }
}

/// Two operator processes with leader election: one leads; when it is killed (no chance
/// to release the Lease), the other takes over once the Lease expires and renders what
/// changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_succeeded_by_the_other_operator_process() {
    let Some(cluster) = Cluster::connect().await else {
        return;
    };
    let _turn = cluster.exclusive().await;
    let namespace = cluster.namespace("leader-election").await;
    let (site, devices, _) = plant();
    cluster.create_all(&namespace, &[site]).await;
    cluster.create_all(&namespace, &devices[..1]).await;

    let mut first = OperatorProcess::start(&namespace, "operator-a");
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &namespace);
    let holder = || async {
        let lease = leases.get_opt("tagstream-operator").await.unwrap()?;
        lease.spec?.holder_identity
    };
    assert_eq!(
        wait_for("a leader", Duration::from_secs(60), holder).await,
        "operator-a"
    );
    let configs: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &namespace);
    let devices_rendered = |count: usize| {
        let configs = configs.clone();
        async move {
            let map = configs.get_opt("tagstream-plant-a").await.unwrap()?;
            let text = map.data?.remove("devices.yaml")?;
            (text.lines().filter(|l| *l == "kind: Device").count() == count).then_some(())
        }
    };
    wait_for("operator-a to render the site", Duration::from_secs(60), || {
        devices_rendered(1)
    })
    .await;
    let mut second = OperatorProcess::start(&namespace, "operator-b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder().await.as_deref(),
        Some("operator-a"),
        "the Lease changed hands while its holder ran"
    );

    first.kill();
    cluster.create_all(&namespace, &devices[1..2]).await;
    assert_eq!(
        wait_for("operator-b to take the Lease", Duration::from_secs(90), || async {
            holder().await.filter(|h| h == "operator-b")
        })
        .await,
        "operator-b"
    );
    wait_for("operator-b to render the new Device", Duration::from_secs(60), || {
        devices_rendered(2)
    })
    .await;
    assert!(second.running(), "operator-b exited");
    second.kill();
}

/// `tagstream-operator` as its own process, against the control plane; killed on drop.
struct OperatorProcess(Child);

impl OperatorProcess {
    fn start(lease_namespace: &str, identity: &str) -> Self {
        let kubeconfig = std::env::var("TAGSTREAM_KUBECONFIG").unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tagstream-operator"))
            .args(["--http", "127.0.0.1:0", "--status-period", "1s", "--apply-window", "1s"])
            .args(["--lease-namespace", lease_namespace, "--identity", identity])
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .spawn()
            .expect("tagstream-operator starts");
        Self(child)
    }

    fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
