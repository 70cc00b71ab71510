//! ingest under a limit on open files: it raises its soft limit to the hard one, serves no
//! more connections than fit beside the files it keeps for itself, and so keeps answering its
//! admin port (probes, Prometheus) while clients hold every connection it will take; where a
//! sandbox refuses the raise, it fits its connections to the limit it has; a limit too small
//! for any client is refused at start with what to change.

use std::time::Duration;

use test_support::client::{http_request, post_json};
use test_support::events::event;
use test_support::process::{Launch, Service};
use test_support::{TestEnv, eventually};
use tokio::net::TcpStream;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// ingest's RESERVED_FILES.
const RESERVED: u64 = 256;

#[tokio::test]
async fn clients_past_the_open_file_limit_wait_and_the_admin_port_still_answers() {
    let env = TestEnv::new("open-files").await;
    let limit = RESERVED + 64;
    let ingest = Launch::ingest(&env, RABBITMQ)
        .set("HEADER_READ_TIMEOUT", "60s")
        .open_file_limit(limit, limit)
        .start()
        .await;
    assert_eq!(ingest.metric("dedup_ingest_connections_limit").await, 64.0);

    // More idle clients than the process has files: without the fitted limit each would take
    // a descriptor until accept failed (EMFILE) on the public and the admin port alike. With
    // it, 64 are accepted and the rest wait in the kernel's accept queue, or for their SYN to
    // be taken once that queue is full: those attempts are given up after 3 s.
    let attempts: Vec<_> = (0..limit + 80)
        .map(|_| {
            let addr = ingest.addr();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await
            })
        })
        .collect();
    let mut idle = Vec::new();
    for attempt in attempts {
        if let Ok(Ok(stream)) = attempt.await.expect("connect task") {
            idle.push(stream);
        }
    }
    assert!(idle.len() > 64, "only {} connected", idle.len());
    eventually(
        Duration::from_secs(10),
        "ingest to hold its 64 connections",
        || async { (ingest.metric("dedup_ingest_connections").await == 64.0).then_some(()) },
    )
    .await;
    for _ in 0..20 {
        let (status, body) = http_request(ingest.admin, "GET", "/readyz", "text/plain", b"").await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(ingest.metric("dedup_ingest_connections").await, 64.0);

    drop(idle);
    accepts_an_event(&ingest, "after").await;
    assert_eq!(env.ready_messages(&env.topology.queue).await, 1);
    assert!(ingest.stop().await, "ingest exits cleanly");
}

/// Once the clients holding its connections have gone, ingest serves a new one: 202 within 20 s.
async fn accepts_an_event(ingest: &Service, id: &str) {
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(20),
        post_json(
            ingest.addr(),
            "/product_events/",
            event(id).to_string().as_bytes(),
        ),
    )
    .await
    .expect("served once the idle clients are gone");
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn ingest_raises_its_soft_limit_to_the_hard_one() {
    let env = TestEnv::new("open-files-raise").await;
    let ingest = Launch::ingest(&env, RABBITMQ)
        .set("MAX_CONNECTIONS", 1000)
        .open_file_limit(RESERVED + 10, RESERVED + 1000)
        .start()
        .await;
    assert_eq!(
        ingest.metric("dedup_ingest_connections_limit").await,
        1000.0,
        "the soft limit was raised to the hard one, where MAX_CONNECTIONS fits"
    );
    // More connections than the soft limit it started with had files for.
    let mut held = Vec::new();
    for _ in 0..RESERVED + 50 {
        held.push(TcpStream::connect(ingest.addr()).await.expect("connect"));
    }
    eventually(
        Duration::from_secs(10),
        "ingest to hold them all",
        || async {
            (ingest.metric("dedup_ingest_connections").await == (RESERVED + 50) as f64)
                .then_some(())
        },
    )
    .await;
    assert!(ingest.ready().await.is_ok());
    drop(held);
    assert!(ingest.stop().await, "ingest exits cleanly");
}

#[tokio::test]
async fn where_raising_the_limit_is_refused_ingest_keeps_the_one_it_has() {
    let env = TestEnv::new("open-files-refused").await;
    // The hard limit has room for MAX_CONNECTIONS, but a sandbox refuses every change of a
    // limit: ingest must start with the soft limit it was given and fit its connections to it.
    let ingest = Launch::ingest(&env, RABBITMQ)
        .set("MAX_CONNECTIONS", 1000)
        .open_file_limit(RESERVED + 40, RESERVED + 1000)
        .refuse_raising_limits()
        .capture_log()
        .start()
        .await;
    // Logged at start; the pipe may take a moment to carry it.
    let warned = |log: &str| {
        log.contains("Cannot raise the soft limit on open files to the hard one; keeping it.")
            && log.contains("Operation not permitted")
            && log.contains("serving at most 40 connections")
    };
    if tokio::time::timeout(Duration::from_secs(5), async {
        while !warned(&ingest.log()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_err()
    {
        panic!("no warning about the refused raise in:\n{}", ingest.log());
    }
    assert_eq!(
        ingest.metric("dedup_ingest_connections_limit").await,
        40.0,
        "what fits the soft limit it kept (1000 had the raise gone through)"
    );
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(TcpStream::connect(ingest.addr()).await.expect("connect"));
    }
    eventually(
        Duration::from_secs(10),
        "ingest to hold its 40 connections",
        || async { (ingest.metric("dedup_ingest_connections").await == 40.0).then_some(()) },
    )
    .await;
    assert!(ingest.ready().await.is_ok(), "the admin port answers");
    assert_eq!(ingest.metric("dedup_ingest_connections").await, 40.0);
    drop(held);
    accepts_an_event(&ingest, "refused").await;
    assert_eq!(env.ready_messages(&env.topology.queue).await, 1);
    assert!(ingest.stop().await, "ingest exits cleanly");
}

#[test]
fn the_refusing_sandbox_refuses() {
    // The stand-in sandbox above, checked on its own: under it, util-linux's prlimit cannot
    // change its own limit, while reading one still works.
    let refuse = test_support::process::built("refuse-raising-limits");
    let run = |args: &[&str]| {
        std::process::Command::new(&refuse)
            .args(args)
            .output()
            .expect("run refuse-raising-limits")
    };
    let read = run(&["prlimit", "--nofile", "--output", "SOFT", "--noheadings"]);
    assert!(read.status.success(), "{read:?}");
    let set = run(&["prlimit", "--nofile=100:", "--", "true"]);
    let stderr = String::from_utf8_lossy(&set.stderr);
    assert!(!set.status.success(), "{set:?}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
}

#[tokio::test]
async fn a_limit_too_small_for_any_client_is_refused_at_start() {
    let env = TestEnv::new("open-files-tiny").await;
    let output = Launch::ingest(&env, RABBITMQ)
        .open_file_limit(RESERVED, RESERVED)
        .run(&[])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("may open only 256 files (RLIMIT_NOFILE")
            && stderr.contains("at least 256 + MAX_CONNECTIONS (4352)"),
        "{stderr}"
    );
}
