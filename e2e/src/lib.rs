//! Helpers of the end-to-end suite: finding the cluster, waiting with a deadline while
//! saying what for, dumping what a user would look at when a wait fails, and reaching
//! NATS inside the cluster through the API server.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, LogParams},
};
use tokio::net::TcpListener;

/// The cluster of `KUBECONFIG`, `~/.kube/config` or the pod's service account; `None`
/// when none is configured. A configured cluster that cannot be reached is an error,
/// not a skip.
pub async fn configured_client() -> Option<Client> {
    let home_config = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"));
    let configured = std::env::var_os("KUBECONFIG").is_some()
        || home_config.is_some_and(|p| p.exists())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if !configured {
        return None;
    }
    let client = Client::try_default()
        .await
        .expect("a cluster is configured but no client could be built from it");
    client
        .apiserver_version()
        .await
        .expect("a cluster is configured but its API server does not answer");
    Some(client)
}

/// What to show when a step fails: events, pod states and logs of some namespaces.
#[derive(Clone)]
pub struct Diagnostics {
    pub client: Client,
    pub namespaces: Vec<String>,
}

impl std::fmt::Debug for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diagnostics")
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

impl Diagnostics {
    /// Prints events, a `kubectl describe`-like summary and the last log lines of every
    /// pod in the namespaces.
    pub async fn dump(&self) {
        for namespace in &self.namespaces {
            eprintln!("==== namespace {namespace}: events");
            let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
            match events.list(&ListParams::default()).await {
                Ok(list) => {
                    for event in list.items.iter().rev().take(60).rev() {
                        eprintln!(
                            "  {} {} {}/{}: {}",
                            event.type_.as_deref().unwrap_or_default(),
                            event.reason.as_deref().unwrap_or_default(),
                            event.involved_object.kind.as_deref().unwrap_or_default(),
                            event.involved_object.name.as_deref().unwrap_or_default(),
                            event.message.as_deref().unwrap_or_default()
                        );
                    }
                }
                Err(error) => eprintln!("  cannot list events: {error}"),
            }
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let Ok(list) = pods.list(&ListParams::default()).await else {
                continue;
            };
            for pod in list.items {
                let name = pod.name_any();
                eprintln!("==== pod {namespace}/{name}");
                if let Some(status) = &pod.status {
                    eprintln!("{}", serde_yaml::to_string(status).unwrap_or_default());
                }
                let tail = LogParams {
                    tail_lines: Some(80),
                    ..LogParams::default()
                };
                match pods.logs(&name, &tail).await {
                    Ok(logs) => eprintln!("---- logs\n{logs}"),
                    Err(error) => eprintln!("---- no logs: {error}"),
                }
            }
        }
    }

    /// Waits for `check` to give a value, asking every second, for at most `limit`;
    /// prints what it waits for, and on timeout dumps the diagnostics and panics.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, limit: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, String>>,
    {
        println!("e2e: waiting up to {limit:?} for {what}");
        let started = tokio::time::Instant::now();
        let mut last = String::from("not checked yet");
        while started.elapsed() < limit {
            match check().await {
                Ok(Some(value)) => {
                    println!("e2e: {what}: done after {:.0?}", started.elapsed());
                    return value;
                }
                Ok(None) => last = "not yet".into(),
                Err(why) => last = why,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.dump().await;
        panic!("timed out after {limit:?} waiting for {what}; last: {last}");
    }
}

/// A loopback address that reaches port `port` of the first running pod matching
/// `selector` in `namespace`, through the API server's port-forward. Each new TCP
/// connection looks the pod up again, so a client reconnecting after the pod was
/// replaced reaches the new one.
pub async fn port_forward(client: Client, namespace: &str, selector: &str, port: u16) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let selector = selector.to_owned();
    tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            let pods = pods.clone();
            let selector = selector.clone();
            tokio::spawn(async move {
                let Some(pod) = running_pod(&pods, &selector).await else {
                    return;
                };
                let Ok(mut forwarder) = pods.portforward(&pod, &[port]).await else {
                    return;
                };
                if let Some(mut remote) = forwarder.take_stream(port) {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
            });
        }
    });
    Ok(address)
}

async fn running_pod(pods: &Api<Pod>, selector: &str) -> Option<String> {
    let list = pods.list(&ListParams::default().labels(selector)).await.ok()?;
    list.items
        .into_iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| p.name_any())
}
