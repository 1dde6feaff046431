//! The operator binary refuses a bad start with the reason: an invalid default Site (the
//! field named) or no reachable cluster.

use std::process::{Command, Output};

fn operator(args: &[&str], kubeconfig: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tagstream-operator"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("TAGSTREAM_INGESTOR_IMAGE")
        .output()
        .unwrap()
}

#[test]
fn an_invalid_default_site_stops_the_operator_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("default-site.yaml");
    std::fs::write(&site, "storage: {size: 1Gi}\nqueue: {maxSize: 2Gi}\n").unwrap();
    let out = operator(
        &["--ingestor-image", "x", "--default-site", site.to_str().unwrap()],
        &dir.path().join("none"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("queue.maxSize"), "{stderr}");
    assert!(stderr.contains("default-site.yaml"), "{stderr}");
}

/// Only a kubeconfig is needed: the ingestor image defaults to this version's, so the
/// run gets as far as the cluster.
#[test]
fn without_a_cluster_the_operator_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = operator(&["--http", "127.0.0.1:0"], &dir.path().join("none"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot reach the Kubernetes API"), "{stderr}");
}
