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
use tagstream_crds::{
    Device, Site,
    condition_types::{BROKER_DURABLE, CONNECTED, QUEUE_HEALTHY, READY},
};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context,
    membership::site_of,
    reconcile::write_status,
    report::ReportSource,
    status::{
        BROKER_LOST_RECORDS, BROKER_MISCONFIGURED, DISK_FULL, DeviceReported, FieldManager, QUEUE_WRITE_FAILING,
        Reached, condition_status, device_reported, formula_reported, new_reason, site_reported, siteless_device,
        turns, turns_false,
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
}

type Key = (String, Option<String>, String);

/// The status loop: asks every site's ingestor for its report and writes what changed to
/// the statuses of the Site, its Devices and its Formulas.
///
/// An object whose last write the watch has not delivered yet (the store still holds the
/// version the write was computed from) is left alone until it has: a patch computed from
/// the stale status would repeat the write or undo a transition. Only the version and the
/// time of each write are kept (for the heartbeat), not the written object: copies of
/// 10,000 written statuses were a third of the operator's heap.
#[derive(Debug)]
pub struct StatusLoop {
    ctx: Arc<Context>,
    settings: StatusSettings,
    written: HashMap<Key, Written>,
}

impl StatusLoop {
    pub fn new(ctx: Arc<Context>, settings: StatusSettings) -> Self {
        Self {
            ctx,
            settings,
            written: HashMap::new(),
        }
    }

