//! Applying a Device alone works: when a Device or Formula names a Site that does not
//! exist, the operator creates it with the default spec from its own configuration.
//!
//! This runs in its own task, fed by the member watches: a watch never waits on an API
//! call. A Site is created only when it is still missing `--apply-window` after its
//! member appeared, and the member still names it: `kubectl apply -f dir/` sends the
//! Devices before the Site when their files sort first, and the user's own Site must win
//! over the defaults.

use std::{collections::HashMap, time::Duration};

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource, ResourceExt,
    api::PostParams,
    runtime::{events::EventType, reflector::ObjectRef, reflector::Store},
};
use tagstream_crds::{Device, Formula, Site};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    apply::FIELD_MANAGER,
    context::Context,
    controller::LAST_APPLIED,
    membership::{SiteMember, is_unprocessed, site_of},
};

/// Which store a candidate's member is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemberKind {
    Device,
    Formula,
}

/// A member that may name a missing Site, as its watch saw it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub site: ObjectRef<Site>,
    kind: MemberKind,
    name: String,
    seen: Instant,
}

impl Candidate {
    /// The candidate for `member`, or `None` when the operator already processed its
    /// current spec: a Site the user deleted is not brought back by the members left.
    pub fn of<K: SiteMember>(member: &K) -> Option<Self> {
        is_unprocessed(member).then(|| Self {
            site: site_of(member),
            kind: if K::kind(&()) == Device::kind(&()) {
                MemberKind::Device
            } else {
                MemberKind::Formula
            },
            name: member.name_any(),
            seen: Instant::now(),
        })
    }

    /// Whether the member still exists, unprocessed, naming the same site.
    fn still_wanted(&self, ctx: &Context) -> bool {
        fn names<K: SiteMember>(store: &Store<K>, candidate: &Candidate) -> bool {
            let mut reference = ObjectRef::<K>::new(&candidate.name);
            reference.namespace.clone_from(&candidate.site.namespace);
            store
                .get(&reference)
                .is_some_and(|m| is_unprocessed(&*m) && site_of(&*m) == candidate.site)
        }
        match self.kind {
            MemberKind::Device => names::<Device>(&ctx.devices, self),
            MemberKind::Formula => names::<Formula>(&ctx.formulas, self),
        }
    }
}

/// A created Site shows up in the store within a watch round trip; until then, other
/// members of the same site do not try again.
const CREATED_RECENTLY: Duration = Duration::from_secs(60);

/// The task that creates missing Sites.
#[derive(Debug)]
pub struct SiteCreation {
    ctx: std::sync::Arc<Context>,
    created: HashMap<ObjectRef<Site>, Instant>,
}

impl SiteCreation {
    pub fn new(ctx: std::sync::Arc<Context>) -> Self {
        Self {
            ctx,
            created: HashMap::new(),
        }
    }

    /// Considers each candidate the apply window after it was seen, until `shutdown`.
    pub async fn run(mut self, candidates: impl Stream<Item = Candidate> + Send, shutdown: CancellationToken) {
        // Before the first list, every Site looks missing.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = self.ctx.listed.sites.wait() => {}
        }
        let mut candidates = std::pin::pin!(candidates.take_until(shutdown.clone().cancelled_owned()));
        while let Some(candidate) = candidates.next().await {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(candidate.seen + self.ctx.apply_window) => {}
            }
            if !candidate.still_wanted(&self.ctx)
                || self
                    .created
                    .get(&candidate.site)
                    .is_some_and(|at| at.elapsed() < CREATED_RECENTLY)
            {
                continue;
            }
            match create_missing_site(&self.ctx, &candidate).await {
                Ok(Some(_)) => {
                    self.created.retain(|_, at| at.elapsed() < CREATED_RECENTLY);
                    self.created.insert(candidate.site.clone(), Instant::now());
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, site = %candidate.site, "cannot create the missing Site");
                }
            }
        }
    }
}

/// Records `site` as its own last-applied configuration, as `kubectl create --save-config`
/// does. A user who later runs `kubectl apply` with their own Site then gets kubectl's
/// three-way merge: every default the operator wrote and the user's Site leaves out is
/// removed, so the user's Site is what stays. Without it kubectl warns that the
/// annotation is missing and merges the user's Site into the defaults, keeping e.g. a
/// default credentials Secret the user never named.
fn save_config(site: &mut Site) {
    let mut applied = serde_json::to_value(&*site).expect("a Site serialises");
    if let Some(object) = applied.as_object_mut() {
        object.remove("status");
    }
    site.annotations_mut()
        .insert(LAST_APPLIED.to_owned(), format!("{applied}\n"));
}

/// Creates the Site `candidate` names when it is missing from the (complete) Site store.
/// Returns the Site created, if any.
pub async fn create_missing_site(ctx: &Context, candidate: &Candidate) -> Result<Option<Site>, kube::Error> {
    if ctx.sites.get(&candidate.site).is_some() {
        return Ok(None);
    }
    let namespace = candidate.site.namespace.clone().unwrap_or_default();
    let mut site = Site::new(&candidate.site.name, ctx.default_site.clone());
    site.metadata.namespace = Some(namespace.clone());
    save_config(&mut site);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match Api::<Site>::namespaced(ctx.client.clone(), &namespace)
        .create(&params, &site)
        .await
    {
        Ok(created) => {
            ctx.metrics.sites_created.inc();
            tracing::info!(%namespace, site = %candidate.site.name, by = %candidate.name, "created a missing Site");
            let note = format!(
                "created with the operator's default settings for {:?} {}",
                candidate.kind, candidate.name
            );
            ctx.event(&created, EventType::Normal, "SiteCreated", note).await;
            Ok(Some(created))
        }
        // Created meanwhile (by a user, or for another member before the watch saw it).
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => Ok(None),
        Err(error) => Err(error),
    }
}
