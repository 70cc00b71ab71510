//! The worker against the real PostgreSQL, Redis and RabbitMQ: every unique event is stored
//! exactly once, whatever the mix of duplicates, racing workers, crashes and outages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::support::{WorkerUnderTest, worker_config};
use crate::fault::Stage;
use chrono::Utc;
use dedup_message::message;
use serde_json::Value;
use test_support::client::amqp_url_via;
use test_support::events::{event, ndjson, unique};
use test_support::{Proxy, TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(30);

async fn publish_each(env: &TestEnv, events: &[Value]) {
    env.publish_each(events).await;
}

async fn settle(env: &TestEnv, rows: i64) {
    env.settle(rows, WAIT).await;
}

/// Waits until `worker` has consumed `n` events in all (so its counters are final).
async fn consumed(worker: &WorkerUnderTest, n: u64) {
    let m = worker.worker.metrics().clone();
    eventually(WAIT, &format!("{n} events consumed"), || async {
        (m.consumed.get() >= n).then_some(())
    })
    .await;
}

/// Every stored `r` appears exactly once and the set is exactly `expected`.
async fn assert_each_once(env: &TestEnv, expected: impl IntoIterator<Item = String>) {
    let counts = env.stored_r_counts().await;
    assert!(
        counts.iter().all(|(_, n)| *n == 1),
        "some event was stored twice: {:?}",
        &counts[..counts.len().min(5)]
    );
    let mut stored: Vec<String> = counts.into_iter().map(|(r, _)| r).collect();
    let mut expected: Vec<String> = expected.into_iter().collect();
    stored.sort();
    expected.sort();
    expected.dedup();
    assert_eq!(
        stored, expected,
        "stored events differ from the unique events sent"
    );
}

/// A mix of unique events and repeats (30% duplicates, some sent three times) stores each
/// unique event once, and the duplicate counters add up to the repeats sent.
#[tokio::test]
async fn duplicate_mix_is_stored_once_and_counted_by_tier() {
    let env = TestEnv::new("mix").await;
    let worker = WorkerUnderTest::start(worker_config(&env), None).await;
    let originals = unique(200, "mix");
    let mut sent = originals.clone();
    sent.extend(originals.iter().take(60).cloned());
    sent.extend(originals.iter().take(20).cloned());
    publish_each(&env, &sent[..230]).await;
    // The rest arrive after the first ones were stored and recorded in Redis (200 recent
    // keys), so Redis catches them.
    settle(&env, 200).await;
    eventually(WAIT, "the stored keys recorded in Redis", || async {
        (env.redis_keys()
            .await
            .iter()
            .filter(|k| k.contains(":k:"))
            .count()
            == 200)
            .then_some(())
    })
    .await;
    publish_each(&env, &sent[230..]).await;
    let m = worker.worker.metrics().clone();
    eventually(WAIT, "all events consumed", || async {
        (m.consumed.get() == sent.len() as u64).then_some(())
    })
    .await;
    settle(&env, 200).await;
    assert_each_once(&env, (0..200).map(|i| format!("mix-{i}"))).await;
    assert_eq!(m.stored.get(), 200);
    let duplicates: u64 = crate::metrics::TIERS
        .iter()
        .map(|t| m.duplicates.with_label_values(&[*t]).get())
        .sum();
    assert_eq!(
        duplicates, 80,
        "duplicates by tier must add up to the repeats sent"
    );
    assert!(
        m.duplicates.with_label_values(&["recent_keys"]).get() >= 50,
        "Redis caught the late repeats"
    );
    worker.stop().await.expect("clean stop");
}

/// Three workers on one queue, each event published three times as messages of their own,
/// the copies spread over the workers: every key is stored once and every copy is counted
/// as a duplicate by one tier or another.
#[tokio::test]
async fn racing_workers_store_each_key_once() {
    let env = TestEnv::new("race").await;
    let mut config = worker_config(&env);
    config.batch_size = 10;
    config.prefetch = 10;
    let first = WorkerUnderTest::start(config.clone(), None).await;
    config.migrate_on_start = false;
    let second = WorkerUnderTest::start(config.clone(), None).await;
    let third = WorkerUnderTest::start(config, None).await;
    let workers = [&first, &second, &third];
    for w in workers {
        let ready = w.worker.readiness();
        eventually(WAIT, "every worker consuming", || async { ready().ok() }).await;
    }
    let originals = unique(150, "race");
    // Copy 1 of every event, then copy 2 of every event, then copy 3: each its own message,
    // so the broker hands the copies of one key to different workers.
    for _ in 0..3 {
        publish_each(&env, &originals).await;
    }
    settle(&env, 150).await;
    eventually(WAIT, "all 450 copies consumed", || async {
        let consumed: u64 = workers
            .iter()
            .map(|w| w.worker.metrics().consumed.get())
            .sum();
        (consumed == 450).then_some(())
    })
    .await;
    assert_each_once(&env, (0..150).map(|i| format!("race-{i}"))).await;
    let duplicates: u64 = workers
        .iter()
        .flat_map(|w| {
            let m = w.worker.metrics().clone();
            ["in_batch", "recent_keys", "postgres"]
                .map(move |tier| m.duplicates.with_label_values(&[tier]).get())
        })
        .sum();
    assert_eq!(
        duplicates, 300,
        "every copy after the first is a counted duplicate"
    );
    let busy = workers
        .iter()
        .filter(|w| w.worker.metrics().consumed.get() > 0)
        .count();
    assert!(busy >= 2, "the copies were spread over the workers");
    for w in [first, second, third] {
        w.stop().await.expect("clean stop");
    }
}

/// Two workers each hold a copy of one key, and both have asked Redis (which knows neither)
/// before either inserts: PostgreSQL's unique constraint lets one insert win and the other
/// worker counts the copy as a duplicate caught by PostgreSQL.
// Several threads: each worker's hook blocks its thread until the other arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_holding_one_key_store_it_once_through_postgres() {
    let env = TestEnv::new("racepg").await;
    let mut config = worker_config(&env);
    config.batch_size = 1;
    config.prefetch = 1;
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook = || -> crate::fault::FaultHook {
        let arrived = arrived.clone();
        let waited = AtomicBool::new(false);
        Arc::new(move |at: Stage, _| {
            if at == Stage::AfterRedisCheck && !waited.swap(true, Ordering::SeqCst) {
                arrived.fetch_add(1, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                // block_in_place: the runtime moves this thread's other tasks elsewhere, so
                // the other worker can reach the barrier.
                tokio::task::block_in_place(|| {
                    while arrived.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < until {
                        #[allow(
                            clippy::disallowed_methods,
                            reason = "the hook is synchronous; holding its thread is the point"
                        )]
                        std::thread::sleep(Duration::from_millis(5));
                    }
                });
            }
            false
        })
    };
    let first = WorkerUnderTest::start(config.clone(), Some(hook())).await;
    config.migrate_on_start = false;
    let second = WorkerUnderTest::start(config, Some(hook())).await;
    for w in [&first, &second] {
        let ready = w.worker.readiness();
        eventually(WAIT, "both workers consuming", || async { ready().ok() }).await;
    }
    let copy = event("race-pg");
    publish_each(&env, &[copy.clone(), copy]).await;
    settle(&env, 1).await;
    eventually(WAIT, "both copies consumed", || async {
        let consumed =
            first.worker.metrics().consumed.get() + second.worker.metrics().consumed.get();
        (consumed == 2).then_some(())
    })
    .await;
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        2,
        "each worker held one copy"
    );
    let tier = |t: &str| {
        first
            .worker
            .metrics()
            .duplicates
            .with_label_values(&[t])
            .get()
            + second
                .worker
                .metrics()
                .duplicates
                .with_label_values(&[t])
                .get()
    };
    assert_eq!(tier("postgres"), 1, "PostgreSQL caught the second copy");
    assert_eq!(tier("recent_keys") + tier("in_batch"), 0);
    assert_each_once(&env, ["race-pg".to_owned()]).await;
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
}

