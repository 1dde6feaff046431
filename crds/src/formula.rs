//! `Formula`: a derived tag computed from other tags and formulas of the same site.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, condition::Conditions};

/// Desired state of a derived tag.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tagstream.io",
    version = "v1alpha1",
    kind = "Formula",
    namespaced,
    derive = "PartialEq",
    status = "FormulaStatus",
    shortname = "fx",
    category = "tagstream",
    doc = "A derived tag: an expression over other tags and formulas of the same site, evaluated when an input changes.",
    printcolumn(name = "Site", type_ = "string", json_path = ".spec.site"),
    printcolumn(name = "Valid", type_ = "string", json_path = ".status.conditions[?(@.type==\"Valid\")].status"),
    printcolumn(name = "Last Value", type_ = "string", json_path = ".status.lastValue"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63")
        .message("metadata.name: a Formula name is a tag name other formulas refer to and must be a DNS label (lowercase letters, digits and '-', no dots, at most 63 characters)"),
)]
#[serde(rename_all = "camelCase")]
pub struct FormulaSpec {
    /// Name of the Site (same namespace) whose ingestor evaluates this formula.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub site: String,

    /// The expression's variables: each key is a variable name used in `expression`, each
    /// value the tag it reads: `<device>/<tag>` for a polled tag or `<formula>` for another
    /// formula's result. Every variable must be used and every identifier must be a variable.
    #[schemars(schema_with = "inputs_schema")]
    pub inputs: BTreeMap<String, String>,

    /// The expression, in evalexpr 11 syntax: arithmetic (`+ - * / % ^`), comparison,
    /// boolean logic, `if(cond, a, b)`, `min`, `max`, `floor`, `round`, `math::sqrt`, ...
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,

    /// Engineering unit of the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub unit: Option<String>,

    /// Mark the result Uncertain when the newest value of an input is older than this.
    /// Unset means inputs never go stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("must be at least 1s"))]
    pub stale_after: Option<Duration>,
}

/// Bounded map of variable name to reference. Variable names are checked when the formula
/// compiles (an API-server rule over map keys would exceed the CEL cost budget).
fn inputs_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 64,
        "additionalProperties": {
            "type": "string",
            "maxLength": 127,
            "pattern": INPUT_REF_PATTERN,
        },
    })
}

/// `<device>/<tag>` or `<formula>`.
pub const INPUT_REF_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$";

/// What a formula input refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputRef<'a> {
    /// A polled tag: `<device>/<tag>`.
    Tag { device: &'a str, tag: &'a str },
    /// Another formula's result: `<formula>`.
    Formula(&'a str),
}

impl<'a> InputRef<'a> {
    /// Splits an input reference; the schema guarantees the shape.
    pub fn parse(reference: &'a str) -> Self {
        match reference.split_once('/') {
            Some((device, tag)) => Self::Tag { device, tag },
            None => Self::Formula(reference),
        }
    }
}

/// Observed state of a formula, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FormulaStatus {
    /// `Valid` (it compiles, its inputs exist and it is on no cycle) with the reason when not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Conditions")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The formulas this one depends on, in the order they are evaluated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub dependency_order: Vec<String>,
    /// The most recent result, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_value: Option<String>,
    /// When the most recent result was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_value_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}
