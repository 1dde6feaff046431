//! The checked-in CRD YAML matches the Rust types, and the CRDs are ones a real API server
//! accepts: every CEL rule compiles and stays inside the API server's cost budget.

use std::path::Path;

use kube::core::cel::{CompiledSchema, WarningKind, compile_schema, estimate_rule_cost};

#[test]
fn checked_in_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let generated = tagstream_crds::crds_yaml();
    for path in tagstream_crds::GENERATED_CRD_PATHS {
        let on_disk = std::fs::read_to_string(root.join(path)).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{path} differs from the Rust types: run `cargo run -p tagstream-crds --bin crdgen` and commit the result"
        );
    }
}

#[test]
fn every_cel_rule_compiles_within_the_cost_budget() {
    let mut checked = 0;
    for crd in tagstream_crds::crds() {
        let version = &crd.spec.versions[0];
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        let compiled = compile_schema(&schema);
        let mut problems = Vec::new();
        walk(&compiled, &crd.spec.names.kind, &mut problems, &mut checked);
        assert!(problems.is_empty(), "{problems:#?}");
    }
    assert!(checked >= 20, "only {checked} rules found");
}

fn walk(node: &CompiledSchema, at: &str, problems: &mut Vec<String>, checked: &mut usize) {
    for validation in &node.validations {
        match validation {
            Ok(compiled) => {
                *checked += 1;
                for warning in estimate_rule_cost(&compiled.rule.rule, node) {
                    if matches!(warning.kind, WarningKind::CostExceeded) {
                        problems.push(format!("{at}: {}: {}", warning.rule, warning.message));
                    }
                }
            }
            Err(e) => problems.push(format!("{at}: does not compile: {e}")),
        }
    }
    for (name, child) in &node.properties {
        walk(child, &format!("{at}.{name}"), problems, checked);
    }
    if let Some(items) = &node.items {
        walk(items, &format!("{at}[]"), problems, checked);
    }
    if let Some(values) = &node.additional_properties {
        walk(values, &format!("{at}{{}}"), problems, checked);
    }
}

#[test]
fn crds_have_status_columns_and_short_names() {
    let crds = tagstream_crds::crds();
    let find = |kind: &str| crds.iter().find(|c| c.spec.names.kind == kind).unwrap();
    let columns = |kind: &str| -> Vec<String> {
        find(kind).spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.to_uppercase())
            .collect()
    };
    assert_eq!(columns("Device"), ["SITE", "CONNECTED", "TAGS", "LAST POLL", "AGE"]);
    assert_eq!(columns("Formula"), ["SITE", "VALID", "LAST VALUE", "AGE"]);
    assert_eq!(columns("Site"), ["DEVICES", "READY", "QUEUE", "AGE"]);
    assert_eq!(
        find("Device").spec.names.short_names.as_deref(),
        Some(&["dev".to_owned()][..])
    );
    assert_eq!(
        find("Formula").spec.names.short_names.as_deref(),
        Some(&["fx".to_owned()][..])
    );
    for crd in &crds {
        assert_eq!(crd.spec.group, "tagstream.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{} has no status subresource",
            crd.spec.names.kind
        );
    }
}

#[test]
fn every_spec_field_is_documented_for_kubectl_explain() {
    let mut undocumented = Vec::new();
    for crd in tagstream_crds::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        find_undocumented(spec, &format!("{}.spec", crd.spec.names.kind), &mut undocumented);
    }
    assert!(
        undocumented.is_empty(),
        "fields without a description: {undocumented:#?}"
    );
}

fn find_undocumented(schema: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else {
        if let Some(items) = schema.get("items") {
            find_undocumented(items, &format!("{at}[]"), out);
        }
        return;
    };
    for (name, child) in properties {
        let path = format!("{at}.{name}");
        // Kubernetes' own types (tolerations, resources) come documented from k8s-openapi.
        if child.get("description").is_none() {
            out.push(path.clone());
        }
        find_undocumented(child, &path, out);
    }
}
