//! The example plant on a real cluster, with the tagstream chart and NATS installed (see
//! e2e/README.md; `e2e/run.sh` does it all on kind). Skipped, with one line saying so,
//! only when no cluster is configured.
//!
//! 1. applies the simulator and the example plant into a fresh namespace;
//! 2. waits for every Device to report `Connected`;
//! 3. reads the stream and checks raw and derived values against the simulated
//!    waveforms;
//! 4. writes the boiler's setpoint through the ingestor over NATS (the example Site enables
//!    writes) and finds the write's audit and the new value in the stream;
//! 5. deletes the ingestor pod, then restarts the NATS pod while points flow: the outage
//!    must show as queued records in the ingestor's `/status`, points stamped after the
//!    new NATS pod turned Ready must arrive, at least the records queued at the peak must
//!    be acked and in the stream, and every queue record must be there exactly once, in
//!    order;
//! 6. deletes the Site and checks that its workload goes and its queue's claim stays.

#[path = "../../ingestor/tests/support/stream.rs"]
mod stream;

use std::{collections::BTreeMap, io::Write as _, path::PathBuf, time::Duration};

use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod, Service},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use stream::{assert_exactly_once_in_order, stream_contents};
use tagstream_core::report::Status as Report;
use tagstream_crds::{Device, Formula, Site, device::Waveform, manifest::load};
use tagstream_e2e::{Diagnostics, configured_client, port_forward};
use tagstream_ingestor::write_cmd::{self, NatsWrite};
use tagstream_proto::v1::{PointBatch, Quality, SourceKind, WriteOutcome, point::Value};

const MANAGER: &str = "tagstream-e2e";
/// Waits for pods and for the backlog.
const LONG: Duration = Duration::from_secs(300);
/// Waits for points.
const SHORT: Duration = Duration::from_secs(120);
const SITE: &str = "plant-a";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A namespaced API object the suite can apply.
trait Namespaced:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + DeserializeOwned
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + DeserializeOwned
{
}

async fn apply<K: Namespaced>(client: &Client, namespace: &str, object: &K) {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot apply {} {}: {e}", K::kind(&()), object.name_any()));
}

/// Namespace, simulator (its Device manifests in a ConfigMap, as kustomize packs them)
/// and the example plant.
async fn apply_plant(client: &Client, namespace: &str) -> (Vec<Device>, Vec<Formula>) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(namespace.into());
    namespaces
        .patch(namespace, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&ns))
        .await
        .expect("cannot create the test namespace");

    let plant = repo().join("deploy/examples/plant");
    let mut devices = ConfigMap::default();
    devices.metadata.name = Some("tagstream-example-devices".into());
    devices.data = Some(
        ["boiler.yaml", "meter.yaml", "line.yaml"]
            .iter()
            .map(|f| ((*f).to_owned(), std::fs::read_to_string(plant.join(f)).unwrap()))
            .collect(),
    );
    apply(client, namespace, &devices).await;
    let text = std::fs::read_to_string(repo().join("deploy/simulator.yaml")).unwrap();
    let mut documents = serde_yaml::Deserializer::from_str(&text);
    let deployment: Deployment = serde::Deserialize::deserialize(documents.next().unwrap()).unwrap();
    let service: Service = serde::Deserialize::deserialize(documents.next().unwrap()).unwrap();
    apply(client, namespace, &deployment).await;
    apply(client, namespace, &service).await;

    let report = load(&[plant]).expect("the example plant loads");
    apply_placed(client, namespace, report.sites.into_iter().map(|l| l.object)).await;
    let devices = apply_placed(client, namespace, report.devices.into_iter().map(|l| l.object)).await;
    let formulas = apply_placed(client, namespace, report.formulas.into_iter().map(|l| l.object)).await;
    (devices, formulas)
}

