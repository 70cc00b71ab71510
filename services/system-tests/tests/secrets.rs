//! Credentials stay out of what the binaries print: with known secret values in every
//! credential variable, neither `--help` nor the logs and errors of the failure paths (a
//! refused password, an unreachable host, a value that is not a URL) show them.

use std::process::Command;

use test_support::process::{Launch, built};

const SECRET: &str = "S3CRETvalue";

/// Runs `binary` with `env` (and `args`) for at most `seconds` (long enough for retries to be
/// logged), returning everything it printed.
fn output_of(binary: &str, args: &[&str], env: &[(&str, String)], seconds: u64) -> String {
    let output = Command::new("timeout")
        .arg(seconds.to_string())
        .arg(built(binary))
        .args(args)
        .env_clear()
        .env("LOG_FORMAT", "text")
        .env("AUTH", "none")
        .env("RUST_LOG", "debug")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ADMIN_LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_secret_free(what: &str, text: &str) {
    if let Some(at) = text.find(SECRET) {
        let start = at.saturating_sub(120);
        panic!(
            "{what} shows a credential: …{}…",
            &text[start..at + SECRET.len()]
        );
    }
}

/// Every credential variable set to a URL holding the secret, with `host` and `port`.
fn credentials(host: &str, port: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "RABBITMQ_URL",
            format!("amqp://guest:{SECRET}@{host}:{port}/%2f"),
        ),
        (
            "RABBITMQ_MANAGEMENT_URL",
            format!("http://guest:{SECRET}@{host}:{port}"),
        ),
        (
            "DATABASE_URL",
            format!("postgres://postgres:{SECRET}@{host}:{port}/dedup"),
        ),
        ("REDIS_URL", format!("redis://:{SECRET}@{host}:{port}")),
    ]
}

#[test]
fn help_never_shows_credential_values() {
    let env = credentials("db.example", "5432");
    for binary in ["ingest", "dedup-worker"] {
        let help = output_of(binary, &["--help"], &env, 10);
        assert!(
            help.contains("[env: DATABASE_URL]") || binary == "ingest",
            "{help}"
        );
        assert!(help.contains("[env: RABBITMQ_URL]"), "{help}");
        assert_secret_free(&format!("{binary} --help"), &help);
    }
}

