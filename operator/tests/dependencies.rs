//! The operator image carries no Modbus, queue or NATS code: none of the ingestor's data
//! path crates is linked into the operator binary.

use std::process::Command;

const DATA_PATH_CRATES: [&str; 5] = [
    "tagstream-ingestor",
    "sled",
    "tokio-modbus",
    "tokio-serial",
    "async-nats",
];

#[test]
fn the_operator_links_no_modbus_queue_or_nats_crate() {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "tagstream-operator",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8(output.stdout).expect("cargo tree prints UTF-8");
    let names: Vec<&str> = tree.lines().filter_map(|line| line.split(' ').next()).collect();
    assert!(names.contains(&"tagstream-core"), "unexpected tree:\n{tree}");
    let linked: Vec<&str> = DATA_PATH_CRATES
        .into_iter()
        .filter(|crate_name| names.contains(crate_name))
        .collect();
    assert!(linked.is_empty(), "the operator links {linked:?}");
}
