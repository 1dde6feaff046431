//! Offline validation of one document against its CRD, as the API server would do it, in
//! the API server's phases (held to it by `operator/tests/api_validation.rs` against a
//! real kube-apiserver):
//! 1. strict decoding: a field the schema does not know refuses the object alone (400);
//! 2. the OpenAPI schema, a missing required field named as the field itself;
//! 3. the CEL rules, unless phase 2 found a type error, an unsupported enum value or a
//!    missing field (the API server's "blocking" errors: the rules would see a value of
//!    the wrong shape). A rule whose evaluation fails is reported on the node that carries
//!    it, as the API server does, not on its `fieldPath`.

use std::{collections::HashMap, fmt::Write as _, sync::LazyLock};

use jsonschema::error::ValidationErrorKind;
use kube::core::cel::{CompiledSchema, ErrorKind, ValidationError, Validator, apply_defaults, compile_schema};
use serde_json::{Map, Value};

use super::{Kind, push_property};

/// The generated CRD schema of one kind, compiled for both validators.
struct KindSchema {
    openapi: Value,
    structural: jsonschema::Validator,
    cel: CompiledSchema,
    /// Each CEL rule's `fieldPath`, by rule text.
    rule_field_paths: HashMap<String, String>,
}

impl KindSchema {
    fn new(crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition) -> Self {
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a derived CRD has an openAPIV3Schema");
        let openapi = serde_json::to_value(schema).expect("a CRD schema serialises to JSON");
        // Draft 4 is the JSON Schema dialect OpenAPI v3.0 schemas are built on; the
        // Kubernetes extensions (`x-kubernetes-*`, `nullable`) are unknown keywords to it.
        let structural = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(&openapi)
            .expect("the generated CRD schema is a valid JSON schema");
        let cel = compile_schema(&openapi);
        let mut rule_field_paths = HashMap::new();
        collect_rule_field_paths(&openapi, &mut rule_field_paths);
        Self {
            openapi,
            structural,
            cel,
            rule_field_paths,
        }
    }
}

fn collect_rule_field_paths(schema: &Value, out: &mut HashMap<String, String>) {
    match schema {
        Value::Object(map) => {
            for rule in map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let (Some(text), Some(path)) = (rule["rule"].as_str(), rule["fieldPath"].as_str()) {
                    out.insert(text.to_owned(), path.to_owned());
                }
            }
            map.values().for_each(|v| collect_rule_field_paths(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_rule_field_paths(v, out)),
        _ => {}
    }
}

static SCHEMAS: LazyLock<[KindSchema; 3]> = LazyLock::new(|| {
    use kube::CustomResourceExt;
    [
        KindSchema::new(&crate::Site::crd()),
        KindSchema::new(&crate::Device::crd()),
        KindSchema::new(&crate::Formula::crd()),
    ]
});

fn schema_of(kind: Kind) -> &'static KindSchema {
    &SCHEMAS[kind as usize]
}

/// A problem: the field path and what is wrong with it.
pub(super) type Problem = (String, String);

/// Validates a document of `kind` and returns it with the schema defaults applied, or every
/// problem found. `status` is dropped first: the API server ignores it on create and update
/// through the main resource.
pub(super) fn validate(kind: Kind, mut value: Value) -> Result<Value, Vec<Problem>> {
    let schema = schema_of(kind);
    if let Some(object) = value.as_object_mut() {
        object.remove("status");
    }
    let name = value.pointer("/metadata/name").and_then(Value::as_str);
    if name.is_none_or(str::is_empty) {
        return Err(vec![("metadata.name".into(), "required".into())]);
    }
    let defaulted = apply_defaults(&schema.openapi, &value);

    let mut walked = Vec::new();
    walk_structure(&schema.openapi, &defaulted, &mut String::new(), true, &mut walked);
    let (unknown, mut problems): (Vec<Problem>, Vec<Problem>) =
        walked.into_iter().partition(|(_, message)| message == UNKNOWN_FIELD);
    if !unknown.is_empty() {
        return Err(unknown);
    }
    let mut blocking = problems.iter().any(|(_, message)| message == NOT_INT_OR_STRING);
    for error in schema.structural.iter_errors(&defaulted) {
        let mut field = pointer_to_field_path(error.instance_path().as_str());
        match error.kind() {
            ValidationErrorKind::Required { property } => {
                push_property(&mut field, property.as_str().unwrap_or_default());
                blocking = true;
            }
            ValidationErrorKind::Type { .. } | ValidationErrorKind::Enum { .. } => blocking = true,
            _ => {}
        }
        problems.push((field, error.to_string()));
    }
    if !blocking && let Err(errors) = Validator::new().validate_compiled(&schema.cel, &defaulted, None) {
        problems.extend(errors.iter().map(|e| cel_problem(schema, e)));
    }
    if problems.is_empty() {
        Ok(defaulted)
    } else {
        Err(problems)
    }
}

