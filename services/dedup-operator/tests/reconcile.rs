//! Reconcile against a mocked Kubernetes API server: the test plays the API server, checks
//! every request the controller makes, in order, and feeds it the answers.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use dedup_operator::controller::{self, Context, DepthSource, REQUEUE};
use dedup_operator::crd::{DedupPipeline, DedupPipelineSpec};
use dedup_operator::scale::Observation;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn pipeline() -> DedupPipeline {
    let spec: DedupPipelineSpec = serde_yaml::from_str(
        "secrets:\n  rabbitmqUrl: {name: s, key: amqp}\n  rabbitmqManagementUrl: {name: s, key: mgmt}\n  redisUrl: {name: s, key: redis}\n  databaseUrl: {name: s, key: db}\n",
    )
    .expect("spec");
    let mut p = DedupPipeline::new("events", spec);
    p.metadata.namespace = Some("prod".into());
    p.metadata.uid = Some("uid-1".into());
    p.metadata.generation = Some(3);
    p
}

fn fixed_now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("time")
}

fn context(client: Client, depth: Observation) -> Arc<Context> {
    let depth: DepthSource = Arc::new(move |_, _| {
        let depth = depth.clone();
        Box::pin(async move { depth })
    });
    Arc::new(Context::new(client, depth, fixed_now, Default::default()))
}

/// One expected request: method, path, and the answer (given the request body).
async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    answer: impl FnOnce(Value) -> (StatusCode, Value),
) -> Value {
    let (request, send) = handle
        .next_request()
        .await
        .expect("the controller made a request");
    assert_eq!(
        (request.method(), request.uri().path()),
        (&method, path),
        "unexpected request {}",
        request.uri()
    );
    if method == Method::PATCH && !path.ends_with("/status") {
        let query = request.uri().query().unwrap_or_default();
        assert!(
            query.contains("fieldManager=dedup-operator") && query.contains("force=true"),
            "server-side apply: {query}"
        );
    }
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    let (status, reply) = answer(body.clone());
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).expect("json")))
            .expect("response"),
    );
    body
}

/// The requests of every reconcile before scaling: apply the ConfigMap, the ingest Deployment
/// (answered with 2 pods available) and Service, then read the worker Deployment (answered with
/// `workers` replicas). Returns the applied ConfigMap.
async fn expect_workloads(handle: &mut Handle, workers: i64) -> Value {
    let base = "/apis/apps/v1/namespaces/prod/deployments";
    let cm = expect(
        handle,
        Method::PATCH,
        "/api/v1/namespaces/prod/configmaps/events-config",
        |b| (StatusCode::OK, b),
    )
    .await;
    expect(
        handle,
        Method::PATCH,
        &format!("{base}/events-ingest"),
        |b| with_available(b, 2),
    )
    .await;
    expect(
        handle,
        Method::PATCH,
        "/api/v1/namespaces/prod/services/events-ingest",
        |b| (StatusCode::OK, b),
    )
    .await;
    expect(handle, Method::GET, &format!("{base}/events-worker"), |_| {
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "events-worker"},
            "spec": {"replicas": workers, "selector": {}, "template": {}}});
        (StatusCode::OK, deployment)
    })
    .await;
    cm
}

/// The next request posts an event of this type and reason about the pipeline; returns it.
async fn expect_event(handle: &mut Handle, type_: &str, reason: &str) -> Value {
    let event = expect(
        handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/prod/events",
        |b| (StatusCode::OK, b),
    )
    .await;
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some(type_), Some(reason)),
        "{event}"
    );
    event
}

/// The status patch, answered with the stored pipeline carrying that status; returns the patch.
async fn expect_status(handle: &mut Handle) -> Value {
    expect(
        handle,
        Method::PATCH,
        "/apis/dedup.io/v1alpha1/namespaces/prod/deduppipelines/events/status",
        |b| {
            let mut stored = serde_json::to_value(pipeline()).expect("pipeline json");
            stored["status"] = b["status"].clone();
            (StatusCode::OK, stored)
        },
    )
    .await
}