/// Applies loaded objects in `namespace`; returns them as applied.
async fn apply_placed<K: Namespaced>(client: &Client, namespace: &str, objects: impl Iterator<Item = K>) -> Vec<K> {
    let mut applied = Vec::new();
    for mut object in objects {
        object.meta_mut().namespace = Some(namespace.into());
        apply(client, namespace, &object).await;
        applied.push(object);
    }
    applied
}

async fn every_device_connected(client: &Client, namespace: &str) -> Result<Option<()>, String> {
    let devices: Api<Device> = Api::namespaced(client.clone(), namespace);
    let list = devices.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
    let waiting: Vec<String> = list
        .items
        .iter()
        .filter(|d| {
            !d.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Connected" && c.status == "True")
            })
        })
        .map(ResourceExt::name_any)
        .collect();
    if list.items.is_empty() || !waiting.is_empty() {
        return Err(format!("not connected: {waiting:?}"));
    }
    Ok(Some(()))
}

/// The ingestor's own report, through the API server (as the operator reads it).
async fn ingestor_report(client: &Client, namespace: &str) -> Result<Report, String> {
    let request = http_request(&format!(
        "/api/v1/namespaces/{namespace}/services/tagstream-{SITE}:http/proxy/status"
    ));
    let text = client.request_text(request).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

fn http_request(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path).body(Vec::new()).unwrap()
}

/// The range each raw tag and the boiler's temperature difference may take.
fn envelopes(devices: &[Device]) -> BTreeMap<(String, String), (f64, f64)> {
    let mut out = BTreeMap::new();
    for device in devices {
        // A writable tag holds what the suite writes, not its waveform.
        for tag in device.spec.tags.iter().filter(|t| !t.writable) {
            if let Some(sim) = &tag.simulation {
                let (low, high) = if sim.waveform == Waveform::Constant {
                    (sim.min, sim.min)
                } else {
                    (sim.min, sim.max)
                };
                // Register quantisation of scaled integers.
                let step = tag.scale.unwrap_or(0.0).abs();
                out.insert((device.name_any(), tag.name.clone()), (low - step, high + step));
            }
        }
    }
    let t = |tag: &str| out[&("boiler".to_owned(), tag.to_owned())];
    let (t_in, t_out) = (t("temperature_in"), t("temperature_out"));
    out.insert(
        ("boiler-delta-t".into(), "boiler-delta-t".into()),
        (t_out.0 - t_in.1, t_out.1 - t_in.0),
    );
    out
}

fn number(value: Option<&Value>) -> Option<f64> {
    match value? {
        Value::DoubleValue(v) => Some(*v),
        Value::IntValue(v) => Some(*v as f64),
        Value::UintValue(v) => Some(*v as f64),
        Value::BoolValue(v) => Some(f64::from(u8::from(*v))),
        Value::StringValue(_) => None,
    }
}

/// Every good numeric point lies in its simulated envelope; every device and formula
/// of the plant sent good points.
fn check_values(batches: &[&PointBatch], devices: &[Device], formulas: &[Formula]) {
    let envelopes = envelopes(devices);
    let mut good: BTreeMap<String, usize> = BTreeMap::new();
    for batch in batches.iter().filter(|b| b.source_kind != SourceKind::Write as i32) {
        for point in &batch.points {
            if point.quality != Quality::Good as i32 {
                continue;
            }
            *good.entry(batch.source.clone()).or_default() += 1;
            let key = (batch.source.clone(), point.tag.clone());
            if let (Some(value), Some((low, high))) = (number(point.value.as_ref()), envelopes.get(&key)) {
                let slack = 1e-6 * (high - low).abs().max(1.0);
                assert!(
                    value >= low - slack && value <= high + slack,
                    "{}/{} = {value} is outside the simulated range [{low}, {high}]",
                    batch.source,
                    point.tag
                );
            }
        }
    }
    for source in devices
        .iter()
        .map(ResourceExt::name_any)
        .chain(formulas.iter().map(ResourceExt::name_any))
    {
        assert!(
            good.get(&source).copied().unwrap_or(0) > 0,
            "no good point from {source}: {good:?}"
        );
    }
}

