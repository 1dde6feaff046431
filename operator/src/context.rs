//! What the reconciler and the status loop share: the client, the watched objects, the
//! settings, events and metrics.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::channel::mpsc::UnboundedSender;
use kube::{
    Client, Resource, ResourceExt,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use tagstream_crds::{Device, Formula, Site, SiteSpec};

use crate::{membership::SiteMember, metrics::Metrics, render::Settings};

/// The operator's shared state.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// The spec of a Site the operator creates for a Device or Formula naming a missing one.
    pub default_site: SiteSpec,
    pub sites: Store<Site>,
    pub devices: Store<Device>,
    pub formulas: Store<Formula>,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Consecutive failed reconciles per site, for the retry backoff.
    pub failures: Arc<Mutex<HashMap<ObjectRef<Site>, u32>>>,
    /// Which sites had their workload applied since start, and which left their status
    /// writes for later; see [`Context::statuses_now`].
    first_applies: Arc<Mutex<FirstApplies>>,
    /// Which stores hold a complete first list.
    pub listed: Listed,
    /// How long the objects of one `kubectl apply` may take to arrive.
    pub apply_window: Duration,
}

/// The sites applied since start, and those whose status writes wait for the rest.
#[derive(Debug, Default)]
struct FirstApplies {
    applied: HashSet<ObjectRef<Site>>,
    deferred: HashSet<ObjectRef<Site>>,
    triggers: Option<UnboundedSender<ObjectRef<Site>>>,
    all_done: bool,
}

/// Which watches have completed their first list, for every task that must not act on a
/// half-filled store. kube-runtime's `Store::wait_until_ready` cannot serve more than one
/// waiter: it polls a oneshot receiver, which keeps only the last poller's waker, so with
/// the controller, the Site watch and the status loop all waiting, all but one would wait
/// forever.
#[derive(Clone, Debug, Default)]
pub struct Listed {
    pub devices: Signal,
    pub formulas: Signal,
    pub sites: Signal,
}

impl Listed {
    /// Waits until the Device and Formula stores hold a complete list.
    pub async fn members(&self) {
        self.devices.wait().await;
        self.formulas.wait().await;
    }

    /// Waits until every store holds a complete list.
    pub async fn all(&self) {
        self.members().await;
        self.sites.wait().await;
    }
}

/// A flag that is set once and that any number of tasks can wait for.
#[derive(Clone, Debug, Default)]
pub struct Signal(Arc<tokio::sync::SetOnce<()>>);

impl Signal {
    pub fn set(&self) {
        let _ = self.0.set(());
    }

    pub async fn wait(&self) {
        self.0.wait().await;
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("default_site", &self.default_site)
            .finish_non_exhaustive()
    }
}

/// The stores the watchers fill.
#[derive(Clone, Debug)]
pub struct Stores {
    pub sites: Store<Site>,
    pub devices: Store<Device>,
    pub formulas: Store<Formula>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        default_site: SiteSpec,
        stores: Stores,
        instance: Option<String>,
        metrics: Arc<Metrics>,
        apply_window: Duration,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::apply::FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            default_site,
            sites: stores.sites,
            devices: stores.devices,
            formulas: stores.formulas,
            metrics,
            failures: Arc::default(),
            first_applies: Arc::default(),
            listed: Listed::default(),
            apply_window,
        }
    }

    /// Where a reconcile that left its status writes for later is triggered again once
    /// every site has had its workload applied (the controller's trigger channel).
    pub fn retrigger_deferred_statuses_through(&self, triggers: UnboundedSender<ObjectRef<Site>>) {
        self.first_applies.lock().expect("first_applies lock").triggers = Some(triggers);
    }

    /// Records that `site`'s workload was applied (or failed to apply), and says whether
    /// its reconcile writes its statuses now: only once every Site in the store has had
    /// its workload applied since start. At start, every ingestor gets its configuration
    /// first, and the one status write per Device and Formula follows: on a real API
    /// server those writes are most of the work (10,000 Devices and as many Formulas in
    /// 100 sites: 20,100 status writes against 300 applies), and written first they held
    /// back the last sites' `ConfigMap`s by minutes. A site told "not now" is triggered
    /// again, through the channel set by [`Self::retrigger_deferred_statuses_through`],
    /// when the last site has had its turn.
    pub fn statuses_now(&self, site: &Site) -> bool {
        let mut guard = self.first_applies.lock().expect("first_applies lock");
        let first = &mut *guard;
        if first.all_done {
            return true;
        }
        first.applied.insert(ObjectRef::from(site));
        // A Site being deleted is never applied again: it does not hold the others back.
        let all = self
            .sites
            .state()
            .iter()
            .filter(|s| s.meta().deletion_timestamp.is_none())
            .all(|s| first.applied.contains(&ObjectRef::from(&**s)));
        if all || first.triggers.is_none() {
            first.all_done = true;
            if let Some(triggers) = &first.triggers {
                for deferred in first.deferred.drain() {
                    let _ = triggers.unbounded_send(deferred);
                }
            }
            return true;
        }
        first.deferred.insert(ObjectRef::from(site));
        false
    }

    /// The Devices and Formulas that name `site`, sorted by name.
    pub fn members(&self, site: &Site) -> (Vec<Arc<Device>>, Vec<Arc<Formula>>) {
        (members_of(&self.devices, site), members_of(&self.formulas, site))
    }

    /// Publishes an event on `object`; a failure is logged, never fatal: events are a
    /// courtesy to the user, the status is the record.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, object: &K, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(fit_note(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(object = %object.name_any(), reason, %error, "cannot publish an event");
        }
    }
}

/// The longest note the API server accepts on an event (`events.k8s.io/v1`).
const MAX_EVENT_NOTE: usize = 1024;

/// `note` cut to what an event may hold: an API server error quoted whole (a refused
/// StatefulSet's spec) runs to several KiB, and the server refused the whole event.
fn fit_note(mut note: String) -> String {
    const ELLIPSIS: &str = "...";
    if note.len() > MAX_EVENT_NOTE {
        let end = (0..=MAX_EVENT_NOTE - ELLIPSIS.len())
            .rev()
            .find(|&i| note.is_char_boundary(i))
            .unwrap_or_default();
        note.truncate(end);
        note.push_str(ELLIPSIS);
    }
    note
}

fn members_of<K: SiteMember>(store: &Store<K>, site: &Site) -> Vec<Arc<K>> {
    let name = site.meta().name.as_deref().unwrap_or_default();
    let namespace = site.meta().namespace.as_deref();
    let mut members: Vec<Arc<K>> = store
        .state()
        .into_iter()
        .filter(|m| m.site() == name && m.meta().namespace.as_deref() == namespace)
        .collect();
    members.sort_by_key(|m| m.name_any());
    members
}

#[cfg(test)]
mod tests {
    use super::{MAX_EVENT_NOTE, fit_note};

    #[test]
    fn a_note_longer_than_an_event_holds_is_cut_on_a_character_boundary() {
        let short = "the last poll failed".to_owned();
        assert_eq!(fit_note(short.clone()), short);
        let long = "é".repeat(MAX_EVENT_NOTE);
        let fitted = fit_note(long);
        assert!(fitted.len() <= MAX_EVENT_NOTE, "{}", fitted.len());
        assert!(fitted.ends_with("é..."), "{fitted}");
    }
}
