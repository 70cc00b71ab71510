//! Every backend connection over TLS with certificate verification, through the real binaries:
//! private TLS-only instances of RabbitMQ (AMQP and the management API), Redis and PostgreSQL
//! with a certificate from a CA the test makes, trusted through `TLS_CA_FILE`. The same
//! servers refuse (or are refused by) a client that trusts another CA.

use std::str::FromStr;
use std::time::Duration;

use dedup_runtime::queue_depth::DepthReader;
use dedup_runtime::tls::TlsArgs;
use sqlx::postgres::PgConnectOptions;
use test_support::client::post_json;
use test_support::events::event;
use test_support::process::Launch;
use test_support::tls::{self, TestCa};
use test_support::{TestEnv, eventually};

/// A management API client that trusts only the system's roots and the CA in `ca_file`.
fn depth_reader(management: &str, ca_file: &std::path::Path) -> DepthReader {
    let tls = TlsArgs {
        tls_ca_file: Some(ca_file.to_owned()),
    };
    DepthReader::with_tls(
        management,
        Duration::from_secs(5),
        tls.client_config().expect("config"),
    )
    .expect("reader")
}

#[tokio::test]
async fn every_backend_connection_runs_over_verified_tls() {
    let ca = TestCa::new("backends");
    // Started side by side: RabbitMQ takes ~10 s, PostgreSQL a few, Redis none.
    let (redis, postgres, rabbitmq) = std::thread::scope(|s| {
        let redis = s.spawn(|| tls::redis(&ca));
        let postgres = s.spawn(|| tls::postgres(&ca));
        let rabbitmq = tls::rabbitmq(&ca);
        (
            redis.join().expect("redis"),
            postgres.join().expect("postgres"),
            rabbitmq,
        )
    });
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", rabbitmq.port);
    let management = format!(
        "https://guest:guest@localhost:{}",
        rabbitmq.management_port.expect("management port")
    );
    let rediss = format!(
        "rediss://dedup-worker:worker-secret@localhost:{}",
        redis.port
    );
    let database = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
        postgres.port
    );
    let env = TestEnv::new("tls").await;
    let ca_file = ca.ca_file.display().to_string();

    // A client trusting another CA is refused by each server's certificate.
    let migrate = Launch::worker(&env)
        .set("DATABASE_URL", &database)
        .set("TLS_CA_FILE", ca.other_ca_file.display())
        .run(&["migrate"])
        .await;
    let said = String::from_utf8_lossy(&migrate.stderr);
    assert!(
        !migrate.status.success(),
        "migrate trusted an unknown CA: {said}"
    );
    assert!(said.to_lowercase().contains("certificate"), "{said}");
    let wrong = depth_reader(&management, &ca.other_ca_file);
    let error = wrong
        .read("/", "anything")
        .await
        .expect_err("an unknown CA is refused");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    let untrusting_ingest = Launch::ingest(&env, &amqps)
        .set("TLS_CA_FILE", ca.other_ca_file.display())
        .spawn();

    // Trusting the test's CA, the whole pipeline runs over TLS.
    let worker = Launch::worker(&env)
        .set("RABBITMQ_URL", &amqps)
        .set("RABBITMQ_MANAGEMENT_URL", &management)
        .set("REDIS_URL", &rediss)
        .set("DATABASE_URL", &database)
        .set("TLS_CA_FILE", &ca_file)
        .start()
        .await;
    let ingest = Launch::ingest(&env, &amqps)
        .set("TLS_CA_FILE", &ca_file)
        .start()
        .await;
    for r in ["t-1", "t-2", "t-1"] {
        let body = event(r).to_string();
        let (status, answer) = post_json(ingest.addr(), "/product_events/", body.as_bytes()).await;
        assert_eq!(status, 202, "{answer}");
    }
    let options = PgConnectOptions::from_str(&database)
        .expect("database URL")
        .ssl_root_cert(&ca.ca_file);
    let pg = sqlx::PgPool::connect_with(options)
        .await
        .expect("TLS PostgreSQL");
    eventually(
        Duration::from_secs(30),
        "two rows in the TLS PostgreSQL",
        || async {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM product_events")
                .fetch_one(&pg)
                .await
                .ok()?;
            (rows == 2).then_some(())
        },
    )
    .await;
    // Redis remembers the two keys (the worker wrote them over rediss:// as its ACL user).
    let client = redis::Client::build_with_tls(
        format!("rediss://default:admin-secret@localhost:{}", redis.port),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&ca.ca_file).expect("CA")),
        },
    )
    .expect("Redis client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("TLS Redis");
    let keys = test_support::env::scan_keys(&mut conn, &format!("{{{}}}:*", env.redis_prefix))
        .await
        .expect("SCAN");
    assert_eq!(keys.len(), 2, "{keys:?}");
    // The management API over https: the worker's depth gauges and a direct read.
    let reader = depth_reader(&management, &ca.ca_file);
    let depth = reader
        .read("/", &env.topology.queue)
        .await
        .expect("depth over https");
    assert_eq!(depth.ready, 0, "{depth:?}");
    eventually(
        Duration::from_secs(20),
        "the worker's queue depth gauge",
        || async {
            worker
                .metrics()
                .await
                .lines()
                .any(|l| l.starts_with("dedup_queue_messages{") && l.contains(&env.topology.queue))
                .then_some(())
        },
    )
    .await;

    // The ingest that trusts another CA never connected.
    assert!(
        untrusting_ingest.ready().await.is_err(),
        "ingest trusted an unknown CA"
    );
    assert!(ingest.stop().await && worker.stop().await);
    drop((redis, postgres, rabbitmq));
}
