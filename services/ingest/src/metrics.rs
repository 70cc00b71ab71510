//! ingest's Prometheus metrics: few, bounded labels, base units.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Latency buckets in seconds, from 0.5 ms (a confirm on an idle broker) to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Every metric ingest exports, registered in one registry. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Requests by route (single, batch, health) and status class (2xx, 4xx, 5xx).
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Events accepted (confirmed by the broker) or rejected (invalid), by source. Requests
    /// count them through their caller's children (`auth::Caller`), resolved once per key.
    pub events: IntCounterVec,
    /// Write keys loaded.
    pub write_keys: IntGauge,
    /// Key file reloads by outcome (ok, error).
    pub key_reloads: IntCounterVec,
    /// Requests refused for their key, by reason (missing, invalid).
    pub auth_failures: IntCounterVec,
    /// Requests refused by a rate limit, by limit (key, address).
    pub rate_limited: IntCounterVec,
    pub publish_confirm_seconds: Histogram,
    pub publishes_in_flight: IntGauge,
    pub broker_connected: IntGauge,
    /// Size of each published message body, after compression.
    pub message_bytes: Histogram,
    /// Client connections open (TLS handshakes included), and the most that may be.
    pub connections: IntGauge,
    pub connections_limit: IntGauge,
    /// Connections ingest closed on a client's account.
    pub connections_closed: ClosedConnections,
    /// The series every accepted single event touches, resolved once: a label lookup per
    /// request hashes the labels and takes the vector's lock.
    pub hot: HotSeries,
}

/// `dedup_ingest_connections_closed_total` by reason.
#[derive(Clone)]
pub struct ClosedConnections {
    /// No whole request head within HEADER_READ_TIMEOUT (a slow client, or an idle
    /// keep-alive connection).
    pub header_timeout: IntCounter,
    /// A request head past MAX_HEADER_BYTES (answered 431).
    pub header_too_large: IntCounter,
    /// A TLS handshake that failed or did not finish in time.
    pub tls_handshake: IntCounter,
}

/// Pre-resolved children of the labelled metrics, for the per-request path.
#[derive(Clone)]
pub struct HotSeries {
    /// `requests{route="single",status_class="2xx"}`.
    pub single_2xx: IntCounter,
    /// `request_seconds{route="single"}`.
    pub single_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "dedup_ingest_requests_total",
                "HTTP requests by route and status class.",
            ),
            &["route", "status_class"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "dedup_ingest_request_duration_seconds",
                "HTTP request latency.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let events = IntCounterVec::new(
            Opts::new(
                "dedup_ingest_events_total",
                "Events accepted (broker-confirmed) or rejected (invalid), by source (the write \
                 key's name; anonymous with AUTH=none).",
            ),
            &["outcome", "source"],
        )
        .expect("valid metric");
        let write_keys =
            IntGauge::new("dedup_ingest_write_keys", "Write keys loaded.").expect("valid metric");
        let key_reloads = IntCounterVec::new(
            Opts::new(
                "dedup_ingest_write_key_reloads_total",
                "Reloads of the write key file by outcome (ok; error: the file is invalid and the keys in use stay).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "dedup_ingest_auth_failures_total",
                "Requests refused with 401, by reason (missing, invalid).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "dedup_ingest_rate_limited_total",
                "Requests refused with 429, by limit (key, address).",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let publish_confirm_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "dedup_ingest_publish_confirm_duration_seconds",
                "Time from publishing a message to the broker's confirm.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let publishes_in_flight = IntGauge::new(
            "dedup_ingest_publishes_in_flight",
            "Messages published and awaiting a confirm.",
        )
        .expect("valid metric");
        let broker_connected = IntGauge::new(
            "dedup_ingest_broker_connected",
            "1 while connected to RabbitMQ, else 0.",
        )
        .expect("valid metric");
        let message_bytes = Histogram::with_opts(
            HistogramOpts::new(
                "dedup_ingest_message_bytes",
                "Bytes of each published message body, after compression.",
            )
            .buckets(prometheus::exponential_buckets(256.0, 4.0, 8).expect("valid buckets")),
        )
        .expect("valid metric");
        let connections = IntGauge::new(
            "dedup_ingest_connections",
            "Client connections open, TLS handshakes included.",
        )
        .expect("valid metric");
        let connections_limit = IntGauge::new(
            "dedup_ingest_connections_limit",
            "Most client connections open at once (MAX_CONNECTIONS); further clients wait to \
             be accepted.",
        )
        .expect("valid metric");
        let closed = IntCounterVec::new(
            Opts::new(
                "dedup_ingest_connections_closed_total",
                "Connections closed by ingest on the client's account, by reason (header_timeout: \
                 no whole request head within HEADER_READ_TIMEOUT, idle keep-alive connections \
                 included; header_too_large: answered 431; tls_handshake: failed or too slow).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let connections_closed = ClosedConnections {
            header_timeout: closed.with_label_values(&["header_timeout"]),
            header_too_large: closed.with_label_values(&["header_too_large"]),
            tls_handshake: closed.with_label_values(&["tls_handshake"]),
        };
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(events.clone()),
            Box::new(publish_confirm_seconds.clone()),
            Box::new(publishes_in_flight.clone()),
            Box::new(broker_connected.clone()),
            Box::new(message_bytes.clone()),
            Box::new(connections.clone()),
            Box::new(connections_limit.clone()),
            Box::new(closed),
            Box::new(write_keys.clone()),
            Box::new(key_reloads.clone()),
            Box::new(auth_failures.clone()),
            Box::new(rate_limited.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // The series dashboards expect exist from the start, so they read 0 rather than
        // "no data".
        for (vec, labels) in [
            (&key_reloads, &["ok"][..]),
            (&key_reloads, &["error"]),
            (&auth_failures, &["missing"]),
            (&auth_failures, &["invalid"]),
            (&rate_limited, &["key"]),
            (&rate_limited, &["address"]),
        ] {
            vec.with_label_values(labels);
        }
        // The event routes' status classes too: the error ratio reads 0 %, not "no data".
        for route in ["single", "batch"] {
            for class in ["2xx", "4xx", "5xx"] {
                requests.with_label_values(&[route, class]);
            }
        }
        let hot = HotSeries {
            single_2xx: requests.with_label_values(&["single", "2xx"]),
            single_seconds: request_seconds.with_label_values(&["single"]),
        };
        Self {
            registry,
            requests,
            request_seconds,
            events,
            write_keys,
            key_reloads,
            auth_failures,
            rate_limited,
            publish_confirm_seconds,
            publishes_in_flight,
            broker_connected,
            message_bytes,
            connections,
            connections_limit,
            connections_closed,
            hot,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pre-resolved series are the labelled ones the dashboards query, not copies.
    #[test]
    fn hot_series_are_the_labelled_series() {
        let metrics = Metrics::new();
        metrics.hot.single_2xx.inc();
        metrics.hot.single_seconds.observe(0.004);
        assert_eq!(
            metrics.requests.with_label_values(&["single", "2xx"]).get(),
            1
        );
        assert_eq!(
            metrics
                .request_seconds
                .with_label_values(&["single"])
                .get_sample_count(),
            1
        );
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry.gather())
            .expect("encode");
        assert!(
            text.contains(r#"dedup_ingest_requests_total{route="single",status_class="2xx"} 1"#),
            "{text}"
        );
    }
}
