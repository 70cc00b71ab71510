//! The operator's own Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

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
    /// The pipeline's maxReplicas, so alerts can tell when scaling has run out.
    pub workers_max: IntGaugeVec,
    /// 1 while this replica holds the leader Lease and runs the controllers.
    pub leader: IntGauge,
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
            workers_max: gauge(
                "dedup_operator_workers_max",
                "The pipeline's worker.maxReplicas: the most workers the operator will run.",
            ),
            leader: IntGauge::new(
                "dedup_operator_leader",
                "1 while this replica holds the leader Lease (runs the controllers), else 0.",
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.reconcile_errors.clone()),
            Box::new(m.reconcile_seconds.clone()),
            Box::new(m.workers_desired.clone()),
            Box::new(m.workers_current.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.workers_max.clone()),
            Box::new(m.leader.clone()),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every `dedup_operator_*` name the dashboard and the alert rules query is one the operator
    /// exports (the system tests check the other services' names against real scrapes; the
    /// operator needs a Kubernetes API to run, so its registry is checked here).
    #[test]
    fn the_dashboard_and_alerts_query_only_exported_operator_metrics() {
        let m = Metrics::new();
        for vec in [
            &m.workers_desired,
            &m.workers_current,
            &m.queue_depth,
            &m.workers_max,
        ] {
            vec.with_label_values(&["ns", "p"]).set(1);
        }
        m.reconcile_seconds.observe(0.1);
        let exported: BTreeSet<String> = m
            .registry
            .gather()
            .iter()
            .flat_map(|f| {
                let name = f.name().to_owned();
                ["", "_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}"))
            })
            .collect();
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/dedup/files");
        let mut used = BTreeSet::new();
        for file in ["grafana/dedup-dashboard.json", "prometheus/alerts.yaml"] {
            let text = std::fs::read_to_string(format!("{root}/{file}")).expect("monitoring file");
            for (at, _) in text.match_indices("dedup_operator_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used.insert(name);
            }
        }
        assert!(used.len() >= 3, "{used:?}");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "not exported: {missing:?}; exported: {exported:?}"
        );
    }
}
