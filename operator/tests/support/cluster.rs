//! A real Kubernetes control plane as a test peer: the cluster of `TAGSTREAM_KUBECONFIG`,
//! which `scripts/control-plane.sh run <minor> -- ...` starts (etcd, kube-apiserver and
//! kube-controller-manager on loopback, no node), as controller-runtime's envtest does for
//! Go operators.
//!
//! Deliberately not `KUBECONFIG`: these tests create thousands of objects and delete
//! namespaces, and must never reach a developer's cluster by accident. Without the
//! variable they say SKIPPED: `scripts/test.sh` runs them once more through
//! `scripts/control-plane.sh` at each supported version, and fails in CI when it cannot.
//! The operator watches every namespace, so the tests of one binary take turns
//! ([`Cluster::exclusive`]) and each leaves no namespace behind.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    future::Future,
    sync::{Arc, Mutex as StdMutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::StatefulSet,
        core::v1::{ConfigMap, Namespace, Service},
        events::v1::Event,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tagstream_crds::{Device, Formula, Site};
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

/// The control plane's admin client, and which Kubernetes minor version it runs.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub minor: String,
}

impl Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("minor", &self.minor)
            .finish_non_exhaustive()
    }
}

static TURNS: Mutex<()> = Mutex::const_new(());

impl Cluster {
    /// The test control plane with the tagstream CRDs installed, or `None` (the test is
    /// skipped) when `TAGSTREAM_KUBECONFIG` names none.
    pub async fn connect() -> Option<Self> {
        // The operator's logs, shown with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,kube=warn,kube_client=warn,kube_client::client::builder=off")
            .with_test_writer()
            .try_init();
        let Some(path) = std::env::var_os("TAGSTREAM_KUBECONFIG") else {
            eprintln!("SKIPPED: no control plane (run through scripts/control-plane.sh run <minor> -- ...)");
            return None;
        };
        let kubeconfig = Kubeconfig::read_from(&path).expect("TAGSTREAM_KUBECONFIG is a kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("a client config from TAGSTREAM_KUBECONFIG");
        let client = Client::try_from(config).expect("a client for the control plane");
        let version = client.apiserver_version().await.expect("the control plane answers");
        let cluster = Self {
            client,
            minor: format!("{}.{}", version.major, version.minor.trim_end_matches('+')),
        };
        cluster.install_crds().await;
        Some(cluster)
    }

    /// One test at a time: the operator under test watches every namespace.
    pub async fn exclusive(&self) -> MutexGuard<'static, ()> {
        TURNS.lock().await
    }

    /// The CRDs as the chart installs them, applied and served.
    async fn install_crds(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for crd in tagstream_crds::crds() {
            crds.patch(
                &crd.name_any(),
                &PatchParams::apply("tagstream-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap_or_else(|e| panic!("the API server refused CRD {}: {e}", crd.name_any()));
        }
        wait_for("the CRDs to be served", Duration::from_secs(60), || async {
            let sites = Api::<Site>::all(self.client.clone());
            let devices = Api::<Device>::all(self.client.clone());
            let formulas = Api::<Formula>::all(self.client.clone());
            let one = ListParams::default().limit(1);
            (sites.list(&one).await.is_ok() && devices.list(&one).await.is_ok() && formulas.list(&one).await.is_ok())
                .then_some(())
        })
        .await;
    }

    /// A new namespace named `name`, deleted with everything in it when the returned
    /// guard is dropped, also when the test fails: the next test's operator would
    /// otherwise reconcile what this one left.
    pub async fn namespace(&self, name: &str) -> TestNamespace {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
        TestNamespace {
            name: name.to_owned(),
            client: self.client.clone(),
        }
    }

    /// Creates `objects` in `namespace`, 16 requests at a time, as a client-side
    /// `kubectl apply` would: server-assigned fields are dropped, the last-applied
    /// annotation is kept.
    pub async fn create_all<K>(&self, namespace: &str, objects: &[K])
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        stream::iter(objects.iter().cloned().map(|object| {
            let api = api.clone();
            async move {
                let object = fresh(object, namespace);
                api.create(&PostParams::default(), &object)
                    .await
                    .map_err(|e| format!("{} {}: {e}", K::kind(&()), object.name_any()))
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("the API server refused {e}"));
    }
}

/// A namespace of one test; see [`Cluster::namespace`].
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl std::ops::Deref for TestNamespace {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    /// Deletes the namespace and waits until kube-controller-manager's namespace
    /// controller has removed it and everything in it. Drop cannot await, and may run on a
    /// runtime thread, so the deletion runs on a thread of its own.
    fn drop(&mut self) {
        let (name, client) = (self.name.clone(), self.client.clone());
        let deletion = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let namespaces: Api<Namespace> = Api::all(client);
                let _ = namespaces.delete(&name, &DeleteParams::default()).await;
                let started = Instant::now();
                while namespaces.get_opt(&name).await.ok().flatten().is_some() {
                    if started.elapsed() > Duration::from_secs(300) {
                        return Err(format!("namespace {name} still there after 300 s"));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(())
            })
        });
        let outcome = deletion.join().expect("the namespace deletion thread");
        if let Err(message) = outcome
            && !std::thread::panicking()
        {
            panic!("{message}");
        }
    }
}

/// `object` as a user's manifest: in `namespace`, without what the API server assigns.
pub fn fresh<K: Resource>(mut object: K, namespace: &str) -> K {
    let meta = object.meta_mut();
    meta.namespace = Some(namespace.to_owned());
    meta.uid = None;
    meta.generation = None;
    meta.resource_version = None;
    meta.managed_fields = None;
    meta.creation_timestamp = None;
    object
}

/// Polls `check` every 100 ms until it returns `Some`, failing the test after `limit` with
/// what it was waiting for.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every version of every rendered `ConfigMap` in a namespace, as a watch delivers them:
/// how many Devices and Formulas each held.
#[derive(Clone, Default)]
pub struct Renderings(Arc<StdMutex<Vec<Rendering>>>);

/// One version of one rendered `ConfigMap`.
#[derive(Clone, Debug)]
pub struct Rendering {
    pub name: String,
    pub devices: usize,
    pub formulas: usize,
}

impl Renderings {
    /// Watches the rendered `ConfigMap`s of `namespace` from now on, until `stop`.
    pub fn watch(cluster: &Cluster, namespace: &str, stop: CancellationToken) -> Self {
        let seen = Self::default();
        let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), namespace);
        let record = seen.clone();
        let rendered = watcher::Config::default().labels("app.kubernetes.io/managed-by=tagstream-operator");
        tokio::spawn(
            watcher(api, rendered)
                .applied_objects()
                .take_until(stop.cancelled_owned())
                .try_for_each(move |map| {
                    let count = |key: &str, kind: &str| {
                        map.data
                            .as_ref()
                            .and_then(|d| d.get(key))
                            .map_or(0, |text| text.lines().filter(|l| *l == kind).count())
                    };
                    record.0.lock().unwrap().push(Rendering {
                        name: map.name_any(),
                        devices: count("devices.yaml", "kind: Device"),
                        formulas: count("formulas.yaml", "kind: Formula"),
                    });
                    futures::future::ready(Ok(()))
                }),
        );
        seen
    }