/// A pod that is Ready and is not the one with uid `not_uid`: its uid and when it turned
/// Ready, in the cluster's clock (ns since the Unix epoch).
async fn pod_ready(pods: &Api<Pod>, name: &str, not_uid: Option<&str>) -> Result<Option<(String, i64)>, String> {
    let pod = pods
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no pod yet")?;
    let ready_since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map_or(0, |t| t.0.as_nanosecond() as i64)
        });
    let uid = pod.uid().unwrap_or_default();
    Ok(ready_since
        .filter(|_| Some(uid.as_str()) != not_uid)
        .map(|since| (uid, since)))
}

/// The batches of this test's site in the stream, in stream order.
async fn our_batches(nats_url: &str, namespace: &str) -> Result<Vec<(String, PointBatch)>, String> {
    let client = async_nats::ConnectOptions::new()
        .connect(nats_url)
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream_contents(client, "TAGSTREAM")
        .await
        .into_iter()
        .filter(|(_, b)| b.namespace == namespace && b.site == SITE)
        .collect())
}

/// The newest queue record in `stored`.
fn last_record(stored: &[(String, PointBatch)]) -> u64 {
    stored.iter().map(|(_, b)| b.sequence).max().unwrap_or(0)
}

/// Writes the boiler's setpoint through the ingestor and waits for the write's audit and a
/// poll reading the new value in the stream.
async fn write_setpoint(nats_url: &str, namespace: &str, diag: &Diagnostics) {
    let write = NatsWrite {
        url: nats_url.to_owned(),
        subject: format!("tagstream-write.{namespace}.{SITE}.boiler.setpoint"),
        asked: tagstream_ingestor::write_cmd::Asked::Tag {
            value: tagstream_core::point::PointValue::Double(72.5),
            expected: None,
        },
        request_id: format!("e2e-{namespace}"),
        requested_by: "tagstream-e2e".to_owned(),
        credentials_file: None,
        timeout: Duration::from_secs(15),
    };
    let reply = diag
        .wait_for("the ingestor to answer a write", SHORT, || async {
            // Repeating the request id is safe: a repeat is answered, not written again.
            write_cmd::write_via_nats(&write)
                .await
                .map(Some)
                .map_err(|e| format!("{e:#}"))
        })
        .await;
    assert_eq!(reply.outcome, WriteOutcome::Written as i32, "{reply:?}");
    let read_back = reply.read_back.and_then(|v| v.kind);
    assert_eq!(read_back, Some(tagstream_proto::v1::value::Kind::DoubleValue(72.5)));
    diag.wait_for(
        "the write's audit and the written value in the stream",
        SHORT,
        || async {
            let stored = our_batches(nats_url, namespace).await?;
            let audited = stored.iter().any(|(_, b)| {
                b.source_kind == SourceKind::Write as i32
                    && b.write.as_ref().is_some_and(|w| w.request_id == write.request_id)
            });
            let polled = stored.iter().any(|(_, b)| {
                b.source_kind == SourceKind::Device as i32
                    && b.points
                        .iter()
                        .any(|p| p.tag == "setpoint" && p.value == Some(Value::DoubleValue(72.5)))
            });
            Ok((audited && polled).then_some(()))
        },
    )
    .await;
}

/// Deletes the ingestor pod while points flow and waits for its successor.
async fn restart_ingestor(client: &Client, namespace: &str, diag: &Diagnostics) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let ingestor_pod = format!("tagstream-{SITE}-0");
    let old = pods.get(&ingestor_pod).await.unwrap().uid();
    pods.delete(&ingestor_pod, &DeleteParams::default()).await.unwrap();
    diag.wait_for("the ingestor pod to be replaced and ready", LONG, || {
        pod_ready(&pods, &ingestor_pod, old.as_deref())
    })
    .await;
}