#[test]
fn failure_paths_never_show_credentials() {
    // A password the local RabbitMQ refuses; hosts nothing listens on; ports that are not
    // numbers; values that are not URLs at all.
    let cases: Vec<(&str, Vec<(&'static str, String)>)> = vec![
        ("refused password", credentials("127.0.0.1", "5672")),
        ("unreachable host", credentials("127.0.0.1", "1")),
        ("malformed port", credentials("127.0.0.1", "notaport")),
        (
            "not URLs",
            [
                "RABBITMQ_URL",
                "RABBITMQ_MANAGEMENT_URL",
                "DATABASE_URL",
                "REDIS_URL",
            ]
            .map(|name| (name, format!("{SECRET}-not-a-url")))
            .to_vec(),
        ),
    ];
    let mut printed = 0;
    for (case, env) in &cases {
        for (binary, args) in [
            ("ingest", &[][..]),
            ("dedup-worker", &[][..]),
            ("dedup-worker", &["migrate"][..]),
            ("dedup-worker", &["maintain"][..]),
        ] {
            let mut env = env.clone();
            env.push(("MIGRATE_ON_START", "true".to_owned()));
            let text = output_of(binary, args, &env, 3);
            assert_secret_free(&format!("{binary} {args:?} with a {case}"), &text);
            printed += text.lines().count();
        }
    }
    // The failure paths were really taken: they logged their errors (without the secret).
    assert!(printed > 20, "the binaries printed only {printed} lines");
}

/// Credentials can come from files, as Kubernetes mounts Secrets: with RABBITMQ_URL_FILE
/// instead of RABBITMQ_URL ingest connects (it is ready only once the broker confirmed its
/// connection), and the worker reads DATABASE_URL_FILE the same way.
#[tokio::test]
async fn credentials_come_from_mounted_files() {
    let env = test_support::TestEnv::new("secretfiles").await;
    let dir = std::env::temp_dir().join(format!("dedup-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (amqp, db) = (dir.join("amqp"), dir.join("db"));
    std::fs::write(&amqp, format!("{}\n", test_support::env::RABBITMQ_URL)).expect("write");
    std::fs::write(&db, format!("{}\n", env.database_url)).expect("write");
    let ingest = Launch::ingest(&env, "unused")
        .unset("RABBITMQ_URL")
        .set("RABBITMQ_URL_FILE", amqp.display())
        .start()
        .await;
    let worker = Launch::worker(&env)
        .unset("DATABASE_URL")
        .set("DATABASE_URL_FILE", db.display())
        .start()
        .await;
    // The schema exists only in the database the file names: the worker migrated it.
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() \
         AND table_name = 'product_events'",
    )
    .fetch_one(&env.pg)
    .await
    .expect("query");
    assert_eq!(tables, 1, "the worker used the DATABASE_URL from its file");
    assert!(ingest.stop().await && worker.stop().await);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Write keys never reach the output: not the valid key a client sends, not a wrong one, with
/// debug logging on and both requests answered.
#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "the client is a plain thread: it sleeps outside the runtime, which only sets up and removes the test's queues"
)]
fn write_keys_never_reach_the_output() {
    // ingest declares its exchange and queues on the shared broker: this test's own, removed
    // with the rest of its slice when `env` is dropped (inside the runtime, entered until then).
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _entered = runtime.enter();
    let env = runtime.block_on(test_support::TestEnv::new("keylog"));
    let dir = std::env::temp_dir().join(format!("dedup-keylog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let made = Command::new(built("ingest"))
        .args(["write-key", "--source", "web"])
        .output()
        .expect("ingest write-key");
    let key = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    let said = String::from_utf8_lossy(&made.stderr).into_owned();
    let entry = &said[said.find("  - source:").expect("entry")..];
    let keys = dir.join("write-keys.yaml");
    std::fs::write(&keys, format!("keys:\n{entry}")).expect("key file");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let wrong = format!("dk_{SECRET}");
    let (sent_key, sent_wrong) = (key.clone(), wrong);
    let client = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut statuses = Vec::new();
        for header in [
            format!("Authorization: Bearer {sent_key}"),
            format!("X-API-Key: {sent_wrong}"),
        ] {
            let mut answer = String::new();
            for _ in 0..50 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
                    continue;
                };
                let request = format!(
                    "POST /product_events/ HTTP/1.1\r\nHost: x\r\n{header}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                );
                if stream.write_all(request.as_bytes()).is_ok() {
                    let _ = stream.read_to_string(&mut answer);
                    break;
                }
            }
            statuses.push(answer.split(' ').nth(1).unwrap_or_default().to_owned());
        }
        statuses
    });
    let text = output_of(
        "ingest",
        &[],
        &[
            ("AUTH", "keys".to_owned()),
            ("WRITE_KEYS_PATH", keys.display().to_string()),
            ("LISTEN_ADDR", addr.to_string()),
            ("RABBITMQ_URL", test_support::env::RABBITMQ_URL.to_owned()),
            ("AMQP_EXCHANGE", env.topology.exchange.clone()),
            ("AMQP_QUEUE", env.topology.queue.clone()),
        ],
        5,
    );
    let statuses = client.join().expect("client");
    let _ = std::fs::remove_dir_all(&dir);
    // The valid key passed the door (its empty event is then invalid), the wrong one did not.
    assert_eq!(statuses, ["400", "401"], "{text}");
    assert!(
        !text.contains(&key),
        "the output shows a valid write key: {text}"
    );
    assert_secret_free("ingest with a wrong write key", &text);
}
