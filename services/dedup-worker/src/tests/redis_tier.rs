//! The Redis tier against the real Redis: what the check answers for new keys, recorded keys
//! and keys whose recent entry is gone, across batches larger than one command asks for.

use std::time::Duration;

use crate::metrics::Metrics;
use crate::redis_tier::{Item, RedisSettings, RedisTier};
use chrono::NaiveDate;
use dedup_event::DedupKey;
use test_support::TestEnv;

fn items(range: std::ops::Range<u32>) -> Vec<Item> {
    let day = NaiveDate::from_ymd_opt(2025, 4, 10).expect("date");
    range
        .map(|i| {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&i.to_le_bytes());
            key[4..8].copy_from_slice(&(i.wrapping_mul(2_654_435_761)).to_le_bytes());
            Item {
                key: DedupKey(key),
                day,
            }
        })
        .collect()
}

/// The tier's settings for the local Redis (or another server at `url`).
fn settings(url: &str, prefix: &str, key_buckets: u32, cluster: bool) -> RedisSettings {
    RedisSettings {
        url: url.into(),
        prefix: prefix.to_owned(),
        key_buckets,
        cluster,
        recent_ttl: Duration::from_secs(600),
        timeout: Duration::from_secs(5),
        retry_interval: Duration::from_secs(1),
        ca_pem: None,
    }
}

/// Checks `stored` (recorded) and `fresh` interleaved: recorded keys known, new ones not, and
/// an answer out of order would show.
async fn assert_answers_in_order(tier: &RedisTier, stored: &[Item], fresh: &[Item]) {
    let mixed: Vec<Item> = stored
        .iter()
        .zip(fresh)
        .flat_map(|(a, b)| [*a, *b])
        .collect();
    let expected: Vec<bool> = (0..mixed.len()).map(|i| i % 2 == 0).collect();
    let after = tier.check(&mixed).await.expect("Redis answers");
    assert!(
        after == expected,
        "recorded keys known, new keys not, in order"
    );
}

/// A connection to the local Redis and its keys matching `pattern`.
async fn local_keys(pattern: &str) -> (redis::aio::MultiplexedConnection, Vec<String>) {
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let keys = test_support::env::scan_keys(&mut conn, pattern)
        .await
        .expect("SCAN");
    (conn, keys)
}

#[tokio::test]
async fn check_answers_recorded_keys_only_across_large_batches() {
    let env = TestEnv::new("redistier").await;
    let tier = RedisTier::new(
        settings("redis://127.0.0.1:6379", &env.redis_prefix, 1, false),
        Metrics::new(),
    )
    .expect("tier");

    // 2,500 items: past the 1,000 keys one MGET asks for, so answers from several commands
    // must come back in order.
    let stored = items(0..2_500);
    let fresh = items(10_000..12_500);
    let before = tier.check(&stored).await.expect("Redis answers");
    assert_eq!(before.len(), 2_500);
    assert!(before.iter().all(|known| !known), "nothing is known yet");
    tier.record(&stored).await;

    assert_answers_in_order(&tier, &stored, &fresh).await;

    let (mut conn, recent) = local_keys(&format!("{{{}}}:*", env.redis_prefix)).await;
    assert_eq!(
        recent.len(),
        2_500,
        "one recent key per recorded item and nothing else"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&recent[0])
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        (500_000..=600_000).contains(&ttl),
        "recent key TTL {ttl} ms"
    );
    // Recent entries gone (expired, or evicted): nothing is known any more, PostgreSQL decides.
    let _: () = redis::cmd("DEL")
        .arg(&recent)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let forgotten = tier.check(&stored).await.expect("Redis answers");
    assert!(forgotten.iter().all(|known| !known));
    assert!(!tier.is_degraded());
}