/// The worker Deployment's apply, answered with `available` pods; returns what was applied.
async fn expect_worker_apply(handle: &mut Handle, available: i64) -> Value {
    expect(
        handle,
        Method::PATCH,
        "/apis/apps/v1/namespaces/prod/deployments/events-worker",
        move |b| with_available(b, available),
    )
    .await
}

/// The API server's answer for a missing object or API.
fn not_found(_: Value) -> (StatusCode, Value) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
    (StatusCode::NOT_FOUND, status)
}

fn with_available(mut deployment: Value, available: i64) -> (StatusCode, Value) {
    deployment["status"] = json!({ "availableReplicas": available });
    (StatusCode::OK, deployment)
}

/// A burst in the queue: the controller applies the ConfigMap, ingest Deployment and Service,
/// reads the worker Deployment, scales it from 2 to 5 and reports it in the status.
#[tokio::test]
async fn reconcile_applies_workloads_scales_workers_and_reports_status() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = context(client, Observation::Depth(4500));
    let server = tokio::spawn(async move {
        let base = "/apis/apps/v1/namespaces/prod/deployments";
        let cm = expect_workloads(&mut handle, 2).await;
        assert_eq!(cm["data"]["DEDUP_WINDOW"], "7d");
        let worker = expect(
            &mut handle,
            Method::PATCH,
            &format!("{base}/events-worker"),
            |b| with_available(b, 2),
        )
        .await;
        assert_eq!(worker["spec"]["replicas"], 5, "ceil(4500 / 1000) workers");
        // Every scaling decision leaves a Normal event.
        let event = expect_event(&mut handle, "Normal", "ScaledWorkers").await;
        assert!(
            event["note"]
                .as_str()
                .unwrap_or("")
                .contains("workers 2 → 5"),
            "{event}"
        );
        let status = expect_status(&mut handle).await;
        let s = &status["status"];
        assert_eq!(
            (
                s["desiredWorkers"].as_i64(),
                s["queueDepth"].as_i64(),
                s["observedGeneration"].as_i64()
            ),
            (Some(5), Some(4500), Some(3))
        );
        assert!(s["lastScaleTime"].is_string());
        assert_eq!(
            s["recommendations"],
            json!([{"at": "2027-01-15T08:00:00+00:00", "replicas": 5}]),
            "the scaler's history is kept in the status"
        );
        let conditions: HashMap<&str, &str> = s["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap_or(""),
                    c["status"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            conditions,
            HashMap::from([
                ("Ready", "True"),
                ("Progressing", "True"),
                ("Degraded", "False")
            ])
        );
    });
    let action = controller::reconcile(Arc::new(pipeline()), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(REQUEUE));
    assert_eq!(
        ctx.metrics
            .workers_desired
            .with_label_values(&["prod", "events"])
            .get(),
        5
    );
    assert_eq!(
        ctx.metrics
            .queue_depth
            .with_label_values(&["prod", "events"])
            .get(),
        4500
    );
    server.await.expect("every expected request arrived");
}

/// The broker cannot be read: replicas are held and the status says Degraded.
#[tokio::test]
async fn unreachable_broker_holds_workers_and_reports_degraded() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(
        Client::new(service, "default"),
        Observation::Unavailable("connection refused".into()),
    );
    let server = tokio::spawn(async move {
        let base = "/apis/apps/v1/namespaces/prod/deployments";
        expect_workloads(&mut handle, 4).await;
        let worker = expect(
            &mut handle,
            Method::PATCH,
            &format!("{base}/events-worker"),
            |b| with_available(b, 4),
        )
        .await;
        assert_eq!(worker["spec"]["replicas"], 4, "held");
        let status = expect_status(&mut handle).await;
        let degraded = status["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == "Degraded")
            .cloned()
            .expect("Degraded");
        assert_eq!(
            (degraded["status"].as_str(), degraded["reason"].as_str()),
            (Some("True"), Some("BrokerUnreachable"))
        );
        assert!(status["status"]["queueDepth"].is_null());
    });
    controller::reconcile(Arc::new(pipeline()), ctx)
        .await
        .expect("reconcile");
    server.await.expect("every expected request arrived");
}

