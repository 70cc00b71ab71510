//! Trace context survives the queue: the worker's batch span links the trace of the ingest
//! request whose event it stored (W3C `traceparent` in the AMQP headers).

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use test_support::events::event;
use test_support::harness::{IngestUnderTest, WorkerUnderTest, ingest_config, worker_config};
use test_support::{TestEnv, eventually};
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

// One thread: the test's subscriber is thread-local and every task must see it.
#[tokio::test(flavor = "current_thread")]
async fn worker_batch_span_links_the_ingest_request_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let env = TestEnv::new("trace").await;
    let worker = WorkerUnderTest::start(worker_config(&env), None).await;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    let request = Request::post("/product_events/")
        .header("content-type", "application/json")
        .body(Body::from(event("traced").to_string()))
        .expect("request");
    let response = ingest
        .router
        .clone()
        .oneshot(request)
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // The request span ends with the response body.
    drop(response);
    eventually(
        Duration::from_secs(20),
        "the event to be stored",
        || async { (env.stored_rows().await == 1).then_some(()) },
    )
    .await;
    worker.stop().await.expect("clean stop");
    provider.force_flush().expect("flush spans");

    let spans = exporter.get_finished_spans().expect("finished spans");
    let request_span = spans
        .iter()
        .find(|s| s.name == "request")
        .expect("ingest made a request span");
    let batch = spans
        .iter()
        .find(|s| {
            s.name == "batch"
                && s.links
                    .iter()
                    .any(|l| l.span_context.trace_id() == request_span.span_context.trace_id())
        })
        .unwrap_or_else(|| {
            let names: Vec<_> = spans.iter().map(|s| (&s.name, s.links.len())).collect();
            panic!(
                "no batch span links the request's trace {:?}; spans: {names:?}",
                request_span.span_context.trace_id()
            )
        });
    assert_ne!(
        batch.span_context.trace_id(),
        opentelemetry::trace::TraceId::INVALID
    );
}
