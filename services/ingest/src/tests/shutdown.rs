//! On SIGTERM ingest stops taking new connections but finishes the requests in flight.

use std::net::SocketAddr;
use std::time::Duration;

use super::support::{IngestServer, ingest_config, messages_by_r, metric};
use test_support::client::amqp_url_via;
use test_support::events::event;
use test_support::{Proxy, TestEnv, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const RABBITMQ_ADDR: &str = "127.0.0.1:5672";
const WAIT: Duration = Duration::from_secs(30);

/// A request whose body is still arriving when shutdown starts is completed (202, queued),
/// then the server exits.
#[tokio::test]
async fn shutdown_drains_the_request_in_flight() {
    let env = TestEnv::new("drainhttp").await;
    let mut server = IngestServer::start(ingest_config(&env, RABBITMQ)).await;
    let addr = server.addr;

    let body = event("in-flight").to_string();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /product_events/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(first).await.expect("first half");
    tokio::time::sleep(Duration::from_millis(100)).await;

    server.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !server.task.is_finished(),
        "the server waits for the request in flight"
    );
    stream.write_all(rest).await.expect("second half");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");

    server
        .exits_within(Duration::from_secs(10), "the server exits once drained")
        .await;
    assert_eq!(
        env.ready_messages(&env.topology.queue).await,
        1,
        "the drained request's event was queued"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}

/// ingest serving on real ports behind a proxy the test pauses, with `grace` to drain on
/// shutdown and a confirm timeout far past anything the tests wait for.
async fn serving_behind_a_pausable_broker(env: &TestEnv, grace: Duration) -> (Proxy, IngestServer) {
    let proxy = Proxy::start(RABBITMQ_ADDR.parse().expect("addr")).await;
    let mut config = ingest_config(env, &amqp_url_via(proxy.addr()));
    config.confirm_timeout = Duration::from_secs(60);
    config.request_timeout = Duration::from_secs(60);
    config.coalesce_flushers = 2;
    config.max_events_per_message = 128;
    config.shutdown_grace = grace;
    let server = IngestServer::start(config).await;
    (proxy, server)
}

/// Posts the event named `r` on its own connection; the raw answer, empty if the connection
/// closed without one.
fn post(addr: SocketAddr, r: &str) -> JoinHandle<String> {
    let body = event(r).to_string();
    tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /product_events/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(body.as_bytes()).await.expect("body");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    })
}

/// ingest's `dedup_ingest_publishes_in_flight`, read from its admin server.
async fn publishes_in_flight(admin: SocketAddr) -> i64 {
    metric(admin, "dedup_ingest_publishes_in_flight").await as i64
}

/// Pauses the broker link, posts "first" and waits until its message awaits its confirm, then
/// posts the events named `later`, which gather behind it; the answers to come, "first"'s
/// first.
async fn first_then_later_while_paused(
    proxy: &Proxy,
    server: &IngestServer,
    later: &[String],
) -> Vec<JoinHandle<String>> {
    proxy.pause();
    let mut answers = vec![post(server.addr, "first")];
    let admin = server.admin_addr;
    eventually(
        WAIT,
        "the first event's message to await its confirm",
        || async { (publishes_in_flight(admin).await == 1).then_some(()) },
    )
    .await;
    answers.extend(later.iter().map(|r| post(server.addr, r)));
    // Long enough on loopback for ingest to read each 2 KB body and hold its event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        publishes_in_flight(admin).await,
        1,
        "the later events gather behind the pending confirm"
    );
    answers
}

/// SIGTERM while events gather behind a pending confirm: ingest neither answers them early
/// nor exits; when the confirm comes back, the gathered events go out as one message, every
/// request is answered 202, and then ingest exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_publishes_the_events_gathered_behind_a_pending_confirm() {
    let env = TestEnv::new("draingather").await;
    let (proxy, mut server) = serving_behind_a_pausable_broker(&env, Duration::from_secs(30)).await;
    let later: Vec<String> = (0..10).map(|i| format!("later-{i:02}")).collect();
    let answers = first_then_later_while_paused(&proxy, &server, &later).await;

    server.shutdown();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !server.task.is_finished(),
        "ingest waits for the requests whose events it holds"
    );
    assert!(
        answers.iter().all(|a| !a.is_finished()),
        "no request is answered before its event is confirmed"
    );

    proxy.resume();
    for answer in answers {
        let answer = tokio::time::timeout(WAIT, answer)
            .await
            .expect("answered once the broker confirms")
            .expect("task");
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    server
        .exits_within(Duration::from_secs(10), "ingest exits once drained")
        .await;
    assert_eq!(
        messages_by_r(&env).await,
        vec![vec!["first".to_owned()], later],
        "the first event's message, then one for all that gathered behind it"
    );
}

/// SIGTERM while the broker never confirms: ingest exits once the grace period runs out, and no
/// request whose event was not confirmed is answered 202 (each is closed unanswered or gets
/// 503), so every client retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_after_the_grace_period_without_a_false_202() {
    let env = TestEnv::new("draingrace").await;
    let grace = Duration::from_secs(1);
    let (proxy, mut server) = serving_behind_a_pausable_broker(&env, grace).await;
    let later: Vec<String> = (0..5).map(|i| format!("later-{i}")).collect();
    let answers = first_then_later_while_paused(&proxy, &server, &later).await;

    let started = std::time::Instant::now();
    server.shutdown();
    server
        .exits_within(
            grace + Duration::from_secs(5),
            "ingest exits soon after the grace period",
        )
        .await;
    assert!(
        started.elapsed() >= grace,
        "ingest waited out the grace period for the requests in flight"
    );
    for answer in answers {
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("every connection is answered or closed soon after ingest exits")
            .expect("task");
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
            "an unconfirmed event was answered: {answer}"
        );
    }
    drop(proxy);
}
