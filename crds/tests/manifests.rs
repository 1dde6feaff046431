//! The manifest loader against the example plant and a table of broken manifests: every
//! broken one must be refused with a diagnostic that names the field.

use std::path::{Path, PathBuf};

mod cases;

use cases::{bad_manifests, device, edit, site, with_device};
use serde_json::{Value, json};
use tagstream_crds::manifest::{Diagnostic, Report, load_report};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

#[test]
fn example_plant_loads_without_any_diagnostic() {
    let report = load_report(&[examples()]).unwrap();
    let shown: Vec<String> = report.diagnostics.iter().map(ToString::to_string).collect();
    assert!(shown.is_empty(), "{shown:#?}");
    assert_eq!(report.sites.len(), 1);
    assert_eq!(report.devices.len(), 3);
    assert_eq!(report.formulas.len(), 5);
    let boiler = report.devices.iter().find(|d| d.name() == "boiler").unwrap();
    assert_eq!(boiler.namespace(), "default");
    assert_eq!(boiler.object.spec.byte_order, tagstream_crds::device::ByteOrder::CDAB);
    // Schema defaults are applied, as the API server would.
    assert_eq!(boiler.object.spec.reads.max_registers, 125);
    assert_eq!(report.sites[0].object.spec.stream.replicas, 1);
}

fn load_docs(docs: &[Value]) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<String> = docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect();
    let path = dir.path().join("plant.yaml");
    std::fs::write(&path, text.join("---\n")).unwrap();
    load_report(&[path]).unwrap()
}

fn errors(report: &Report) -> Vec<&Diagnostic> {
    report.errors().collect()
}

#[test]
fn every_bad_manifest_is_refused_naming_the_field() {
    let mut failures = Vec::new();
    for case in bad_manifests() {
        let report = load_docs(&case.docs);
        let found = errors(&report);
        let hit = found
            .iter()
            .any(|d| d.field == case.field && d.message.contains(case.message));
        if !hit {
            let shown: Vec<String> = found
                .iter()
                .map(|d| format!("{:?} / {:?}", d.field, d.message))
                .collect();
            failures.push(format!(
                "{}: expected {:?} containing {:?}, got {shown:#?}",
                case.what, case.field, case.message
            ));
        }
        // A refused object is not handed on.
        let total = report.sites.len() + report.devices.len() + report.formulas.len();
        assert!(total < case.docs.len(), "{}: the bad object was kept", case.what);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn diagnostics_name_file_document_object_and_field() {
    let report = load_docs(&with_device(&[("/spec/tags/0/address", json!(70000))]));
    let text = errors(&report)[0].to_string();
    assert!(text.starts_with("error: "), "{text}");
    assert!(
        text.contains("plant.yaml: document 2 (Device default/boiler): spec.tags[0].address: "),
        "{text}"
    );
}

#[test]
fn every_cel_rule_of_the_crds_is_exercised_by_a_failing_case() {
    let mut messages = Vec::new();
    for crd in tagstream_crds::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        collect_rule_messages(&schema, &mut messages);
    }
    assert!(messages.len() >= 20, "found only {} rules", messages.len());
    let triggered: Vec<String> = bad_manifests()
        .iter()
        .flat_map(|case| load_docs(&case.docs).diagnostics.into_iter().map(|d| d.message))
        .collect();
    let untested: Vec<&String> = messages
        .iter()
        .filter(|m| !triggered.iter().any(|t| t.contains(m.as_str())))
        .collect();
    assert!(untested.is_empty(), "CEL rules no case violates: {untested:#?}");
}

fn collect_rule_messages(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(rules) = map.get("x-kubernetes-validations").and_then(Value::as_array) {
                // Root rules name their field in the message; the loader moves it to `field`.
                let messages = rules.iter().filter_map(|r| r["message"].as_str());
                out.extend(messages.map(|m| m.trim_start_matches("metadata.name: ").to_owned()));
            }
            map.values().for_each(|v| collect_rule_messages(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_rule_messages(v, out)),
        _ => {}
    }
}

#[test]
fn overlapping_registers_and_undefined_sites_are_warnings() {
    let overlapping = json!({"name": "temperature_raw", "register": "holding", "address": 1, "type": "uint16"});
    let report = load_docs(&[edit(device(), &[("/spec/tags/1", overlapping)])]);
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    assert_eq!(report.devices.len(), 1, "warnings keep the object");
    let warnings: Vec<String> = report.warnings().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("spec.tags[1]: temperature_raw registers 1..1 overlap tag \"temperature\"")),
        "{warnings:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("spec.site: Site default/plant-a is not in these files")),
        "{warnings:#?}"
    );
}

#[test]
fn distinct_bits_of_one_register_do_not_overlap() {
    let bits = json!([
        {"name": "a", "register": "holding", "address": 3, "type": "bit", "bit": 0},
        {"name": "b", "register": "holding", "address": 3, "type": "bit", "bit": 1}]);
    let report = load_docs(&[site(), edit(device(), &[("/spec/tags", bits)])]);
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
}

#[test]
fn other_kinds_are_passed_over_and_invalid_yaml_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: plant}\n---\nkind: [unclosed\n",
    )
    .unwrap();
    let report = load_report(&[path]).unwrap();
    assert_eq!(report.ignored.len(), 1);
    let errs = errors(&report);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].source.document, 2);
    assert!(errs[0].message.starts_with("not valid YAML"), "{}", errs[0]);
}

#[test]
fn a_missing_path_is_an_error_naming_it() {
    let err = load_report(&[PathBuf::from("/nonexistent/plant")]).unwrap_err();
    assert!(err.to_string().contains("cannot read /nonexistent/plant"), "{err}");
}

#[test]
fn valid_objects_survive_beside_invalid_ones() {
    let report = load_docs(&[
        site(),
        device(),
        edit(
            device(),
            &[("/metadata/name", json!("meter")), ("/spec/unitId", json!(999))],
        ),
    ]);
    assert_eq!(report.devices.len(), 1);
    assert_eq!(report.devices[0].name(), "boiler");
    assert_eq!(report.errors().count(), 1);
}