    /// Runs until `shutdown`, from the moment every store is complete: a pass over a store
    /// still being listed would call every Device siteless.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = self.ctx.listed.all() => {}
        }
        let mut ticks = tokio::time::interval(self.settings.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A pass is cut short at shutdown: its writes are idempotent, and at plant scale
        // one pass can take longer than a pod's termination grace period.
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = async {
                    ticks.tick().await;
                    self.pass().await;
                } => {}
            }
        }
    }

    /// One pass over every site.
    pub async fn pass(&mut self) {
        // An entry older than the heartbeat says nothing a missing one would not.
        let heartbeat = self.settings.heartbeat;
        self.written.retain(|_, w| w.at.elapsed() < heartbeat);
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
                    Err(error.condition_message())
                }
            };
            let reached: Reached<'_> = reached.as_ref().map_err(String::as_str).copied();
            self.write_site(&site, reached).await;
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
        let writes = siteless
            .into_iter()
            .filter(|d| !self.awaiting_watch(&**d))
            .filter_map(|d| siteless_device(&d, now).map(|status| (d, status)))
            .collect();
        self.write_all(writes).await;
    }

    /// Writes what `report` says into the site's Formulas, Devices and Site; an object
    /// whose write fails is logged and counted, and the others are still written.
    async fn write_site(&mut self, site: &Arc<Site>, report: Reached<'_>) {
        let now = Timestamp::now();
        let (devices, formulas) = self.ctx.members(site);
        let formula_writes = formulas
            .into_iter()
            .filter(|f| !self.awaiting_watch(&**f))
            .filter_map(|f| formula_reported(&f, report, self.heartbeat_due(&*f)).map(|status| (f, status)))
            .collect();
        self.write_all(formula_writes).await;
        let device_writes = devices
            .into_iter()
            .filter(|d| !self.awaiting_watch(&**d))
            .filter_map(|d| device_reported(&d, report, now, self.heartbeat_due(&*d)).map(|status| (d, status)))
            .collect();
        for (device, status) in self.write_all(device_writes).await {
            let device = &*device;
            let before = device
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            if turns_false(before, &status.conditions, CONNECTED) {
                let why = status.last_error.as_deref().unwrap_or_default();
                let note = format!("the last poll failed: {why}");
                self.ctx
                    .event(device, EventType::Warning, "DeviceUnreachable", note)
                    .await;
            }
            if let Some(skipped) = keeps_skipping(device, &status) {
                let note = format!(
                    "{skipped} poll cycles skipped since the last status: polling takes longer than pollInterval {}",
                    device.spec.poll_interval
                );
                self.ctx
                    .event(device, EventType::Warning, "PollCyclesSkipped", note)
                    .await;
            }
        }
        if self.awaiting_watch(&**site) {
            return;
        }
        let due = self.heartbeat_due(&**site);
        let write = site_reported(site, report, now, due).map(|status| (Arc::clone(site), status));
        if let Some((_, status)) = self.write_all(write.into_iter().collect()).await.pop() {
            let site = &**site;
            let before = site
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            // Said once per transition, never once per failed pass; an ingestor not up
            // yet after a deploy is expected and its status says so.
            let after = status.conditions.as_slice();
            if condition_status(before, READY) == Some("True") && turns_false(before, after, READY) {
                let why = report.err().unwrap_or_default();
                tracing::warn!(site = %site.name_any(), why, "the site's ingestor stopped answering");
                self.ctx
                    .event(site, EventType::Warning, "IngestorNotReady", why.to_owned())
                    .await;
            } else if turns(before, after, READY, "True") {
                tracing::info!(site = %site.name_any(), "the site's ingestor answers");
            }
            let warnings = [
                new_reason(before, after, QUEUE_HEALTHY)
                    .filter(|c| [DISK_FULL, QUEUE_WRITE_FAILING, BROKER_MISCONFIGURED].contains(&c.reason.as_str())),
                new_reason(before, after, BROKER_DURABLE).filter(|c| c.reason == BROKER_LOST_RECORDS),
            ];
            for warning in warnings.into_iter().flatten() {
                self.ctx
                    .event(site, EventType::Warning, &warning.reason, warning.message.clone())
                    .await;
            }
        }
    }

    fn heartbeat_due<K: kube::Resource<DynamicType = ()>>(&self, object: &K) -> bool {
        self.written
            .get(&key(object))
            .is_none_or(|w| w.at.elapsed() >= self.settings.heartbeat)
    }

    /// Whether the store still holds the version of `stored` that the loop's last write
    /// to it was computed from.
    fn awaiting_watch<K: kube::Resource<DynamicType = ()>>(&self, stored: &K) -> bool {
        self.written
            .get(&key(stored))
            .is_some_and(|w| w.from_version == stored.meta().resource_version)
    }

    /// Applies each status to its object, [`StatusSettings::concurrency`] at a time (the
    /// first pass after a deploy writes every Device of every site); the writes made.
    async fn write_all<K, S>(&mut self, writes: Vec<(Arc<K>, S)>) -> Vec<(Arc<K>, S)>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug
            + Send
            + Sync,
        S: serde::Serialize + Send,
    {
        let applies = writes.into_iter().map(|(stored, status)| {
            let ctx = Arc::clone(&self.ctx);
            async move {
                let written = apply_logged(&ctx, &*stored, &status).await;
                (stored, status, written)
            }
        });
        let results: Vec<_> = futures::stream::iter(applies)
            .buffered(self.settings.concurrency.max(1))
            .collect()
            .await;
        let mut written = Vec::with_capacity(results.len());
        for (stored, status, ok) in results {
            if ok {
                self.remember(&*stored);
                written.push((stored, status));
            }
        }
        written
    }

    /// Notes a write to `stored`, for the heartbeat and for [`Self::awaiting_watch`].
    fn remember<K: kube::Resource<DynamicType = ()>>(&mut self, stored: &K) {
        self.written.insert(
            key(stored),
            Written {
                at: Instant::now(),
                from_version: stored.meta().resource_version.clone(),
            },
        );
    }
}

/// Applies `status` to `stored` under the status loop's field manager; whether it was
/// written. A failure is logged and counted, naming the object.
async fn apply_logged<K>(ctx: &Context, stored: &K, status: &impl serde::Serialize) -> bool
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + serde::de::DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let Err(error) = write_status(ctx, stored, FieldManager::StatusLoop, status).await else {
        return true;
    };
    let kind = K::kind(&());
    tracing::warn!(%kind, name = %stored.name_any(), %error, "cannot write status");
    ctx.metrics.count_status_write_failure(&kind);
    false
}

fn key<K: kube::Resource<DynamicType = ()>>(object: &K) -> Key {
    let reference = ObjectRef::from(object);
    (K::kind(&()).into_owned(), reference.namespace, reference.name)
}

/// Poll cycles a device skipped since its last written status, when that many say it
/// keeps missing its interval rather than stumbled once. The counter restarts with the
/// ingestor, so a smaller number than before is no news.
const KEEPS_SKIPPING: u64 = 10;

fn keeps_skipping(device: &Device, reported: &DeviceReported) -> Option<u64> {
    let before = device.status.as_ref().map_or(0, |s| s.poll_cycles_skipped);
    (reported.poll_cycles_skipped)
        .checked_sub(before)
        .filter(|skipped| *skipped >= KEEPS_SKIPPING)
}
