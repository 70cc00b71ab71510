//! Leader election against a stateful fake of the Lease API: one replica leads at a time, a
//! stopped leader hands over, a dead one is replaced once its Lease expires, and a leader that
//! finds another holder, or cannot renew (cut off, or refused), stops its work.
//!
//! The fake keeps one Lease and, like the API server's server-side apply, remembers which
//! field manager set each spec field: an apply that would change a field another manager owns
//! is a 409 Conflict, which is what keeps two candidates from taking a free Lease at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dedup_operator::leader::{self, LeaderArgs, Term};
use prometheus::IntGauge;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Fake {
    lease: Option<Value>,
    /// spec field → the field manager that last set it.
    owners: HashMap<String, String>,
    version: u64,
    /// Answer every request with this status: 403 as an API server without the RBAC would,
    /// 500 as one that is failing.
    refuse: Option<StatusCode>,
}

type Shared = Arc<Mutex<Fake>>;

fn status(code: StatusCode, reason: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code.as_u16()});
    (code, axum::Json(body)).into_response()
}

fn refused(code: StatusCode) -> Response {
    status(code, code.canonical_reason().unwrap_or("Refused"))
}

fn bump(fake: &mut Fake) -> Value {
    fake.version += 1;
    let lease = fake.lease.as_mut().expect("lease");
    lease["metadata"]["resourceVersion"] = json!(fake.version.to_string());
    lease.clone()
}

async fn get_lease(State(fake): State<Shared>) -> Response {
    let fake = fake.lock().expect("test setup");
    if let Some(code) = fake.refuse {
        return refused(code);
    }
    match &fake.lease {
        Some(lease) => axum::Json(lease.clone()).into_response(),
        None => status(StatusCode::NOT_FOUND, "NotFound"),
    }
}

async fn create_lease(State(fake): State<Shared>, body: Bytes) -> Response {
    let mut fake = fake.lock().expect("test setup");
    if let Some(code) = fake.refuse {
        return refused(code);
    }
    if fake.lease.is_some() {
        return status(StatusCode::CONFLICT, "AlreadyExists");
    }
    let mut lease: Value = serde_json::from_slice(&body).expect("lease json");
    if lease.get("spec").is_none() {
        lease["spec"] = json!({});
    }
    fake.lease = Some(lease);
    (StatusCode::CREATED, axum::Json(bump(&mut fake))).into_response()
}

async fn patch_lease(
    State(fake): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut fake = fake.lock().expect("test setup");
    if let Some(code) = fake.refuse {
        return refused(code);
    }
    let Some(lease) = fake.lease.clone() else {
        return status(StatusCode::NOT_FOUND, "NotFound");
    };
    let manager = query.get("fieldManager").cloned().unwrap_or_default();
    let apply = headers
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"application/apply-patch"));
    let patch: Value = serde_json::from_slice(&body).expect("patch json");
    let fields = patch["spec"].as_object().cloned().unwrap_or_default();
    if apply {
        for (field, value) in &fields {
            let owner = fake.owners.get(field);
            if lease["spec"].get(field) != Some(value) && owner.is_some_and(|o| o != &manager) {
                return status(StatusCode::CONFLICT, "Conflict");
            }
        }
    }
    for (field, value) in fields {
        let spec = fake.lease.as_mut().expect("test setup")["spec"]
            .as_object_mut()
            .expect("test setup");
        if value.is_null() {
            spec.remove(&field);
            fake.owners.remove(&field);
        } else {
            spec.insert(field.clone(), value);
            fake.owners.insert(field, manager.clone());
        }
    }
    axum::Json(bump(&mut fake)).into_response()
}

async fn fake_api() -> (Shared, kube::Client) {
    let (fake, addr) = fake_server().await;
    (fake, client_at(&format!("http://{addr}")))
}

/// The fake API server and its address.
async fn fake_server() -> (Shared, std::net::SocketAddr) {
    let fake: Shared = Arc::default();
    let app = Router::new()
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            axum::routing::post(create_lease),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            get(get_lease).patch(patch_lease),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("test setup");
    let addr = listener.local_addr().expect("test setup");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, addr)
}

fn client_at(url: &str) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("test setup"));
    // A cut connection fails fast, as against a real API server that went away.
    config.connect_timeout = Some(Duration::from_millis(500));
    config.read_timeout = Some(Duration::from_secs(1));
    kube::Client::try_from(config).expect("test setup")
}

/// The Lease's duration and renew margin in these tests: short, with room for a slow
/// renewal on a loaded machine (the leader renews 3 s before expiry and stops 1.5 s before it
/// if no renewal got through).
const LEASE_SECS: u64 = 6;
const MARGIN_SECS: u64 = 3;

fn args(identity: &str) -> LeaderArgs {
    LeaderArgs {
        leader_election: true,
        lease_name: "dedup-operator".into(),
        lease_namespace: "dedup".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(LEASE_SECS),
        lease_renew_margin: Duration::from_secs(MARGIN_SECS),
    }
}

