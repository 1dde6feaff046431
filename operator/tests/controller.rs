//! The reconciler, the Site creation and the status loop against a mocked API server
//! (tower-test): each test asserts the exact requests the operator makes, which a real
//! API server cannot show. The same behaviours against a real kube-apiserver are in
//! `control_plane.rs`.

#[path = "support/api.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod api;
#[path = "support/plant.rs"]
#[allow(dead_code, reason = "shared by the test binaries, each using part of it")]
mod plant;

use std::{sync::Arc, time::Duration};

use api::{ApiServer, Recorded};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Resource, ResourceExt,
    runtime::{
        controller::Action,
        reflector::{self, store::Writer},
        watcher::Event,
    },
};
use plant::{path, plant, report, settings};
use serde_json::{Value, json};
use tagstream_crds::{Device, Formula, Site, SiteSpec};
use tagstream_operator::{
    context::{Context, Stores},
    controller::{LAST_APPLIED, OperatorSettings, run},
    reconcile::{RESYNC, reconcile},
    report::ReportSource,
    site_creation::{Candidate, SiteCreation, create_missing_site},
    status_loop::{StatusLoop, StatusSettings},
};
use tokio_util::sync::CancellationToken;

const GROUP: &str = "/apis/tagstream.io/v1alpha1/namespaces/plant";
const CONFIG_MAP: &str = "/api/v1/namespaces/plant/configmaps/tagstream-plant-a";
const STATEFUL_SET: &str = "/apis/apps/v1/namespaces/plant/statefulsets/tagstream-plant-a";
const SERVICE: &str = "/api/v1/namespaces/plant/services/tagstream-plant-a";
/// The ConfigMap a site that outgrows one would continue in: a written StatefulSet is
/// followed by its deletion (a 404 here), in case the site needed more before.
const SECOND_CONFIG_MAP: &str = "/api/v1/namespaces/plant/configmaps/tagstream-plant-a-devices-1";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/plant/events";

/// The operator's view of a fake cluster: the API server and the stores its watches fill.
struct World {
    server: ApiServer,
    ctx: Arc<Context>,
    sites: Writer<Site>,
    devices: Writer<Device>,
    formulas: Writer<Formula>,
}

impl World {
    /// A world whose objects all count as applied long ago (no apply window).
    fn new(site: Option<&Site>, devices: &[Device], formulas: &[Formula]) -> Self {
        Self::with_apply_window(site, devices, formulas, Duration::ZERO)
    }

    fn with_apply_window(
        site: Option<&Site>,
        devices: &[Device],
        formulas: &[Formula],
        apply_window: Duration,
    ) -> Self {
        let server = ApiServer::default();
        if let Some(object) = site {
            server.insert(&path(object), object);
        }
        for object in devices {
            server.insert(&path(object), object);
        }
        for object in formulas {
            server.insert(&path(object), object);
        }
        let (site_store, sites) = reflector::store();
        let (device_store, devices) = reflector::store();
        let (formula_store, formulas) = reflector::store();
        let ctx = Arc::new(Context::new(
            server.client(),
            settings(),
            SiteSpec::default(),
            Stores {
                sites: site_store,
                devices: device_store,
                formulas: formula_store,
            },
            Some("test".into()),
            Arc::default(),
            apply_window,
        ));
        let mut world = Self {
            server,
            ctx,
            sites,
            devices,
            formulas,
        };
        world.watch();
        world
    }

    /// What the watches would deliver: every tagstream object as the server holds it now.
    fn watch(&mut self) {
        fn relist<K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned>(
            writer: &mut Writer<K>,
            server: &ApiServer,
            names: &[String],
        ) {
            writer.apply_watcher_event(&Event::Init);
            for name in names {
                let path = format!("{GROUP}/{}/{name}", K::plural(&()));
                if let Some(object) = server.get(&path) {
                    writer.apply_watcher_event(&Event::InitApply(serde_json::from_value(object).unwrap()));
                }
            }
            writer.apply_watcher_event(&Event::InitDone);
        }
        let names = |plural: &str| self.server.names(&format!("{GROUP}/{plural}/"));
        let (sites, devices, formulas) = (names("sites"), names("devices"), names("formulas"));
        relist(&mut self.sites, &self.server, &sites);
        relist(&mut self.devices, &self.server, &devices);
        relist(&mut self.formulas, &self.server, &formulas);
    }

    fn site(&self, name: &str) -> Arc<Site> {
        let site = self.server.get(&format!("{GROUP}/sites/{name}")).unwrap();
        Arc::new(serde_json::from_value(site).unwrap())
    }

    /// One pass of the status loop, then what the watches would deliver.
    async fn status_pass(&mut self, status: &mut StatusLoop) -> Vec<Recorded> {
        status.pass().await;
        self.watch();
        self.server.take_requests()
    }

    async fn reconcile(&mut self, site: &str) -> Vec<Recorded> {
        reconcile(self.site(site), Arc::clone(&self.ctx)).await.unwrap();
        self.watch();
        self.server.take_requests()
    }
}

fn lines(requests: &[Recorded]) -> Vec<String> {
    requests.iter().map(Recorded::line).collect()
}

fn status_patch(plural: &str, name: &str) -> String {
    format!("PATCH {GROUP}/{plural}/{name}/status")
}

