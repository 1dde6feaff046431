//! The example plant as the API server hands it to the operator: in namespace `plant`,
//! with uids and generations.

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use tagstream_crds::{Device, Formula, Site, manifest::load};
use tagstream_operator::render::Settings;

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// Namespace, uid and generation 1, as the API server sets them.
pub fn place<K: kube::Resource>(mut object: K) -> K {
    let uid = format!("0d6b1f0e-0000-4000-8000-{:012x}", fxhash(&object.name_any()));
    let meta = object.meta_mut();
    meta.namespace = Some("plant".into());
    meta.uid = Some(uid);
    meta.generation = Some(1);
    object
}

fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0, |h: u64, b| h.rotate_left(5) ^ u64::from(b)) & 0xffff_ffff_ffff
}

pub fn plant() -> (Site, Vec<Device>, Vec<Formula>) {
    let report = load(&[examples()]).unwrap();
    let site = place(report.sites[0].object.clone());
    let devices = report.devices.into_iter().map(|d| place(d.object)).collect();
    let formulas = report.formulas.into_iter().map(|f| place(f.object)).collect();
    (site, devices, formulas)
}

/// The example plant with `copies` of its boiler in place of its devices, 100 tags each
/// (200 copies: 20,000 tags, over one ConfigMap's 1 MiB).
pub fn large_site(copies: usize) -> (Site, Vec<Device>, Vec<Formula>) {
    let (site, devices, formulas) = plant();
    let boiler = &devices[0];
    let template = boiler.spec.tags[0].clone();
    let copies = (0..copies)
        .map(|n| {
            let mut device = boiler.clone();
            device.metadata.name = Some(format!("boiler-{n:03}"));
            device.spec.tags = (0..100u16)
                .map(|t| tagstream_crds::device::Tag {
                    name: format!("zone{:02}_temperature_{t:03}", t % 12),
                    address: t * 2,
                    ..template.clone()
                })
                .collect();
            device
        })
        .collect();
    (site, copies, formulas)
}

/// The whole operator's settings for a test: ingestors asked every `status_period` (they
/// never answer: no node runs them), and `apply_window`.
pub fn operator_settings(
    client: &kube::Client,
    status_period: std::time::Duration,
    apply_window: std::time::Duration,
) -> tagstream_operator::controller::OperatorSettings {
    tagstream_operator::controller::OperatorSettings {
        render: settings(),
        default_site: tagstream_crds::SiteSpec::default(),
        status: tagstream_operator::status_loop::StatusSettings {
            source: tagstream_operator::report::ReportSource::ApiServerProxy(client.clone()),
            period: status_period,
            timeout: status_period.min(std::time::Duration::from_secs(5)),
            heartbeat: std::time::Duration::from_secs(3600),
            concurrency: 8,
        },
        instance: Some("test".into()),
        concurrency: 8,
        apply_window,
    }
}

pub fn settings() -> Settings {
    Settings {
        ingestor_image: "ghcr.io/tagstream/tagstream-ingestor:0.1.0".into(),
        image_pull_secrets: Vec::new(),
    }
}

/// An object's path in the API server (every object of the tests is in `plant`).
pub fn path<K: kube::Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "/apis/tagstream.io/v1alpha1/namespaces/plant/{}/{}",
        K::plural(&()),
        object.name_any()
    )
}

/// Many sites, as `kubectl apply` leaves them in the API server.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub sites: Vec<Site>,
    pub devices: Vec<Device>,
    pub formulas: Vec<Formula>,
}

impl Fleet {
    /// Every object with its API path: Sites, then Devices, then Formulas.
    pub fn objects(&self) -> Vec<(String, serde_json::Value)> {
        fn each<K: kube::Resource<DynamicType = ()> + serde::Serialize>(
            objects: &[K],
        ) -> impl Iterator<Item = (String, serde_json::Value)> + '_ {
            objects.iter().map(|o| (path(o), serde_json::to_value(o).unwrap()))
        }
        each(&self.sites)
            .chain(each(&self.devices))
            .chain(each(&self.formulas))
            .collect()
    }
}

