//! Applying a Device alone works: when a Device or Formula names a Site that does not
//! exist, the operator creates it with the default spec from its own configuration.

use kube::{
    Api, ResourceExt,
    api::PostParams,
    runtime::{events::EventType, reflector::ObjectRef},
};
use tagstream_crds::Site;

use crate::{
    apply::FIELD_MANAGER,
    context::Context,
    membership::{SiteMember, is_unprocessed, site_of},
};

/// Creates the Site `member` names when it is missing. Only for a member whose current
/// spec the operator has not processed yet, so that a Site the user deleted is not brought
/// back by the Devices left behind. Returns the Site created, if any.
pub async fn create_missing_site<K: SiteMember>(ctx: &Context, member: &K) -> Result<Option<Site>, kube::Error> {
    if !is_unprocessed(member) {
        return Ok(None);
    }
    let site_ref: ObjectRef<Site> = site_of(member);
    // Before the first list, every Site looks missing.
    if ctx.sites.wait_until_ready().await.is_err() || ctx.sites.get(&site_ref).is_some() {
        return Ok(None);
    }
    let namespace = member.namespace().unwrap_or_default();
    let mut site = Site::new(&site_ref.name, ctx.default_site.clone());
    site.metadata.namespace = Some(namespace.clone());
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
            tracing::info!(%namespace, site = %site_ref.name, by = %member.name_any(), "created a missing Site");
            let note = format!(
                "created with the operator's default settings for {} {}",
                K::kind(&()),
                member.name_any()
            );
            ctx.event(&created, EventType::Normal, "SiteCreated", note).await;
            Ok(Some(created))
        }
        // Created meanwhile (by a user, or for another member before the watch saw it).
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => Ok(None),
        Err(error) => Err(error),
    }
}
