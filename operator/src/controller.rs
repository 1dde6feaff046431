//! Wiring: the watches, the controller on Site, and the status loop.
//!
//! - Sites go through a generation predicate: a status write never re-renders a site.
//! - Devices and Formulas go through [`Membership`], which maps each spec change to the
//!   sites it touches (both of them when one moves) and skips status writes; the same
//!   stream creates a missing Site.
//! - The rendered objects are owned (the StatefulSet by generation, not by its status): one
//!   deleted or changed behind the operator's back is put back.

use std::{fmt::Debug, sync::Arc};

use futures::{Stream, StreamExt, future::ready, stream};
use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::ConfigMap, core::v1::Service};
use kube::{
    Api, Client,
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
    context::{Context, Stores},
    membership::{Membership, SiteMember},
    metrics::Metrics,
    reconcile::{error_policy, reconcile},
    render::Settings,
    site_creation::create_missing_site,
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
}

/// The label every rendered object carries, to watch only those.
const MANAGED: &str = "app.kubernetes.io/managed-by=tagstream-operator";

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
    ));

    let site_events = watcher(Api::<Site>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(site_writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let member_triggers = stream::select(
        member_triggers(Api::<Device>::all(client.clone()), device_writer, Arc::clone(&ctx)),
        member_triggers(Api::<Formula>::all(client.clone()), formula_writer, Arc::clone(&ctx)),
    );
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
                Err(error) => tracing::debug!(%error, "reconcile error"),
            }
            ready(())
        });
    let status = StatusLoop::new(Arc::clone(&ctx), settings.status).run(shutdown);
    tokio::join!(controller, status);
    ctx
}

/// The sites to reconcile for a Device or Formula watch; creates missing Sites on the way.
fn member_triggers<K>(api: Api<K>, writer: Writer<K>, ctx: Arc<Context>) -> impl Stream<Item = ObjectRef<Site>> + Send
where
    K: SiteMember + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut membership = Membership::default();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .filter_map(|event| {
            ready(
                event
                    .inspect_err(|error| tracing::warn!(%error, kind = %K::kind(&()), "watch failed; retrying"))
                    .ok(),
            )
        })
        .then(move |event| {
            let ctx = Arc::clone(&ctx);
            async move {
                if let watcher::Event::Apply(member) | watcher::Event::InitApply(member) = &event
                    && let Err(error) = create_missing_site(&ctx, member).await
                {
                    tracing::warn!(%error, member = ?ObjectRef::from(member), "cannot create the missing Site");
                }
                event
            }
        })
        .flat_map(move |event| stream::iter(membership.observe(&event)))
}
