//! Which Site each Device or Formula belongs to, so that a watch event re-renders exactly
//! the sites it touches.
//!
//! kube-runtime's `watches` maps an object to the sites it names *now*, which misses two
//! cases this operator must handle: a Device moved from site A to site B must re-render A
//! as well, and a status write (same generation) must not re-render anything. So the
//! watch events go through [`Membership`], which remembers each object's generation and
//! site and answers with the sites to reconcile.
//!
//! Timing matters as much as the sites: kube-runtime's store takes a list's objects only
//! at `InitDone`, so a site triggered by an `InitApply` would be rendered from a store
//! that does not hold its members yet (found on a real API server at 10,000 Devices:
//! every ConfigMap written empty, and nothing triggered again). The sites of a (re)list
//! are answered at its `InitDone`: all of them, since the list may have brought news
//! the watch missed.

use std::collections::{HashMap, HashSet};

use kube::{Resource, ResourceExt, runtime::reflector::ObjectRef, runtime::watcher::Event};
use tagstream_crds::{Device, Formula, Site};

/// A Device or Formula: something that names its site.
pub trait SiteMember: Resource<DynamicType = ()> + Clone {
    fn site(&self) -> &str;
    /// The generation the operator last wrote status for, if any.
    fn observed_generation(&self) -> Option<i64>;
}

impl SiteMember for Device {
    fn site(&self) -> &str {
        &self.spec.site
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref()?.observed_generation
    }
}

impl SiteMember for Formula {
    fn site(&self) -> &str {
        &self.spec.site
    }
    fn observed_generation(&self) -> Option<i64> {
        self.status.as_ref()?.observed_generation
    }
}

/// The Site an object names, in the object's namespace.
pub fn site_of<K: SiteMember>(object: &K) -> ObjectRef<Site> {
    let mut site = ObjectRef::new(object.site());
    if let Some(namespace) = object.namespace() {
        site = site.within(&namespace);
    }
    site
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    generation: Option<i64>,
    site: ObjectRef<Site>,
}

/// Remembers each object's generation and site across watch events.
#[derive(Debug, Default)]
pub struct Membership {
    seen: HashMap<(Option<String>, String), Seen>,
    /// Objects listed since the current re-list began (`None` outside a re-list).
    relisted: Option<HashSet<(Option<String>, String)>>,
    /// Sites of the current (re)list, answered when it is complete.
    listed_sites: Vec<ObjectRef<Site>>,
}

impl Membership {
    /// The sites a watch event changes.
    pub fn observe<K: SiteMember>(&mut self, event: &Event<K>) -> Vec<ObjectRef<Site>> {
        match event {
            Event::Init => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(key(object));
                }
                let site = site_of(object);
                let moved_from = self.applied(object).into_iter().filter(|s| *s != site);
                self.listed_sites.extend(moved_from);
                self.listed_sites.push(site);
                Vec::new()
            }
            Event::Apply(object) => self.applied(object),
            Event::Delete(object) => self.seen.remove(&key(object)).map(|s| vec![s.site]).unwrap_or_default(),
            // Objects deleted while the watch was down are missing from the re-list.
            Event::InitDone => {
                let relisted = self.relisted.take().unwrap_or_default();
                let mut sites = std::mem::take(&mut self.listed_sites);
                self.seen.retain(|key, seen| {
                    let keep = relisted.contains(key);
                    if !keep {
                        sites.push(seen.site.clone());
                    }
                    keep
                });
                dedup(sites)
            }
        }
    }

    fn applied<K: SiteMember>(&mut self, object: &K) -> Vec<ObjectRef<Site>> {
        let now = Seen {
            generation: object.meta().generation,
            site: site_of(object),
        };
        match self.seen.insert(key(object), now.clone()) {
            Some(before) if before == now => Vec::new(),
            Some(before) if before.site != now.site => vec![before.site, now.site],
            _ => vec![now.site],
        }
    }
}

fn key<K: Resource>(object: &K) -> (Option<String>, String) {
    (object.meta().namespace.clone(), object.name_any())
}

fn dedup(mut sites: Vec<ObjectRef<Site>>) -> Vec<ObjectRef<Site>> {
    let mut seen = HashSet::new();
    sites.retain(|site| seen.insert(site.clone()));
    sites
}

/// Whether the operator has not yet processed this object's current spec: such an object
/// may create its missing Site. One whose spec was processed may not, so that a Site the
/// user deleted stays deleted.
pub fn is_unprocessed<K: SiteMember>(object: &K) -> bool {
    object.observed_generation() != object.meta().generation
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagstream_crds::DeviceSpec;

    fn device(site: &str, generation: i64) -> Device {
        let spec: DeviceSpec = serde_json::from_value(serde_json::json!({
            "site": site, "connection": {"tcp": {"host": "h"}}, "tags": [],
        }))
        .unwrap();
        let mut device = Device::new("boiler", spec);
        device.metadata.namespace = Some("plant".into());
        device.metadata.generation = Some(generation);
        device
    }

    fn site(name: &str) -> ObjectRef<Site> {
        ObjectRef::new(name).within("plant")
    }

    #[test]
    fn a_status_write_touches_no_site_and_a_spec_change_its_own() {
        let mut membership = Membership::default();
        assert_eq!(membership.observe(&Event::Apply(device("a", 1))), [site("a")]);
        assert_eq!(membership.observe(&Event::Apply(device("a", 1))), []);
        assert_eq!(membership.observe(&Event::Apply(device("a", 2))), [site("a")]);
    }

    #[test]
    fn a_move_touches_both_sites_and_a_delete_the_last_one() {
        let mut membership = Membership::default();
        membership.observe(&Event::Apply(device("a", 1)));
        assert_eq!(
            membership.observe(&Event::Apply(device("b", 2))),
            [site("a"), site("b")]
        );
        assert_eq!(membership.observe(&Event::Delete(device("b", 2))), [site("b")]);
    }

    #[test]
    fn an_object_missing_from_a_relist_was_deleted() {
        let mut membership = Membership::default();
        membership.observe(&Event::Apply(device("a", 1)));
        let mut other = device("b", 1);
        other.metadata.name = Some("meter".into());
        assert_eq!(membership.observe(&Event::<Device>::Init), []);
        assert_eq!(membership.observe(&Event::InitApply(other)), []);
        assert_eq!(membership.observe(&Event::<Device>::InitDone), [site("b"), site("a")]);
    }

    /// The store holds a list's objects only from `InitDone` on: a site triggered earlier
    /// would be rendered without them.
    #[test]
    fn listed_objects_trigger_their_sites_once_the_list_is_complete() {
        let mut membership = Membership::default();
        assert_eq!(membership.observe(&Event::<Device>::Init), []);
        for (name, site_name) in [("d1", "a"), ("d2", "b"), ("d3", "a")] {
            let mut listed = device(site_name, 1);
            listed.metadata.name = Some(name.into());
            assert_eq!(membership.observe(&Event::InitApply(listed)), []);
        }
        assert_eq!(membership.observe(&Event::<Device>::InitDone), [site("a"), site("b")]);
        // A re-list reconciles every listed site again, and both ends of a move.
        membership.observe(&Event::<Device>::Init);
        for (name, site_name, generation) in [("d1", "a", 1), ("d2", "c", 2), ("d3", "a", 1)] {
            let mut listed = device(site_name, generation);
            listed.metadata.name = Some(name.into());
            membership.observe(&Event::InitApply(listed));
        }
        assert_eq!(
            membership.observe(&Event::<Device>::InitDone),
            [site("a"), site("b"), site("c")]
        );
    }
}