/// One candidate: `lead` with work that counts how many candidates work at once and runs
/// until the candidate is stopped.
struct Candidate {
    gauge: IntGauge,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Term>>,
}

fn candidate(client: &kube::Client, identity: &str, working: &Arc<AtomicUsize>) -> Candidate {
    let gauge = IntGauge::new("leading", "leading").expect("test setup");
    let stop = CancellationToken::new();
    let work = {
        let (stop, working) = (stop.clone(), working.clone());
        async move {
            let others = working.fetch_add(1, Ordering::SeqCst);
            assert_eq!(others, 0, "two candidates work at once");
            // Counted out when the work ends or is dropped (its leader stopped it).
            let _working = Working(working);
            stop.cancelled().await;
        }
    };
    let task = tokio::spawn({
        let (client, args, gauge, stop) =
            (client.clone(), args(identity), gauge.clone(), stop.clone());
        async move { leader::lead(client, &args, &gauge, stop, work).await }
    });
    Candidate { gauge, stop, task }
}

struct Working(Arc<AtomicUsize>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn wait_leading(c: &Candidate, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if c.gauge.get() == 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A candidate that took the free Lease.
async fn first_leader(
    client: &kube::Client,
    fake: &Shared,
    working: &Arc<AtomicUsize>,
) -> Candidate {
    let a = candidate(client, "operator-a", working);
    assert!(
        wait_leading(&a, Duration::from_secs(5)).await,
        "a never led"
    );
    assert_eq!(holder(fake).as_deref(), Some("operator-a"));
    a
}

/// Stops a candidate and returns how its term ended.
async fn stop(c: Candidate) -> Term {
    c.stop.cancel();
    c.task
        .await
        .expect("the candidate's task panicked")
        .expect("lead failed")
}

fn holder(fake: &Shared) -> Option<String> {
    let fake = fake.lock().expect("test setup");
    fake.lease.as_ref()?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// The first candidate leads; the second waits through several renewals; stopping the leader
/// hands the Lease over within its duration, and the new leader's work never overlaps the old.
#[tokio::test]
async fn a_stopped_leader_hands_over_and_only_one_works() {
    let (fake, client) = fake_api().await;
    let working = Arc::new(AtomicUsize::new(0));
    let a = first_leader(&client, &fake, &working).await;
    let b = candidate(&client, "operator-b", &working);
    // Two lease durations: a renews, b never leads.
    tokio::time::sleep(Duration::from_secs(2 * LEASE_SECS)).await;
    assert_eq!(b.gauge.get(), 0, "b led while a held the Lease");
    assert_eq!(working.load(Ordering::SeqCst), 1);
    assert_eq!(holder(&fake).as_deref(), Some("operator-a"));

    let a_gauge = a.gauge.clone();
    assert_eq!(stop(a).await, Term::Finished);
    assert_eq!(a_gauge.get(), 0, "a stopped leader no longer says it leads");
    assert!(
        wait_leading(&b, Duration::from_secs(5)).await,
        "b never took over"
    );
    assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
    assert_eq!(working.load(Ordering::SeqCst), 1);
    assert_eq!(stop(b).await, Term::Finished);
    // A stopped leader leaves the Lease free.
    assert_eq!(holder(&fake), None);
}

/// A leader that dies without releasing (kill -9) is replaced once its Lease expires.
#[tokio::test]
async fn a_dead_leader_is_replaced_after_the_lease_expires() {
    let (fake, client) = fake_api().await;
    let working = Arc::new(AtomicUsize::new(0));
    let a = first_leader(&client, &fake, &working).await;
    a.task.abort();
    let _ = a.task.await;
    assert_eq!(working.load(Ordering::SeqCst), 0, "its work died with it");
    let b = candidate(&client, "operator-b", &working);
    assert!(
        wait_leading(&b, Duration::from_secs(2 * LEASE_SECS)).await,
        "b never replaced a dead leader"
    );
    assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
    assert_eq!(stop(b).await, Term::Finished);
}

/// A leader that finds the Lease held by someone else (as after a partition) stops its work
/// and reports the loss, which makes the process exit.
#[tokio::test]
async fn a_leader_that_lost_the_lease_stops_working() {
    let (fake, client) = fake_api().await;
    let working = Arc::new(AtomicUsize::new(0));
    let a = first_leader(&client, &fake, &working).await;
    {
        let mut fake = fake.lock().expect("test setup");
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let spec = &mut fake.lease.as_mut().expect("test setup")["spec"];
        spec["holderIdentity"] = json!("operator-z");
        spec["renewTime"] = json!(now);
        spec["acquireTime"] = json!(now);
        spec["leaseDurationSeconds"] = json!(30);
        fake.owners
            .insert("holderIdentity".into(), "someone-else".into());
    }
    let term = tokio::time::timeout(Duration::from_secs(8), a.task)
        .await
        .expect("a kept working after losing the Lease")
        .expect("test setup")
        .expect("test setup");
    assert_eq!(term, Term::Lost);
    assert_eq!(a.gauge.get(), 0);
    assert_eq!(holder(&fake).as_deref(), Some("operator-z"));
}

/// A leader cut off from the API server (its renewals fail) stops working before its Lease
/// can expire, so the standby that takes the Lease after expiry never works beside it; the
/// work counter panics on any overlap. Hanging instead of refusing (a dead router) ends the
/// same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_stops_before_its_lease_expires() {
    for hang in [false, true] {
        let (fake, addr) = fake_server().await;
        let client = client_at(&format!("http://{addr}"));
        let proxy = test_support::proxy::Proxy::start(addr).await;
        let through_proxy = client_at(&format!("http://{}", proxy.addr()));
        let working = Arc::new(AtomicUsize::new(0));
        let a = first_leader(&through_proxy, &fake, &working).await;
        let b = candidate(&client, "operator-b", &working);
        tokio::time::sleep(Duration::from_secs(LEASE_SECS)).await;
        assert_eq!(holder(&fake).as_deref(), Some("operator-a"), "a renews");

        if hang {
            proxy.hang();
        } else {
            proxy.cut();
        }
        // Nothing of a's reaches the API now: this was its last renewal.
        stops_before_expiry(&fake, a, &working, &format!("hang: {hang}")).await;
        // The standby takes over once the Lease expires.
        assert!(
            wait_leading(&b, Duration::from_secs(2 * LEASE_SECS)).await,
            "b never took over (hang: {hang})"
        );
        assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
        assert_eq!(stop(b).await, Term::Finished);
    }
}

/// A leader whose API server answers but refuses every request (500 while it fails, 403 when
/// the operator's RBAC was taken away) stops before its Lease expires, like one cut off; once
/// the API server answers again, the standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_the_api_refuses_stops_before_its_lease_expires() {
    for code in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::FORBIDDEN] {
        let (fake, client) = fake_api().await;
        let working = Arc::new(AtomicUsize::new(0));
        let a = first_leader(&client, &fake, &working).await;
        let b = candidate(&client, "operator-b", &working);
        tokio::time::sleep(Duration::from_secs(LEASE_SECS)).await;
        assert_eq!(holder(&fake).as_deref(), Some("operator-a"), "a renews");

        fake.lock().expect("test setup").refuse = Some(code);
        stops_before_expiry(&fake, a, &working, code.as_str()).await;
        assert_eq!(b.gauge.get(), 0, "b led while the API refused it ({code})");

        fake.lock().expect("test setup").refuse = None;
        assert!(
            wait_leading(&b, Duration::from_secs(2 * LEASE_SECS)).await,
            "b never took over ({code})"
        );
        assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
        assert_eq!(stop(b).await, Term::Finished);
    }
}