/// A worker that dies between any two steps of a batch loses nothing and stores nothing twice:
/// the unacked deliveries come back, and a fresh worker settles them.
#[tokio::test]
async fn crash_between_any_two_steps_loses_nothing_and_stores_nothing_twice() {
    for stage in [
        Stage::Decoded,
        Stage::AfterRedisCheck,
        Stage::AfterCommit,
        Stage::AfterRedisRecord,
    ] {
        let env = TestEnv::new("crash").await;
        let mut config = worker_config(&env);
        config.batch_size = 40;
        config.batch_linger = Duration::from_millis(200);
        // One batch at a time, so what is committed at the crash is exactly the first batch.
        config.batches_in_flight = 1;
        let originals = unique(40, "crash");
        // Each event twice, in two halves of the batch, so the batch has in-batch copies too.
        let mut sent = originals.clone();
        sent.extend(originals.iter().take(20).cloned());
        publish_each(&env, &sent).await;
        let crashed = Arc::new(AtomicBool::new(false));
        let hook = {
            let crashed = crashed.clone();
            Arc::new(move |at: Stage, _first_tag: u64| {
                at == stage && !crashed.swap(true, Ordering::SeqCst)
            })
        };
        let victim = WorkerUnderTest::start(config.clone(), Some(hook)).await;
        let outcome = victim.finished(WAIT).await;
        assert!(
            matches!(outcome, Err(crate::error::Error::InjectedCrash(s)) if s == stage),
            "{stage:?}: {outcome:?}"
        );
        let rows_after_crash = env.stored_rows().await;
        let expected_rows = if matches!(stage, Stage::AfterCommit | Stage::AfterRedisRecord) {
            40
        } else {
            0
        };
        assert_eq!(
            rows_after_crash, expected_rows,
            "{stage:?}: rows committed before the crash"
        );
        // Nothing was acked: every message is back in the queue.
        eventually(WAIT, "the unacked messages to return", || async {
            (env.ready_messages(&env.topology.queue).await == sent.len() as u32).then_some(())
        })
        .await;
        config.migrate_on_start = false;
        let survivor = WorkerUnderTest::start(config, None).await;
        settle(&env, 40).await;
        assert_each_once(&env, (0..40).map(|i| format!("crash-{i}"))).await;
        survivor.stop().await.expect("clean stop");
    }
}

