//! The example plant as the API server hands it to the operator: in namespace `plant`,
//! with uids and generations.

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use tagstream_crds::{Device, Formula, Site, manifest::load};
use tagstream_operator::render::Settings;

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// Namespace, uid and generation 1, as the API server sets them.
pub fn place<K: kube::Resource>(mut object: K) -> K {
    let uid = format!("0d6b1f0e-0000-4000-8000-{:012x}", fxhash(&object.name_any()));
    let meta = object.meta_mut();
    meta.namespace = Some("plant".into());
    meta.uid = Some(uid);
    meta.generation = Some(1);
    object
}

fn fxhash(text: &str) -> u64 {
    text.bytes().fold(0, |h: u64, b| h.rotate_left(5) ^ u64::from(b)) & 0xffff_ffff_ffff
}

pub fn plant() -> (Site, Vec<Device>, Vec<Formula>) {
    let report = load(&[examples()]).unwrap();
    let site = place(report.sites[0].object.clone());
    let devices = report.devices.into_iter().map(|d| place(d.object)).collect();
    let formulas = report.formulas.into_iter().map(|f| place(f.object)).collect();
    (site, devices, formulas)
}

pub fn settings() -> Settings {
    Settings {
        ingestor_image: "ghcr.io/tagstream/tagstream-ingestor:0.1.0".into(),
    }
}
