//! The operator's own Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};

/// Every metric the operator exports. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub reconcile_errors: IntCounter,
    pub reconcile_seconds: Histogram,
    /// Workers the scaler asked for, per pipeline (namespace, name).
    pub workers_desired: IntGaugeVec,
    /// Worker pods available, per pipeline.
    pub workers_current: IntGaugeVec,
    /// Ready plus unacked messages at the last reading, per pipeline.
    pub queue_depth: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["namespace", "name"]).expect("valid metric")
        };
        let m = Self {
            registry: Registry::new(),
            reconciles: IntCounter::new("dedup_operator_reconciles_total", "Reconciles run.")
                .expect("valid metric"),
            reconcile_errors: IntCounter::new(
                "dedup_operator_reconcile_errors_total",
                "Reconciles that failed.",
            )
            .expect("valid metric"),
            reconcile_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "dedup_operator_reconcile_duration_seconds",
                    "Time one reconcile took.",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .expect("valid metric"),
            workers_desired: gauge(
                "dedup_operator_workers_desired",
                "Worker replicas the scaler asked for.",
            ),
            workers_current: gauge("dedup_operator_workers_current", "Worker pods available."),
            queue_depth: gauge(
                "dedup_operator_queue_depth",
                "Ready plus unacknowledged messages at the last reading (-1: unreadable).",
            ),
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.reconcile_errors.clone()),
            Box::new(m.reconcile_seconds.clone()),
            Box::new(m.workers_desired.clone()),
            Box::new(m.workers_current.clone()),
            Box::new(m.queue_depth.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
