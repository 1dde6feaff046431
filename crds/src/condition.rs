//! Status conditions shared by every tagstream object, following the Kubernetes API
//! conventions (KEP-1623): `metav1.Condition` in a list keyed by `type`.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// Schema for `status.conditions`: a list-map keyed by `type`, bounded so CEL stays cheap.
#[derive(Debug)]
pub struct Conditions;

impl JsonSchema for Conditions {
    fn schema_name() -> Cow<'static, str> {
        "Conditions".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let item = generator.subschema_for::<Condition>();
        json_schema!({
            "type": "array",
            "description": "Current state of the object, one entry per condition type (Kubernetes conventions).",
            "items": item,
            "maxItems": 16,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        })
    }
}

/// Condition types and reasons written by tagstream; kept here so the operator and the
/// tests agree on the spelling.
pub mod types {
    pub const READY: &str = "Ready";
    pub const CONNECTED: &str = "Connected";
    pub const VALID: &str = "Valid";
    pub const QUEUE_HEALTHY: &str = "QueueHealthy";
    /// Whether the broker still holds what it acknowledged (a power cut on a broker that
    /// acks before it syncs loses the tail of its stream).
    pub const BROKER_DURABLE: &str = "BrokerDurable";
}
