//! `tagstream-ingestor check` as users run it: on the example plant and on a broken one.

use std::{path::Path, process::Command};

fn check(path: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
        .args(["check", "-f"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap(), text)
}

#[test]
fn the_example_plant_checks_clean_and_shows_the_chain_in_order() {
    let (code, text) = check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples"));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("checked 1 site, 3 devices, 5 formulas"), "{text}");
    let position = |name: &str| {
        text.find(&format!(". {name} = "))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert!(position("boiler-delta-t") < position("boiler-heat-output"));
    assert!(position("boiler-heat-output") < position("boiler-efficiency"));
    // What the operator would render, against Kubernetes' limit per ConfigMap.
    assert!(text.contains("rendered configuration: "), "{text}");
    assert!(
        text.contains(" bytes in 1 ConfigMap(s), each of Kubernetes' 1048576 used "),
        "{text}"
    );
    assert!(text.ends_with("OK\n"), "{text}");
}

#[test]
fn a_broken_plant_fails_naming_every_problem() {
    let (code, text) = check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken-plant.yaml"));
    assert_eq!(code, 1, "{text}");
    for expected in [
        "document 1 (Device default/pump): spec.connection.tcp.port: 0 is less than the minimum of 1",
        "spec.site: Site default/plant-b is not in these files",
        "error: formula default/capacity: on a dependency cycle of the formulas capacity, level-pct",
        "error: formula default/level-pct: on a dependency cycle of the formulas capacity, level-pct",
        "error: formula default/level-mm: expression does not parse: operator + needs 2 operand(s), found 1",
        "1. level-cm = l * 100",
        "FAILED: 4 error(s)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn an_unreadable_path_exits_2_naming_it() {
    let (code, text) = check(Path::new("/nonexistent/manifests"));
    assert_eq!(code, 2);
    assert!(text.contains("cannot read /nonexistent/manifests"), "{text}");
}