#[tokio::test]
async fn the_first_reconcile_applies_the_site_and_records_what_it_deployed() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    let requests = world.reconcile("plant-a").await;

    let mut expected = vec![
        format!("GET {CONFIG_MAP}"),
        format!("PATCH {CONFIG_MAP}"),
        format!("GET {STATEFUL_SET}"),
        format!("PATCH {STATEFUL_SET}"),
        format!("DELETE {SECOND_CONFIG_MAP}"),
        format!("GET {SERVICE}"),
        format!("PATCH {SERVICE}"),
        format!("POST {EVENTS}"),
    ];
    for formula in [
        "boiler-delta-t",
        "boiler-efficiency",
        "boiler-heat-output",
        "line-ready",
        "meter-apparent-power",
    ] {
        expected.push(status_patch("formulas", formula));
    }
    for device in ["boiler", "line", "meter"] {
        expected.push(status_patch("devices", device));
    }
    expected.push(status_patch("sites", "plant-a"));
    assert_eq!(lines(&requests), expected);

    // Server-side apply, forced, under the operator's field manager, with the hash.
    let apply = &requests[1];
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    let query = apply.uri.split_once('?').unwrap().1;
    let mut query: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    query.sort_unstable();
    assert_eq!(query, ["fieldManager=tagstream-operator", "force=true"]);
    assert!(apply.body["metadata"]["annotations"]["tagstream.io/rendered-hash"].is_string());
    assert_eq!(apply.body["metadata"]["ownerReferences"][0]["kind"], "Site");
    assert_eq!(requests[7].body["reason"], "Applied");

    let efficiency = world
        .server
        .get(&format!("{GROUP}/formulas/boiler-efficiency"))
        .unwrap();
    assert_eq!(efficiency["status"]["conditions"][0]["type"], "Valid");
    assert_eq!(efficiency["status"]["conditions"][0]["status"], "True");
    assert_eq!(efficiency["status"]["observedGeneration"], 1);
    assert_eq!(
        efficiency["status"]["dependencyOrder"],
        json!(["boiler-delta-t", "boiler-heat-output"])
    );
    let boiler = world.server.get(&format!("{GROUP}/devices/boiler")).unwrap();
    assert_eq!(boiler["status"]["tagCount"], 7);
    let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    assert_eq!(
        (&site["status"]["devices"], &site["status"]["formulas"]),
        (&json!(3), &json!(5))
    );
}

#[tokio::test]
async fn a_second_identical_reconcile_only_reads() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let requests = world.reconcile("plant-a").await;
    assert_eq!(
        lines(&requests),
        [
            format!("GET {CONFIG_MAP}"),
            format!("GET {STATEFUL_SET}"),
            format!("GET {SERVICE}"),
        ]
    );
    let applies = world
        .ctx
        .metrics
        .applies
        .get_or_create(&tagstream_operator::metrics::WriteLabels {
            kind: "ConfigMap".into(),
            outcome: "unchanged",
        });
    assert_eq!(applies.get(), 1);
}

#[tokio::test]
async fn a_device_moved_between_sites_leaves_one_config_and_joins_the_other() {
    let (site, devices, formulas) = plant();
    let mut other = site.clone();
    other.metadata.name = Some("plant-b".into());
    other.metadata.uid = Some("0d6b1f0e-0000-4000-8000-00000000000b".into());
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.server.insert(&path(&other), &other);
    world.reconcile("plant-a").await;
    world.reconcile("plant-b").await;

    let mut line: Device = serde_json::from_value(world.server.get(&format!("{GROUP}/devices/line")).unwrap()).unwrap();
    line.spec.site = "plant-b".into();
    line.metadata.generation = Some(2);
    world.server.insert(&path(&line), &line);
    world.watch();

    // Site A: only its ConfigMap and its device count change. The line-ready formula
    // reads the line and becomes invalid.
    let requests = world.reconcile("plant-a").await;
    assert_eq!(
        lines(&requests),
        [
            format!("GET {CONFIG_MAP}"),
            format!("PATCH {CONFIG_MAP}"),
            format!("GET {STATEFUL_SET}"),
            format!("GET {SERVICE}"),
            // The second "Applied" event of the site: kube's recorder counts it in a series.
            format!("PATCH {EVENTS}/<event>"),
            status_patch("formulas", "line-ready"),
            format!("POST {EVENTS}"),
            status_patch("sites", "plant-a"),
        ]
    );
    let config = &requests[1].body["data"]["devices.yaml"];
    assert!(!config.as_str().unwrap().contains("name: line\n"), "{config}");
    assert_eq!(requests[5].body["status"]["conditions"][0]["reason"], "UnknownInput");

    // Site B: its ConfigMap gains the device, which records the new generation.
    let requests = world.reconcile("plant-b").await;
    let b = |p: &str| p.replace("plant-a", "plant-b");
    assert_eq!(
        lines(&requests),
        [
            format!("GET {}", b(CONFIG_MAP)),
            format!("PATCH {}", b(CONFIG_MAP)),
            format!("GET {}", b(STATEFUL_SET)),
            format!("GET {}", b(SERVICE)),
            format!("PATCH {EVENTS}/<event>"),
            status_patch("devices", "line"),
            status_patch("sites", "plant-b"),
        ]
    );
    assert!(
        requests[1].body["data"]["devices.yaml"]
            .as_str()
            .unwrap()
            .contains("name: line\n")
    );
    assert_eq!(requests[5].body["status"]["observedGeneration"], 2);
}

