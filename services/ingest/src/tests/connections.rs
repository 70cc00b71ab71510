//! The public port's limits on connections, on a real server: silent, slow and idle clients are
//! closed after HEADER_READ_TIMEOUT, an oversized head gets 431, and clients past
//! MAX_CONNECTIONS wait until a connection closes, then are served.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::support::{IngestServer, ingest_config, metric};
use test_support::client::{connect_https, post_json_https};
use test_support::events::event;
use test_support::tls::TestCa;
use test_support::{TestEnv, eventually};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The header timeout the tests set: short, so a test waits for it in seconds.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

async fn serving(env: &TestEnv, tune: impl FnOnce(&mut crate::Config)) -> IngestServer {
    let mut config = ingest_config(env, RABBITMQ);
    config.header_read_timeout = HEADER_TIMEOUT;
    tune(&mut config);
    IngestServer::start(config).await
}

/// A single-event request for the event named `r`, keeping the connection open.
fn request(r: &str) -> String {
    let body = event(r).to_string();
    format!(
        "POST /product_events/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads until the server closes the connection (30 s at most); what it sent, and when it
/// closed, counted from `since`.
async fn until_closed(stream: &mut (impl AsyncRead + Unpin), since: Instant) -> (String, Duration) {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection within 30 s")
        .expect("read");
    (
        String::from_utf8_lossy(&answer).into_owned(),
        since.elapsed(),
    )
}

/// Reads one answer's head and body (Content-Length) off a kept-alive connection.
async fn one_answer(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !seen.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).await.expect("read"),
                1,
                "closed early"
            );
            seen.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&seen).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("body");
        head + &String::from_utf8_lossy(&body)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

async fn closed_for(admin: SocketAddr, reason: &str) -> f64 {
    metric(
        admin,
        &format!("dedup_ingest_connections_closed_total{{reason=\"{reason}\"}}"),
    )
    .await
}

/// Waits (5 s at most) until `count` connections were closed for `reason`: ingest counts a
/// connection just after closing it, so a client can see the close first.
async fn counted_closed(admin: SocketAddr, reason: &str, count: f64) {
    eventually(
        Duration::from_secs(5),
        &format!("{count} connections counted closed for {reason}"),
        || async { (closed_for(admin, reason).await == count).then_some(()) },
    )
    .await;
}

