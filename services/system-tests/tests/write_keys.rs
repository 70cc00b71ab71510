//! Who may send events and how fast, through the real binaries: write keys made by
//! `ingest write-key`, a key file reloaded while ingest runs (issue, rotate, revoke, a broken
//! edit), the source stored with each event and counted by it, and the rate limits' 429s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use test_support::client::{Answer, http_exchange};
use test_support::events::event;
use test_support::process::{Launch, Service};
use test_support::{TestEnv, eventually};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A key made by the real `ingest write-key`: the key (stdout) and its key file entry (stderr).
async fn write_key(env: &TestEnv, source: &str) -> (String, String) {
    let output = Launch::ingest(env, RABBITMQ)
        .run(&["write-key", "--source", source])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let key = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let entry_at = stderr.find("  - source:").expect("the key file entry");
    (key, stderr[entry_at..].to_owned())
}

/// A key file that is replaced whole, the way a Kubernetes Secret volume changes.
struct KeyFile {
    dir: PathBuf,
}

impl KeyFile {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dedup-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("key dir");
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("write-keys.yaml")
    }

    fn write(&self, text: &str) {
        let staged = self.dir.join(".staged");
        std::fs::write(&staged, text).expect("write key file");
        std::fs::rename(&staged, self.path()).expect("replace key file");
    }

    fn keys(&self, entries: &[&str]) {
        self.write(&format!("keys:\n{}", entries.concat()));
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ingest_with_keys(env: &TestEnv, path: &Path) -> Launch {
    Launch::ingest(env, RABBITMQ)
        .set("AUTH", "keys")
        .set("WRITE_KEYS_PATH", path.display())
        .set("WRITE_KEYS_RELOAD_INTERVAL", "100ms")
}

async fn post(ingest: &Service, headers: &[(&str, &str)], r: &str) -> Answer {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let body = event(r).to_string();
    http_exchange(
        ingest.addr(),
        "POST",
        "/product_events/",
        &all,
        body.as_bytes(),
    )
    .await
}

/// A JSON-array batch of events with these `r`s, with `key` in X-API-Key.
async fn post_batch(ingest: &Service, key: &str, rs: &[&str]) -> Answer {
    let batch = serde_json::Value::Array(rs.iter().map(|r| event(r)).collect()).to_string();
    let headers = [("Content-Type", "application/json"), ("X-API-Key", key)];
    http_exchange(
        ingest.addr(),
        "POST",
        "/product_events/batch",
        &headers,
        batch.as_bytes(),
    )
    .await
}

/// Waits until a request with `headers` gets `status` (the key file is re-read every 100 ms).
async fn until_status(ingest: &Service, headers: &[(&str, &str)], status: u16, what: &str) {
    let mut n = 0;
    eventually(Duration::from_secs(10), what, || {
        n += 1;
        let r = format!("{what}-{n}");
        async move { (post(ingest, headers, &r).await.status == status).then_some(()) }
    })
    .await;
}

async fn stored_by_source(env: &TestEnv) -> Vec<(Option<String>, i64)> {
    sqlx::query_as("SELECT source, count(*) FROM product_events GROUP BY source ORDER BY source")
        .fetch_all(&env.pg)
        .await
        .expect("count by source")
}

/// Without a valid key nothing is taken (401 in the original's error shape); keys are issued,
/// rotated and revoked by editing the file while ingest runs; a broken edit keeps the keys in
/// use; each stored event names its source and is counted under it.
#[tokio::test]
async fn only_known_keys_send_and_their_source_is_stored() {
    let env = TestEnv::new("keys").await;
    let (web, web_entry) = write_key(&env, "web").await;
    let (ios, ios_entry) = write_key(&env, "ios").await;
    let (web2, web2_entry) = write_key(&env, "web").await;
    let file = KeyFile::new("keys");
    file.keys(&[&web_entry]);
    let worker = Launch::worker(&env).start().await;
    let ingest = ingest_with_keys(&env, &file.path()).start().await;
    let bearer = |key: &str| format!("Bearer {key}");

    let missing = post(&ingest, &[], "none").await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing
            .body
            .contains("Authentication credentials were not provided"),
        "{missing:?}"
    );
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"dedup\"")
    );
    let wrong = post(
        &ingest,
        &[("Authorization", "Bearer dk_not-a-key")],
        "wrong",
    )
    .await;
    assert_eq!(
        (wrong.status, wrong.body.as_str()),
        (401, r#"{"detail":"Invalid write key."}"#)
    );
    assert_eq!(
        post(&ingest, &[("Authorization", &bearer(&ios))], "ios-early")
            .await
            .status,
        401
    );

    let sent = post(&ingest, &[("Authorization", &bearer(&web))], "web-1").await;
    assert_eq!(sent.status, 202, "{sent:?}");
    let sent = post_batch(&ingest, &web, &["web-2", "web-3"]).await;
    assert_eq!(sent.status, 202, "{sent:?}");

    // Issue a key for ios and a second for web (a rotation), then revoke the first web key.
    file.keys(&[&web_entry, &ios_entry, &web2_entry]);
    until_status(&ingest, &[("Authorization", &bearer(&ios))], 202, "ios").await;
    assert_eq!(
        post(&ingest, &[("X-API-Key", &web2)], "web2-1")
            .await
            .status,
        202
    );
    assert_eq!(
        post(&ingest, &[("X-API-Key", &web)], "web-4").await.status,
        202
    );
    file.keys(&[&ios_entry, &web2_entry]);
    until_status(&ingest, &[("X-API-Key", &web)], 401, "web-revoked").await;

    // A broken edit is refused and counted; the keys in use stay.
    file.write("keys:\n  - source: ios\n    sha256: not-hex\n");
    eventually(
        Duration::from_secs(10),
        "the failed reload to be counted",
        || async {
            (ingest
                .metric("dedup_ingest_write_key_reloads_total{outcome=\"error\"}")
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        post(&ingest, &[("X-API-Key", &web2)], "web2-2")
            .await
            .status,
        202
    );

    // Accepted: web-1..4, web2-1, web2-2, and every 202 of the probes that waited for a
    // reload (at least one ios, maybe some web before the revocation took).
    let ios_accepted = ingest
        .metric("dedup_ingest_events_total{outcome=\"accepted\",source=\"ios\"}")
        .await as i64;
    let web_accepted = ingest
        .metric("dedup_ingest_events_total{outcome=\"accepted\",source=\"web\"}")
        .await as i64;
    assert!(ios_accepted >= 1);
    assert!(web_accepted >= 6, "{}", ingest.metrics().await);
    assert!(
        ingest
            .metric("dedup_ingest_auth_failures_total{reason=\"missing\"}")
            .await
            >= 1.0
    );
    assert!(
        ingest
            .metric("dedup_ingest_auth_failures_total{reason=\"invalid\"}")
            .await
            >= 2.0
    );
    env.settle(web_accepted + ios_accepted, Duration::from_secs(20))
        .await;
    assert_eq!(
        stored_by_source(&env).await,
        [
            (Some("ios".to_owned()), ios_accepted),
            (Some("web".to_owned()), web_accepted)
        ],
        "every stored event names its source; no refused request was stored"
    );
    assert!(worker.stop().await && ingest.stop().await);
}

/// A key over its rate gets 429 with a Retry-After after which it passes again, and a batch
/// over its burst gets 413; a client address over its rate gets 429, counted by the address a
/// trusted proxy forwarded and never by one an untrusted peer claims.
#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let env = TestEnv::new("ratelimit").await;
    let (key, entry) = write_key(&env, "web").await;
    let file = KeyFile::new("ratelimit");
    file.keys(&[&format!("{entry}    rate: 1\n    burst: 2\n")]);
    let ingest = ingest_with_keys(&env, &file.path())
        .set("RATE_LIMIT", 1000)
        .start()
        .await;
    let auth = [("X-API-Key", key.as_str())];
    assert_eq!(post(&ingest, &auth, "a").await.status, 202);
    assert_eq!(post(&ingest, &auth, "b").await.status, 202);
    let limited = post(&ingest, &auth, "c").await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.header("retry-after"), Some("1"), "{limited:?}");
    assert!(limited.body.contains("throttled"), "{limited:?}");
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        post(&ingest, &auth, "d").await.status,
        202,
        "a token after Retry-After"
    );
    let over = post_batch(&ingest, &key, &["e", "f", "g"]).await;
    assert_eq!(over.status, 413, "{over:?}");
    assert!(over.body.contains("burst of 2"), "{over:?}");
    assert!(
        ingest
            .metric("dedup_ingest_rate_limited_total{limit=\"key\"}")
            .await
            >= 1.0
    );
    assert!(ingest.stop().await);

    // Behind a trusted proxy (the test's own address) each forwarded client has its own bucket.
    let open = |trusted: &str| {
        Launch::ingest(&env, RABBITMQ)
            .set("ADDRESS_RATE_LIMIT", 1)
            .set("ADDRESS_RATE_LIMIT_BURST", 2)
            .set("TRUSTED_PROXIES", trusted)
    };
    let ingest = open("127.0.0.0/8,10.0.0.0/8").start().await;
    let client = |ip: &'static str| [("X-Forwarded-For", ip)];
    for r in ["h", "i"] {
        assert_eq!(
            post(&ingest, &client("203.0.113.7, 10.1.2.3"), r)
                .await
                .status,
            202
        );
    }
    let limited = post(&ingest, &client("203.0.113.7"), "j").await;
    assert_eq!(
        (limited.status, limited.header("retry-after")),
        (429, Some("1")),
        "{limited:?}"
    );
    assert_eq!(
        post(&ingest, &client("203.0.113.8"), "k").await.status,
        202,
        "another client"
    );
    // A forged entry left of the real client changes nothing.
    let forged = post(&ingest, &client("198.51.100.1, 203.0.113.7"), "l").await;
    assert_eq!(forged.status, 429, "{forged:?}");
    assert!(
        ingest
            .metric("dedup_ingest_rate_limited_total{limit=\"address\"}")
            .await
            >= 2.0
    );
    assert!(ingest.stop().await);

    // From an untrusted peer the header is ignored: every claimed client is the peer.
    let ingest = open("10.0.0.0/8").start().await;
    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for (i, ip) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
            .into_iter()
            .enumerate()
        {
            statuses.push(post(&ingest, &client(ip), &format!("m{i}")).await.status);
        }
        statuses
    };
    assert_eq!(statuses, [202, 202, 429]);
    assert!(ingest.stop().await);
    // Whatever was accepted is on the queue; the refused requests added nothing.
    let queued = env.drain(&env.topology.queue).await;
    let events: usize = queued
        .iter()
        .map(|(body, _)| {
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count()
        })
        .sum();
    assert_eq!(events, 3 + 3 + 2);
}