#[tokio::test]
async fn an_invalid_formula_is_reported_on_its_status_once_and_left_out() {
    let (site, devices, mut formulas) = plant();
    let mut broken = formulas[0].clone();
    broken.metadata.name = Some("broken".into());
    broken.spec.expression = "t_out -".into();
    formulas.push(broken);
    let mut world = World::new(Some(&site), &devices, &formulas);
    let requests = world.reconcile("plant-a").await;

    let patch = requests
        .iter()
        .find(|r| r.line() == status_patch("formulas", "broken"))
        .expect("the broken formula's status is written");
    let valid = &patch.body["status"]["conditions"][0];
    assert_eq!((&valid["type"], &valid["status"]), (&json!("Valid"), &json!("False")));
    assert_eq!(valid["reason"], "ParseError");
    assert!(valid["message"].as_str().unwrap().contains("operand"), "{valid}");
    let warnings: Vec<&Value> = requests
        .iter()
        .filter(|r| r.line() == format!("POST {EVENTS}") && r.body["type"] == "Warning")
        .map(|r| &r.body)
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0]["regarding"]["name"], "broken");
    let config = world.server.get(CONFIG_MAP).unwrap();
    assert!(
        !config["data"]["formulas.yaml"]
            .as_str()
            .unwrap()
            .contains("name: broken")
    );
    let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    assert_eq!(site["status"]["formulas"], 5);

    // Reported once: the next reconcile writes nothing.
    assert_eq!(world.reconcile("plant-a").await.len(), 3);
}

fn warnings(requests: &[Recorded]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.line() == format!("POST {EVENTS}") && r.body["type"] == "Warning")
        .map(|r| format!("{} {}", r.body["regarding"]["name"], r.body["reason"]))
        .collect()
}

fn valid_reasons(requests: &[Recorded]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.line().starts_with(&format!("PATCH {GROUP}/formulas/")))
        .map(|r| {
            let valid = &r.body["status"]["conditions"][0];
            format!("{} {}", r.line().split('/').nth_back(1).unwrap(), valid["reason"])
        })
        .collect()
}

/// The keys of `original` that `modified` no longer has, as JSON merge patch deletions;
/// what client-side `kubectl apply` removes (it diffs the last-applied configuration
/// against the new one).
fn deletions(original: &Value, modified: &Value) -> Value {
    let (Some(original), Some(modified)) = (original.as_object(), modified.as_object()) else {
        return json!({});
    };
    let mut patch = serde_json::Map::new();
    for (key, old) in original {
        match modified.get(key) {
            None => {
                patch.insert(key.clone(), Value::Null);
            }
            Some(new) if old.is_object() && new.is_object() => {
                let nested = deletions(old, new);
                if nested.as_object().is_some_and(|n| !n.is_empty()) {
                    patch.insert(key.clone(), nested);
                }
            }
            Some(_) => {}
        }
    }
    Value::Object(patch)
}

/// What `modified` adds to or changes in `current`, ignoring what it leaves out.
fn changes(current: &Value, modified: &Value) -> Value {
    let (Some(current), Some(modified)) = (current.as_object(), modified.as_object()) else {
        return modified.clone();
    };
    let mut patch = serde_json::Map::new();
    for (key, new) in modified {
        match current.get(key) {
            Some(old) if old == new => {}
            Some(old) if old.is_object() && new.is_object() => {
                patch.insert(key.clone(), changes(old, new));
            }
            _ => {
                patch.insert(key.clone(), new.clone());
            }
        }
    }
    Value::Object(patch)
}

/// Client-side `kubectl apply` of `manifest` over `live`, as kubectl does it for custom
/// resources: a three-way JSON merge patch from the last-applied annotation (nothing
/// when it is missing), the manifest and the live object.
fn kubectl_apply(live: &Value, manifest: &Value) -> Value {
    let original: Value = live["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .map_or_else(|| json!({}), |text| serde_json::from_str(text).unwrap());
    let mut modified = manifest.clone();
    modified["metadata"]["annotations"][LAST_APPLIED] = json!(format!("{manifest}\n"));
    let mut patch = deletions(&original, &modified);
    json_patch::merge(&mut patch, &changes(live, &modified));
    let mut applied = live.clone();
    json_patch::merge(&mut applied, &patch);
    applied
}

/// The user applies their own Site after the operator created it from the defaults
/// (later than the apply window). The operator saved what it created as the last-applied
/// configuration, so kubectl's merge drops every default the user's Site leaves out
/// (found on a real cluster: a default credentials Secret stayed, and the ingestor hung
/// in `ContainerCreating`).
#[tokio::test]
async fn a_site_the_user_applies_over_a_created_one_keeps_only_what_the_user_wrote() {
    let (_, devices, _) = plant();
    let mut world = World::new(None, &devices, &[]);
    let defaults: SiteSpec = serde_json::from_value(json!({
        "broker": {"urls": ["nats://nats.nats.svc:4222"],
                   "credentials": {"secretName": "nats-tagstream", "type": "userPassword"}},
        "placement": {"resources": {"limits": {"memory": "256Mi"}}},
    }))
    .unwrap();
    Arc::get_mut(&mut world.ctx).unwrap().default_site = defaults;
    let candidate = Candidate::of(&devices[0]).unwrap();
    create_missing_site(&world.ctx, &candidate).await.unwrap().unwrap();
    let live = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    assert_eq!(live["spec"]["broker"]["credentials"]["secretName"], "nats-tagstream");

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/plant/site.yaml"
    ))
    .unwrap();
    let mut manifest: Value = serde_yaml::from_str(&text).unwrap();
    manifest["metadata"]["namespace"] = json!("plant");
    let applied = kubectl_apply(&live, &manifest);
    assert_eq!(applied["spec"], manifest["spec"]);
}