const UNKNOWN_FIELD: &str = "unknown field";
/// `x-kubernetes-int-or-string` (quantities) has no JSON schema type to check against.
const NOT_INT_OR_STRING: &str = "must be of type integer or string";

/// The field a CEL failure is reported on. A rule on the object root can only name
/// `metadata.name` in its message (the API server refuses a `fieldPath` outside the
/// schema), so such messages start with `<field>: `.
fn cel_problem(schema: &KindSchema, error: &ValidationError) -> Problem {
    let mut field = error.field_path.trim_start_matches('.');
    if error.kind == ErrorKind::EvaluationError
        && let Some(rule_path) = schema.rule_field_paths.get(&error.rule)
    {
        field = field.strip_suffix(rule_path.trim_start_matches('.')).unwrap_or(field);
        field = field.trim_end_matches('.');
    }
    match error.message.split_once(": ") {
        Some((named, rest)) if field.is_empty() && named.starts_with("metadata.") => {
            (named.to_owned(), rest.to_owned())
        }
        _ => (field.to_owned(), error.message.clone()),
    }
}

/// Finds what the JSON schema dialect cannot: fields the schema does not know (refused by
/// `kubectl apply --validate=strict`, silently pruned otherwise), duplicate keys in
/// `x-kubernetes-list-type: map` lists and int-or-string values of neither type.
fn walk_structure(schema: &Value, value: &Value, path: &mut String, root: bool, problems: &mut Vec<Problem>) {
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        && !(value.is_i64() || value.is_u64() || value.is_string())
    {
        problems.push((path.clone(), NOT_INT_OR_STRING.into()));
        return;
    }
    match value {
        Value::Object(object) => walk_object(schema, object, path, root, problems),
        Value::Array(items) => {
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                check_list_map_keys(schema, items, path, problems);
            }
            let Some(item_schema) = schema.get("items") else { return };
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{index}]");
                walk_structure(item_schema, item, path, false, problems);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn walk_object(
    schema: &Value,
    object: &Map<String, Value>,
    path: &mut String,
    root: bool,
    problems: &mut Vec<Problem>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let open = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    for (key, child) in object {
        let len = path.len();
        push_property(path, key);
        if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
            walk_structure(child_schema, child, path, false, problems);
        } else if let Some(child_schema) = additional.filter(|a| a.is_object()) {
            walk_structure(child_schema, child, path, false, problems);
        } else if !(open || additional == Some(&Value::Bool(true)) || (properties.is_none() && !root)) {
            // The object root also carries apiVersion, kind and metadata, which the API
            // server validates itself.
            let envelope = root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata");
            if !envelope {
                problems.push((path.clone(), UNKNOWN_FIELD.into()));
            }
        }
        path.truncate(len);
    }
}

fn check_list_map_keys(schema: &Value, items: &[Value], path: &str, problems: &mut Vec<Problem>) {
    let keys: Vec<&str> = schema
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut seen = std::collections::HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let key: Vec<&Value> = keys.iter().filter_map(|k| item.get(*k)).collect();
        if let Some(first) = seen.insert(key.clone(), index) {
            let shown: Vec<String> = key.iter().map(ToString::to_string).collect();
            problems.push((
                format!("{path}[{index}]"),
                format!(
                    "duplicate entry with {} {}: already used by {path}[{first}]",
                    keys.join(", "),
                    shown.join(", ")
                ),
            ));
        }
    }
}

/// `/spec/tags/2/address` -> `spec.tags[2].address`.
fn pointer_to_field_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            let _ = write!(out, "[{segment}]");
        } else {
            push_property(&mut out, &segment);
        }
    }
    out
}
