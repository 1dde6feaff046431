//! What the ingestor knows about its site, for `/status` (read by the operator) and
//! `/metrics` (scraped by Prometheus).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use tagstream_core::{
    point::Sample,
    report::{DeviceHealth, FormulaStatus, PublisherStatus, QueueStatus, Status},
};

use crate::{acquisition::poller::HealthMap, queue::Queue};

/// Shared state of the running site.
#[derive(Debug)]
pub struct SiteState {
    pub namespace: String,
    pub site: String,
    pub queue: Queue,
    pub queue_moved_aside: Option<PathBuf>,
    pub publisher: Arc<Mutex<PublisherStatus>>,
    pub devices: Mutex<HealthMap>,
    pub formula_issues: Mutex<BTreeMap<String, String>>,
    pub formulas: Mutex<Vec<String>>,
    /// The latest result of each formula, for `/status`.
    pub formula_values: Mutex<HashMap<String, Sample>>,
    pub ready: AtomicBool,
    points_polled: AtomicU64,
    points_derived: AtomicU64,
    points_lost: AtomicU64,
    pub reloads: AtomicU64,
    /// Write attempts by outcome.
    writes: Mutex<BTreeMap<String, u64>>,
}

impl SiteState {
    pub fn new(namespace: &str, site: &str, queue: Queue, queue_moved_aside: Option<PathBuf>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            site: site.to_owned(),
            queue,
            queue_moved_aside,
            publisher: Arc::default(),
            devices: Mutex::default(),
            formula_issues: Mutex::default(),
            formulas: Mutex::default(),
            formula_values: Mutex::default(),
            ready: AtomicBool::new(false),
            points_polled: AtomicU64::new(0),
            points_derived: AtomicU64::new(0),
            points_lost: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            writes: Mutex::default(),
        }
    }

    pub fn count_points(&self, polled: u64, derived: u64) {
        self.points_polled.fetch_add(polled, Ordering::Relaxed);
        self.points_derived.fetch_add(derived, Ordering::Relaxed);
    }

    pub fn count_write(&self, outcome: &str) {
        *self
            .writes
            .lock()
            .expect("writes lock")
            .entry(outcome.to_owned())
            .or_default() += 1;
    }

    pub fn count_lost(&self, points: u64) {
        self.points_lost.fetch_add(points, Ordering::Relaxed);
    }

    /// The JSON document behind `/status`.
    pub fn status(&self) -> Status {
        let now = tagstream_core::point::now_ns();
        let devices = self
            .devices
            .lock()
            .expect("devices lock")
            .iter()
            .map(|(name, health)| (name.clone(), health.lock().expect("health lock").clone()))
            .collect();
        let issues = self.formula_issues.lock().expect("issues lock").clone();
        let values = self.formula_values.lock().expect("values lock");
        let mut formulas: BTreeMap<String, FormulaStatus> = self
            .formulas
            .lock()
            .expect("formulas lock")
            .iter()
            .map(|name| {
                let last = values.get(name);
                let status = FormulaStatus {
                    valid: true,
                    error: None,
                    last_value: last.map(|s| {
                        s.value
                            .as_ref()
                            .map_or_else(|| s.quality.to_string(), ToString::to_string)
                    }),
                    last_value_ns: last.map(|s| s.timestamp_ns),
                };
                (name.clone(), status)
            })
            .collect();
        drop(values);
        for (name, error) in issues {
            formulas.insert(
                name,
                FormulaStatus {
                    valid: false,
                    error: Some(error),
                    last_value: None,
                    last_value_ns: None,
                },
            );
        }
        let q = self.queue.stats();
        Status {
            namespace: self.namespace.clone(),
            site: self.site.clone(),
            devices,
            formulas,
            queue: QueueStatus {
                points: q.points,
                records: q.records,
                disk_bytes: q.disk_bytes,
                payload_bytes: q.payload_bytes,
                oldest_age_seconds: q.oldest_enqueued_ns.map(|at| (now - at).max(0) as f64 / 1e9),
                dropped_points: q.dropped_points,
                corrupt_records: q.corrupt_records,
                paused: q.paused,
                moved_aside: self.queue_moved_aside.as_ref().map(|p| p.display().to_string()),
                disk_full: q.disk_full,
                volume_available_bytes: q.volume_available_bytes,
                write_error: q.write_error,
                write_failures: q.write_failures,
                retained_records: q.retained_records,
                retained_bytes: q.retained_bytes,
                retained_evicted: q.retained_evicted,
                memory_records: q.memory_records,
                memory_bytes: q.memory_bytes,
                records_written: q.records_written,
                groups_written: q.groups_written,
                records_acked_from_memory: q.records_acked_from_memory,
            },
            publisher: self.publisher.lock().expect("publisher lock").clone(),
            points_polled: self.points_polled.load(Ordering::Relaxed),
            points_derived: self.points_derived.load(Ordering::Relaxed),
            points_lost: self.points_lost.load(Ordering::Relaxed),
            writes: self.writes.lock().expect("writes lock").clone(),
        }
    }
}