/// A Secret whose management-URL key holds something that is not a URL (here the password
/// alone), read by the production depth source: the workers are held and Degraded says the
/// URL is unusable — without echoing the value, nor the password of the AMQP URL beside it.
#[tokio::test]
async fn a_secret_that_is_not_a_url_stays_out_of_the_status() {
    use base64::Engine;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Arc::new(Context::new(
        Client::new(service, "default"),
        controller::broker_depth(Default::default()),
        fixed_now,
        Default::default(),
    ));
    let server = tokio::spawn(async move {
        expect_workloads(&mut handle, 2).await;
        let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "data": {"mgmt": encode("S3CRET-password"), "amqp": encode("amqp://u:S3CRET-amqp@rabbit/%2f")}});
        for _ in 0..2 {
            let secret = secret.clone();
            expect(
                &mut handle,
                Method::GET,
                "/api/v1/namespaces/prod/secrets/s",
                move |_| (StatusCode::OK, secret),
            )
            .await;
        }
        expect_worker_apply(&mut handle, 2).await;
        let status = expect_status(&mut handle).await;
        let text = status.to_string();
        assert!(!text.contains("S3CRET"), "{text}");
        assert!(text.contains("not a URL"), "{text}");
    });
    controller::reconcile(Arc::new(pipeline()), ctx)
        .await
        .expect("reconcile");
    server.await.expect("every expected request arrived");
}

/// The API server refuses the first apply (a conflict): reconcile fails with the API error,
/// says so with a Warning event and a Degraded condition, and the error policy retries with a
/// growing backoff.
#[tokio::test]
async fn api_conflict_fails_the_reconcile_reports_it_and_backs_off() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"), Observation::Depth(0));
    let server = tokio::spawn(async move {
        expect(&mut handle, Method::PATCH, "/api/v1/namespaces/prod/configmaps/events-config", |_| {
            (StatusCode::CONFLICT, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "conflict", "reason": "Conflict", "code": 409}))
        })
        .await;
        let event = expect_event(&mut handle, "Warning", "ReconcileFailed").await;
        assert_eq!(event["regarding"]["name"], "events");
        let status = expect_status(&mut handle).await;
        let degraded = &status["status"]["conditions"][0];
        assert_eq!(
            (
                degraded["type"].as_str(),
                degraded["status"].as_str(),
                degraded["reason"].as_str()
            ),
            (Some("Degraded"), Some("True"), Some("ReconcileFailed"))
        );
    });
    let p = Arc::new(pipeline());
    let error = controller::reconcile(p.clone(), ctx.clone())
        .await
        .expect_err("the conflict surfaces");
    assert!(error.to_string().contains("conflict"), "{error}");
    server.await.expect("every expected request arrived");
    let delays: Vec<Action> = (0..3)
        .map(|_| controller::error_policy(p.clone(), &error, ctx.clone()))
        .collect();
    let secs = |s| Action::requeue(std::time::Duration::from_secs(s));
    assert_eq!(delays, [secs(5), secs(10), secs(20)]);
    assert_eq!(
        (
            ctx.metrics.reconciles.get(),
            ctx.metrics.reconcile_errors.get()
        ),
        (1, 3)
    );
}