/// `sites` copies of the example plant's Site, each with `per_site` Devices of 10 float32
/// tags and a Formula per Device reading two of them. Every object carries what
/// `kubectl apply` adds (its last-applied annotation and a managedFields entry), which is
/// most of a stored object's size.
pub fn fleet(sites: usize, per_site: usize) -> Fleet {
    let (site, _, _) = plant();
    let mut fleet = Fleet {
        sites: Vec::new(),
        devices: Vec::new(),
        formulas: Vec::new(),
    };
    for s in 0..sites {
        let site_name = format!("site-{s:03}");
        let mut site = site.clone();
        site.metadata.name = Some(site_name.clone());
        site.metadata.uid = Some(format!("0d6b1f0e-0000-4000-8000-{s:012}"));
        fleet.sites.push(applied_by_kubectl(site));
        for d in 0..per_site {
            let device_name = format!("{site_name}-dev-{d:03}");
            let tags: Vec<serde_json::Value> = (0..10)
                .map(|t| serde_json::json!({"name": format!("t{t}"), "register": "holding", "address": 2 * t, "type": "float32", "unit": "degC"}))
                .collect();
            let device: Device = serde_json::from_value(serde_json::json!({
                "apiVersion": "tagstream.io/v1alpha1", "kind": "Device",
                "metadata": {"name": device_name},
                "spec": {"site": site_name, "connection": {"tcp": {"host": format!("10.1.{s}.{d}"), "port": 502}},
                         "unitId": 1, "pollInterval": "1s", "tags": tags},
            }))
            .unwrap();
            fleet.devices.push(applied_by_kubectl(place(device)));
            let formula: Formula = serde_json::from_value(serde_json::json!({
                "apiVersion": "tagstream.io/v1alpha1", "kind": "Formula",
                "metadata": {"name": format!("{device_name}-delta")},
                "spec": {"site": site_name, "inputs": {"a": format!("{device_name}/t0"), "b": format!("{device_name}/t1")},
                         "expression": "b - a", "unit": "K"},
            }))
            .unwrap();
            fleet.formulas.push(applied_by_kubectl(place(formula)));
        }
    }
    fleet
}

/// Adds what `kubectl apply` (client side) leaves on an object: the whole object again in
/// an annotation, and a managedFields entry naming every field it set.
fn applied_by_kubectl<K: kube::Resource<DynamicType = ()> + serde::Serialize>(mut object: K) -> K {
    fn fields(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, v)| (format!("f:{k}"), fields(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|item| {
                    let key = format!("k:{{\"name\":{}}}", item["name"]);
                    (key, fields(item))
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
            _ => serde_json::json!({}),
        }
    }
    let value = serde_json::to_value(&object).unwrap();
    let applied = serde_json::json!({
        "apiVersion": value["apiVersion"], "kind": value["kind"],
        "metadata": {"name": value["metadata"]["name"], "namespace": value["metadata"]["namespace"]},
        "spec": value["spec"],
    });
    let managed = serde_json::json!([{
        "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "tagstream.io/v1alpha1",
        "time": "2026-11-20T10:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                     "f:spec": fields(&value["spec"])},
    }]);
    let meta = object.meta_mut();
    meta.annotations = Some(
        [(
            "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
            applied.to_string(),
        )]
        .into(),
    );
    meta.managed_fields = Some(serde_json::from_value(managed).unwrap());
    object
}

/// An ingestor's report on the example plant: its three devices connected or not, a
/// queue of 12 points, a connected publisher.
pub fn report(connected: bool) -> String {
    let now = tagstream_core::point::now_ns();
    let device = |name: &str| {
        (
            name.to_owned(),
            serde_json::json!({"connected": connected, "lastPollNs": now, "polls": 10, "failedPolls": u64::from(!connected),
                   "consecutiveFailures": u32::from(!connected),
                   "lastError": if connected { serde_json::Value::Null } else { serde_json::json!("connection refused") }}),
        )
    };
    serde_json::json!({
        "namespace": "plant", "site": "plant-a",
        "devices": serde_json::Map::from_iter([device("boiler"), device("line"), device("meter")]),
        "formulas": {"boiler-delta-t": {"valid": true, "error": null, "lastValue": "20.5", "lastValueNs": now}},
        "queue": {"points": 12, "records": 2, "diskBytes": 4096, "payloadBytes": 900, "oldestAgeSeconds": 0.2,
                  "droppedPoints": 0, "corruptRecords": 0, "paused": false, "movedAside": null},
        "publisher": {"connected": true, "publishedBatches": 5, "ackedRecords": 5, "duplicates": 0,
                      "failures": 0, "lastError": null, "lastAckLatencySeconds": 0.001},
        "pointsPolled": 30, "pointsDerived": 10, "pointsLost": 0,
    })
    .to_string()
}
