//! Writing rendered objects: server-side apply under one field manager, and no write at
//! all when the object in the cluster was applied from the same rendering.
//!
//! Comparing the live object with the rendered one field by field does not work: the API
//! server fills in defaults (`protocol: TCP`, `imagePullPolicy`, ...) and normalises
//! quantities (`0.5` becomes `500m`), so a naive comparison writes on every reconcile.
//! Instead every applied object carries the hash of what was rendered, and the operator
//! writes only when that hash changes or the object is gone.

use std::fmt::{Debug, Write};

use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PropagationPolicy},
};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "tagstream-operator";
/// Annotation holding the hash of the rendered object that was last applied.
pub const RENDERED_HASH: &str = "tagstream.io/rendered-hash";

/// What [`apply_if_changed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The live object was applied from the same rendering: nothing written.
    Unchanged,
    /// The object was missing or rendered differently, and was applied.
    Written,
    /// The live object is being deleted (a StatefulSet re-created for an immutable
    /// change waits for the garbage collector to orphan its pods): nothing written; apply
    /// again once it is gone.
    Terminating,
}

/// The hex SHA-256 of an object's JSON form (struct fields and `BTreeMap`s serialise in a
/// fixed order, so equal objects hash equal).
pub fn rendered_hash<K: Serialize>(object: &K) -> String {
    let json = serde_json::to_vec(object).expect("a rendered object serialises");
    Sha256::digest(&json)
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// Applies `object` unless the live one carries the same rendered hash, or is being
/// deleted: an apply to a terminating object changes an object about to vanish (or, for
/// a StatefulSet's immutable fields, is refused again).
pub async fn apply_if_changed<K>(api: &Api<K>, rendered: &K) -> Result<Outcome, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let hash = rendered_hash(rendered);
    let name = rendered.name_any();
    if let Some(live) = api.get_opt(&name).await? {
        if live.meta().deletion_timestamp.is_some() {
            return Ok(Outcome::Terminating);
        }
        if live.annotations().get(RENDERED_HASH) == Some(&hash) {
            return Ok(Outcome::Unchanged);
        }
    }
    let mut object = rendered.clone();
    object.annotations_mut().insert(RENDERED_HASH.to_owned(), hash);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await?;
    Ok(Outcome::Written)
}

/// What the API server says when a change touches a StatefulSet's immutable fields (its
/// claim templates, selector or service name): older releases refuse any field outside
/// the updatable ones, newer ones name the field (`spec.volumeClaimTemplates: Invalid
/// value: ...: field is immutable`, Kubernetes 1.37).
const IMMUTABLE_STATEFUL_SET: [&str; 2] = [
    "updates to statefulset spec for fields other than",
    "field is immutable",
];

/// [`apply_if_changed`] for a StatefulSet: when the API server refuses the change because
/// it touches immutable fields (a Site's new storage size or class), the StatefulSet is
/// deleted with its pod and claim orphaned, and applied again once it is gone; the new
/// one adopts the running pod and its claim, so no point is lost. The claim keeps its old
/// size: growing it is the storage class's business (see docs/k3s.md).
///
/// An orphaning delete is not immediate: the API server keeps the StatefulSet, with a
/// deletion timestamp and the `orphan` finalizer, until the garbage collector has taken
/// its owner reference off the pods. Until then this answers [`Outcome::Terminating`],
/// and the caller looks again shortly.
pub async fn apply_or_recreate<K>(api: &Api<K>, rendered: &K) -> Result<Outcome, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = rendered.name_any();
    match apply_if_changed(api, rendered).await {
        Err(kube::Error::Api(status))
            if status.code == 422 && IMMUTABLE_STATEFUL_SET.iter().any(|m| status.message.contains(m)) =>
        {
            tracing::warn!(%name, reason = %status.message, "immutable fields changed: recreating, pods and claims orphaned");
            let orphan = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Orphan),
                ..DeleteParams::default()
            };
            let gone = api.delete(&name, &orphan).await?.is_right();
            if gone {
                apply_if_changed(api, rendered).await
            } else {
                Ok(Outcome::Terminating)
            }
        }
        outcome => outcome,
    }
}
