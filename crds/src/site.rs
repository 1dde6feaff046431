//! `Site`: a plant or cabinet with one ingestor: its broker, stream, queue and placement.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ResourceRequirements, Toleration},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, condition::Conditions};

/// Desired state of a site: one ingestor polling the site's devices into one JetStream stream.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "tagstream.io",
    version = "v1alpha1",
    kind = "Site",
    namespaced,
    derive = "PartialEq",
    status = "SiteStatus",
    category = "tagstream",
    doc = "A plant or cabinet: one ingestor with a persistent queue, publishing its devices' points to NATS JetStream.",
    printcolumn(name = "Devices", type_ = "integer", json_path = ".status.devices"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queue.depth"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52")
        .message("metadata.name: a Site name is used as a NATS subject token and in the names of its ingestor's objects, so it must be a DNS label of at most 52 characters"),
)]
#[x_kube(
    // Guarded: without it, a size that is no quantity makes the rule fail to evaluate, and
    // the API server answers with a regular expression on `spec` beside the field's own
    // "must be a quantity" (found by the differential test against a real API server).
    validation = Rule::new("!isQuantity(self.queue.maxSize) || !isQuantity(self.storage.size) || quantity(self.queue.maxSize).isLessThan(quantity(self.storage.size))")
        .message("queue.maxSize must be smaller than storage.size, or the volume fills before the queue limit applies")
        .field_path(".queue.maxSize"),
    validation = Rule::new("!has(self.writes) || (self.writes.subjectPrefix != self.stream.subjectPrefix && !self.writes.subjectPrefix.startsWith(self.stream.subjectPrefix + '.'))")
        .message("writes.subjectPrefix must not be stream.subjectPrefix or under it: the stream would store the write requests and answer them itself")
        .field_path(".writes.subjectPrefix"),
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// The NATS servers to publish to.
    #[serde(default)]
    pub broker: Broker,
    /// The JetStream stream the points go to.
    #[serde(default)]
    pub stream: Stream,
    /// The ingestor's persistent queue.
    #[serde(default)]
    pub queue: Queue,
    /// The volume that holds the queue.
    #[serde(default)]
    pub storage: Storage,
    /// Where and with what resources the ingestor pod runs.
    #[serde(default)]
    pub placement: Placement,
    /// Whether the ingestor takes write requests for the site's writable tags.
    // Left out at its defaults: a site without writes renders as before writes existed,
    // so an operator upgrade rewrites no ConfigMap and older ingestors still read it.
    #[serde(default, skip_serializing_if = "Writes::is_default")]
    pub writes: Writes,
}

/// NATS connection settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Broker {
    /// NATS server URLs (`nats://`, `tls://`); the client fails over between them.
    #[schemars(
        length(min = 1, max = 16),
        inner(length(max = 253), regex(pattern = "^(nats|tls)://[^\\s]+$"))
    )]
    pub urls: Vec<String>,
    /// How the ingestor authenticates; unset connects without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<BrokerCredentials>,
    /// TLS settings; unset uses TLS only for `tls://` URLs, verified against the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BrokerTls>,
}

impl Default for Broker {
    fn default() -> Self {
        Self {
            urls: vec!["nats://nats:4222".to_owned()],
            credentials: None,
            tls: None,
        }
    }
}

/// Credentials from a Secret in the Site's namespace, mounted into the ingestor pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerCredentials {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Which kind of credentials the Secret holds, and so which keys it must have.
    #[serde(rename = "type")]
    pub kind: CredentialsKind,
}

/// NATS authentication kinds and the Secret keys each reads.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CredentialsKind {
    /// Keys `username` and `password`.
    UserPassword,
    /// Key `token`.
    Token,
    /// Key `nkey` (the seed, starting with `SU`).
    Nkey,
    /// Key `user.creds` (a JWT and nkey seed, as `nsc` writes them).
    CredsFile,
}

/// TLS material from a Secret (keys `ca.crt`, and `tls.crt` + `tls.key` for a client
/// certificate, as in a `kubernetes.io/tls` Secret or one cert-manager writes).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerTls {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Present `tls.crt` and `tls.key` as a client certificate.
    #[serde(default)]
    pub client_certificate: bool,
}