/// Over `rediss://` as the workers' ACL user, verified against TLS_CA_FILE's CA: keys are
/// recorded and found. A tier trusting another CA gets no answer (and the batch goes on
/// without Redis).
#[tokio::test]
async fn the_tier_runs_over_verified_tls() {
    let ca = test_support::tls::TestCa::new("redistier");
    let server = test_support::tls::redis(&ca);
    let settings = |ca_file: &std::path::Path| RedisSettings {
        url: format!(
            "rediss://dedup-worker:worker-secret@localhost:{}",
            server.port
        )
        .into(),
        prefix: "{tls}".into(),
        key_buckets: 1,
        cluster: false,
        recent_ttl: Duration::from_secs(600),
        timeout: Duration::from_secs(5),
        retry_interval: Duration::from_secs(1),
        ca_pem: Some(std::fs::read_to_string(ca_file).expect("CA")),
    };
    let tier = RedisTier::new(settings(&ca.ca_file), Metrics::new()).expect("tier");
    let keys = items(0..3);
    tier.record(&keys).await;
    let known = tier.check(&keys).await;
    assert_eq!(known, Some(vec![true; 3]), "{}", server.log_text());

    let untrusting = RedisTier::new(settings(&ca.other_ca_file), Metrics::new()).expect("tier");
    assert_eq!(
        untrusting.check(&keys).await,
        None,
        "an unknown CA is refused"
    );
}

/// Against a real three-node Redis Cluster with the keys spread over 64 hash tags: a batch's
/// check and record (pipelines per slot, sent at once) answer as against one server, in
/// order, and the keys land on every node. With one hash tag they would all sit on one.
#[tokio::test]
async fn keys_spread_over_a_redis_cluster_and_answers_stay_in_order() {
    let cluster =
        tokio::task::spawn_blocking(|| test_support::redis_cluster::RedisCluster::start("tier"))
            .await
            .expect("cluster");
    let url = cluster.url();
    let tier = RedisTier::new(settings(&url, "dedup", 64, true), Metrics::new()).expect("tier");
    let stored = items(0..2_500);
    let fresh = items(10_000..12_500);
    let before = tier.check(&stored).await.expect("the cluster answers");
    assert!(before.iter().all(|known| !known), "nothing is known yet");
    tier.record(&stored).await;
    assert_answers_in_order(&tier, &stored, &fresh).await;
    assert!(!tier.is_degraded());
    let spread = cluster.keys_per_node();
    assert_eq!(spread.iter().sum::<u64>(), 2_500, "{spread:?}");
    assert!(
        spread.iter().all(|&n| n > 2_500 / 10),
        "every node holds a fair share of the keys: {spread:?}"
    );

    // One hash tag (the default): correct too, but every key on one node.
    let single = RedisTier::new(settings(&url, "one", 1, true), Metrics::new()).expect("tier");
    let few = items(50_000..50_300);
    single.record(&few).await;
    assert!(
        single
            .check(&few)
            .await
            .expect("answers")
            .iter()
            .all(|k| *k)
    );
    let after_single = cluster.keys_per_node();
    let grew: Vec<u64> = after_single
        .iter()
        .zip(&spread)
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(
        grew.iter().filter(|&&n| n > 0).count(),
        1,
        "one hash tag puts every key on one node: {grew:?}"
    );

    // The cluster gone: no answer (PostgreSQL decides), and the tier says it is degraded.
    drop(cluster);
    assert_eq!(tier.check(&few).await, None);
    assert!(tier.is_degraded());
}

/// Several hash tags on one server: the groups go as one pipeline (the other groups' commands
/// joined to the first) and the answers still come back in the items' order.
#[tokio::test]
async fn buckets_on_one_server_answer_in_order() {
    let env = TestEnv::new("redisbuckets").await;
    let tier = RedisTier::new(
        settings("redis://127.0.0.1:6379", &env.redis_prefix, 8, false),
        Metrics::new(),
    )
    .expect("tier");
    let stored = items(0..1_500);
    tier.record(&stored).await;
    assert_answers_in_order(&tier, &stored, &items(20_000..21_500)).await;
    let (mut conn, keys) = local_keys(&format!("{{{}:*", env.redis_prefix)).await;
    // TestEnv removes `{prefix}:*` only: these keys carry a bucket in their tag.
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let tags: std::collections::BTreeSet<&str> =
        keys.iter().filter_map(|k| k.split('}').next()).collect();
    assert_eq!(keys.len(), 1_500);
    assert_eq!(tags.len(), 8, "keys under all 8 hash tags: {tags:?}");
}
