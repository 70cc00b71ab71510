//! ingest serving HTTPS itself: a certificate from files, a renewed certificate served without
//! a restart, and a broken pair refused at start with what is wrong.

use std::path::Path;
use std::time::Duration;

use test_support::client::{Answer, post_json_https};
use test_support::events::event;
use test_support::process::{Launch, Service};
use test_support::tls::TestCa;
use test_support::{TestEnv, eventually};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One POST of the event named `r` over TLS to `ingest`, trusting the CA in `ca_file`; `Err`
/// when the handshake fails (the server's certificate is not that CA's).
async fn post_https(ingest: &Service, ca_file: &Path, r: &str) -> Result<Answer, String> {
    post_json_https(ingest.addr(), ca_file, event(r).to_string().as_bytes()).await
}

#[tokio::test]
async fn ingest_serves_https_and_takes_a_renewed_certificate() {
    let env = TestEnv::new("https").await;
    let first = TestCa::new("https-first");
    let renewed = TestCa::new("https-renewed");
    let dir = first.dir.join("served");
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    // Replaced whole, as a Secret volume or certbot does.
    let serve = |ca: &TestCa| {
        for (from, to) in [(&ca.cert_file, &cert), (&ca.key_file, &key)] {
            let staged = dir.join(".staged");
            std::fs::copy(from, &staged).expect("copy");
            std::fs::rename(&staged, to).expect("rename");
        }
    };
    serve(&first);
    let ingest = Launch::ingest(&env, RABBITMQ)
        .set("TLS_CERT_FILE", cert.display())
        .set("TLS_KEY_FILE", key.display())
        .set("TLS_RELOAD_INTERVAL", "100ms")
        .start()
        .await;

    let answer = post_https(&ingest, &first.ca_file, "s-1")
        .await
        .expect("HTTPS");
    assert_eq!(answer.status, 202, "{answer:?}");
    let refused = post_https(&ingest, &first.other_ca_file, "s-x").await;
    assert!(
        refused.is_err(),
        "a client trusting another CA must fail the handshake"
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = tokio::time::timeout(Duration::from_secs(5), async {
        let stream = tokio::net::TcpStream::connect(ingest.addr())
            .await
            .expect("connect");
        let mut stream = stream;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        buf
    })
    .await
    .expect("the server closes a plain connection");
    assert!(!plain.starts_with(b"HTTP/"), "plain HTTP was answered");

    // A renewed certificate (another CA here, to tell them apart) is served without a restart.
    serve(&renewed);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate",
        || async {
            post_https(&ingest, &renewed.ca_file, "s-2")
                .await
                .ok()
                .filter(|a| a.status == 202)
        },
    )
    .await;
    assert!(
        post_https(&ingest, &first.ca_file, "s-3").await.is_err(),
        "the old one is gone"
    );
    // A half-written renewal (a key that does not match) is refused; the one in use stays.
    std::fs::copy(&first.key_file, &key).expect("mismatched key");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = post_https(&ingest, &renewed.ca_file, "s-4")
        .await
        .expect("still served");
    assert_eq!(still.status, 202);
    assert!(ingest.stop().await);
    env.drain(&env.topology.queue).await;

    // At start, a key that is not the certificate's is refused with both files named.
    let broken = Launch::ingest(&env, RABBITMQ)
        .set("TLS_CERT_FILE", cert.display())
        .set("TLS_KEY_FILE", key.display())
        .run(&[])
        .await;
    let said = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success());
    assert!(
        said.contains("is not the key of the certificate in TLS_CERT_FILE"),
        "{said}"
    );
    let half = Launch::ingest(&env, RABBITMQ)
        .set("TLS_CERT_FILE", cert.display())
        .run(&[])
        .await;
    let said = String::from_utf8_lossy(&half.stderr);
    assert!(
        !half.status.success() && said.contains("--tls-key-file"),
        "{said}"
    );
}
