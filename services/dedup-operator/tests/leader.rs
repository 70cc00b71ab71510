//! Leader election against a stateful fake of the Lease API: one replica leads at a time, a
//! stopped leader hands over, a dead one is replaced once its Lease has not changed for its
//! duration, and a leader that finds another holder, or cannot renew (cut off, or refused),
//! stops its work.
//!
//! The fake keeps one Lease and, like the API server, bumps its `resourceVersion` on every
//! write and refuses a replace that names another version (409 Conflict): that is what keeps
//! two candidates from taking a free Lease at once, and a standby from taking one that was
//! renewed after it looked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dedup_operator::leader::{self, LeaderArgs, Term};
use prometheus::IntGauge;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Fake {
    lease: Option<Value>,
    version: u64,
    /// Before the next replace, write a renewal as the holder would.
    renew_before_next_write: bool,
    /// Replaces refused because the Lease changed since the writer read it.
    stale_writes: usize,
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

async fn replace_lease(State(fake): State<Shared>, body: Bytes) -> Response {
    let mut fake = fake.lock().expect("test setup");
    if let Some(code) = fake.refuse {
        return refused(code);
    }
    if fake.renew_before_next_write {
        // The holder renews between this writer's read and its write.
        fake.renew_before_next_write = false;
        renew_as_holder(&mut fake, chrono::Utc::now());
    }
    let Some(current) = &fake.lease else {
        return status(StatusCode::NOT_FOUND, "NotFound");
    };
    let lease: Value = serde_json::from_slice(&body).expect("lease json");
    // As on the API server, a replace without a version is unconditional.
    let version = &lease["metadata"]["resourceVersion"];
    if !version.is_null() && *version != current["metadata"]["resourceVersion"] {
        fake.stale_writes += 1;
        return status(StatusCode::CONFLICT, "Conflict");
    }
    fake.lease = Some(lease);
    axum::Json(bump(&mut fake)).into_response()
}

/// The current holder writes its renewal, stamped `renewed_at` by its own clock.
fn renew_as_holder(fake: &mut Fake, renewed_at: chrono::DateTime<chrono::Utc>) {
    let lease = fake.lease.as_mut().expect("a Lease");
    lease["spec"]["renewTime"] = json!(micro_time(renewed_at));
    bump(fake);
}

fn micro_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
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
            get(get_lease).put(replace_lease),
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
    client_with_read_timeout(url, Some(Duration::from_secs(1)))
}

fn client_with_read_timeout(url: &str, read_timeout: Option<Duration>) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("test setup"));
    // A cut connection fails fast, as against a real API server that went away.
    config.connect_timeout = Some(Duration::from_millis(500));
    config.read_timeout = read_timeout;
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

fn transitions(fake: &Shared) -> Option<i64> {
    let fake = fake.lock().expect("test setup");
    fake.lease.as_ref()?["spec"]["leaseTransitions"].as_i64()
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
    assert_eq!(transitions(&fake), Some(0), "renewals are not transitions");

    let a_gauge = a.gauge.clone();
    assert_eq!(stop(a).await, Term::Finished);
    assert_eq!(a_gauge.get(), 0, "a stopped leader no longer says it leads");
    assert!(
        wait_leading(&b, Duration::from_secs(5)).await,
        "b never took over"
    );
    assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
    assert_eq!(transitions(&fake), Some(1), "a handover is a transition");
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
        let now = micro_time(chrono::Utc::now());
        let spec = &mut fake.lease.as_mut().expect("test setup")["spec"];
        spec["holderIdentity"] = json!("operator-z");
        spec["renewTime"] = json!(now);
        spec["acquireTime"] = json!(now);
        spec["leaseDurationSeconds"] = json!(30);
        bump(&mut fake);
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

/// A leader told to stop while the API server hangs (its client has no read timeout of its
/// own) still stops: the release gives up after two renewal periods, the Lease keeps naming
/// the stopped leader, and the standby takes it once it has not changed for its duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopping_while_the_api_hangs_does_not_hang_with_it() {
    let (fake, addr) = fake_server().await;
    let client = client_at(&format!("http://{addr}"));
    let proxy = test_support::proxy::Proxy::start(addr).await;
    let through_proxy = client_with_read_timeout(&format!("http://{}", proxy.addr()), None);
    let working = Arc::new(AtomicUsize::new(0));
    let a = first_leader(&through_proxy, &fake, &working).await;
    let b = candidate(&client, "operator-b", &working);

    proxy.hang();
    // The release is bounded by two renewal periods (1.5 s here); the Lease's duration is the
    // point past which a hanging release would be a bug, not a slow one.
    let term = tokio::time::timeout(Duration::from_secs(LEASE_SECS), stop(a))
        .await
        .expect("a's shutdown hung with the API server");
    assert_eq!(term, Term::Finished);
    assert_eq!(working.load(Ordering::SeqCst), 0, "a's work stopped");
    assert_eq!(
        holder(&fake).as_deref(),
        Some("operator-a"),
        "nothing of a's release reached the API"
    );
    assert!(
        wait_leading(&b, Duration::from_secs(2 * LEASE_SECS)).await,
        "b never took the Lease a could not release"
    );
    assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
    assert_eq!(transitions(&fake), Some(1));
    assert_eq!(stop(b).await, Term::Finished);
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

/// Puts a Lease held by `holder`, a replica with no process here, renewed at `renewed_at` by
/// its clock.
fn seed_lease(fake: &Shared, holder: &str, renewed_at: chrono::DateTime<chrono::Utc>) {
    let mut fake = fake.lock().expect("test setup");
    fake.lease = Some(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "dedup-operator", "namespace": "dedup"},
        "spec": {
            "holderIdentity": holder,
            "acquireTime": micro_time(renewed_at),
            "renewTime": micro_time(renewed_at),
            "leaseDurationSeconds": LEASE_SECS,
            "leaseTransitions": 0,
        },
    }));
    bump(&mut fake);
}

