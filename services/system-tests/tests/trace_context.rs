//! Trace context survives the queue, end to end through the real exporters: the `ingest` and
//! `dedup-worker` binaries export OTLP/HTTP to a real receiver, and the worker's batch span
//! links the trace of the ingest request whose event it stored (W3C `traceparent` in the
//! AMQP headers). The operator exports its reconcile spans the same way.

use std::time::Duration;

use test_support::client::post_json;
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
    let (status, body) = post_json(
        ingest.addr(),
        "/product_events/",
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

/// A Kubernetes API server just big enough for the operator to start: one DedupPipeline in
/// the lists, watches that stay open, and every write refused with a 500, so the reconcile
/// fails (and is traced) without a cluster.
async fn fake_kubernetes() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::response::{IntoResponse, Response};
    use std::sync::Arc;

    async fn answer(State(pipeline): State<Arc<serde_json::Value>>, request: Request) -> Response {
        let watch = request.uri().query().unwrap_or("").contains("watch=true");
        let path = request.uri().path().to_owned();
        let list = |kind: &str, items: Vec<serde_json::Value>| {
            axum::Json(serde_json::json!({"apiVersion": "v1", "kind": kind,
                "metadata": {"resourceVersion": "1"}, "items": items}))
            .into_response()
        };
        match (request.method().clone(), path.as_str()) {
            // A watch that never sends anything (the operator keeps waiting on it).
            (Method::GET, _) if watch => Body::from_stream(futures::stream::pending::<
                Result<axum::body::Bytes, std::io::Error>,
            >())
            .into_response(),
            (Method::GET, "/apis/dedup.io/v1alpha1/deduppipelines") => {
                list("DedupPipelineList", vec![(*pipeline).clone()])
            }
            (Method::GET, "/apis/apps/v1/deployments") => list("DeploymentList", vec![]),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "message": "this fake API server refuses writes",
                    "reason": "InternalError", "code": 500})),
            )
                .into_response(),
        }
    }
    let pipeline = serde_json::json!({
        "apiVersion": "dedup.io/v1alpha1", "kind": "DedupPipeline",
        "metadata": {"name": "events", "namespace": "prod", "uid": "u1", "generation": 1, "resourceVersion": "1"},
        "spec": {"secrets": {
            "rabbitmqUrl": {"name": "s", "key": "a"}, "rabbitmqManagementUrl": {"name": "s", "key": "m"},
            "redisUrl": {"name": "s", "key": "r"}, "databaseUrl": {"name": "s", "key": "d"}}}});
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::new(pipeline));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, server)
}

/// The operator exports its reconcile spans to a real OTLP/HTTP receiver too: started against
/// a fake API server whose writes fail, its (failed) reconcile of the one pipeline arrives as
/// a `reconcile` span of the service `dedup-operator`.
#[tokio::test]
async fn operator_exports_its_reconcile_spans() {
    let receiver = OtlpReceiver::start().await;
    let (api, server) = fake_kubernetes().await;
    let dir = std::env::temp_dir().join(format!("dedup-operator-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{api}'}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u, namespace: prod}}}}]\n\
             current-context: c\n"
        ),
    )
    .expect("kubeconfig");
    let operator = Launch::operator(&kubeconfig)
        .set("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .start()
        .await;
    // The failed reconcile is retried after 5 s; one is enough. Spans flush on shutdown.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(operator.stop().await, "the operator stops cleanly");
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    eventually(
        Duration::from_secs(10),
        "a reconcile span from dedup-operator",
        || async {
            receiver
                .spans()
                .iter()
                .any(|(service, s)| service == "dedup-operator" && s.name == "reconcile")
                .then_some(())
        },
    )
    .await;
}
