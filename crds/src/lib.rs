//! tagstream's Kubernetes API, group `tagstream.io`, version `v1alpha1`.
//!
//! - [`Site`]: a plant or cabinet with one ingestor, its broker and its queue.
//! - [`Device`]: a Modbus device and its tag map.
//! - [`Formula`]: a derived tag computed from other tags.
//!
//! The CRD YAML under `crds/` is generated from these types (`cargo run -p tagstream-crds
//! --bin crdgen`); [`manifest`] loads the same documents from files and validates them the
//! way the API server would (schema and CEL rules), plus the checks that need the whole site.

mod condition;
pub mod device;
mod duration;
pub mod formula;
pub mod manifest;
pub mod site;
pub mod site_files;

pub use condition::{Conditions, types as condition_types};
pub use device::{Device, DeviceSpec, DeviceStatus};
pub use duration::{DURATION_PATTERN, Duration, ParseDurationError};
pub use formula::{Formula, FormulaSpec, FormulaStatus, InputRef};
pub use site::{Site, SiteSpec, SiteStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every tagstream object.
pub const GROUP: &str = "tagstream.io";
/// `apiVersion` of every tagstream object.
pub const API_VERSION: &str = "tagstream.io/v1alpha1";

/// The CRDs of this API, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Site::crd(), Device::crd(), Formula::crd()]
}

/// The CRDs as one multi-document YAML file, as `crdgen` writes it.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD serialises to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Where `crdgen` writes [`crds_yaml`], relative to the workspace root.
pub const GENERATED_CRD_PATHS: [&str; 2] = [
    "crds/tagstream.io_crds.yaml",
    "charts/tagstream/crds/tagstream.io_crds.yaml",
];
