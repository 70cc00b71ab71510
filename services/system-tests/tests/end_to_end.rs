//! The whole pipeline as a newcomer runs it: the real `ingest` and `dedup-worker` binaries,
//! HTTP → RabbitMQ → worker → PostgreSQL, observed only through HTTP, SQL and `/metrics`.

use std::time::Duration;

use test_support::client::post_json;
use test_support::events::{event, sample_app_list};
use test_support::process::Launch;
use test_support::{TestEnv, eventually};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Posting the same sample twice over HTTP stores exactly one row; a batch with repeats and a
/// bad item stores each valid unique event once.
#[tokio::test]
async fn sample_posted_twice_over_http_is_stored_once() {
    let env = TestEnv::new("e2e").await;
    let worker = Launch::worker(&env).start().await;
    let ingest = Launch::ingest(&env, RABBITMQ).start().await;
    let addr = ingest.addr();

    let sample = sample_app_list().to_string();
    for _ in 0..2 {
        let (status, body) = post_json(addr, "/product_events/", sample.as_bytes()).await;
        assert_eq!((status, body.as_str()), (202, r#"{"status":"queued"}"#));
    }
    let batch =
        serde_json::json!([event("e-1"), event("e-2"), event("e-1"), {"sid": 1}]).to_string();
    let (status, body) = post_json(addr, "/product_events/batch", batch.as_bytes()).await;
    assert_eq!(status, 202, "{body}");

    eventually(Duration::from_secs(20), "three stored rows", || async {
        (env.stored_rows().await == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.stored_r_counts().await,
        [
            ("999888777666555".to_owned(), 1),
            ("e-1".to_owned(), 1),
            ("e-2".to_owned(), 1)
        ]
    );
    let payload: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM product_events WHERE r = '999888777666555'")
            .fetch_one(&env.pg)
            .await
            .expect("stored payload");
    assert_eq!(
        payload,
        sample_app_list(),
        "the whole event is stored as sent"
    );

    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains("dedup_ingest_events_total{outcome=\"accepted\",source=\"anonymous\"} 5"),
        "{metrics}"
    );

    // The worker's /metrics tells the same story: 5 events in, 3 stored, 2 duplicates.
    eventually(
        Duration::from_secs(10),
        "the worker to consume all 5 events",
        || async {
            (worker.metric("dedup_worker_events_consumed_total").await == 5.0).then_some(())
        },
    )
    .await;
    for (name, expected) in [
        ("dedup_worker_events_stored_total", 3.0),
        ("dedup_worker_duplicates_total", 2.0),
        ("dedup_worker_dead_lettered_total", 0.0),
        ("dedup_worker_redis_degraded", 0.0),
    ] {
        assert_eq!(worker.metric(name).await, expected, "{name}");
    }

    assert!(ingest.stop().await, "ingest stops cleanly on SIGTERM");
    assert!(worker.stop().await, "the worker stops cleanly on SIGTERM");
}
