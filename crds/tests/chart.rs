//! The Helm chart with the real `helm` binary: it lints, and it installs the generated CRDs.

use std::{path::PathBuf, process::Command};

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/tagstream")
}

fn helm(args: &[&str]) -> String {
    let output = Command::new("helm")
        .args(args)
        .output()
        .expect("the `helm` binary is needed: run scripts/test.sh, which installs it, or put helm on PATH");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "helm {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn chart_passes_strict_lint() {
    let out = helm(&["lint", "--strict", chart().to_str().unwrap()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn chart_renders_the_generated_crds() {
    let out = helm(&["template", "tagstream", chart().to_str().unwrap(), "--include-crds"]);
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&out)
        .filter_map(|doc| {
            use serde::Deserialize;
            let crd = serde_yaml::Value::deserialize(doc).ok()?;
            (crd["kind"].as_str() == Some("CustomResourceDefinition"))
                .then(|| crd["metadata"]["name"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        kinds,
        ["sites.tagstream.io", "devices.tagstream.io", "formulas.tagstream.io"]
    );
}