/// Restarts the NATS pod while points flow and checks that what the ingestor queued
/// meanwhile arrived: the outage must be seen in the ingestor's `/status` (records
/// queued), the new NATS pod must be Ready, points stamped after it turned Ready must be
/// in the stream, the queue must be empty again, and the stream must hold at least the
/// records queued at the outage's peak after the last one it held before.
async fn restart_broker(client: &Client, namespace: &str, nats_namespace: &str, nats_url: &str, diag: &Diagnostics) {
    let settled = || async {
        let report = ingestor_report(client, namespace).await?;
        Ok((report.publisher.connected && report.queue.records == 0).then_some(report))
    };
    let before = diag
        .wait_for("the ingestor to be caught up before the outage", LONG, settled)
        .await;
    let last_before = last_record(&our_batches(nats_url, namespace).await.expect("the stream is readable"));

    let nats_pods: Api<Pod> = Api::namespaced(client.clone(), nats_namespace);
    let nats_pod = env("TAGSTREAM_E2E_NATS_POD", "nats-0");
    let old = nats_pods.get(&nats_pod).await.unwrap().uid();
    nats_pods.delete(&nats_pod, &DeleteParams::default()).await.unwrap();
    let peak_queued = std::cell::Cell::new(0u64);
    let (_, ready_since) = diag
        .wait_for(
            "the new NATS pod to be ready (sampling the ingestor's queue)",
            LONG,
            || async {
                if let Ok(report) = ingestor_report(client, namespace).await {
                    peak_queued.set(peak_queued.get().max(report.queue.records));
                }
                pod_ready(&nats_pods, &nats_pod, old.as_deref()).await
            },
        )
        .await;
    let peak_queued = peak_queued.get();
    assert!(
        peak_queued > 0,
        "the ingestor's /status never showed a queued record while NATS was away: the outage was not exercised"
    );
    println!("e2e: up to {peak_queued} records queued during the NATS restart");

    diag.wait_for("points stamped after the new NATS pod turned ready", LONG, || async {
        let stored = our_batches(nats_url, namespace).await?;
        Ok(stored
            .iter()
            .any(|(_, b)| b.points.iter().any(|p| p.timestamp_ns > ready_since))
            .then_some(()))
    })
    .await;
    let after = diag
        .wait_for("the ingestor to publish its backlog", LONG, settled)
        .await;
    let acked = after.publisher.acked_records - before.publisher.acked_records;
    let stored = our_batches(nats_url, namespace).await.expect("the stream is readable");
    let arrived: std::collections::BTreeSet<u64> = stored
        .iter()
        .map(|(_, b)| b.sequence)
        .filter(|sequence| *sequence > last_before)
        .collect();
    assert!(
        acked >= peak_queued && arrived.len() as u64 >= peak_queued,
        "queued at the peak: {peak_queued}; acked since: {acked}; in the stream since: {}",
        arrived.len()
    );
    println!(
        "e2e: {peak_queued} records queued at the peak; {acked} acked and {} in the stream since the outage began",
        arrived.len()
    );
}

/// Deletes the Site: its workload goes (owner references), its queue's claim stays.
async fn delete_site_and_keep_its_claim(client: &Client, namespace: &str, diag: &Diagnostics) {
    println!("e2e: deleting the Site");
    let sites: Api<Site> = Api::namespaced(client.clone(), namespace);
    sites.delete(SITE, &DeleteParams::default()).await.unwrap();
    let name = format!("tagstream-{SITE}");
    diag.wait_for(
        "the Site's StatefulSet, ConfigMap and Service to be removed",
        SHORT,
        || async {
            let left = [
                Api::<StatefulSet>::namespaced(client.clone(), namespace)
                    .get_opt(&name)
                    .await
                    .map(|o| o.is_some()),
                Api::<ConfigMap>::namespaced(client.clone(), namespace)
                    .get_opt(&name)
                    .await
                    .map(|o| o.is_some()),
                Api::<Service>::namespaced(client.clone(), namespace)
                    .get_opt(&name)
                    .await
                    .map(|o| o.is_some()),
            ];
            let left: Vec<bool> = left.into_iter().collect::<Result<_, _>>().map_err(|e| e.to_string())?;
            Ok(left.iter().all(|present| !present).then_some(()))
        },
    )
    .await;
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .get_opt(&format!("queue-{name}-0"))
        .await
        .unwrap();
    assert!(
        claim.is_some_and(|c| c.metadata.deletion_timestamp.is_none()),
        "the queue's claim must outlive the Site"
    );
    println!("e2e: workload removed, queue claim kept");
}