/// Exposes [`SiteState`] to Prometheus, read at scrape time.
#[derive(Debug)]
pub struct Metrics(pub Arc<SiteState>);

/// A family with one unlabelled sample.
fn one<V>(value: V) -> Vec<(Vec<(&'static str, String)>, V)> {
    vec![(Vec::new(), value)]
}

fn encode_families<V: Copy, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    families: &[Family<'_, V>],
    kind: MetricType,
    metric: fn(V) -> M,
) -> std::fmt::Result {
    for (name, help, samples) in families {
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in samples {
            metric(*value).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

/// One metric family: name, help, and its samples (labels, value).
type Family<'a, V> = (&'a str, &'a str, Vec<(Vec<(&'a str, String)>, V)>);

impl Collector for Metrics {
    #[allow(clippy::too_many_lines, reason = "a table of metric families, one entry each")]
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = self.0.status();
        let per_device = |f: &dyn Fn(&DeviceHealth) -> u64| -> Vec<(Vec<(&str, String)>, u64)> {
            status
                .devices
                .iter()
                .map(|(n, d)| (vec![("device", n.clone())], f(d)))
                .collect()
        };
        let counters: Vec<Family<'_, u64>> = vec![
            (
                "tagstream_polls",
                "Poll cycles, successful or not",
                per_device(&|d| d.polls),
            ),
            (
                "tagstream_failed_polls",
                "Poll cycles that failed",
                per_device(&|d| d.failed_polls),
            ),
            (
                "tagstream_poll_cycles_skipped",
                "Poll cycles skipped because the previous one was still running",
                per_device(&|d| d.poll_cycles_skipped),
            ),
            (
                "tagstream_requests_retried",
                "Requests sent again after no answer came within the device's timeout",
                per_device(&|d| d.requests_retried),
            ),
            (
                "tagstream_points_polled",
                "Points read from devices and queued",
                one(status.points_polled),
            ),
            (
                "tagstream_points_derived",
                "Formula results queued",
                one(status.points_derived),
            ),
            (
                "tagstream_points_lost",
                "Points that could not be persisted",
                one(status.points_lost),
            ),
            (
                "tagstream_writes",
                "Write attempts, by outcome",
                status
                    .writes
                    .iter()
                    .map(|(outcome, n)| (vec![("outcome", outcome.clone())], *n))
                    .collect(),
            ),
            (
                "tagstream_config_reloads",
                "Manifest changes applied without a restart",
                one(self.0.reloads.load(Ordering::Relaxed)),
            ),
            (
                "tagstream_queue_dropped_points",
                "Points dropped by the dropOldest policy",
                one(status.queue.dropped_points),
            ),
            (
                "tagstream_queue_corrupt_records",
                "Unreadable queue records skipped",
                one(status.queue.corrupt_records),
            ),
            (
                "tagstream_queue_write_failures",
                "Queue writes that failed (a full disk, an I/O error) and were made again",
                one(status.queue.write_failures),
            ),
            (
                "tagstream_queue_retained_evicted",
                "Acknowledged records given up before their ackedRetention ended, to make room",
                one(status.queue.retained_evicted),
            ),
            (
                "tagstream_queue_records_written",
                "Queue records written to disk because JetStream had not acknowledged them within the flush interval",
                one(status.queue.records_written),
            ),
            (
                "tagstream_queue_group_writes",
                "Group writes to disk, each one flush and fsync",
                one(status.queue.groups_written),
            ),
            (
                "tagstream_queue_records_acked_from_memory",
                "Queue records JetStream acknowledged before any disk write",
                one(status.queue.records_acked_from_memory),
            ),
            (
                "tagstream_broker_lost_records",
                "Records JetStream acknowledged and then no longer held (a broker's power cut), published again",
                one(status.publisher.broker_lost_records),
            ),
            (
                "tagstream_published_batches",
                "Batches sent to JetStream",
                one(status.publisher.published_batches),
            ),
            (
                "tagstream_acked_records",
                "Queue records acknowledged by JetStream and removed",
                one(status.publisher.acked_records),
            ),
            (
                "tagstream_publish_duplicates",
                "Re-sent batches JetStream dropped as duplicates",
                one(status.publisher.duplicates),
            ),
            (
                "tagstream_publish_reordered",
                "Batches JetStream stored after a later one (a failover while they were in flight)",
                one(status.publisher.reordered),
            ),
            (
                "tagstream_publish_failures",
                "Publish attempts that failed and were retried",
                one(status.publisher.failures),
            ),
        ];
        let flag = |b: bool| f64::from(u8::from(b));
        let connected = status
            .devices
            .iter()
            .map(|(n, d)| (vec![("device", n.clone())], flag(d.connected)))
            .collect();
        let gauges: Vec<Family<'_, f64>> = vec![
            (
                "tagstream_device_connected",
                "1 when the last poll reached the device",
                connected,
            ),
            (
                "tagstream_queue_points",
                "Points waiting to be published",
                one(status.queue.points as f64),
            ),
            (
                "tagstream_queue_disk_bytes",
                "Bytes the queue uses on disk",
                one(status.queue.disk_bytes as f64),
            ),
            (
                "tagstream_queue_memory_bytes",
                "Bytes of records the queue holds in memory (queue.memorySize bounds them)",
                one(status.queue.memory_bytes as f64),
            ),
            (
                "tagstream_queue_retained_bytes",
                "Bytes of acknowledged records kept for ackedRetention, to publish again what a broker's power cut loses",
                one(status.queue.retained_bytes as f64),
            ),
            (
                "tagstream_queue_oldest_age_seconds",
                "Age of the oldest waiting point",
                one(status.queue.oldest_age_seconds.unwrap_or(0.0)),
            ),
            (
                "tagstream_queue_paused",
                "1 while pausePolling holds new points",
                one(flag(status.queue.paused)),
            ),
            (
                "tagstream_queue_disk_full",
                "1 while the filesystem's free space, not maxSize, limits the queue",
                one(flag(status.queue.disk_full)),
            ),
            (
                "tagstream_queue_volume_available_bytes",
                "Bytes free on the queue's filesystem",
                one(status.queue.volume_available_bytes.unwrap_or(0) as f64),
            ),
            (
                "tagstream_queue_recovered_from_corruption",
                "1 when this run found the queue corrupt, moved it aside and started a fresh one",
                one(flag(status.queue.moved_aside.is_some())),
            ),
            (
                "tagstream_broker_connected",
                "1 while acks arrive from JetStream",
                one(flag(status.publisher.connected)),
            ),
            (
                "tagstream_formulas_invalid",
                "Formulas not evaluated because they are invalid",
                one(status.formulas.values().filter(|f| !f.valid).count() as f64),
            ),
        ];
        encode_families(&mut encoder, &counters, MetricType::Counter, ConstCounter::new)?;
        encode_families(&mut encoder, &gauges, MetricType::Gauge, ConstGauge::new)?;
        Ok(())
    }
}