/// `kubectl apply -f dir/` sends a Formula before the Formula it reads when the files
/// sort that way. Within the apply window the missing input is not reported (found on a
/// real cluster: a transient `UnknownInput` Warning on every such apply); the formula
/// stays out of the rendering until its input is there.
#[tokio::test]
async fn a_formula_whose_input_arrives_later_in_the_same_apply_is_never_reported_invalid() {
    let (site, devices, formulas) = plant();
    let (input, rest): (Vec<Formula>, Vec<Formula>) =
        formulas.into_iter().partition(|f| f.name_any() == "boiler-delta-t");
    let mut world = World::with_apply_window(Some(&site), &devices, &rest, Duration::from_secs(30));

    let action = reconcile(world.site("plant-a"), Arc::clone(&world.ctx)).await.unwrap();
    world.watch();
    let requests = world.server.take_requests();
    assert!(
        action != Action::requeue(RESYNC) && action != Action::await_change(),
        "looks again when the window closes: {action:?}"
    );
    assert_eq!(warnings(&requests), Vec::<String>::new());
    let reported = valid_reasons(&requests);
    assert!(
        !reported
            .iter()
            .any(|r| r.starts_with("boiler-heat-output") || r.starts_with("boiler-efficiency")),
        "{reported:?}"
    );
    let config = world.server.get(CONFIG_MAP).unwrap()["data"]["formulas.yaml"].clone();
    assert!(!config.as_str().unwrap().contains("name: boiler-heat-output"));

    world.server.insert(&path(&input[0]), &input[0]);
    world.watch();
    let requests = world.reconcile("plant-a").await;
    assert_eq!(warnings(&requests), Vec::<String>::new());
    let mut reported = valid_reasons(&requests);
    reported.sort();
    assert_eq!(
        reported,
        [
            "boiler-delta-t \"Compiled\"",
            "boiler-efficiency \"Compiled\"",
            "boiler-heat-output \"Compiled\""
        ]
    );
}

/// The input never arrives: reported once the window has closed, with one Warning.
#[tokio::test]
async fn a_formula_input_still_missing_after_the_apply_window_is_reported() {
    let (site, devices, formulas) = plant();
    let rest: Vec<Formula> = formulas
        .into_iter()
        .filter(|f| f.name_any() != "boiler-delta-t")
        .collect();
    let mut world = World::with_apply_window(Some(&site), &devices, &rest, Duration::from_secs(1));
    assert_eq!(warnings(&world.reconcile("plant-a").await), Vec::<String>::new());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let requests = world.reconcile("plant-a").await;
    assert_eq!(
        warnings(&requests),
        [
            "\"boiler-efficiency\" \"InvalidInput\"",
            "\"boiler-heat-output\" \"UnknownInput\""
        ]
    );
    assert_eq!(world.reconcile("plant-a").await.len(), 3, "reported once");
}

#[tokio::test]
async fn a_deleted_site_is_left_to_the_garbage_collector_and_not_recreated() {
    let (mut site, devices, formulas) = plant();
    site.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let mut world = World::new(Some(&site), &devices, &formulas);
    // Its objects are owned by the Site, so the garbage collector removes them; the
    // queue's claim is owned by nobody and stays (Retain, in the rendering test).
    assert_eq!(lines(&world.reconcile("plant-a").await), Vec::<String>::new());

    // Once gone, Devices whose spec the operator already processed do not bring it back.
    let mut world = World::new(None, &[], &[]);
    let mut processed = devices[0].clone();
    processed.status = Some(tagstream_crds::DeviceStatus {
        observed_generation: Some(1),
        ..Default::default()
    });
    assert!(Candidate::of(&processed).is_none());
    world.watch();
}

#[tokio::test]
async fn a_device_naming_a_missing_site_creates_it_with_the_defaults() {
    let (_, devices, _) = plant();
    let world = World::new(None, &devices, &[]);
    let created = create_missing_site(&world.ctx, &Candidate::of(&devices[0]).unwrap())
        .await
        .unwrap()
        .expect("a Site");
    assert_eq!(created.spec, SiteSpec::default());
    let requests = world.server.take_requests();
    assert_eq!(
        lines(&requests),
        [format!("POST {GROUP}/sites"), format!("POST {EVENTS}")]
    );
    assert_eq!(requests[0].body["metadata"]["name"], "plant-a");
    assert!(requests[0].uri.contains("fieldManager=tagstream-operator"));
    assert_eq!(requests[1].body["reason"], "SiteCreated");
    // A second member of the same site, before the watch shows the Site: a conflict,
    // nothing more.
    let second = Candidate::of(&devices[1]).unwrap();
    assert!(create_missing_site(&world.ctx, &second).await.unwrap().is_none());
    assert_eq!(lines(&world.server.take_requests()), [format!("POST {GROUP}/sites")]);
}

