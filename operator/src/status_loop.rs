//! The status loop: every period, read each site's ingestor report and write what changed
//! into the Site's and its Devices' status. Status writes keep the generation, so they
//! never trigger a reconcile of the spec.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    ResourceExt,
    runtime::{events::EventType, reflector::ObjectRef},
};
use serde_json::Value;
use tagstream_crds::{
    Site,
    condition_types::{CONNECTED, READY},
};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    membership::site_of,
    reconcile::write_status,
    report::ReportSource,
    status::{
        Reached, device_report_patch, formula_report_patch, site_report_patch, siteless_device_patch, turns_false,
    },
};

/// How the status loop runs.
#[derive(Clone, Debug)]
pub struct StatusSettings {
    pub source: ReportSource,
    /// How often every ingestor is asked.
    pub period: Duration,
    /// How long a report may wait for its ingestor.
    pub timeout: Duration,
    /// Figures that only moved (counters, queue depth) are written at most this often.
    pub heartbeat: Duration,
    /// Sites whose ingestors are asked at the same time.
    pub concurrency: usize,
}

/// The status loop's memory of its last write to an object.
#[derive(Debug)]
struct Written {
    at: Instant,
    /// The store's `resourceVersion` when the write was computed.
    from_version: Option<String>,
    /// The object as the API server returned it.
    object: Value,
}

/// The status loop's memory: its last write to each object. While the watch has not yet
/// delivered that write (the store still holds the version the write was computed
/// from), the written object stands in for the stored one; without this a slow watch
/// makes every period write the same status again.
#[derive(Debug)]
pub struct StatusLoop {
    ctx: Arc<Context>,
    settings: StatusSettings,
    written: HashMap<(String, Option<String>, String), Written>,
}

impl StatusLoop {
    pub fn new(ctx: Arc<Context>, settings: StatusSettings) -> Self {
        Self {
            ctx,
            settings,
            written: HashMap::new(),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.settings.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => self.pass().await,
            }
        }
    }

    /// One pass over every site.
    pub async fn pass(&mut self) {
        let sites = self.ctx.sites.state();
        let source = &self.settings.source;
        let timeout = self.settings.timeout;
        let reports: Vec<_> = futures::stream::iter(sites)
            .map(|site| async move {
                let namespace = site.namespace().unwrap_or_default();
                let report = source.fetch(&namespace, &site.name_any(), timeout).await;
                (site, report)
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        self.mark_siteless_devices().await;
        for (site, report) in reports {
            let reached = match &report {
                Ok(report) => Ok(report),
                Err(error) => {
                    self.ctx.metrics.report_failures.inc();
                    tracing::debug!(site = %site.name_any(), %error, "no report from the ingestor");
                    Err(error.to_string())
                }
            };
            let reached: Reached<'_> = reached.as_ref().map_err(String::as_str).copied();
            if let Err(error) = self.write_site(&site, reached).await {
                tracing::warn!(site = %site.name_any(), %error, "cannot write status");
            }
        }
    }

    /// Devices whose Site does not exist are not polled by anything: say so in their
    /// status instead of leaving the last report standing.
    async fn mark_siteless_devices(&mut self) {
        let now = Timestamp::now();
        let mut siteless: Vec<_> = self
            .ctx
            .devices
            .state()
            .into_iter()
            .filter(|d| self.ctx.sites.get(&site_of(&**d)).is_none())
            .collect();
        siteless.sort_by_key(|d| (d.namespace(), d.name_any()));
        for stored in siteless {
            let device = self.current(&*stored);
            if let Some(patch) = siteless_device_patch(&device, now)
                && let Err(error) = self.write(&*stored, &patch).await
            {
                tracing::warn!(device = %stored.name_any(), %error, "cannot write status");
            }
        }
    }

    async fn write_site(&mut self, stored_site: &Site, report: Reached<'_>) -> Result<(), crate::reconcile::Error> {
        let now = Timestamp::now();
        let (devices, formulas) = self.ctx.members(stored_site);
        for stored in formulas.iter().map(Arc::as_ref) {
            let formula = self.current(stored);
            let due = self.heartbeat_due(stored);
            if let Some(patch) = formula_report_patch(&formula, report, due) {
                self.write(stored, &patch).await?;
            }
        }
        for stored in devices.iter().map(Arc::as_ref) {
            let device = self.current(stored);
            let due = self.heartbeat_due(stored);
            if let Some(patch) = device_report_patch(&device, report, now, due) {
                self.write(stored, &patch).await?;
                let before = device
                    .status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default();
                if turns_false(before, &patch, CONNECTED) {
                    let why = patch["status"]["lastError"].as_str().unwrap_or_default();
                    let note = format!("the last poll failed: {why}");
                    self.ctx
                        .event(&device, EventType::Warning, "DeviceUnreachable", note)
                        .await;
                }
            }
        }
        let site = &self.current(stored_site);
        let due = self.heartbeat_due(stored_site);
        if let Some(patch) = site_report_patch(site, report, now, due) {
            self.write(stored_site, &patch).await?;
            let before = site
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            if turns_false(before, &patch, READY) {
                let why = report.err().unwrap_or_default();
                self.ctx
                    .event(site, EventType::Warning, "IngestorNotReady", why.to_owned())
                    .await;
            }
        }
        Ok(())
    }

    fn heartbeat_due<K: kube::Resource<DynamicType = ()>>(&self, object: &K) -> bool {
        self.written
            .get(&key(object))
            .is_none_or(|w| w.at.elapsed() >= self.settings.heartbeat)
    }

    /// The object as last known: the stored one, or the loop's own newer write of it.
    fn current<K>(&self, stored: &K) -> K
    where
        K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone,
    {
        self.written
            .get(&key(stored))
            .filter(|w| w.from_version == stored.meta().resource_version)
            .and_then(|w| serde_json::from_value(w.object.clone()).ok())
            .unwrap_or_else(|| stored.clone())
    }

    /// Writes `patch` to the status of `stored` (the store's version of the object).
    async fn write<K>(&mut self, stored: &K, patch: &Value) -> Result<(), crate::reconcile::Error>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + serde::de::DeserializeOwned
            + serde::Serialize
            + Clone
            + std::fmt::Debug,
    {
        let written = write_status(&self.ctx, stored, patch).await?;
        self.written.insert(
            key(stored),
            Written {
                at: Instant::now(),
                from_version: stored.meta().resource_version.clone(),
                object: serde_json::to_value(&written).unwrap_or_default(),
            },
        );
        Ok(())
    }
}

fn key<K: kube::Resource<DynamicType = ()>>(object: &K) -> (String, Option<String>, String) {
    let reference = ObjectRef::from(object);
    (K::kind(&()).into_owned(), reference.namespace, reference.name)
}
