//! The worker's Prometheus metrics: few, bounded labels, base units.

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];
const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// The tiers that catch duplicates, as metric labels.
pub const TIERS: [&str; 3] = ["in_batch", "recent_keys", "postgres"];

/// Every metric the worker exports. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    pub stored: IntCounter,
    /// Duplicates by the tier that caught them (see [`TIERS`]).
    pub duplicates: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    pub redis_seconds: HistogramVec,
    pub postgres_seconds: HistogramVec,
    pub redis_degraded: IntGauge,
    pub end_to_end_lag_seconds: Histogram,
    pub batch_errors: IntCounterVec,
    /// 1 while the worker holds deliveries and has committed nothing for STALL_TIMEOUT.
    pub stalled: IntGauge,
    /// Partitions the maintenance step created and dropped.
    pub partitions: IntCounterVec,
    /// Ready and unacknowledged messages per queue, read from the broker.
    pub queue_messages: IntGaugeVec,
    /// 1 while every shard queue's leader is on one node of a cluster.
    pub shard_leaders_on_one_node: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric")
        };
        let histogram_vec = |name: &str, help: &str, label: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &[label],
            )
            .expect("valid metric")
        };
        let m = Self {
            registry: Registry::new(),
            consumed: counter(
                "dedup_worker_events_consumed_total",
                "Events taken from the queue (valid or not).",
            ),
            stored: counter(
                "dedup_worker_events_stored_total",
                "Unique events written to PostgreSQL.",
            ),
            duplicates: counter_vec(
                "dedup_worker_duplicates_total",
                "Duplicate events dropped, by the tier that caught them.",
                &["tier"],
            ),
            dead_lettered: counter_vec(
                "dedup_worker_dead_lettered_total",
                "Events sent to the dead-letter queue, by reason.",
                &["reason"],
            ),
            batch_size: histogram(
                "dedup_worker_batch_size",
                "Events per processed batch.",
                BATCH_BUCKETS,
            ),
            batch_seconds: histogram(
                "dedup_worker_batch_duration_seconds",
                "Time to process one batch, decode to ack.",
                LATENCY_BUCKETS,
            ),
            redis_seconds: histogram_vec(
                "dedup_worker_redis_duration_seconds",
                "Redis round-trip time per batch.",
                "op",
            ),
            postgres_seconds: histogram_vec(
                "dedup_worker_postgres_duration_seconds",
                "PostgreSQL round-trip time per batch.",
                "op",
            ),
            redis_degraded: IntGauge::new(
                "dedup_worker_redis_degraded",
                "1 while Redis is unavailable and dedup runs on PostgreSQL alone.",
            )
            .expect("valid metric"),
            end_to_end_lag_seconds: histogram(
                "dedup_worker_end_to_end_lag_seconds",
                "Time from ingest receiving an event to its row being committed.",
                LAG_BUCKETS,
            ),
            batch_errors: counter_vec(
                "dedup_worker_batch_errors_total",
                "Failures while processing batches, by stage.",
                &["stage"],
            ),
            stalled: IntGauge::new(
                "dedup_worker_stalled",
                "1 while the worker holds deliveries and has committed no batch for STALL_TIMEOUT.",
            )
            .expect("valid metric"),
            partitions: counter_vec(
                "dedup_worker_partitions_total",
                "Daily partitions the maintenance step created or dropped, by action.",
                &["action"],
            ),
            queue_messages: IntGaugeVec::new(
                Opts::new(
                    "dedup_queue_messages",
                    "Messages in the queue, by state (ready, unacked), as the broker reports them; \
                     role is events (the main queue and its shards) or dead_letter, main_queue \
                     the AMQP_QUEUE they belong to.",
                ),
                &["queue", "state", "role", "main_queue"],
            )
            .expect("valid metric"),
            shard_leaders_on_one_node: IntGauge::new(
                "dedup_queue_shard_leaders_on_one_node",
                "1 while all the shard queues (AMQP_QUEUE_SHARDS of 2 or more) have their leader \
                 on one node although their replicas span several: that node does every shard's \
                 work.",
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.consumed.clone()),
            Box::new(m.stored.clone()),
            Box::new(m.duplicates.clone()),
            Box::new(m.dead_lettered.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.batch_seconds.clone()),
            Box::new(m.redis_seconds.clone()),
            Box::new(m.postgres_seconds.clone()),
            Box::new(m.redis_degraded.clone()),
            Box::new(m.end_to_end_lag_seconds.clone()),
            Box::new(m.batch_errors.clone()),
            Box::new(m.stalled.clone()),
            Box::new(m.partitions.clone()),
            Box::new(m.queue_messages.clone()),
            Box::new(m.shard_leaders_on_one_node.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Pre-create the bounded label values so dashboards read 0, not "no data".
        for tier in TIERS {
            m.duplicates.with_label_values(&[tier]);
        }
        for action in ["created", "dropped"] {
            m.partitions.with_label_values(&[action]);
        }
        for reason in [
            "invalid_json",
            "invalid_event",
            "invalid_encoding",
            "outside_window",
            "refused_by_postgres",
        ] {
            m.dead_lettered.with_label_values(&[reason]);
        }
        for stage in ["redis", "postgres", "amqp"] {
            m.batch_errors.with_label_values(&[stage]);
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