/// `kubectl apply` of a directory sends a site's Devices before its Site. The operator
/// creates a missing Site only `--apply-window` after a member named it, so the
/// user's own Site, arriving within the delay, is never merged into one made from the
/// defaults (found on a real cluster: the ingestor hung on a default credentials Secret).
#[tokio::test]
async fn a_site_applied_within_the_creation_delay_is_the_users_own() {
    let (site, devices, _) = plant();
    let mut world = World::with_apply_window(None, &devices, &[], Duration::from_secs(1));
    world.ctx.listed.sites.set();
    let (candidates, queued) = futures::channel::mpsc::unbounded();
    let shutdown = CancellationToken::new();
    let creation = tokio::spawn(SiteCreation::new(Arc::clone(&world.ctx)).run(queued, shutdown.clone()));
    candidates.unbounded_send(Candidate::of(&devices[0]).unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    world.server.insert(&path(&site), &site);
    world.watch();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        lines(&world.server.take_requests()),
        Vec::<String>::new(),
        "the user's Site stands"
    );

    // Still missing after the delay: created from the defaults.
    world.server.remove(&path(&site));
    world.watch();
    candidates.unbounded_send(Candidate::of(&devices[1]).unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while world.server.get(&path(&site)).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the missing Site was not created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    creation.await.unwrap();
    assert_eq!(
        lines(&world.server.take_requests()),
        [format!("POST {GROUP}/sites"), format!("POST {EVENTS}")]
    );
}

fn status_loop(world: &World, heartbeat: Duration) -> StatusLoop {
    StatusLoop::new(
        Arc::clone(&world.ctx),
        StatusSettings {
            source: ReportSource::ApiServerProxy(world.ctx.client.clone()),
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            heartbeat,
            concurrency: 4,
        },
    )
}

const PROXY: &str = "/api/v1/namespaces/plant/services/tagstream-plant-a:http/proxy/status";

/// A drained queue has no oldest point: the Site's status must not keep the last
/// backlog's age (found on a real cluster: 46.97 s stood for minutes after an outage).
#[tokio::test]
async fn a_drained_queue_clears_the_oldest_age_on_the_site() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    world.server.proxy(PROXY, 200, report(true));
    let mut loop_ = status_loop(&world, Duration::ZERO);
    world.status_pass(&mut loop_).await;
    let queue = |world: &World| world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap()["status"]["queue"].clone();
    assert_eq!(queue(&world)["oldestAgeSeconds"], 0.2);

    let mut drained: Value = serde_json::from_str(&report(true)).unwrap();
    drained["queue"]["points"] = json!(0);
    drained["queue"]["oldestAgeSeconds"] = Value::Null;
    world.server.proxy(PROXY, 200, drained.to_string());
    world.status_pass(&mut loop_).await;
    assert_eq!(queue(&world)["depth"], 0);
    assert_eq!(queue(&world).get("oldestAgeSeconds"), None, "{}", queue(&world));
}

/// A device that keeps missing its poll interval: the count reaches its status, and a
/// Warning says so when it grew by ten or more since the last status; a stumble does not.
#[tokio::test]
async fn a_device_that_keeps_skipping_poll_cycles_gets_a_warning() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut loop_ = status_loop(&world, Duration::ZERO);
    let skipping = |boiler: u64, line: u64| {
        let mut report: Value = serde_json::from_str(&report(true)).unwrap();
        report["devices"]["boiler"]["pollCyclesSkipped"] = json!(boiler);
        report["devices"]["line"]["pollCyclesSkipped"] = json!(line);
        report.to_string()
    };
    world.server.proxy(PROXY, 200, skipping(3, 0));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(
        warnings(&requests),
        Vec::<String>::new(),
        "three skipped cycles are a stumble"
    );
    let boiler = world.server.get(&format!("{GROUP}/devices/boiler")).unwrap();
    assert_eq!(boiler["status"]["pollCyclesSkipped"], 3);

    world.server.proxy(PROXY, 200, skipping(40, 9));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), ["\"boiler\" \"PollCyclesSkipped\""]);
    let note = requests
        .iter()
        .find(|r| r.body["reason"] == "PollCyclesSkipped")
        .map(|r| r.body["note"].clone())
        .unwrap();
    assert!(note.as_str().unwrap().starts_with("37 poll cycles skipped"), "{note}");
}

/// A broker that refuses the Site's stream (its subjects overlap another stream's) is a
/// configuration problem: `QueueHealthy` says what the broker said, with one Warning.
#[tokio::test]
async fn a_stream_the_broker_refuses_turns_queue_healthy_false_with_one_warning() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut loop_ = status_loop(&world, Duration::ZERO);
    let refusal = "the broker refuses stream PLANT: jetstream error: subjects overlap with an existing stream \
                   (code 400, error code 10065)";
    let mut refused: Value = serde_json::from_str(&report(true)).unwrap();
    refused["publisher"]["connected"] = json!(false);
    refused["publisher"]["lastError"] = json!(refusal);
    refused["publisher"]["configError"] = json!(refusal);
    world.server.proxy(PROXY, 200, refused.to_string());
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), ["\"plant-a\" \"BrokerMisconfigured\""]);
    let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    let condition = site["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "QueueHealthy")
        .cloned()
        .unwrap();
    assert_eq!(
        (&condition["status"], &condition["reason"], &condition["message"]),
        (&json!("False"), &json!("BrokerMisconfigured"), &json!(refusal))
    );
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), Vec::<String>::new(), "one warning per refusal");
}