/// Redis flushed mid-stream forgets every key; PostgreSQL still refuses the repeats.
#[tokio::test]
async fn redis_flushed_mid_stream_still_stores_each_event_once() {
    let env = TestEnv::new("flush").await;
    let worker = WorkerUnderTest::start(worker_config(&env), None).await;
    let originals = unique(100, "flush");
    publish_each(&env, &originals).await;
    settle(&env, 100).await;
    assert!(
        !env.redis_keys().await.is_empty(),
        "the worker recorded keys in Redis"
    );
    env.flush_redis().await;
    let mut second = originals[..50].to_vec();
    second.extend(unique(120, "flush").into_iter().skip(100));
    publish_each(&env, &second).await;
    settle(&env, 120).await;
    consumed(&worker, 170).await;
    assert_each_once(&env, (0..120).map(|i| format!("flush-{i}"))).await;
    let m = worker.worker.metrics();
    assert_eq!(
        m.duplicates.with_label_values(&["postgres"]).get(),
        50,
        "PostgreSQL caught what Redis forgot"
    );
    worker.stop().await.expect("clean stop");
}

/// Redis going away mid-stream: the worker goes on with PostgreSQL alone (and says so), then
/// uses Redis again when it returns.
#[tokio::test]
async fn redis_outage_falls_back_to_postgres_and_recovers() {
    let env = TestEnv::new("redisdown").await;
    let proxy = Proxy::start("127.0.0.1:6379".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.redis_url = format!("redis://{}", proxy.addr()).into();
    let worker = WorkerUnderTest::start(config, None).await;
    let m = worker.worker.metrics().clone();
    let originals = unique(90, "rd");
    publish_each(&env, &originals[..30]).await;
    settle(&env, 30).await;
    assert_eq!(m.redis_degraded.get(), 0);

    proxy.cut();
    // Repeats of the first 30 plus 30 new ones, while Redis is unreachable.
    publish_each(&env, &originals[..60]).await;
    settle(&env, 60).await;
    consumed(&worker, 90).await;
    assert_eq!(
        m.redis_degraded.get(),
        1,
        "the outage is visible in the metric"
    );
    assert_eq!(m.duplicates.with_label_values(&["postgres"]).get(), 30);

    proxy.restore();
    publish_each(&env, &originals[60..]).await;
    settle(&env, 90).await;
    eventually(WAIT, "Redis to be used again", || async {
        publish_each(&env, &originals[89..]).await;
        (m.redis_degraded.get() == 0).then_some(())
    })
    .await;
    settle(&env, 90).await;
    assert_each_once(&env, (0..90).map(|i| format!("rd-{i}"))).await;
    worker.stop().await.expect("clean stop");
}

/// PostgreSQL going away: the batch in hand waits, unacked, and is stored once it returns.
#[tokio::test]
async fn postgres_outage_holds_the_batch_until_it_returns() {
    let env = TestEnv::new("pgdown").await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.database_url = env
        .database_url
        .replace("127.0.0.1:5432", &proxy.addr().to_string())
        .into();
    let worker = WorkerUnderTest::start(config, None).await;
    let originals = unique(50, "pg");
    publish_each(&env, &originals[..10]).await;
    settle(&env, 10).await;

    proxy.cut();
    publish_each(&env, &originals[10..]).await;
    let m = worker.worker.metrics().clone();
    eventually(WAIT, "the worker to hit the outage", || async {
        (m.batch_errors.with_label_values(&["postgres"]).get() > 0).then_some(())
    })
    .await;
    assert_eq!(
        env.stored_rows().await,
        10,
        "nothing new can be stored while PostgreSQL is away"
    );
    // The management API refreshes its numbers every few seconds.
    eventually(
        WAIT,
        "the 40 new messages held or waiting, none acked",
        || async {
            let depth = env.queue_depth(&env.topology.queue).await;
            (depth.unacked > 0 && depth.ready + depth.unacked == 40).then_some(())
        },
    )
    .await;

    proxy.restore();
    settle(&env, 50).await;
    assert_each_once(&env, (0..50).map(|i| format!("pg-{i}"))).await;
    worker.stop().await.expect("clean stop");
}

/// RabbitMQ going away while a batch is committed but not yet acked: the ack is lost with
/// the link, the worker reconnects, the broker redelivers that batch, and the redelivered
/// copies are recognised as duplicates — every event stored once.
// Several threads: the hook holds its batch's thread while the link is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_outage_reconnects_and_loses_nothing() {
    let env = TestEnv::new("mqdown").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.amqp.rabbitmq_url = amqp_url_via(proxy.addr()).into();
    config.batch_size = 10;
    // The first batch after `hold` is set waits after its commit until `held` is cleared.
    let hold = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicBool::new(false));
    let hook: crate::fault::FaultHook = {
        let (hold, held) = (hold.clone(), held.clone());
        Arc::new(move |at: Stage, _| {
            if at == Stage::AfterCommit && hold.swap(false, Ordering::SeqCst) {
                held.store(true, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                // block_in_place: the runtime moves this thread's other tasks elsewhere, so
                // holding the batch holds nothing else (the test's own queries included).
                tokio::task::block_in_place(|| {
                    while held.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                        #[allow(
                            clippy::disallowed_methods,
                            reason = "the hook is synchronous; holding its thread is the point"
                        )]
                        std::thread::sleep(Duration::from_millis(5));
                    }
                });
            }
            false
        })
    };
    let worker = WorkerUnderTest::start(config, Some(hook)).await;
    let originals = unique(80, "mq");
    publish_each(&env, &originals[..40]).await;
    settle(&env, 40).await;

    hold.store(true, Ordering::SeqCst);
    publish_each(&env, &originals[40..60]).await;
    eventually(WAIT, "a committed batch held before its ack", || async {
        held.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let committed = env.stored_rows().await;
    assert!(committed > 40, "the held batch committed");
    proxy.cut();
    held.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    publish_each(&env, &originals[60..]).await;
    settle(&env, 80).await;
    let m = worker.worker.metrics().clone();
    // Every event was published once: a duplicate can only be a redelivered copy. (Whether
    // the held batch's own count is in `consumed` depends on whether its task was aborted
    // with the session before it finished, so that count proves nothing.)
    // Every event was published once: a duplicate can only be a redelivered copy. (Whether
    // the held batch's own count is in `consumed` depends on whether its task was aborted
    // with the session before it finished, so that count proves nothing.)
    eventually(
        WAIT,
        "the unacked batch redelivered and seen again",
        || async {
            let seen_again = m.duplicates.with_label_values(&["recent_keys"]).get()
                + m.duplicates.with_label_values(&["postgres"]).get();
            (seen_again > 0).then_some(())
        },
    )
    .await;
    assert_each_once(&env, (0..80).map(|i| format!("mq-{i}"))).await;
    worker.stop().await.expect("clean stop");
}

/// A poison message (bad JSON, an invalid event) goes to the dead-letter queue, each bad line
/// alone with its reason, and the good events around it are stored — in a compressed message
/// too. A message whose body cannot be decoded goes there whole.
#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_rest_flow() {
    let env = TestEnv::new("poison").await;
    let worker = WorkerUnderTest::start(worker_config(&env), None).await;
    let mut body = ndjson(&[event("p-1")]);
    body.extend_from_slice(b"{this is not json\n");
    body.extend_from_slice(b"{\"sid\": \"no other fields\"}\n");
    body.extend_from_slice(&ndjson(&[event("p-2")]));
    env.publish_raw(&body, message::Envelope::properties(Utc::now(), 4))
        .await;
    env.publish_raw(&[0xff, 0xfe, 0xfd], lapin::BasicProperties::default())
        .await;
    publish_each(&env, &[event("p-3")]).await;
    // lz4, as ingest sends by default: one good event and one bad line.
    let mut envelope = message::Envelope::new();
    envelope.push_line(&ndjson(&[event("p-4")]), Utc::now(), None, None);
    envelope.push_line(b"{\"lz4\": \"bad line\"}\n", Utc::now(), None, None);
    let (packed, properties) = envelope.seal(message::Compression::Lz4);
    assert_eq!(
        properties.content_encoding().as_ref().map(|e| e.as_str()),
        Some(message::ENCODING_LZ4)
    );
    let lz4 = || properties.clone();
    env.publish_raw(&packed, lz4()).await;
    // Corrupt lz4, and an encoding the worker does not know.
    env.publish_raw(&packed[..packed.len() / 2], lz4()).await;
    env.publish_raw(
        b"\x1f\x8b",
        message::Envelope::properties(Utc::now(), 1).with_content_encoding("gzip".into()),
    )
    .await;
    settle(&env, 4).await;
    assert_each_once(&env, ["p-1", "p-2", "p-3", "p-4"].map(String::from)).await;
    eventually(WAIT, "six dead letters", || async {
        (env.ready_messages(&env.topology.dead_letter_queue()).await == 6).then_some(())
    })
    .await;
    consumed(&worker, 10).await;
    let letters = env.drain(&env.topology.dead_letter_queue()).await;
    let bodies: Vec<Vec<u8>> = letters.iter().map(|(b, _)| b.clone()).collect();
    assert!(bodies.contains(&b"{this is not json".to_vec()));
    assert!(bodies.contains(&b"{\"sid\": \"no other fields\"}".to_vec()));
    assert!(bodies.contains(&vec![0xff, 0xfe, 0xfd]));
    assert!(
        bodies.contains(&b"{\"lz4\": \"bad line\"}".to_vec()),
        "a bad line of a compressed message goes alone, decompressed"
    );
    assert!(
        bodies.contains(&packed[..packed.len() / 2].to_vec()),
        "an undecodable message goes whole"
    );
    assert!(bodies.contains(&b"\x1f\x8b".to_vec()));
    for (_, headers) in &letters {
        let reason = headers
            .as_ref()
            .and_then(|h| h.inner().get(message::HEADER_DEAD_LETTER_REASON).cloned());
        assert!(reason.is_some(), "every dead letter says why");
    }
    let m = worker.worker.metrics();
    assert_eq!(
        m.dead_lettered.with_label_values(&["invalid_json"]).get(),
        2
    );
    assert_eq!(
        m.dead_lettered.with_label_values(&["invalid_event"]).get(),
        2
    );
    assert_eq!(
        m.dead_lettered
            .with_label_values(&["invalid_encoding"])
            .get(),
        2
    );
    worker.stop().await.expect("clean stop");
}

