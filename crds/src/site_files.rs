//! The files of a site's ConfigMaps (`site.yaml`, `formulas.yaml`, `devices.yaml`,
//! `devices-1.yaml` ...): what the operator renders, what the ingestor reads, and how they
//! are split to fit the size Kubernetes allows one ConfigMap. `check` and the operator
//! measure the same bytes.
//!
//! Each object is one document as a user would apply it (apiVersion, kind, name,
//! namespace and spec). A tag takes about 100 bytes, so one ConfigMap of 1 MiB holds
//! about 10,000 tags: the Devices are laid out in order over as many ConfigMaps as they
//! need, each under the limit, and the ingestor reads them from one directory (issue 27:
//! a site of a few hundred devices used to fail to reconcile with an opaque API error).
//! Measured in `benches/site_files.rs` (BENCHMARKS.md).

use std::collections::BTreeMap;

use kube::Resource;
use serde::Serialize;
use serde_json::Value;

use crate::{Device, Formula, Site};

/// What the API server accepts in one ConfigMap's data: keys and values, 1 MiB.
pub const CONFIG_MAP_LIMIT: usize = 1 << 20;

/// The document a user would apply: apiVersion, kind, name, namespace and spec only.
fn document<K: Resource<DynamicType = ()> + Serialize>(object: &K) -> Value {
    let value = serde_json::to_value(object).expect("an API object serialises");
    let meta = object.meta();
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": meta.name, "namespace": meta.namespace},
        "spec": value["spec"],
    })
}

/// Between two documents of a file.
const SEPARATOR: &str = "---\n";

/// Documents as one multi-document YAML file.
fn documents(values: &[Value]) -> String {
    values
        .iter()
        .map(|v| serde_yaml::to_string(v).expect("JSON values serialise to YAML"))
        .collect::<Vec<_>>()
        .join(SEPARATOR)
}

/// The files of one ConfigMap, by name.
pub type Files = BTreeMap<String, String>;

/// The ConfigMaps' files for `site`, its `devices` (in order) and the `formulas` it runs:
/// the first holds the Site, the Formulas and the first Devices (`devices.yaml`); each
/// further one the next Devices (`devices-<n>.yaml`, unique in the directory the ingestor
/// reads). `Err` when the Site and Formulas alone, or one Device, are over the limit.
/// The sizes count each file's name and text as the API server does.
pub fn site_files(site: &Site, devices: &[&Device], formulas: &[&Formula]) -> Result<Vec<Files>, TooLarge> {
    let first = Files::from([
        ("site.yaml".to_owned(), documents(&[document(site)])),
        (
            "formulas.yaml".to_owned(),
            documents(&formulas.iter().map(|f| document(*f)).collect::<Vec<_>>()),
        ),
    ]);
    let too_large = |bytes| TooLarge {
        namespace: site.meta().namespace.clone().unwrap_or_default(),
        site: site.meta().name.clone().unwrap_or_default(),
        bytes,
        devices: devices.len(),
        tags: devices.iter().map(|d| d.spec.tags.len()).sum(),
    };
    // Each ConfigMap's files, its Devices' documents so far, and the bytes its data will count.
    let first_bytes = data_bytes(&first) + devices_file(0).len();
    if first_bytes > CONFIG_MAP_LIMIT {
        return Err(too_large(first_bytes));
    }
    let mut shards = vec![(first, Vec::<String>::new(), first_bytes)];
    for device in devices {
        let text = serde_yaml::to_string(&document(*device)).expect("JSON values serialise to YAML");
        let alone = devices_file(shards.len()).len() + text.len();
        let (_, docs, used) = shards.last_mut().expect("one shard at least");
        let separator = if docs.is_empty() { 0 } else { SEPARATOR.len() };
        if *used + separator + text.len() <= CONFIG_MAP_LIMIT {
            *used += separator + text.len();
            docs.push(text);
        } else if alone <= CONFIG_MAP_LIMIT {
            shards.push((Files::new(), vec![text], alone));
        } else {
            return Err(too_large(alone));
        }
    }
    Ok(shards
        .into_iter()
        .enumerate()
        .map(|(index, (mut files, docs, _))| {
            files.insert(devices_file(index), docs.join(SEPARATOR));
            files
        })
        .collect())
}

/// The file of the `index`th ConfigMap's Devices.
fn devices_file(index: usize) -> String {
    if index == 0 {
        "devices.yaml".to_owned()
    } else {
        format!("devices-{index}.yaml")
    }
}

/// The files' size as the API server counts it against [`CONFIG_MAP_LIMIT`].
pub fn data_bytes(files: &Files) -> usize {
    files.iter().map(|(name, text)| name.len() + text.len()).sum()
}

/// A site whose files cannot be split into ConfigMaps under the limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "site {namespace}/{site} ({devices} devices, {tags} tags) cannot be rendered: its Site and Formula documents, or one of its Devices, take {bytes} bytes, over the {CONFIG_MAP_LIMIT} bytes (1 MiB) Kubernetes allows a ConfigMap (its ingestor keeps its last configuration)"
)]
pub struct TooLarge {
    pub namespace: String,
    pub site: String,
    pub bytes: usize,
    pub devices: usize,
    pub tags: usize,
}