/// A full disk under the queue: the Site's `QueueHealthy` says which policy acts and how
/// much is free, with one Warning when it starts; a failing write says so too.
#[tokio::test]
async fn a_full_disk_under_the_queue_turns_queue_healthy_false_with_one_warning() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut loop_ = status_loop(&world, Duration::ZERO);
    let full = |dropped: u64, write_error: Option<&str>| {
        let mut report: Value = serde_json::from_str(&report(true)).unwrap();
        report["queue"]["diskFull"] = json!(true);
        report["queue"]["volumeAvailableBytes"] = json!(3 << 20);
        report["queue"]["droppedPoints"] = json!(dropped);
        report["queue"]["writeError"] = json!(write_error);
        report.to_string()
    };
    let queue_healthy = |world: &World| {
        let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
        let conditions = site["status"]["conditions"].as_array().cloned().unwrap_or_default();
        conditions.into_iter().find(|c| c["type"] == "QueueHealthy").unwrap()
    };
    world.server.proxy(PROXY, 200, full(500, None));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), ["\"plant-a\" \"DiskFull\""]);
    let condition = queue_healthy(&world);
    assert_eq!(
        (&condition["status"], &condition["reason"]),
        (&json!("False"), &json!("DiskFull"))
    );
    assert_eq!(
        condition["message"],
        "the queue's volume is nearly full: the oldest points are dropped to make room (dropOldest; \
         status.queue.dropped counts them)"
    );
    let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    assert_eq!(site["status"]["queue"]["dropped"], 500);

    world.server.proxy(PROXY, 200, full(900, None));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), Vec::<String>::new(), "still full: no new warning");
    assert_eq!(queue_healthy(&world)["reason"], "DiskFull");

    world
        .server
        .proxy(PROXY, 200, full(900, Some("No space left on device (os error 28)")));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), ["\"plant-a\" \"QueueWriteFailing\""]);
    assert_eq!(queue_healthy(&world)["reason"], "QueueWriteFailing");

    world.server.proxy(PROXY, 200, report(true));
    world.status_pass(&mut loop_).await;
    assert_eq!(queue_healthy(&world)["status"], "True");
}

/// A `/status` body larger than any site reports is not read whole: the Site says so
/// (issue 28: the operator read any body, whatever its size).
#[tokio::test]
async fn an_oversized_report_is_refused_and_said_on_the_site() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut loop_ = status_loop(&world, Duration::ZERO);
    let mut huge = report(true);
    huge.push_str(&" ".repeat(tagstream_operator::report::MAX_REPORT_BYTES));
    world.server.proxy(PROXY, 200, huge);
    world.status_pass(&mut loop_).await;
    let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    let ready = site["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready["status"], "False", "{ready}");
    assert_eq!(
        ready["message"],
        "the ingestor's /status is larger than 16 MiB, more than any site reports"
    );
}

/// One object's failed status write (a Device deleted since the pass read the store)
/// does not skip the rest of its site: the other Devices, the Formulas and the Site are
/// still written (issue 28: a `?` on each patch gave up the whole site's pass).
#[tokio::test]
async fn a_failed_status_write_does_not_skip_the_rest_of_the_site() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut loop_ = status_loop(&world, Duration::ZERO);
    world.server.proxy(PROXY, 200, report(true));
    world.server.refuse_next(
        "PATCH",
        &format!("{GROUP}/devices/boiler/status"),
        404,
        "devices.tagstream.io \"boiler\" not found",
    );
    let requests = world.status_pass(&mut loop_).await;
    let written: Vec<String> = requests
        .iter()
        .map(Recorded::line)
        .filter(|line| line.starts_with("PATCH") && line.ends_with("/status"))
        .collect();
    for expected in [
        format!("PATCH {GROUP}/devices/boiler/status"),
        format!("PATCH {GROUP}/devices/line/status"),
        format!("PATCH {GROUP}/devices/meter/status"),
        format!("PATCH {GROUP}/sites/plant-a/status"),
    ] {
        assert!(written.contains(&expected), "{expected} missing from {written:#?}");
    }
}

/// A broker that lost what it had acknowledged (a power cut): the Site's `BrokerDurable`
/// turns False with the ingestor's account of it and one Warning; a loss found more than
/// an hour ago no longer counts.
#[tokio::test]
async fn a_broker_that_lost_acknowledged_records_turns_broker_durable_false_with_one_warning() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut loop_ = status_loop(&world, Duration::ZERO);
    let loss = "the broker lost 12 records it had acknowledged (queue records 88 to 99; the stream ends at \
                sequence 310); publishing them again";
    let report_of_loss = |ago: Duration| {
        let mut report: Value = serde_json::from_str(&report(true)).unwrap();
        report["publisher"]["brokerLostRecords"] = json!(12);
        report["publisher"]["lastBrokerLoss"] = json!(loss);
        report["publisher"]["lastBrokerLossNs"] = json!(tagstream_core::point::now_ns() - ago.as_nanos() as i64);
        report.to_string()
    };
    let broker_durable = |world: &World| {
        let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
        let conditions = site["status"]["conditions"].as_array().cloned().unwrap_or_default();
        conditions.into_iter().find(|c| c["type"] == "BrokerDurable").unwrap()
    };
    world.server.proxy(PROXY, 200, report(true));
    world.status_pass(&mut loop_).await;
    assert_eq!(broker_durable(&world)["status"], "True");

    world.server.proxy(PROXY, 200, report_of_loss(Duration::from_secs(5)));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), ["\"plant-a\" \"BrokerLostRecords\""]);
    let condition = broker_durable(&world);
    assert_eq!(
        (&condition["status"], &condition["reason"], &condition["message"]),
        (&json!("False"), &json!("BrokerLostRecords"), &json!(loss))
    );
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(warnings(&requests), Vec::<String>::new(), "one warning per loss");

    world
        .server
        .proxy(PROXY, 200, report_of_loss(Duration::from_secs(2 * 3600)));
    world.status_pass(&mut loop_).await;
    assert_eq!(broker_durable(&world)["status"], "True");
}

