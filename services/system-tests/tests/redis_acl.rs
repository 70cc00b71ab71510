//! The Redis that docker compose (and the chart, with the same arguments) runs requires a
//! password, and the workers reach it as an ACL user that may not run dangerous commands: a
//! throw-away `redis-server` started with the compose file's own `REDIS_ARGS` refuses an
//! unauthenticated client and `FLUSHALL` from the worker user, and the real worker binary
//! dedups through it as that user.

use std::process::Stdio;
use std::time::Duration;

use test_support::events::event;
use test_support::process::Launch;
use test_support::{TestEnv, eventually};

/// `REDIS_ARGS` from docker-compose.dev.yml with the given passwords in place.
fn compose_redis_args(admin: &str, worker: &str) -> Vec<String> {
    let compose = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docker-compose.dev.yml"
    ))
    .expect("docker-compose.dev.yml");
    let line = compose
        .lines()
        .find_map(|l| l.trim().strip_prefix("REDIS_ARGS: "))
        .expect("the redis service sets REDIS_ARGS");
    line.trim_matches('"')
        .replace("${REDIS_PASSWORD}", admin)
        .replace("${REDIS_WORKER_PASSWORD}", worker)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn workers_dedup_through_a_password_protected_redis_as_their_acl_user() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut redis = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(compose_redis_args("adminpw", "workerpw"))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (scripts/ensure-services.sh installs it)");
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
    let as_worker = redis::Client::open(format!("redis://dedup-worker:workerpw@127.0.0.1:{port}"))
        .expect("url");
    let mut worker_conn = eventually(
        Duration::from_secs(10),
        "redis-server to listen",
        || async { as_worker.get_multiplexed_async_connection().await.ok() },
    )
    .await;
    let refused: redis::RedisResult<String> =
        match anonymous.get_multiplexed_async_connection().await {
            Ok(mut conn) => redis::cmd("PING").query_async(&mut conn).await,
            Err(e) => Err(e),
        };
    assert!(refused.is_err(), "an unauthenticated client is refused");
    let flush: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut worker_conn).await;
    assert!(flush.is_err(), "the worker user may not flush");

    let env = TestEnv::new("redisacl").await;
    let worker = Launch::worker(&env)
        .set(
            "REDIS_URL",
            format!("redis://dedup-worker:workerpw@127.0.0.1:{port}"),
        )
        .start()
        .await;
    env.publish_each(&[event("acl-1"), event("acl-2")]).await;
    eventually(Duration::from_secs(20), "two stored rows", || async {
        (env.stored_rows().await == 2).then_some(())
    })
    .await;
    // Stored keys are remembered in this Redis, so a repeat is dropped there.
    let keys: Vec<String> = eventually(Duration::from_secs(10), "two recent keys", || {
        let mut conn = worker_conn.clone();
        let pattern = format!("{{{}}}:*", env.redis_prefix);
        async move {
            // SCAN: KEYS is among the commands the worker user may not run.
            let keys = test_support::env::scan_keys(&mut conn, &pattern)
                .await
                .ok()?;
            (keys.len() == 2).then_some(keys)
        }
    })
    .await;
    assert_eq!(keys.len(), 2);
    env.publish_each(&[event("acl-1")]).await;
    eventually(
        Duration::from_secs(20),
        "the repeat dropped by Redis",
        || async {
            (worker
                .metric("dedup_worker_duplicates_total{tier=\"recent_keys\"}")
                .await
                == 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(worker.metric("dedup_worker_redis_degraded").await, 0.0);
    assert_eq!(env.stored_rows().await, 2);
    assert!(worker.stop().await);
    let _ = redis.kill().await;
}