    pub fn all(&self) -> Vec<Rendering> {
        self.0.lock().unwrap().clone()
    }

    /// How many `ConfigMap`s hold `members` Devices and as many Formulas in their latest
    /// version, and how many are there.
    pub fn complete(&self, members: usize) -> (usize, usize) {
        let latest: BTreeMap<String, Rendering> = self.all().into_iter().map(|r| (r.name.clone(), r)).collect();
        let complete = latest
            .values()
            .filter(|r| r.devices == members && r.formulas == members)
            .count();
        (complete, latest.len())
    }
}

/// What the operator has written in `namespace`: the `resourceVersion` of every Site,
/// Device, Formula, ConfigMap and Service, the generation and rendered hash of every
/// StatefulSet (kube-controller-manager writes their status), and the version of every
/// event the operator reported (kube-controller-manager keeps counting its own, e.g. a
/// claim waiting for a volume). Equal snapshots mean the operator wrote nothing between.
pub async fn snapshot(cluster: &Cluster, namespace: &str) -> BTreeMap<String, String> {
    async fn versions<K>(cluster: &Cluster, namespace: &str, into: &mut BTreeMap<String, String>)
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    {
        let api: Api<K> = Api::namespaced(cluster.client.clone(), namespace);
        for object in api.list_metadata(&ListParams::default()).await.unwrap() {
            let key = format!("{} {}", K::kind(&()), object.name_any());
            let written = if K::kind(&()) == "StatefulSet" {
                let hash = object.annotations().get("tagstream.io/rendered-hash").cloned();
                format!("generation {:?}, rendered {hash:?}", object.metadata.generation)
            } else {
                object.resource_version().unwrap_or_default()
            };
            into.insert(key, written);
        }
    }
    let mut all = BTreeMap::new();
    versions::<Site>(cluster, namespace, &mut all).await;
    versions::<Device>(cluster, namespace, &mut all).await;
    versions::<Formula>(cluster, namespace, &mut all).await;
    versions::<ConfigMap>(cluster, namespace, &mut all).await;
    versions::<Service>(cluster, namespace, &mut all).await;
    versions::<StatefulSet>(cluster, namespace, &mut all).await;
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), namespace);
    for event in events.list(&ListParams::default()).await.unwrap() {
        if event.reporting_controller.as_deref() == Some("tagstream-operator") {
            all.insert(
                format!("Event {}", event.name_any()),
                event.resource_version().unwrap_or_default(),
            );
        }
    }
    all
}

/// The objects written between two snapshots (added, changed or gone), as
/// `Kind name: before -> after`.
pub fn changed(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect()
}