#[tokio::test]
async fn the_status_loop_writes_reports_when_they_change_and_not_otherwise() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    world.server.proxy(PROXY, 200, report(true));
    let mut loop_ = status_loop(&world, Duration::from_secs(3600));

    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(
        lines(&requests),
        [
            format!("GET {PROXY}"),
            status_patch("formulas", "boiler-delta-t"),
            status_patch("devices", "boiler"),
            status_patch("devices", "line"),
            status_patch("devices", "meter"),
            status_patch("sites", "plant-a"),
        ]
    );
    let delta = world.server.get(&format!("{GROUP}/formulas/boiler-delta-t")).unwrap();
    assert_eq!(delta["status"]["lastValue"], "20.5");
    assert!(delta["status"]["lastValueTime"].is_string());
    assert_eq!(
        delta["status"]["conditions"][0]["type"], "Valid",
        "the reconcile's fields stay"
    );
    let boiler = world.server.get(&format!("{GROUP}/devices/boiler")).unwrap();
    let conditions = &boiler["status"]["conditions"];
    assert_eq!(conditions[0]["type"], "Connected");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[1]["type"], "Ready");
    assert_eq!(conditions[1]["status"], "True");
    assert_eq!(boiler["status"]["polls"], 10);
    assert!(boiler["status"]["lastPollTime"].is_string());
    let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
    assert_eq!(site["status"]["queue"]["depth"], 12);
    assert_eq!(site["status"]["conditions"][1]["status"], "True");

    // Counters and results moved, nothing a user acts on changed, heartbeat not due:
    // read only.
    let moved = report(true)
        .replace("\"polls\":10", "\"polls\":11")
        .replace("\"20.5\"", "\"20.6\"");
    assert!(moved.contains("\"polls\":11") && moved.contains("\"20.6\""));
    world.server.proxy(PROXY, 200, moved);
    loop_.pass().await;
    world.watch();
    assert_eq!(lines(&world.server.take_requests()), [format!("GET {PROXY}")]);

    // The devices stop answering: written at once, with a warning each.
    world.server.proxy(PROXY, 200, report(false));
    let requests = world.status_pass(&mut loop_).await;
    let writes: Vec<String> = lines(&requests)
        .into_iter()
        .filter(|l| l.starts_with("PATCH"))
        .collect();
    assert_eq!(
        writes,
        [
            status_patch("devices", "boiler"),
            status_patch("devices", "line"),
            status_patch("devices", "meter")
        ]
    );
    let warnings = requests
        .iter()
        .filter(|r| r.body["reason"] == "DeviceUnreachable")
        .count();
    assert_eq!(warnings, 3);
    let line = world.server.get(&format!("{GROUP}/devices/line")).unwrap();
    assert_eq!(line["status"]["conditions"][0]["reason"], "PollFailed");
    assert_eq!(line["status"]["lastError"], "connection refused");
}

/// Deployed, the Site and its Devices say that the ingestor has not reported yet; an
/// ingestor that is not up yet is expected and says nothing more. One that stops
/// answering makes one Warning, not one per pass.
#[tokio::test]
async fn an_ingestor_that_stops_answering_makes_the_site_not_ready_with_one_event() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let server = world.server.clone();
    let condition = |object: &str, type_: &str| {
        let object = server.get(&format!("{GROUP}/{object}")).unwrap();
        let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let found = conditions.into_iter().find(|c| c["type"] == type_).unwrap_or_default();
        (found["status"].clone(), found["reason"].clone())
    };
    let not_ready = (json!("False"), json!("IngestorNotReady"));

    world.server.proxy(PROXY, 503, "no endpoints available".into());
    let mut loop_ = status_loop(&world, Duration::from_secs(3600));
    let events = |requests: &[Recorded]| {
        requests
            .iter()
            .filter(|r| r.body["reason"] == "IngestorNotReady")
            .map(|r| r.body.clone())
            .collect::<Vec<_>>()
    };
    let not_up_yet = world.status_pass(&mut loop_).await;
    assert_eq!(events(&not_up_yet), Vec::<Value>::new(), "not up yet is no news");
    assert_eq!(condition("sites/plant-a", "Ready"), not_ready);
    assert_eq!(condition("devices/boiler", "Ready"), not_ready);
    assert_eq!(
        condition("devices/boiler", "Connected"),
        (json!("Unknown"), json!("IngestorNotReady"))
    );

    world.server.proxy(PROXY, 200, report(true));
    world.status_pass(&mut loop_).await;
    assert_eq!(
        condition("sites/plant-a", "Ready"),
        (json!("True"), json!("IngestorRunning"))
    );

    world.server.proxy(PROXY, 503, "no endpoints available".into());
    let stopped = world.status_pass(&mut loop_).await;
    assert_eq!(condition("sites/plant-a", "Ready"), not_ready);
    let warnings = events(&stopped);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["regarding"]["kind"], "Site");
    assert_eq!(warnings[0]["type"], "Warning");
    assert_eq!(condition("devices/boiler", "Connected").0, json!("Unknown"));

    // Still unreachable: nothing new to say.
    loop_.pass().await;
    assert_eq!(lines(&world.server.take_requests()), [format!("GET {PROXY}")]);
}

