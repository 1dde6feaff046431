//! What an ingestor reports on `/status`: written by the ingestor, read by the operator
//! (which turns it into the objects' `status`).

use std::collections::BTreeMap;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::{Deserialize, Serialize};

/// What the ingestor knows of a device's recent polls (also its `/status` entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceHealth {
    /// Whether the last poll reached the device.
    pub connected: bool,
    /// Time of the last successful poll, ns since the Unix epoch.
    #[serde(rename = "lastPollNs")]
    pub last_success_ns: Option<i64>,
    pub polls: u64,
    pub failed_polls: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Poll cycles skipped because the previous cycle of the same group was still running
    /// when they were due: the device, or its bus, answers slower than `pollInterval`.
    #[serde(default)]
    pub poll_cycles_skipped: u64,
    /// Requests sent again because no answer came within the device's timeout: replies
    /// lost on the line, which the device's `retries` kept from failing a poll.
    #[serde(default)]
    pub requests_retried: u64,
}

impl DeviceHealth {
    pub fn record_success(&mut self, at_ns: i64) {
        self.connected = true;
        self.last_success_ns = Some(at_ns);
        self.polls += 1;
        self.consecutive_failures = 0;
        self.last_error = None;
    }

    pub fn record_skipped(&mut self, cycles: u64) {
        self.poll_cycles_skipped += cycles;
    }

    pub fn record_failure(&mut self, error: String, consecutive: u32) {
        self.connected = false;
        self.polls += 1;
        self.failed_polls += 1;
        self.consecutive_failures = consecutive;
        self.last_error = Some(error);
    }
}

/// `/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub namespace: String,
    pub site: String,
    pub devices: BTreeMap<String, DeviceHealth>,
    pub formulas: BTreeMap<String, FormulaStatus>,
    pub queue: QueueStatus,
    pub publisher: PublisherStatus,
    pub points_polled: u64,
    pub points_derived: u64,
    pub points_lost: u64,
    /// Write attempts by outcome (`written`, `refused`, `out_of_range`, ...).
    #[serde(default)]
    pub writes: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FormulaStatus {
    pub valid: bool,
    pub error: Option<String>,
    /// The latest result as text (its quality when it has no value).
    #[serde(default)]
    pub last_value: Option<String>,
    /// When the latest result was computed, ns since the Unix epoch.
    #[serde(default)]
    pub last_value_ns: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    pub points: u64,
    pub records: u64,
    pub disk_bytes: u64,
    pub payload_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub dropped_points: u64,
    pub corrupt_records: u64,
    pub paused: bool,
    pub moved_aside: Option<String>,
    /// Whether the filesystem's free space, not `maxSize`, limits the queue.
    #[serde(default)]
    pub disk_full: bool,
    /// Bytes free on the queue's filesystem.
    #[serde(default)]
    pub volume_available_bytes: Option<u64>,
    /// The last failed queue write, until a write succeeds again.
    #[serde(default)]
    pub write_error: Option<String>,
    /// Queue writes that failed and were made again after reopening the store.
    #[serde(default)]
    pub write_failures: u64,
    /// Acknowledged records kept for `ackedRetention`, and their bytes.
    #[serde(default)]
    pub retained_records: u64,
    #[serde(default)]
    pub retained_bytes: u64,
    /// Acknowledged records given up before their retention ended, to make room.
    #[serde(default)]
    pub retained_evicted: u64,
    /// Records held in memory (unacknowledged; some also on disk), and their bytes.
    #[serde(default)]
    pub memory_records: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// Records written to disk because JetStream had not acknowledged them within the
    /// flush interval, since the ingestor started.
    #[serde(default)]
    pub records_written: u64,
    /// Group writes to disk (each one flush and fsync), since the ingestor started.
    #[serde(default)]
    pub groups_written: u64,
    /// Records JetStream acknowledged before any disk write, since the ingestor started.
    #[serde(default)]
    pub records_acked_from_memory: u64,
}

/// What the publisher reports for status and metrics.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublisherStatus {
    pub connected: bool,
    pub published_batches: u64,
    pub acked_records: u64,
    pub duplicates: u64,
    /// Records JetStream stored after a later record (a failover while in flight).
    #[serde(default)]
    pub reordered: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// What in the Site's broker settings is refused while it is (a stream whose subjects
    /// overlap another's, credentials that are not mounted): a user's fix, not a retry,
    /// ends it. Also in `last_error`.
    #[serde(default)]
    pub config_error: Option<String>,
    /// Records JetStream had acknowledged and then no longer held (a broker's power cut),
    /// found when the publisher (re)connected, and published again.
    #[serde(default)]
    pub broker_lost_records: u64,
    /// What the last such loss was, and when it was found (ns since the Unix epoch).
    #[serde(default)]
    pub last_broker_loss: Option<String>,
    #[serde(default, rename = "lastBrokerLossNs")]
    pub last_broker_loss_ns: Option<i64>,
    /// Seconds from publish to ack of the latest ack.
    #[serde(rename = "lastAckLatencySeconds")]
    pub last_ack_latency: Option<f64>,
    /// Seconds from publish to ack, every ack; clones share it (it is registered once
    /// with the metrics registry).
    #[serde(skip, default = "ack_latency_histogram")]
    pub ack_latency: Histogram,
}

impl Default for PublisherStatus {
    fn default() -> Self {
        Self {
            connected: false,
            published_batches: 0,
            acked_records: 0,
            duplicates: 0,
            reordered: 0,
            failures: 0,
            last_error: None,
            config_error: None,
            broker_lost_records: 0,
            last_broker_loss: None,
            last_broker_loss_ns: None,
            last_ack_latency: None,
            ack_latency: ack_latency_histogram(),
        }
    }
}

fn ack_latency_histogram() -> Histogram {
    // 0.5 ms to 4 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}