/// The JetStream stream.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Stream {
    /// Stream name.
    #[serde(default = "default_stream_name")]
    #[schemars(length(min = 1, max = 64), regex(pattern = "^[A-Za-z0-9_-]+$"))]
    pub name: String,
    /// Subjects are `<subjectPrefix>.<namespace>.<site>.<device>`.
    #[serde(default = "default_subject_prefix")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"))]
    pub subject_prefix: String,
    /// Create the stream on `<subjectPrefix>.>` when it does not exist (one stream for every
    /// site and namespace under the prefix). When false the ingestor only checks that it
    /// exists and covers the site's subjects (for brokers managed by someone else).
    #[serde(default = "default_true")]
    pub create: bool,
    /// Replicas of a stream the ingestor creates.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u8,
    /// Storage of a stream the ingestor creates.
    #[serde(default)]
    pub storage: StreamStorage,
    /// JetStream's duplicate window: a message re-sent within it with the same
    /// `Nats-Msg-Id` is dropped by the server. Must cover the longest ingestor restart.
    #[serde(default = "default_duplicate_window")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("must be at least 1s"))]
    pub duplicate_window: Duration,
}

fn default_stream_name() -> String {
    "TAGSTREAM".to_owned()
}
fn default_subject_prefix() -> String {
    "tagstream".to_owned()
}
const fn default_true() -> bool {
    true
}
const fn default_replicas() -> u8 {
    1
}
const fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            name: default_stream_name(),
            subject_prefix: default_subject_prefix(),
            create: true,
            replicas: default_replicas(),
            storage: StreamStorage::default(),
            duplicate_window: default_duplicate_window(),
        }
    }
}

/// JetStream storage backends.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum StreamStorage {
    #[default]
    File,
    Memory,
}

/// The persistent queue between polling and publishing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Queue {
    /// Most disk the queue may use, as a Kubernetes quantity (`512Mi`, `2Gi`). Counted as
    /// the queue's size on disk, not the size of the points in it.
    #[serde(default = "default_queue_max_size")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('16Mi'))").message("must be a quantity above 16Mi"))]
    pub max_size: Quantity,
    /// What happens when the queue is full.
    #[serde(default)]
    pub full_policy: FullPolicy,
    /// Longest time a point waits in memory for JetStream's acknowledgement before it is
    /// written to disk (group commit). Points are published at once; only those not
    /// acknowledged within this interval are written, so it is also the most a killed
    /// ingestor loses of what the broker had not taken. Shorter costs more disk writes
    /// (BENCHMARKS.md).
    #[serde(default = "default_flush_interval")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1ms') && duration(self) <= duration('1s')").message("must be between 1ms and 1s"))]
    pub flush_interval: Duration,
    /// How long records stay on disk after JetStream acknowledged them, so that the
    /// ingestor can publish again what the broker loses in a power cut: JetStream acks a
    /// message before it syncs it to disk, every `sync_interval` (2 minutes by default), so
    /// up to that much acknowledged data is lost with the broker's power. The default
    /// covers NATS's default with a margin. `0s` when the broker syncs before it acks
    /// (JetStream `sync_interval: always`, see docs/k3s.md). Costs disk: about the
    /// queue's write rate times the retention (BENCHMARKS.md).
    #[serde(default = "default_acked_retention")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('1h')").message("must be at most 1h"))]
    pub acked_retention: Duration,
    /// Most memory the queue holds points in. Points are published from memory at once
    /// and written to disk only when JetStream has not acknowledged them within
    /// `flushInterval`; memory also keeps what was written and is still unacknowledged,
    /// so a broker that is behind is fed without reading the disk. Appends wait when it
    /// is full. Costs about this much of the ingestor's RSS at most.
    #[serde(default = "default_queue_memory_size")]
    #[x_kube(validation = Rule::new("isQuantity(self) && !quantity(self).isLessThan(quantity('256Ki')) && !quantity(self).isGreaterThan(quantity('1Gi'))").message("must be a quantity from 256Ki to 1Gi"))]
    pub memory_size: Quantity,
}