/// ingest refuses to start on a missing or broken key file and says what to do.
#[tokio::test]
async fn a_missing_or_broken_key_file_stops_ingest_at_start() {
    let env = TestEnv::new("keyfile").await;
    let no_path = Launch::ingest(&env, RABBITMQ)
        .set("AUTH", "keys")
        .run(&[])
        .await;
    let said = String::from_utf8_lossy(&no_path.stderr);
    assert!(!no_path.status.success());
    assert!(
        said.contains("AUTH=keys needs WRITE_KEYS_PATH") && said.contains("AUTH=none"),
        "{said}"
    );

    let file = KeyFile::new("keyfile");
    let missing = ingest_with_keys(&env, &file.path()).run(&[]).await;
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(said.contains("cannot read the write key file"), "{said}");

    file.write("keys:\n  - source: web app\n    sha256: 00\n");
    let broken = ingest_with_keys(&env, &file.path()).run(&[]).await;
    let said = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success());
    assert!(
        said.contains("key 1: source \"web app\" is not a source name"),
        "{said}"
    );
}

/// The key file docker compose mounts is one ingest reads, and its documented dev key sends.
#[tokio::test]
async fn the_compose_key_file_admits_its_dev_key() {
    let env = TestEnv::new("composekeys").await;
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compose/write-keys/write-keys.yaml");
    let text = std::fs::read_to_string(&path).expect("compose key file");
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("dk_"))
        .expect("the dev key in its comment");
    let ingest = ingest_with_keys(&env, &path).start().await;
    assert_eq!(
        post(
            &ingest,
            &[("Authorization", &format!("Bearer {key}"))],
            "dev"
        )
        .await
        .status,
        202
    );
    assert_eq!(post(&ingest, &[], "anonymous").await.status, 401);
    assert!(ingest.stop().await);
    env.drain(&env.topology.queue).await;
}