/// An operator that restarts finds its scale-down window in the status: with a recommendation
/// of 5 workers a minute ago and an almost empty queue, it keeps 5 instead of scaling down.
#[tokio::test]
async fn a_restarted_operator_keeps_the_scale_down_window() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"), Observation::Depth(100));
    let mut p = pipeline();
    p.status = serde_json::from_value(json!({
        "recommendations": [{"at": (fixed_now() - chrono::Duration::seconds(60)).to_rfc3339(), "replicas": 5}]
    }))
    .expect("status");
    let server = tokio::spawn(async move {
        expect_workloads(&mut handle, 5).await;
        let worker = expect_worker_apply(&mut handle, 5).await;
        assert_eq!(worker["spec"]["replicas"], 5, "held by the kept window");
        let status = expect_status(&mut handle).await;
        assert_eq!(
            status["status"]["recommendations"].as_array().map(Vec::len),
            Some(2)
        );
    });
    controller::reconcile(Arc::new(p), ctx)
        .await
        .expect("reconcile");
    server.await.expect("every expected request arrived");
}

/// A context whose depth source fails the test if called: in `keda` and `none` modes the
/// operator must not read the queue.
fn context_without_depth(client: Client) -> Arc<Context> {
    let depth: DepthSource = Arc::new(|_, _| Box::pin(async { panic!("the queue was read") }));
    Arc::new(Context::new(client, depth, fixed_now, Default::default()))
}

fn with_mode(mode: &str) -> DedupPipeline {
    let mut p = pipeline();
    p.spec.worker.autoscaling = serde_yaml::from_str(&format!(
        "mode: {mode}\nactivation: 5\nscaleUpLimit: {{pods: 4, percent: 100, periodSeconds: 30}}\n"
    ))
    .expect("autoscaling");
    p.spec.worker.min_replicas = 0;
    p
}

/// `keda` mode: the worker Deployment is applied with the replicas it has (KEDA's HPA sets them), then
/// the TriggerAuthentication and the ScaledObject; the queue is not read and the status says
/// who scales.
#[tokio::test]
async fn keda_mode_applies_a_scaled_object_and_leaves_the_replicas() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context_without_depth(Client::new(service, "default"));
    let server = tokio::spawn(async move {
        expect_workloads(&mut handle, 3).await;
        let worker = expect_worker_apply(&mut handle, 3).await;
        assert_eq!(
            worker["spec"]["replicas"], 3,
            "the replicas KEDA set are written back as found, never reset: {worker}"
        );
        let auth = expect(
            &mut handle,
            Method::PATCH,
            "/apis/keda.sh/v1alpha1/namespaces/prod/triggerauthentications/events-worker",
            |b| (StatusCode::OK, b),
        )
        .await;
        assert_eq!(
            auth["spec"]["secretTargetRef"],
            json!([{"parameter": "host", "name": "s", "key": "mgmt"}])
        );
        let scaled = expect(
            &mut handle,
            Method::PATCH,
            "/apis/keda.sh/v1alpha1/namespaces/prod/scaledobjects/events-worker",
            |b| (StatusCode::OK, b),
        )
        .await;
        let spec = &scaled["spec"];
        assert_eq!(spec["scaleTargetRef"]["name"], "events-worker");
        assert_eq!(
            (
                &spec["minReplicaCount"],
                &spec["maxReplicaCount"],
                &spec["cooldownPeriod"]
            ),
            (&json!(0), &json!(10), &json!(300))
        );
        let trigger = &spec["triggers"][0];
        assert_eq!(
            trigger["metadata"],
            json!({"protocol": "http", "mode": "QueueLength", "value": "1000", "activationValue": "5",
                   "queueName": "product_events", "vhostName": "/"})
        );
        assert_eq!(trigger["authenticationRef"]["name"], "events-worker");
        let up = &spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"];
        assert_eq!(
            up["policies"][0],
            json!({"type": "Pods", "value": 4, "periodSeconds": 30})
        );
        assert_eq!(
            scaled["metadata"]["ownerReferences"][0]["kind"],
            "DedupPipeline"
        );
        assert!(!scaled.to_string().contains("password"), "{scaled}");
        let status = expect_status(&mut handle).await;
        let s = &status["status"];
        assert_eq!(s["autoscalingMode"], "keda");
        assert_eq!(s["desiredWorkers"], 3, "as KEDA left them");
        assert!(s["queueDepth"].is_null());
    });
    controller::reconcile(Arc::new(with_mode("keda")), ctx)
        .await
        .expect("reconcile");
    server.await.expect("every expected request arrived");
}