/// A connection that sends nothing, one that sends its head a byte at a time too slowly, and
/// one left idle after its answer: each is closed after HEADER_READ_TIMEOUT, not later, and
/// counted; a prompt client on the same server is served.
#[tokio::test]
async fn silent_slow_and_idle_connections_are_closed_after_the_header_timeout() {
    let env = TestEnv::new("conn-timeout").await;
    let server = serving(&env, |_| {}).await;

    let since = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let (answer, after) = until_closed(&mut silent, since).await;
    assert_eq!(answer, "", "a silent connection gets no answer");
    assert!(
        after >= HEADER_TIMEOUT - Duration::from_millis(100) && after < HEADER_TIMEOUT * 4,
        "closed after {after:?}, the timeout being {HEADER_TIMEOUT:?}"
    );

    // Slowloris: the head keeps coming, a byte every 100 ms, and never ends; the timeout
    // counts from its start, not from the last byte.
    let since = Instant::now();
    let slow = TcpStream::connect(server.addr).await.expect("connect");
    let (mut reader, mut writer) = slow.into_split();
    let trickle = tokio::spawn(async move {
        writer
            .write_all(b"POST /product_events/ HTTP/1.1\r\nX-Slow: ")
            .await?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer.write_all(b"a").await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    let (answer, after) = until_closed(&mut reader, since).await;
    assert!(
        after < HEADER_TIMEOUT * 4,
        "a trickling head is cut after {after:?}, the timeout being {HEADER_TIMEOUT:?}"
    );
    assert!(!answer.contains("202"), "{answer}");
    trickle.abort();

    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(request("kept-alive").as_bytes())
        .await
        .expect("request");
    let answer = one_answer(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let since = Instant::now();
    let (rest, after) = until_closed(&mut idle, since).await;
    assert_eq!(rest, "", "nothing more on the idle connection");
    assert!(
        after >= HEADER_TIMEOUT - Duration::from_millis(100) && after < HEADER_TIMEOUT * 4,
        "an idle keep-alive connection closed after {after:?}"
    );

    counted_closed(server.admin_addr, "header_timeout", 3.0).await;
    assert_eq!(
        metric(server.admin_addr, "dedup_ingest_connections").await,
        0.0
    );
    assert_eq!(
        env.ready_messages(&env.topology.queue).await,
        1,
        "only the prompt request's event was queued"
    );
}

/// A request head past MAX_HEADER_BYTES gets 431 and its connection is closed; the next
/// connection's ordinary request is served.
#[tokio::test]
async fn a_head_past_max_header_bytes_gets_431() {
    let env = TestEnv::new("conn-431").await;
    let server = serving(&env, |c| c.max_header_bytes = 4096).await;

    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let padding = "a".repeat(5000);
    let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {padding}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("head");
    let (answer, _) = until_closed(&mut stream, Instant::now()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    counted_closed(server.admin_addr, "header_too_large", 1.0).await;

    // Just under the limit passes.
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let padding = "a".repeat(3000);
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {padding}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let (answer, _) = until_closed(&mut stream, Instant::now()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// With MAX_CONNECTIONS 2 and two connections open, a third client's request waits unanswered,
/// not refused; it is served once one of the two closes.
#[tokio::test]
async fn a_client_past_max_connections_waits_until_one_closes() {
    let env = TestEnv::new("conn-limit").await;
    let server = serving(&env, |c| {
        c.max_connections = 2;
        // Long enough that only the test closes the two.
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let admin = server.admin_addr;
    assert_eq!(metric(admin, "dedup_ingest_connections_limit").await, 2.0);

    let first = TcpStream::connect(server.addr).await.expect("connect");
    let mut second = TcpStream::connect(server.addr).await.expect("connect");
    second
        .write_all(request("second").as_bytes())
        .await
        .expect("request");
    assert!(one_answer(&mut second).await.starts_with("HTTP/1.1 202"));
    assert_eq!(metric(admin, "dedup_ingest_connections").await, 2.0);

    let mut third = TcpStream::connect(server.addr)
        .await
        .expect("the kernel queues it");
    third
        .write_all(request("third").as_bytes())
        .await
        .expect("request");
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(1500), third.read(&mut byte)).await;
    assert!(
        waited.is_err(),
        "the third client is not served while two are open"
    );
    assert_eq!(metric(admin, "dedup_ingest_connections").await, 2.0);

    drop(first);
    let answer = one_answer(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert_eq!(env.ready_messages(&env.topology.queue).await, 2);
}

/// Over TLS, a client that connects and never starts its handshake holds its slot only until
/// HEADER_READ_TIMEOUT, and is counted; with MAX_CONNECTIONS 1 the client behind it is then
/// served.
#[tokio::test]
async fn a_silent_tls_client_gives_its_slot_back_after_the_timeout() {
    let env = TestEnv::new("conn-tls").await;
    let ca = TestCa::new("conn-tls");
    let server = serving(&env, |c| {
        c.max_connections = 1;
        c.tls_cert_file = Some(ca.cert_file.clone());
        c.tls_key_file = Some(ca.key_file.clone());
    })
    .await;

    let since = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    // Accepted first, it holds the one slot; the TLS client behind it waits in the kernel's
    // queue until the silent one is closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = event("after-silent").to_string();
    let (addr, ca_file) = (server.addr, ca.ca_file.clone());
    let next = tokio::spawn(async move {
        let answer = post_json_https(addr, &ca_file, body.as_bytes()).await;
        (answer, since.elapsed())
    });
    let (_, after) = until_closed(&mut silent, since).await;
    assert!(
        after >= HEADER_TIMEOUT - Duration::from_millis(100) && after < HEADER_TIMEOUT * 4,
        "a silent TLS client closed after {after:?}"
    );
    let (answer, served_after) = next.await.expect("the next client");
    let answer = answer.expect("the next client's handshake");
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert!(
        served_after >= after - Duration::from_millis(100),
        "served after {served_after:?}, before the silent client's slot was free ({after:?})"
    );
    counted_closed(server.admin_addr, "tls_handshake", 1.0).await;
    eventually(
        Duration::from_secs(5),
        "both connections to be closed",
        || async {
            (metric(server.admin_addr, "dedup_ingest_connections").await == 0.0).then_some(())
        },
    )
    .await;
}

/// Over TLS: plain HTTP sent to the HTTPS port and a malformed ClientHello are closed at once,
/// not after the timeout, and counted as failed handshakes; a client that completes its
/// handshake and then sends nothing is closed after HEADER_READ_TIMEOUT, counted as a header
/// timeout. A good HTTPS client on the same server is served throughout.
#[tokio::test]
async fn bad_handshakes_and_silence_after_a_handshake_are_closed_and_counted() {
    let env = TestEnv::new("conn-tls-bad").await;
    let ca = TestCa::new("conn-tls-bad");
    let timeout = Duration::from_secs(3);
    let server = serving(&env, |c| {
        c.header_read_timeout = timeout;
        c.tls_cert_file = Some(ca.cert_file.clone());
        c.tls_key_file = Some(ca.key_file.clone());
    })
    .await;
    let admin = server.admin_addr;

    let mut plain = TcpStream::connect(server.addr).await.expect("connect");
    plain
        .write_all(request("plain-to-https").as_bytes())
        .await
        .expect("request");
    let (answer, after) = until_closed(&mut plain, Instant::now()).await;
    assert!(!answer.contains("HTTP/1.1"), "{answer:?}");
    assert!(after < timeout / 2, "plain HTTP closed after {after:?}");

    // A handshake record announcing a ClientHello whose body is not one.
    let mut malformed = TcpStream::connect(server.addr).await.expect("connect");
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c];
    hello.extend([0xff; 0x3c]);
    malformed.write_all(&hello).await.expect("hello");
    let (_, after) = until_closed(&mut malformed, Instant::now()).await;
    assert!(
        after < timeout / 2,
        "a malformed hello closed after {after:?}"
    );
    counted_closed(admin, "tls_handshake", 2.0).await;

    let since = Instant::now();
    let mut silent = connect_https(server.addr, &ca.ca_file)
        .await
        .expect("the handshake completes");
    let body = event("beside-silent").to_string();
    let answer = post_json_https(server.addr, &ca.ca_file, body.as_bytes())
        .await
        .expect("a good client's handshake");
    assert_eq!(answer.status, 202, "{}", answer.body);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection within 30 s");
    let after = since.elapsed();
    // The server drops the connection without a close_notify: rustls reads that as an early end.
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    assert!(
        rest.is_empty(),
        "no answer to a request never sent: {rest:?}"
    );
    assert!(
        after >= timeout - Duration::from_millis(100) && after < timeout * 2,
        "silent after its handshake, closed after {after:?}, the timeout being {timeout:?}"
    );
    counted_closed(admin, "header_timeout", 1.0).await;
    assert_eq!(closed_for(admin, "tls_handshake").await, 2.0);
    assert_eq!(env.ready_messages(&env.topology.queue).await, 1);
}

/// SIGTERM while every slot is taken by an idle connection and another client waits to be
/// accepted: ingest does not wait for a slot, closes the idle connection and exits well
/// within its grace period; the waiting client is never answered 202.
#[tokio::test]
async fn shutdown_at_the_connection_limit_exits_promptly() {
    let env = TestEnv::new("conn-shutdown").await;
    let mut server = serving(&env, |c| {
        c.max_connections = 1;
        c.header_read_timeout = Duration::from_secs(60);
        c.shutdown_grace = Duration::from_secs(20);
    })
    .await;
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(request("before").as_bytes())
        .await
        .expect("request");
    assert!(one_answer(&mut idle).await.starts_with("HTTP/1.1 202"));
    let mut waiting = TcpStream::connect(server.addr)
        .await
        .expect("the kernel queues it");
    waiting
        .write_all(request("waiting").as_bytes())
        .await
        .expect("request");

    server.shutdown();
    server
        .exits_within(Duration::from_secs(5), "ingest exits with every slot taken")
        .await;
    let (rest, _) = until_closed(&mut idle, Instant::now()).await;
    assert_eq!(rest, "", "the idle connection is closed without an answer");
    let mut answer = Vec::new();
    let _ = waiting.read_to_end(&mut answer).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("202"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(env.ready_messages(&env.topology.queue).await, 1);
}
