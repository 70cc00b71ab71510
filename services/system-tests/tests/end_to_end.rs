//! The whole pipeline over real sockets: ingest's HTTP server → RabbitMQ → dedup-worker →
//! PostgreSQL, as a newcomer would run it.

use std::time::Duration;

use test_support::events::{event, sample_app_list};
use test_support::harness::{
    IngestServer, WorkerUnderTest, http_request, ingest_config, worker_config,
};
use test_support::{TestEnv, eventually};
use tokio::net::TcpListener;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Posting the same sample twice over HTTP stores exactly one row; a batch with repeats and a
/// bad item stores each valid unique event once.
#[tokio::test]
async fn sample_posted_twice_over_http_is_stored_once() {
    let env = TestEnv::new("e2e").await;
    let worker = WorkerUnderTest::start(worker_config(&env), None).await;
    let server = IngestServer::start(ingest_config(&env, RABBITMQ)).await;
    let (addr, admin_addr) = (server.addr, server.admin_addr);

    let sample = sample_app_list().to_string();
    for _ in 0..2 {
        let (status, body) = http_request(
            addr,
            "POST",
            "/product_events/",
            "application/json",
            sample.as_bytes(),
        )
        .await;
        assert_eq!((status, body.as_str()), (202, r#"{"status":"queued"}"#));
    }
    let batch =
        serde_json::json!([event("e-1"), event("e-2"), event("e-1"), {"sid": 1}]).to_string();
    let (status, body) = http_request(
        addr,
        "POST",
        "/product_events/batch",
        "application/json",
        batch.as_bytes(),
    )
    .await;
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

    let (status, metrics) = http_request(admin_addr, "GET", "/metrics", "text/plain", b"").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("dedup_ingest_events_total{outcome=\"accepted\"} 5"),
        "{metrics}"
    );

    // The worker's /metrics tells the same story: 5 events in, 3 stored, 2 duplicates.
    let worker_admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let worker_admin_addr = worker_admin.local_addr().expect("addr");
    let router = dedup_runtime::admin::router(
        worker.worker.metrics().registry.clone(),
        worker.worker.readiness(),
    );
    tokio::spawn(async move { axum::serve(worker_admin, router).await });
    let metrics = eventually(
        Duration::from_secs(10),
        "the worker to consume all 5 events",
        || async {
            let (status, metrics) =
                http_request(worker_admin_addr, "GET", "/metrics", "text/plain", b"").await;
            assert_eq!(status, 200);
            metrics
                .contains("dedup_worker_events_consumed_total 5")
                .then_some(metrics)
        },
    )
    .await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        value("dedup_worker_events_consumed_total"),
        5.0,
        "{metrics}"
    );
    assert_eq!(value("dedup_worker_events_stored_total"), 3.0);
    assert_eq!(value("dedup_worker_duplicates_total"), 2.0);
    assert_eq!(value("dedup_worker_dead_lettered_total"), 0.0);
    assert_eq!(value("dedup_worker_redis_degraded"), 0.0);

    server.stop().await;
    worker.stop().await.expect("worker stops cleanly");
}
