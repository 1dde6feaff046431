//! The operator's Prometheus metrics.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
    /// `written` or `unchanged`.
    pub outcome: &'static str,
}

/// Counters shared by the reconciler and the status loop.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_seconds: Histogram,
    /// Rendered objects, by whether they were written.
    pub applies: Family<WriteLabels, Counter>,
    /// Status patches, by kind.
    pub status_writes: Family<KindLabels, Counter>,
    /// Status patches that failed, by kind (the pass goes on with the other objects).
    pub status_write_failures: Family<KindLabels, Counter>,
    pub report_failures: Counter,
    pub sites_created: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            // 1 ms to 8 s.
            reconcile_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 14,
            )),
            applies: Family::default(),
            status_writes: Family::default(),
            status_write_failures: Family::default(),
            report_failures: Counter::default(),
            sites_created: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("tagstream_operator");
        registry.register("reconciles", "Site reconciles", self.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Site reconciles that failed",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one site",
            self.reconcile_seconds.clone(),
        );
        registry.register(
            "applies",
            "Rendered objects by kind and whether they were written",
            self.applies.clone(),
        );
        registry.register("status_writes", "Status patches by kind", self.status_writes.clone());
        registry.register(
            "status_write_failures",
            "Status patches that failed, by kind (the pass goes on with the other objects)",
            self.status_write_failures.clone(),
        );
        registry.register(
            "report_failures",
            "Ingestor /status reads that failed",
            self.report_failures.clone(),
        );
        registry.register(
            "sites_created",
            "Sites created for a Device or Formula naming a missing one",
            self.sites_created.clone(),
        );
    }

    pub fn count_status_write_failure(&self, kind: &str) {
        self.status_write_failures
            .get_or_create(&KindLabels { kind: kind.to_owned() })
            .inc();
    }

    pub fn count_status_write(&self, kind: &str) {
        self.status_writes
            .get_or_create(&KindLabels { kind: kind.to_owned() })
            .inc();
    }
}