/// Waits for leader `a`, whose renewals no longer get through, to end its term: it must stop
/// with [`Term::NotRenewed`], its work ended, before the Lease it last renewed expires.
async fn stops_before_expiry(fake: &Shared, a: Candidate, working: &AtomicUsize, case: &str) {
    let expiry = renew_time(fake)
        + chrono::TimeDelta::from_std(Duration::from_secs(LEASE_SECS)).expect("test setup");
    let term = tokio::time::timeout(Duration::from_secs(LEASE_SECS), a.task)
        .await
        .unwrap_or_else(|_| panic!("a kept working though it could not renew ({case})"))
        .expect("the candidate's task panicked")
        .expect("lead failed");
    let stopped_at = chrono::Utc::now();
    assert_eq!(term, Term::NotRenewed, "{case}");
    assert_eq!(a.gauge.get(), 0, "{case}");
    assert_eq!(
        working.load(Ordering::SeqCst),
        0,
        "a's work stopped ({case})"
    );
    assert!(
        stopped_at < expiry,
        "a stopped at {stopped_at}, after its Lease expired at {expiry} ({case})"
    );
}

fn renew_time(fake: &Shared) -> chrono::DateTime<chrono::Utc> {
    let fake = fake.lock().expect("test setup");
    let text = fake.lease.as_ref().expect("a Lease")["spec"]["renewTime"]
        .as_str()
        .expect("a renewTime")
        .to_owned();
    chrono::DateTime::parse_from_rfc3339(&text)
        .expect("an RFC 3339 renewTime")
        .to_utc()
}

/// Without the RBAC for Leases the operator stops at once and says what it needs.
#[tokio::test]
async fn without_lease_rights_the_error_names_them() {
    let (fake, client) = fake_api().await;
    fake.lock().expect("test setup").refuse = Some(StatusCode::FORBIDDEN);
    let gauge = IntGauge::new("leading", "leading").expect("test setup");
    let error = leader::lead(
        client,
        &args("a"),
        &gauge,
        CancellationToken::new(),
        async {},
    )
    .await
    .expect_err("403 must fail");
    let message = format!("{error:#}");
    assert!(
        message.contains("get, create and patch on leases"),
        "{message}"
    );
    assert!(message.contains("dedup/dedup-operator"), "{message}");
}
