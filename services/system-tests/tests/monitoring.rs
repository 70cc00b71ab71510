//! The dashboard and the alert rules only use metrics the services really expose: after a
//! small run of the real binaries, every `dedup_*` name they query is in a /metrics scrape.

use std::collections::BTreeSet;
use std::time::Duration;

use test_support::client::http_request;
use test_support::events::event;
use test_support::process::Launch;
use test_support::{TestEnv, eventually};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn repo_file(path: &str) -> String {
    let full = format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// Every `dedup_…` identifier in a text (PromQL, JSON or YAML).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("dedup_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Series names in a Prometheus text exposition, histograms also under their suffixes.
fn exposed(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_exposed_metrics() {
    let env = TestEnv::new("monitoring").await;
    let worker = Launch::worker(&env).start().await;
    let ingest = Launch::ingest(&env, RABBITMQ).start().await;
    let addr = ingest.addr();
    for body in [
        event("m-1").to_string(),
        event("m-1").to_string(),
        "{}".to_owned(),
    ] {
        http_request(
            addr,
            "POST",
            "/product_events/",
            "application/json",
            body.as_bytes(),
        )
        .await;
    }
    eventually(
        Duration::from_secs(20),
        "the event to be stored",
        || async { (env.stored_rows().await == 1).then_some(()) },
    )
    .await;

    let mut names = exposed(&ingest.metrics().await);
    let worker_names = eventually(
        Duration::from_secs(15),
        "the queue depth gauges",
        || async {
            let names = exposed(&worker.metrics().await);
            names.contains("dedup_queue_messages").then_some(names)
        },
    )
    .await;
    names.extend(worker_names);

    for file in [
        "charts/dedup/files/grafana/dedup-dashboard.json",
        "charts/dedup/files/prometheus/alerts.yaml",
    ] {
        let used = metric_names(&repo_file(file));
        assert!(used.len() >= 5, "{file}: found only {used:?}");
        // The operator's own names are checked against its registry in its crate (it needs a
        // Kubernetes API to run).
        let missing: Vec<&String> = used
            .iter()
            .filter(|n| !names.contains(*n) && !n.starts_with("dedup_operator_"))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no service exposes: {missing:?}\nexposed: {names:?}"
        );
    }
    assert!(ingest.stop().await, "ingest stops cleanly");
    assert!(worker.stop().await, "the worker stops cleanly");
}