/// On shutdown the worker finishes and acks the batch in hand instead of dropping it.
#[tokio::test]
async fn shutdown_finishes_the_batch_in_hand() {
    let env = TestEnv::new("drain").await;
    let mut config = worker_config(&env);
    // A batch that would wait long to fill: shutdown must not wait for it, nor drop it.
    config.batch_size = 1000;
    config.batch_linger = Duration::from_secs(60);
    let worker = WorkerUnderTest::start(config, None).await;
    eventually(WAIT, "the worker to consume", || async {
        (worker.worker.readiness())().ok()
    })
    .await;
    publish_each(&env, &unique(25, "drain")).await;
    eventually(WAIT, "deliveries to reach the worker", || async {
        (env.ready_messages(&env.topology.queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(env.stored_rows().await, 0, "the batch is still lingering");
    worker.stop().await.expect("clean stop");
    assert_eq!(
        env.stored_rows().await,
        25,
        "shutdown processed the batch in hand"
    );
    assert_eq!(
        env.ready_messages(&env.topology.queue).await,
        0,
        "and acked it"
    );
}

/// With several batches in flight, a crash in the oldest one leaves every later batch unacked
/// too, even those that already committed: acks only ever go in delivery order.
// Several threads: the stalled batch blocks one of them on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_in_the_oldest_batch_in_flight_leaves_later_batches_unacked() {
    let env = TestEnv::new("ackorder").await;
    let mut config = worker_config(&env);
    config.batch_size = 10;
    config.batches_in_flight = 3;
    config.batch_linger = Duration::from_millis(50);
    let originals = unique(40, "order");
    publish_each(&env, &originals).await;
    let crashed = Arc::new(AtomicBool::new(false));
    let hook = {
        let crashed = crashed.clone();
        // The oldest batch stalls, then "crashes"; the later batches
        // commit meanwhile and must still not be acked.
        #[allow(
            clippy::disallowed_methods,
            reason = "the hook is synchronous; stalling its thread is the point"
        )]
        Arc::new(move |at: Stage, first_tag: u64| {
            // Delivery tags start at 1 on the channel: tag 1 is in the oldest batch.
            if at == Stage::Decoded && first_tag == 1 && !crashed.swap(true, Ordering::SeqCst) {
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(500)));
                return true;
            }
            false
        })
    };
    let victim = WorkerUnderTest::start(config.clone(), Some(hook)).await;
    let outcome = victim.finished(WAIT).await;
    assert!(
        matches!(
            outcome,
            Err(crate::error::Error::InjectedCrash(Stage::Decoded))
        ),
        "{outcome:?}"
    );
    assert!(
        env.stored_rows().await > 0,
        "later batches committed while the oldest stalled"
    );
    eventually(WAIT, "every message back in the queue", || async {
        (env.ready_messages(&env.topology.queue).await == 40).then_some(())
    })
    .await;
    config.migrate_on_start = false;
    let survivor = WorkerUnderTest::start(config, None).await;
    settle(&env, 40).await;
    assert_each_once(&env, (0..40).map(|i| format!("order-{i}"))).await;
    survivor.stop().await.expect("clean stop");
}