#[tokio::test]
async fn a_new_storage_size_recreates_the_stateful_set_keeping_pod_and_claim() {
    let (site, devices, formulas) = plant();
    let mut world = World::new(Some(&site), &devices, &formulas);
    world.reconcile("plant-a").await;
    let mut site: Site = serde_json::from_value(world.server.get(&path(&site)).unwrap()).unwrap();
    site.spec.storage.size = k8s_openapi::apimachinery::pkg::api::resource::Quantity("4Gi".into());
    site.metadata.generation = Some(2);
    world.server.insert(&path(&site), &site);
    world.watch();
    world.server.refuse_next(
        "PATCH",
        STATEFUL_SET,
        422,
        "StatefulSet.apps \"tagstream-plant-a\" is invalid: spec: Forbidden: updates to statefulset spec \
         for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', \
         'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
    );
    let requests = world.reconcile("plant-a").await;
    assert_eq!(
        lines(&requests)[..8],
        [
            format!("GET {CONFIG_MAP}"),
            format!("PATCH {CONFIG_MAP}"),
            format!("GET {STATEFUL_SET}"),
            format!("PATCH {STATEFUL_SET}"),
            format!("DELETE {STATEFUL_SET}"),
            format!("GET {STATEFUL_SET}"),
            format!("PATCH {STATEFUL_SET}"),
            format!("DELETE {SECOND_CONFIG_MAP}"),
        ]
    );
    assert_eq!(requests[4].body["propagationPolicy"], "Orphan");
    let set = world.server.get(STATEFUL_SET).unwrap();
    assert_eq!(
        set["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "4Gi"
    );
}

#[tokio::test]
async fn a_refused_apply_fails_the_reconcile_with_an_event_on_the_site() {
    let (site, devices, formulas) = plant();
    let world = World::new(Some(&site), &devices, &formulas);
    world.server.refuse_next(
        "PATCH",
        CONFIG_MAP,
        403,
        "configmaps \"tagstream-plant-a\" is forbidden: User \"system:serviceaccount:tagstream:tagstream-operator\" cannot patch",
    );
    let error = reconcile(world.site("plant-a"), Arc::clone(&world.ctx))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot apply ConfigMap plant/tagstream-plant-a"),
        "{error}"
    );
    let requests = world.server.take_requests();
    assert_eq!(
        lines(&requests),
        [
            format!("GET {CONFIG_MAP}"),
            format!("PATCH {CONFIG_MAP}"),
            format!("POST {EVENTS}"),
        ]
    );
    assert_eq!(requests[2].body["reason"], "ReconcileFailed");
    assert_eq!(requests[2].body["type"], "Warning");
    assert!(requests[2].body["note"].as_str().unwrap().contains("forbidden"));
}

/// The whole operator (`controller::run`: watches, controller, status loop) against the
/// fake API server, whose lists hold the example plant and whose watches stay open
/// without events.
#[tokio::test]
async fn the_running_operator_deploys_a_listed_site_once_and_reports_its_health() {
    let (site, devices, formulas) = plant();
    let world = World::new(Some(&site), &devices, &formulas);
    world.server.proxy(PROXY, 200, report(true));
    let settings = OperatorSettings {
        render: settings(),
        default_site: SiteSpec::default(),
        status: StatusSettings {
            source: ReportSource::ApiServerProxy(world.ctx.client.clone()),
            period: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(3600),
            concurrency: 4,
        },
        instance: Some("test".into()),
        concurrency: 4,
        apply_window: Duration::from_secs(5),
    };
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(run(
        world.ctx.client.clone(),
        settings,
        Arc::default(),
        shutdown.clone(),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let site = world.server.get(&format!("{GROUP}/sites/plant-a")).unwrap();
        let deployed = world.server.get(STATEFUL_SET).is_some() && site["status"]["devices"] == 3;
        let ready = |object: &Value| {
            object["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        };
        let reported = ready(&site)
            && ["boiler", "line", "meter"]
                .iter()
                .all(|d| ready(&world.server.get(&format!("{GROUP}/devices/{d}")).unwrap()));
        if deployed && reported {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not deployed and reported: {site}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converging = world.server.take_requests();
    // Let it run a few more status periods: nothing is written again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .expect("the operator stops on shutdown")
        .unwrap();

    let count = |requests: &[Recorded], line: &str| requests.iter().filter(|r| r.line() == line).count();
    assert_eq!(
        count(&converging, &format!("PATCH {CONFIG_MAP}")),
        1,
        "{:#?}",
        lines(&converging)
    );
    assert_eq!(count(&converging, &format!("PATCH {STATEFUL_SET}")), 1);
    let steady = world.server.take_requests();
    let writes: Vec<_> = steady.iter().filter(|r| r.is_write()).map(Recorded::line).collect();
    assert_eq!(writes, Vec::<String>::new(), "steady state writes nothing");
    assert!(
        count(&steady, &format!("GET {PROXY}")) >= 3,
        "the status loop kept asking"
    );
}

#[tokio::test]
async fn devices_whose_site_is_gone_say_so_once() {
    let (_, devices, _) = plant();
    let mut world = World::new(None, &devices, &[]);
    let mut loop_ = status_loop(&world, Duration::from_secs(3600));
    let requests = world.status_pass(&mut loop_).await;
    assert_eq!(
        lines(&requests),
        [
            status_patch("devices", "boiler"),
            status_patch("devices", "line"),
            status_patch("devices", "meter"),
        ]
    );
    let boiler = world.server.get(&format!("{GROUP}/devices/boiler")).unwrap();
    let ready = &boiler["status"]["conditions"][1];
    assert_eq!((&ready["type"], &ready["status"]), (&json!("Ready"), &json!("False")));
    assert_eq!(ready["reason"], "SiteNotFound");
    assert!(ready["message"].as_str().unwrap().contains("plant-a"));
    loop_.pass().await;
    assert_eq!(lines(&world.server.take_requests()), Vec::<String>::new());
}
