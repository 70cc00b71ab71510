//! On SIGTERM ingest stops taking new connections but finishes the requests in flight.

use std::time::Duration;

use super::support::{IngestServer, ingest_config};
use test_support::TestEnv;
use test_support::events::event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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

    tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .expect("the server exits once drained")
        .expect("task")
        .expect("clean exit");
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