/// Two workers, each consuming all three shards of a split queue: every event is stored once,
/// including repeats that a mis-routed retry put on another shard than their first copy, and
/// each worker reports ready only while it consumes every shard.
#[tokio::test]
async fn workers_consuming_every_shard_store_each_key_once() {
    let mut env = TestEnv::new("shards").await;
    env.topology.shards = 3;
    let mut config = worker_config(&env);
    config.batch_size = 20;
    config.prefetch = 30;
    let first = WorkerUnderTest::start(config.clone(), None).await;
    config.migrate_on_start = false;
    let second = WorkerUnderTest::start(config, None).await;
    for w in [&first, &second] {
        let ready = w.worker.readiness();
        eventually(WAIT, "both workers consuming", || async { ready().ok() }).await;
    }
    let originals = unique(240, "shards");
    // Each event on the shard its index picks, then a copy of every third one on the next
    // shard: the copies meet only in PostgreSQL (or Redis, once the first is stored).
    for (i, e) in originals.iter().enumerate() {
        let body = ndjson(std::slice::from_ref(e));
        let properties = message::Envelope::properties(Utc::now(), 1);
        env.publish_raw_to((i % 3) as u16, &body, properties).await;
    }
    for (i, e) in originals.iter().enumerate().step_by(3) {
        let body = ndjson(std::slice::from_ref(e));
        let properties = message::Envelope::properties(Utc::now(), 1);
        env.publish_raw_to(((i + 1) % 3) as u16, &body, properties)
            .await;
    }
    settle(&env, 240).await;
    eventually(WAIT, "all 320 messages consumed", || async {
        let consumed =
            first.worker.metrics().consumed.get() + second.worker.metrics().consumed.get();
        (consumed == 320).then_some(())
    })
    .await;
    for queue in env.topology.queues() {
        assert_eq!(env.ready_messages(&queue).await, 0, "{queue} drained");
    }
    let duplicates: u64 = crate::metrics::TIERS
        .iter()
        .map(|t| {
            first
                .worker
                .metrics()
                .duplicates
                .with_label_values(&[*t])
                .get()
                + second
                    .worker
                    .metrics()
                    .duplicates
                    .with_label_values(&[*t])
                    .get()
        })
        .sum();
    assert_eq!(
        duplicates, 80,
        "every mis-routed copy counted as a duplicate"
    );
    assert_each_once(
        &env,
        originals
            .iter()
            .map(|e| e["r"].as_str().expect("r").to_owned()),
    )
    .await;
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
}
