//! Wiring: the watches, the controller on Site, Site creation and the status loop.
//!
//! The invariant that matters most: **a site is never rendered from a member list the
//! operator has not finished reading.** Its ConfigMap is what the site's ingestor polls;
//! one rendered from a half-filled store would stop the devices it left out. A real API
//! server lists in pages, and kube-runtime's stores take a list's objects only when the
//! whole list has arrived, so:
//! - Devices and Formulas are watched in their own tasks, and a watch event triggers its
//!   sites only after the store holds it: at once for a change, and at the end of a
//!   (re)list for the listed objects (see [`Membership`]).
//! - Sites are watched only once the Device and Formula stores are ready; the controller
//!   runs no reconcile before the Site store is ready, hence none before all three are.
//! - Sites go through a generation predicate: a status write never re-renders a site.
//! - The rendered objects are owned (the StatefulSet by generation, not by its status): one
//!   deleted or changed behind the operator's back is put back.
//! - A member naming a missing Site is queued for [`site_creation`], off the watch stream,
//!   so no watch waits on an API call.

use std::{fmt::Debug, sync::Arc};

use futures::{
    StreamExt, TryStreamExt,
    channel::mpsc::{UnboundedSender, unbounded},
    future::ready,
    stream,
};
use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::ConfigMap, core::v1::Service};
use kube::{
    Api, Client, Resource,
    runtime::{
        Controller, PredicateConfig, WatchStreamExt, controller, predicates,
        reflector::{self, ObjectRef, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tagstream_crds::{Device, Formula, Site, SiteSpec};
use tokio_util::sync::CancellationToken;

use crate::{
    context::{Context, Signal, Stores},
    membership::{Membership, SiteMember},
    metrics::Metrics,
    reconcile::{error_policy, reconcile},
    render::Settings,
    site_creation::{Candidate, SiteCreation},
    status_loop::{StatusLoop, StatusSettings},
};

/// Everything the operator needs to run.
#[derive(Clone, Debug)]
pub struct OperatorSettings {
    pub render: Settings,
    pub default_site: SiteSpec,
    pub status: StatusSettings,
    /// This replica's name, for events.
    pub instance: Option<String>,
    /// Sites reconciled at the same time.
    pub concurrency: u16,
    /// How long the objects of one `kubectl apply` may take to arrive: a Site named by a
    /// member must stay missing that long before the operator creates it (the user's own
    /// Site, later in the same apply, wins), and a new Formula's missing input is reported
    /// only after it.
    pub apply_window: std::time::Duration,
}

/// The label every rendered object carries, to watch only those.
const MANAGED: &str = "app.kubernetes.io/managed-by=tagstream-operator";

/// The annotation `kubectl apply` keeps a whole copy of the object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Runs the controller and the status loop until `shutdown`; returns the context so that
/// callers (tests, benches) can read its metrics.
pub async fn run(
    client: Client,
    settings: OperatorSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Arc<Context> {
    let (sites, site_writer) = reflector::store();
    let (devices, device_writer) = reflector::store();
    let (formulas, formula_writer) = reflector::store();
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.render.clone(),
        settings.default_site.clone(),
        Stores {
            sites: sites.clone(),
            devices,
            formulas,
        },
        settings.instance.clone(),
        metrics,
        settings.apply_window,
    ));

    let (triggers, member_triggers) = unbounded();
    ctx.retrigger_deferred_statuses_through(triggers.clone());
    let (candidates, missing_sites) = unbounded();
    let device_watch = tokio::spawn(watch_members(
        Api::<Device>::all(client.clone()),
        device_writer,
        ctx.listed.devices.clone(),
        triggers.clone(),
        candidates.clone(),
        shutdown.clone(),
    ));
    let formula_watch = tokio::spawn(watch_members(
        Api::<Formula>::all(client.clone()),
        formula_writer,
        ctx.listed.formulas.clone(),
        triggers,
        candidates,
        shutdown.clone(),
    ));
    let site_creation = tokio::spawn(SiteCreation::new(Arc::clone(&ctx)).run(missing_sites, shutdown.clone()));

    let members_listed = {
        let ctx = Arc::clone(&ctx);
        async move {
            ctx.listed.members().await;
            tracing::info!(
                devices = ctx.devices.state().len(),
                formulas = ctx.formulas.state().len(),
                "listed every Device and Formula; watching Sites"
            );
        }
    };
    let site_api = Api::<Site>::all(client.clone());
    let sites_listed = ctx.listed.sites.clone();
    let site_events = stream::once(async move {
        members_listed.await;
        watcher(site_api, watcher::Config::default())
            .default_backoff()
            .modify(slim)
            .reflect(site_writer)
            .inspect_ok(move |event| mark_listed(event, &sites_listed))
            .applied_objects()
            .predicate_filter(predicates::generation, PredicateConfig::default())
    })
    .flatten();
    let owned = watcher::Config::default().labels(MANAGED);
    let stateful_sets = watcher(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());

    let controller = Controller::for_stream(site_events, sites)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned)
        .owns_stream(stateful_sets)
        .reconcile_on(member_triggers)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|result| {
            match result {
                Ok((site, _)) => tracing::debug!(site = %site.name, "reconciled"),
                // A trigger for a Site not (yet) in the store: its own watch event follows.
                Err(controller::Error::ObjectNotFound(site)) => tracing::debug!(site = %site.name, "no such site"),
                // Logged with its site by the error policy.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(error) => tracing::warn!(%error, "watch failed; retrying"),
            }
            ready(())
        });
    let status = StatusLoop::new(Arc::clone(&ctx), settings.status).run(shutdown);
    tokio::join!(controller, status);
    for task in [device_watch, formula_watch, site_creation] {
        let _ = task.await;
    }
    ctx
}

/// Keeps in the stores only what the operator reads: `managedFields` and kubectl's
/// last-applied copy of the object are most of a stored object's size and never read.
pub fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

/// Sets `listed` once the store behind the watch holds a complete list (the reflector has
/// applied the event by the time it is passed on).
fn mark_listed<K>(event: &watcher::Event<K>, listed: &Signal) {
    if matches!(event, watcher::Event::InitDone) {
        listed.set();
    }
}

/// Watches one kind of member into its store until `shutdown`; sets `listed` after the
/// first complete list; sends the sites each change touches to `triggers` once the store
/// holds the change, and members that may name a missing Site to `candidates`.
async fn watch_members<K>(
    api: Api<K>,
    writer: Writer<K>,
    listed: Signal,
    triggers: UnboundedSender<ObjectRef<Site>>,
    candidates: UnboundedSender<Candidate>,
    shutdown: CancellationToken,
) where
    K: SiteMember + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut membership = Membership::default();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .filter_map(|event| {
            ready(
                event
                    .inspect_err(|error| tracing::warn!(%error, kind = %K::kind(&()), "watch failed; retrying"))
                    .ok(),
            )
        })
        .map(move |event| {
            mark_listed(&event, &listed);
            if let watcher::Event::Apply(member) | watcher::Event::InitApply(member) = &event
                && let Some(candidate) = Candidate::of(member)
            {
                let _ = candidates.unbounded_send(candidate);
            }
            for site in membership.observe(&event) {
                let _ = triggers.unbounded_send(site);
            }
        })
        .take_until(shutdown.cancelled_owned())
        .for_each(|()| ready(()))
        .await;
}