/// `keda` mode on a cluster without KEDA: the reconcile fails saying to install KEDA or change
/// the mode.
#[tokio::test]
async fn keda_mode_without_keda_says_what_to_do() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context_without_depth(Client::new(service, "default"));
    let server = tokio::spawn(async move {
        expect_workloads(&mut handle, 1).await;
        expect_worker_apply(&mut handle, 1).await;
        expect(
            &mut handle,
            Method::PATCH,
            "/apis/keda.sh/v1alpha1/namespaces/prod/triggerauthentications/events-worker",
            not_found,
        )
        .await;
        let event = expect_event(&mut handle, "Warning", "ReconcileFailed").await;
        assert!(
            event["note"]
                .as_str()
                .unwrap_or("")
                .contains("install KEDA"),
            "{event}"
        );
        let status = expect_status(&mut handle).await;
        assert!(status.to_string().contains("install KEDA"), "{status}");
    });
    let error = controller::reconcile(Arc::new(with_mode("keda")), ctx)
        .await
        .expect_err("no KEDA");
    assert!(
        error.to_string().contains("set the mode to operator"),
        "{error}"
    );
    server.await.expect("every expected request arrived");
}

/// Leaving `keda` for `none`: the ScaledObject and its TriggerAuthentication are deleted
/// (already gone is fine), so KEDA's HPA stops setting the replicas.
#[tokio::test]
async fn leaving_keda_deletes_the_scaled_object() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context_without_depth(Client::new(service, "default"));
    let mut p = with_mode("none");
    p.status = Some(serde_json::from_value(json!({"autoscalingMode": "keda"})).expect("status"));
    let server = tokio::spawn(async move {
        expect_workloads(&mut handle, 2).await;
        expect_worker_apply(&mut handle, 2).await;
        expect(
            &mut handle,
            Method::DELETE,
            "/apis/keda.sh/v1alpha1/namespaces/prod/triggerauthentications/events-worker",
            not_found,
        )
        .await;
        expect(
            &mut handle,
            Method::DELETE,
            "/apis/keda.sh/v1alpha1/namespaces/prod/scaledobjects/events-worker",
            |_| {
                (
                    StatusCode::OK,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
                )
            },
        )
        .await;
        let status = expect_status(&mut handle).await;
        assert_eq!(status["status"]["autoscalingMode"], "none");
    });
    controller::reconcile(Arc::new(p), ctx)
        .await
        .expect("reconcile");
    server.await.expect("every expected request arrived");
}

/// A `settings` entry that would override what the operator sets (a connection URL, a port)
/// fails the reconcile before anything is applied, naming the entry.
#[tokio::test]
async fn settings_cannot_override_what_the_operator_sets() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context_without_depth(Client::new(service, "default"));
    let mut p = pipeline();
    p.spec.worker.settings = [("BATCH_SIZE", "500"), ("DATABASE_URL_FILE", "/x")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    p.spec.ingest.settings = [("ADMIN_LISTEN_ADDR", "0.0.0.0:1")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let server = tokio::spawn(async move {
        expect_event(&mut handle, "Warning", "ReconcileFailed").await;
        expect_status(&mut handle).await;
    });
    let error = controller::reconcile(Arc::new(p), ctx)
        .await
        .expect_err("refused");
    let message = error.to_string();
    assert!(
        message.contains("worker.settings.DATABASE_URL_FILE is refused"),
        "{message}"
    );
    assert!(
        message.contains("ingest.settings.ADMIN_LISTEN_ADDR is refused"),
        "{message}"
    );
    assert!(!message.contains("BATCH_SIZE"), "{message}");
    server.await.expect("every expected request arrived");
}
