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
    api::{Patch, PatchParams},
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

/// Applies `object` unless the live one carries the same rendered hash.
pub async fn apply_if_changed<K>(api: &Api<K>, mut object: K) -> Result<Outcome, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let hash = rendered_hash(&object);
    let name = object.name_any();
    if let Some(live) = api.get_opt(&name).await?
        && live.annotations().get(RENDERED_HASH) == Some(&hash)
    {
        return Ok(Outcome::Unchanged);
    }
    object.annotations_mut().insert(RENDERED_HASH.to_owned(), hash);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await?;
    Ok(Outcome::Written)
}
