//! The Redis tier's scripts against the real Redis: what the check answers for new keys,
//! recorded keys and keys whose recent entry is gone, across batches larger than one script
//! round handles at once.

use std::time::Duration;

use chrono::NaiveDate;
use dedup_core::DedupKey;
use dedup_worker::bloom::BloomParams;
use dedup_worker::metrics::Metrics;
use dedup_worker::redis_tier::{Item, Known, RedisSettings, RedisTier};
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

fn count(answers: &[Known], which: Known) -> usize {
    answers.iter().filter(|a| **a == which).count()
}

#[tokio::test]
async fn check_answers_recent_bloom_only_and_miss_for_large_batches() {
    let env = TestEnv::new("redistier").await;
    let day = Duration::from_secs(86_400);
    let bloom = BloomParams::size(100.0, 0.01, 7 * day, day).expect("sizing");
    assert!(bloom.generations > 1 && bloom.hashes > 1, "{bloom:?}");
    let tier = RedisTier::new(
        RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            prefix: env.redis_prefix.clone(),
            bloom,
            recent_ttl: Duration::from_secs(600),
            timeout: Duration::from_secs(5),
            retry_interval: Duration::from_secs(1),
        },
        Metrics::new(),
    )
    .expect("tier");

    // 2,500 items: past the 1,000 items one BITFIELD round reads and the 4,000 arguments one
    // BITFIELD write takes.
    let stored = items(0..2_500);
    let fresh = items(10_000..12_500);
    let before = tier.check(&stored).await.expect("Redis answers");
    assert_eq!(
        count(&before, Known::BloomMiss),
        2_500,
        "nothing is known yet"
    );
    tier.record(&stored).await;

    let mut mixed = stored.clone();
    mixed.extend(fresh.iter().copied());
    let after = tier.check(&mixed).await.expect("Redis answers");
    assert!(
        after[..2_500].iter().all(|a| *a == Known::Recent),
        "every recorded key is a known duplicate"
    );
    // A new key is a Bloom miss unless it is a false positive (~1 %); never "recent".
    assert_eq!(count(&after[2_500..], Known::Recent), 0);
    assert!(
        count(&after[2_500..], Known::BloomMiss) > 2_400,
        "{after:?}"
    );

    // Recent entries gone (expired, or evicted): the Bloom filter still remembers every key,
    // but that is never trusted as a duplicate on its own.
    let mut conn = redis::Client::open("redis://127.0.0.1:6379")
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let recent = test_support::env::scan_keys(&mut conn, &format!("{{{}}}:k:*", env.redis_prefix))
        .await
        .expect("SCAN");
    assert_eq!(recent.len(), 2_500, "one recent key per recorded item");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&recent[0])
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        (500_000..=600_000).contains(&ttl),
        "recent key TTL {ttl} ms"
    );
    // The generation expires at the end of its time, set once: recording into it again
    // does not push that back.
    let generations =
        test_support::env::scan_keys(&mut conn, &format!("{{{}}}:bloom:*", env.redis_prefix))
            .await
            .expect("SCAN");
    assert_eq!(generations.len(), 1, "{generations:?}");
    let pttl = |conn: &mut redis::aio::MultiplexedConnection| {
        let key = generations[0].clone();
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .expect("PTTL")
        }
    };
    let generation_ttl = pttl(&mut conn).await;
    let limit = i64::try_from(bloom.generation_ttl().as_millis()).expect("ms");
    assert!(
        generation_ttl > 0 && generation_ttl <= limit,
        "{generation_ttl} of {limit}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    tier.record(&items(20_000..20_010)).await;
    assert!(
        pttl(&mut conn).await < generation_ttl,
        "the TTL was not renewed"
    );
    let _: () = redis::cmd("DEL")
        .arg(&recent)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let forgotten = tier.check(&stored).await.expect("Redis answers");
    assert!(
        forgotten.iter().all(|a| *a == Known::BloomHitUnconfirmed),
        "every recorded key is a Bloom hit left to PostgreSQL"
    );
}