fn default_queue_max_size() -> Quantity {
    Quantity("1Gi".to_owned())
}
fn default_queue_memory_size() -> Quantity {
    Quantity("4Mi".to_owned())
}
/// Chosen from the measurements in BENCHMARKS.md ("The hybrid queue"): 20 ms writes a
/// quarter of 5 ms's group commits for the retained records at the same latency, and a
/// kill loses at most two polls at 10 ms.
const fn default_flush_interval() -> Duration {
    Duration::from_millis(20)
}
const fn default_acked_retention() -> Duration {
    Duration::from_secs(150)
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            max_size: default_queue_max_size(),
            full_policy: FullPolicy::default(),
            flush_interval: default_flush_interval(),
            acked_retention: default_acked_retention(),
            memory_size: default_queue_memory_size(),
        }
    }
}

/// Behaviour of a full queue. Both are counted in metrics and shown in the Site status.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum FullPolicy {
    /// Delete the oldest unsent points to make room: keeps the newest data.
    #[default]
    DropOldest,
    /// Stop polling until the broker takes points again: keeps the oldest data, loses
    /// what the devices did meanwhile.
    PausePolling,
}

/// The persistent volume claimed for the queue. It is kept when the Site is deleted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Storage class of the claim; unset uses the cluster default (`local-path` on k3s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Size of the claim.
    #[serde(default = "default_storage_size")]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("must be a quantity such as 2Gi"))]
    pub size: Quantity,
}

fn default_storage_size() -> Quantity {
    Quantity("2Gi".to_owned())
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            storage_class_name: None,
            size: default_storage_size(),
        }
    }
}

/// Setpoint writes through the ingestor: off unless enabled. A request is a NATS request
/// on `<subjectPrefix>.<namespace>.<site>.<device>.<tag>` (a `WriteRequest`, answered with
/// a `WriteReply`, see `proto/tagstream/v1/write.proto`); every attempt is published as an
/// audit point. Restrict who may publish on those subjects with NATS permissions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Writes {
    /// Take write requests. When false the ingestor does not subscribe to the write
    /// subjects, and a request gets NATS's "no responders".
    #[serde(default)]
    pub enabled: bool,
    /// First tokens of the write subjects. Not under `stream.subjectPrefix`: the stream
    /// would store the requests and answer them with its own acknowledgement.
    #[serde(default = "default_writes_subject_prefix")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"))]
    pub subject_prefix: String,
}

fn default_writes_subject_prefix() -> String {
    "tagstream-write".to_owned()
}

impl Writes {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for Writes {
    fn default() -> Self {
        Self {
            enabled: false,
            subject_prefix: default_writes_subject_prefix(),
        }
    }
}

/// Pod placement and resources of the site's ingestor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels the ingestor pod must match (e.g. the edge node wired to the devices).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the ingestor pod tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// CPU and memory requests and limits of the ingestor container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Observed state of a site, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// `Ready` (the ingestor runs the current spec) and `QueueHealthy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Conditions")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Devices deployed to the site's ingestor.
    #[serde(default)]
    pub devices: u32,
    /// Valid formulas deployed to the site's ingestor.
    #[serde(default)]
    pub formulas: u32,
    /// Bytes of the deployed configuration (its ConfigMap's data), against the 1048576
    /// Kubernetes allows: a site over it is not deployed, and says so in a
    /// `ReconcileFailed` event.
    #[serde(default)]
    pub config_bytes: u64,
    /// The ingestor's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
}

/// Queue figures reported by the ingestor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Points waiting to be published.
    pub depth: u64,
    /// Bytes the queue uses on disk.
    pub bytes: u64,
    /// Age in seconds of the oldest waiting point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age_seconds: Option<f64>,
    /// Points dropped by the `dropOldest` policy since the ingestor started.
    #[serde(default)]
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::SiteSpec;

    #[test]
    fn settings_left_at_their_defaults_are_not_written_out() {
        let text = serde_yaml::to_string(&SiteSpec::default()).unwrap();
        assert!(!text.contains("writes"), "{text}");
        let device: crate::DeviceSpec = serde_yaml::from_str(
            "site: s\nconnection: {tcp: {host: h}}\ntags: [{name: t, register: holding, address: 0, type: uint16}]\n",
        )
        .unwrap();
        let text = serde_yaml::to_string(&device).unwrap();
        assert!(!text.contains("write"), "{text}");
    }
}