#[tokio::test]
async fn the_example_plant_survives_an_ingestor_kill_and_a_broker_restart() {
    let Some(client) = configured_client().await else {
        // Straight to stderr, past the test harness's capture, so the skip is always seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED e2e: no cluster configured (KUBECONFIG, ~/.kube/config or in-cluster); e2e/run.sh makes one with kind"
        );
        return;
    };
    // A fresh namespace per run: the stream keeps earlier runs' points, and the audit
    // covers one queue (one namespace and site).
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let namespace = env("TAGSTREAM_E2E_NAMESPACE", &format!("tagstream-e2e-{started}"));
    let nats_namespace = env("TAGSTREAM_E2E_NATS_NAMESPACE", "nats");
    let operator_namespace = env("TAGSTREAM_E2E_OPERATOR_NAMESPACE", "tagstream");
    let diag = Diagnostics {
        client: client.clone(),
        namespaces: vec![namespace.clone(), operator_namespace.clone(), nats_namespace.clone()],
    };
    println!("e2e: applying the simulator and the example plant to namespace {namespace}");
    let (devices, formulas) = apply_plant(&client, &namespace).await;
    diag.wait_for("every Device to report Connected", LONG, || {
        every_device_connected(&client, &namespace)
    })
    .await;

    let nats = port_forward(
        client.clone(),
        &nats_namespace,
        &env(
            "TAGSTREAM_E2E_NATS_SELECTOR",
            "app.kubernetes.io/name=nats,app.kubernetes.io/component=nats",
        ),
        4222,
    )
    .await
    .unwrap();
    let nats_url = format!("nats://{nats}");
    println!("e2e: reading JetStream through a port-forward at {nats_url}");
    let first = diag
        .wait_for("points of every device and formula in the stream", SHORT, || async {
            let stored = our_batches(&nats_url, &namespace).await?;
            let sources: std::collections::BTreeSet<&str> = stored.iter().map(|(_, b)| b.source.as_str()).collect();
            Ok((sources.len() == devices.len() + formulas.len()).then_some(stored))
        })
        .await;
    let batches: Vec<&PointBatch> = first.iter().map(|(_, b)| b).collect();
    check_values(&batches, &devices, &formulas);
    println!(
        "e2e: {} batches, raw and derived values inside their simulated ranges",
        first.len()
    );

    println!("e2e: writing the boiler's setpoint through the ingestor");
    write_setpoint(&nats_url, &namespace, &diag).await;

    println!("e2e: deleting the ingestor pod while points flow");
    restart_ingestor(&client, &namespace, &diag).await;
    println!("e2e: restarting the NATS pod while points flow");
    restart_broker(&client, &namespace, &nats_namespace, &nats_url, &diag).await;

    let after = our_batches(&nats_url, &namespace)
        .await
        .expect("the stream is readable after the restarts");
    assert!(after.len() > first.len(), "nothing published after the restarts");
    assert_exactly_once_in_order(&after, 0);
    let batches: Vec<&PointBatch> = after.iter().map(|(_, b)| b).collect();
    check_values(&batches, &devices, &formulas);
    println!(
        "e2e: {} batches, every queue record exactly once and in order",
        after.len()
    );

    delete_site_and_keep_its_claim(&client, &namespace, &diag).await;

    if std::env::var_os("TAGSTREAM_E2E_KEEP").is_none() {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let _ = namespaces.delete(&namespace, &DeleteParams::default()).await;
    }
}
