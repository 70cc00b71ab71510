//! ingest under a limit on open files: it raises its soft limit to the hard one, serves no
//! more connections than fit beside the files it keeps for itself, and so keeps answering its
//! admin port (probes, Prometheus) while clients hold every connection it will take; a limit
//! too small for any client is refused at start with what to change.

use std::time::Duration;

use test_support::client::{http_request, post_json};
use test_support::events::event;
use test_support::process::Launch;
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
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(20),
        post_json(
            ingest.addr(),
            "/product_events/",
            event("after").to_string().as_bytes(),
        ),
    )
    .await
    .expect("served once the idle clients are gone");
    assert_eq!(status, 202, "{body}");
    assert_eq!(env.ready_messages(&env.topology.queue).await, 1);
    assert!(ingest.stop().await, "ingest exits cleanly");
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
