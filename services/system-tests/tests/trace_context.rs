//! Trace context survives the queue, end to end through the real exporters: the `ingest` and
//! `dedup-worker` binaries export OTLP/HTTP to a real receiver, and the worker's batch span
//! links the trace of the ingest request whose event it stored (W3C `traceparent` in the
//! AMQP headers).

use std::time::Duration;

use test_support::client::http_request;
use test_support::events::event;
use test_support::otlp::OtlpReceiver;
use test_support::process::Launch;
use test_support::{TestEnv, eventually};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::test]
async fn worker_batch_span_links_the_ingest_request_trace() {
    let receiver = OtlpReceiver::start().await;
    let env = TestEnv::new("trace").await;
    let worker = Launch::worker(&env)
        .set("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .start()
        .await;
    let ingest = Launch::ingest(&env, RABBITMQ)
        .set("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .start()
        .await;
    let (status, body) = http_request(
        ingest.addr(),
        "POST",
        "/product_events/",
        "application/json",
        event("traced").to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    eventually(
        Duration::from_secs(20),
        "the event to be stored",
        || async { (env.stored_rows().await == 1).then_some(()) },
    )
    .await;
    // Both flush their spans on a graceful shutdown.
    assert!(ingest.stop().await, "ingest stops cleanly");
    assert!(worker.stop().await, "the worker stops cleanly");

    let spans = eventually(Duration::from_secs(10), "both binaries' spans", || async {
        let spans = receiver.spans();
        let services: Vec<&str> = spans.iter().map(|(s, _)| s.as_str()).collect();
        (services.contains(&"ingest") && services.contains(&"dedup-worker")).then_some(spans)
    })
    .await;
    let (_, request) = spans
        .iter()
        .find(|(service, s)| service == "ingest" && s.name == "request")
        .expect("ingest exported its request span");
    assert_eq!(request.trace_id.len(), 16);
    let linked = spans.iter().any(|(service, s)| {
        service == "dedup-worker"
            && s.name == "batch"
            && s.links.iter().any(|l| l.trace_id == request.trace_id)
    });
    let names: Vec<_> = spans
        .iter()
        .map(|(service, s)| (service.as_str(), s.name.as_str(), s.links.len()))
        .collect();
    assert!(
        linked,
        "no batch span links the request's trace; spans: {names:?}"
    );
}