/// A standby decides on what it read. When the holder renews between that read and the
/// standby's write, the write is refused and changes nothing; the standby times the new
/// version afresh and takes the Lease only once that one has not changed for a duration.
#[tokio::test]
async fn a_take_decided_on_a_stale_read_changes_nothing() {
    let (fake, client) = fake_api().await;
    seed_lease(&fake, "operator-z", chrono::Utc::now());
    fake.lock().expect("test setup").renew_before_next_write = true;
    let working = Arc::new(AtomicUsize::new(0));
    let b = candidate(&client, "operator-b", &working);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2 * LEASE_SECS);
    while fake.lock().expect("test setup").stale_writes == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never tried to take a Lease unchanged for its duration"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder(&fake).as_deref(), Some("operator-z"));
    assert_eq!(b.gauge.get(), 0, "b led on a refused write");
    // z's renewal restarted b's clock: nearly a whole duration later z still holds it.
    tokio::time::sleep(Duration::from_secs(LEASE_SECS - 1)).await;
    assert_eq!(holder(&fake).as_deref(), Some("operator-z"));
    assert_eq!(
        b.gauge.get(),
        0,
        "b took a Lease renewed less than a duration ago"
    );
    assert!(
        wait_leading(&b, Duration::from_secs(3)).await,
        "b never took the Lease z stopped renewing"
    );
    assert_eq!(holder(&fake).as_deref(), Some("operator-b"));
    assert_eq!(stop(b).await, Term::Finished);
}

/// A standby times the Lease by its own clock, from when it saw each version, never by the
/// holder's `renewTime`: a holder whose clock is an hour behind keeps the Lease while it
/// renews, and one whose clock is an hour ahead is replaced a duration after it died.
#[tokio::test]
async fn a_standby_times_the_lease_by_its_own_clock() {
    for offset in [chrono::TimeDelta::hours(-1), chrono::TimeDelta::hours(1)] {
        let (fake, client) = fake_api().await;
        seed_lease(&fake, "operator-z", chrono::Utc::now() + offset);
        let working = Arc::new(AtomicUsize::new(0));
        let b = candidate(&client, "operator-b", &working);
        let renewing = tokio::spawn({
            let fake = fake.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let mut fake = fake.lock().expect("test setup");
                    renew_as_holder(&mut fake, chrono::Utc::now() + offset);
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(LEASE_SECS * 3 / 2)).await;
        assert_eq!(
            b.gauge.get(),
            0,
            "b took a renewed Lease (z's clock off by {offset})"
        );
        assert_eq!(holder(&fake).as_deref(), Some("operator-z"));
        renewing.abort();
        assert!(
            wait_leading(&b, Duration::from_secs(LEASE_SECS + 3)).await,
            "b never replaced z, dead, with its clock off by {offset}"
        );
        assert_eq!(stop(b).await, Term::Finished);
    }
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
        message.contains("get, create and update on leases"),
        "{message}"
    );
    assert!(message.contains("dedup/dedup-operator"), "{message}");
}
