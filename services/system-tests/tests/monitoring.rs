//! The dashboard and the alert rules only use metrics the services really expose: after a
//! small run of the real binaries, every `dedup_*` name they query is in a /metrics scrape.

use std::collections::BTreeSet;
use std::time::Duration;

use test_support::client::post_json;
use test_support::events::event;
use test_support::process::Launch;
use test_support::prometheus::Prometheus;
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
        post_json(addr, "/product_events/", body.as_bytes()).await;
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

/// Every query of the dashboard, and every alert's expression, run by a real Prometheus
/// (Debian's `prometheus`) that scraped the real binaries while events flowed: each query
/// evaluates, and each dashboard panel's query has data. Only the operator's queries are
/// empty here (the operator runs against a Kubernetes API; its crate checks its registry).
#[tokio::test]
async fn a_real_prometheus_answers_the_dashboard_and_the_alerts() {
    let env = TestEnv::new("promql").await;
    let worker = Launch::worker(&env).start().await;
    let ingest = Launch::ingest(&env, RABBITMQ).start().await;
    let prometheus = Prometheus::start(&[("ingest", ingest.admin), ("worker", worker.admin)]).await;
    eventually(Duration::from_secs(30), "both services scraped", || async {
        let up = prometheus.query("sum(up)").await.ok()?;
        (value(up.first()?) == 2.0).then_some(())
    })
    .await;

    // Events flow for a few scrapes: new and repeated single events, a batch, a refused event,
    // and a message the worker cannot read (dead-lettered).
    let addr = ingest.addr();
    const ROUNDS: i64 = 8;
    for round in 0..ROUNDS {
        for body in [
            event(&format!("p-{round}")).to_string(),
            event(&format!("p-{round}")).to_string(),
            "{}".to_owned(),
        ] {
            post_json(addr, "/product_events/", body.as_bytes()).await;
        }
        let batch = serde_json::json!([event(&format!("b-{round}")), event(&format!("p-{round}"))]);
        let (status, body) =
            post_json(addr, "/product_events/batch", batch.to_string().as_bytes()).await;
        assert_eq!(status, 202, "{body}");
        env.publish_raw(
            b"not an event\n",
            dedup_message::message::Envelope::properties(chrono::Utc::now(), 1),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    eventually(Duration::from_secs(30), "every event stored", || async {
        (env.stored_rows().await == 2 * ROUNDS).then_some(())
    })
    .await;
    // The last counts and the queue depth after them reach Prometheus.
    eventually(
        Duration::from_secs(30),
        "the stored count scraped",
        || async {
            let found = prometheus
                .query("sum(dedup_worker_events_stored_total)")
                .await
                .ok()?;
            (value(found.first()?) == (2 * ROUNDS) as f64).then_some(())
        },
    )
    .await;

    // The labels the backlog alert sums and filters by, as the worker exports them: the main
    // queue drained, the dead letters parked (the broker's statistics lag a few seconds).
    let main = env.topology.queue.clone();
    let expected = vec![
        (main.clone(), "dead_letter".to_owned(), ROUNDS as f64),
        (main.clone(), "events".to_owned(), 0.0),
    ];
    let by_role = r#"sum by (main_queue, role) (max by (queue, main_queue, role) (dedup_queue_messages{state="ready"}))"#;
    let mut seen = Vec::new();
    for _ in 0..60 {
        let series = prometheus
            .query(by_role)
            .await
            .expect("query the queue depth");
        seen = series
            .iter()
            .map(|s| {
                let label = |k: &str| s["metric"][k].as_str().unwrap_or_default().to_owned();
                (label("main_queue"), label("role"), value(s))
            })
            .collect::<Vec<_>>();
        seen.sort_by(|a, b| a.1.cmp(&b.1));
        if seen == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(seen, expected, "the queue depth by role and main queue");

    let dashboard: serde_json::Value = serde_json::from_str(&repo_file(
        "charts/dedup/files/grafana/dedup-dashboard.json",
    ))
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    collect_queries(&dashboard["panels"], &mut queries);
    assert!(queries.len() >= 20, "found only {queries:?}");
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        // Grafana's interval variable: several scrapes wide here.
        let expr = expr.replace("$__rate_interval", "30s");
        let series = prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("panel {title:?}: {expr}: {e}\n{}", prometheus.log()));
        if series.is_empty() && !expr.contains("dedup_operator_") {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data after a real run:\n{}",
        empty.join("\n")
    );

    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("charts/dedup/files/prometheus/alerts.yaml"))
            .expect("the alert rules are YAML");
    let rules = alerts["groups"][0]["rules"].as_sequence().expect("rules");
    assert!(rules.len() >= 5, "found only {} rules", rules.len());
    for rule in rules {
        let (name, expr) = (rule["alert"].as_str(), rule["expr"].as_str());
        let (Some(name), Some(expr)) = (name, expr) else {
            panic!("a rule without alert or expr: {rule:?}");
        };
        let firing = prometheus
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("alert {name}: {e}"));
        // A healthy pipeline that just ran raises nothing but its dead letters.
        assert_eq!(
            !firing.is_empty(),
            name == "DedupDeadLetters",
            "alert {name}: {firing:?}"
        );
    }
    assert!(ingest.stop().await, "ingest stops cleanly");
    assert!(worker.stop().await, "the worker stops cleanly");
}

/// A query result's value as a number.
fn value(series: &serde_json::Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Every panel's `(title, expr)`, rows' inner panels included.
fn collect_queries(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        collect_queries(&panel["panels"], out);
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or_default().to_owned();
                out.push((title, expr.to_owned()));
            }
        }
    }
}
