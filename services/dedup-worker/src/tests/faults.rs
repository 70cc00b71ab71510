//! The worker when a service hangs without a reset (through a proxy that stops forwarding and
//! keeps the sockets open), and the broker's own delivery limit: nothing is lost, nothing
//! stored twice, and the worker carries on by itself once the service answers again.

use std::time::Duration;

use super::support::{WorkerUnderTest, delete_queue, worker_config};
use chrono::Utc;
use dedup_message::message;
use dedup_message::topology::close_channel;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use test_support::client::amqp_url_via;
use test_support::events::{event, ndjson, unique};
use test_support::{Proxy, TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(60);

async fn publish_each(env: &TestEnv, events: &[Value]) {
    env.publish_each(events).await;
}

/// How many consumers `queue` has, or `None` when it does not exist.
async fn consumers(env: &TestEnv, queue: &str) -> Option<u32> {
    let channel = env.amqp.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    close_channel(&channel, 200, "done").await;
    Some(declared.consumer_count())
}

/// Publishes each event in a message of its own to shard `shard`'s queue.
async fn publish_to(env: &TestEnv, shard: u16, events: &[Value]) {
    for e in events {
        let body = ndjson(std::slice::from_ref(e));
        let properties = message::Envelope::properties(Utc::now(), 1);
        env.publish_raw_to(shard, &body, properties).await;
    }
}

/// Waits for `rows` rows and an empty queue; no key may be stored twice.
async fn settle(env: &TestEnv, rows: i64) {
    env.settle(rows, WAIT).await;
    let counts = env.stored_r_counts().await;
    assert!(counts.iter().all(|(_, n)| *n == 1), "a key stored twice");
}

/// PostgreSQL hangs mid-stream: the statement never returns, so the client-side deadline
/// (statement timeout plus a margin) ends it, the batch stays unacked and is retried on a new
/// connection once PostgreSQL answers again.
#[tokio::test]
async fn a_hung_postgres_is_timed_out_and_the_batch_retried() {
    let env = TestEnv::new("pghang").await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.database_url = env
        .database_url
        .replace("127.0.0.1:5432", &proxy.addr().to_string())
        .into();
    config.db_statement_timeout = Duration::from_secs(1);
    let worker = WorkerUnderTest::start(config, None).await;
    let originals = unique(30, "pghang");
    publish_each(&env, &originals[..10]).await;
    settle(&env, 10).await;

    proxy.hang();
    publish_each(&env, &originals[10..]).await;
    let m = worker.worker.metrics().clone();
    eventually(WAIT, "a statement to time out", || async {
        (m.batch_errors.with_label_values(&["postgres"]).get() > 0).then_some(())
    })
    .await;
    assert_eq!(env.stored_rows().await, 10);
    proxy.restore();
    settle(&env, 30).await;
    worker.stop().await.expect("clean stop");
}

/// Redis hangs: each call ends at REDIS_TIMEOUT, the worker deduplicates through PostgreSQL
/// alone (degraded gauge set), and uses Redis again once it answers.
#[tokio::test]
async fn a_hung_redis_degrades_to_postgres_and_recovers() {
    let env = TestEnv::new("redishang").await;
    let proxy = Proxy::start("127.0.0.1:6379".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.redis_url = format!("redis://{}", proxy.addr()).into();
    let worker = WorkerUnderTest::start(config, None).await;
    let originals = unique(40, "redishang");
    publish_each(&env, &originals[..10]).await;
    settle(&env, 10).await;

    proxy.hang();
    // New events and repeats of stored ones: PostgreSQL alone must catch the repeats.
    publish_each(&env, &originals[10..20]).await;
    publish_each(&env, &originals[..10]).await;
    let m = worker.worker.metrics().clone();
    eventually(WAIT, "the worker to degrade", || async {
        (m.redis_degraded.get() == 1).then_some(())
    })
    .await;
    settle(&env, 20).await;
    eventually(WAIT, "the repeats caught by PostgreSQL", || async {
        (m.duplicates.with_label_values(&["postgres"]).get() >= 10).then_some(())
    })
    .await;
    proxy.restore();
    // The worker tries Redis again with the next batch after REDIS_RETRY_INTERVAL: keep
    // events coming until one finds it back.
    let next = std::sync::atomic::AtomicUsize::new(20);
    eventually(WAIT, "Redis in use again", || async {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if i < originals.len() {
            publish_each(&env, &originals[i..=i]).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        (m.redis_degraded.get() == 0).then_some(())
    })
    .await;
    publish_each(&env, &originals[next.into_inner().min(40)..]).await;
    settle(&env, 40).await;
    worker.stop().await.expect("clean stop");
}

/// The broker link hangs: missed heartbeats end the session, the worker reconnects when the
/// broker answers, gets back what it had not acked, and stores every event once.
#[tokio::test]
async fn a_hung_broker_link_is_ended_by_heartbeats_and_nothing_is_lost() {
    let env = TestEnv::new("mqhang").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.amqp.rabbitmq_url = format!("{}?heartbeat=1", amqp_url_via(proxy.addr())).into();
    let worker = WorkerUnderTest::start(config, None).await;
    let ready = worker.worker.readiness();
    eventually(WAIT, "the worker consuming", || async { ready().ok() }).await;
    let originals = unique(40, "mqhang");
    publish_each(&env, &originals[..20]).await;
    settle(&env, 20).await;

    proxy.hang();
    eventually(WAIT, "missed heartbeats to end the session", || async {
        ready().err()
    })
    .await;
    publish_each(&env, &originals[20..]).await;
    proxy.restore();
    settle(&env, 40).await;
    eventually(WAIT, "the worker consuming again", || async {
        ready().ok()
    })
    .await;
    worker.stop().await.expect("clean stop");
}

/// The worker is stopped while the broker link hangs (before heartbeats end the session):
/// cancelling its consumer, closing its channels and closing its connection each wait at most
/// `CLOSE_WAIT` for a broker that never answers, so it stops within seconds instead of using
/// up its grace period.
#[tokio::test]
async fn a_worker_stopped_while_the_broker_hangs_does_not_wait_out_its_grace() {
    let env = TestEnv::new("mqhangstop").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = worker_config(&env);
    config.amqp.rabbitmq_url = amqp_url_via(proxy.addr()).into();
    config.shutdown_grace = Duration::from_secs(60);
    let worker = WorkerUnderTest::start(config, None).await;
    let ready = worker.worker.readiness();
    eventually(WAIT, "the worker consuming", || async { ready().ok() }).await;
    publish_each(&env, &unique(20, "mqhangstop")).await;
    settle(&env, 20).await;

    proxy.hang();
    let stopped = tokio::time::timeout(Duration::from_secs(10), worker.stop())
        .await
        .expect("the worker stops without waiting out its 60 s grace for the hung broker");
    stopped.expect("clean stop");
    proxy.restore();
    assert_eq!(
        env.ready_messages(&env.topology.queue).await,
        0,
        "everything was acked before the hang"
    );
}

/// A worker config whose broker link goes through a proxy that stalls the first connection
/// when the worker sends `request` (a step of its setup).
async fn stalling_setup(env: &TestEnv, request: &[u8]) -> (Proxy, crate::Config) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    proxy.stall_on(request);
    let mut config = worker_config(env);
    config.amqp.rabbitmq_url = amqp_url_via(proxy.addr()).into();
    (proxy, config)
}

/// With the broker hanging once the worker sends `request`, the worker still stores 20
/// events within SETUP_WAIT + 8 s, through a new connection; the stall did happen.
async fn hung_setup_is_given_up(test: &str, request: &[u8]) {
    let env = TestEnv::new(test).await;
    let (proxy, config) = stalling_setup(&env, request).await;
    publish_each(&env, &unique(20, test)).await;
    let worker = WorkerUnderTest::start(config, None).await;
    let bound = dedup_message::topology::SETUP_WAIT + Duration::from_secs(8);
    tokio::time::timeout(bound, settle(&env, 20))
        .await
        .expect("the worker gave the hung setup up and consumed through a new connection");
    assert_eq!(proxy.stalled(), 1, "the first connection's setup stalled");
    worker.stop().await.expect("clean stop");
}

/// A broker that accepts the connection, then hangs before the first channel is open, costs
/// the worker one SETUP_WAIT: it gives that connection up and consumes through a new one.
/// Unbounded, the setup waited until the client missed the broker's heartbeats (two minutes
/// at RabbitMQ's default), consuming nothing all that time.
#[tokio::test]
async fn a_broker_hanging_during_the_setup_is_given_up_after_the_setup_wait() {
    hung_setup_is_given_up("mqsetuphang", test_support::proxy::AMQP_CHANNEL_OPEN).await;
}

/// The same at the setup's last step: the queue declared and qos set, the broker hangs on
/// `basic.consume`. The worker gives that connection up after one SETUP_WAIT as well.
#[tokio::test]
async fn a_broker_hanging_at_the_consume_step_is_given_up_after_the_setup_wait() {
    hung_setup_is_given_up("mqconsumehang", test_support::proxy::AMQP_BASIC_CONSUME).await;
}

/// A worker stopped while its broker hangs in the setup stops at once: the setup is not
/// waited out.
#[tokio::test]
async fn a_worker_stopped_during_a_hung_setup_stops_at_once() {
    let env = TestEnv::new("mqsetupstop").await;
    let (proxy, config) = stalling_setup(&env, test_support::proxy::AMQP_CHANNEL_OPEN).await;
    let worker = WorkerUnderTest::start(config, None).await;
    eventually(WAIT, "the first channel stalled", || async {
        (proxy.stalled() == 1).then_some(())
    })
    .await;
    // Closing the stalled connection waits CLOSE_WAIT (2 s) for an answer that never comes.
    tokio::time::timeout(Duration::from_secs(5), worker.stop())
        .await
        .expect("the worker stops without waiting out the hung setup")
        .expect("clean stop");
}

/// A message that keeps coming back (here: a consumer rejects it with requeue, as a worker
/// crashing on it would) is moved by the quorum queue to the dead-letter queue after
/// AMQP_DELIVERY_LIMIT returns, instead of blocking the queue forever.
#[tokio::test]
async fn a_message_past_the_delivery_limit_is_dead_lettered_by_the_broker() {
    let mut env = TestEnv::new("deliverylimit").await;
    // The test's queue, declared again with a delivery limit of 2.
    let channel = env.amqp.create_channel().await.expect("channel");
    delete_queue(&channel, env.topology.queue.as_str(), "delete the queue").await;
    env.topology.delivery_limit = 2;
    env.declare().await;
    env.publish_raw(
        &ndjson(&[event("cursed")]),
        message::Envelope::properties(Utc::now(), 1),
    )
    .await;
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            env.topology.queue.as_str().into(),
            "rejecter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = 0;
    while env.ready_messages(&env.topology.dead_letter_queue()).await == 0 {
        let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
        else {
            continue;
        };
        deliveries += 1;
        assert!(
            deliveries <= 5,
            "still redelivered after {deliveries} deliveries"
        );
        delivery
            .expect("delivery")
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
    }
    assert_eq!(deliveries, 3, "delivered once, then returned twice");
    assert_eq!(env.ready_messages(&env.topology.queue).await, 0);
    let letters = env.drain(&env.topology.dead_letter_queue()).await;
    assert_eq!(letters.len(), 1);
    let reason = letters[0]
        .1
        .as_ref()
        .and_then(|h| h.inner().get("x-first-death-reason").cloned());
    assert!(
        matches!(&reason, Some(AMQPValue::LongString(r)) if r.as_bytes() == b"delivery_limit"),
        "{reason:?}"
    );
    close_channel(&channel, 200, "done").await;
}

/// One shard's queue becomes unusable while the worker consumes two: here it is deleted and
/// declared again as a classic queue, so every session for it fails to declare. The other
/// shard keeps flowing, even through a restart of its own session, the worker reports not
/// ready naming the broken queue, and once the queue is removed the worker declares it again
/// and consumes it; nothing is stored twice.
#[tokio::test]
async fn one_broken_shard_queue_stops_only_its_own_session() {
    let mut env = TestEnv::new("brokenshard").await;
    env.topology.shards = 2;
    let mut config = worker_config(&env);
    config.reconnect_max_backoff = Duration::from_millis(500);
    let worker = WorkerUnderTest::start(config, None).await;
    let ready = worker.worker.readiness();
    eventually(WAIT, "the worker consuming both shards", || async {
        ready().ok()
    })
    .await;
    let originals = unique(60, "brokenshard");
    publish_to(&env, 0, &originals[..10]).await;
    publish_to(&env, 1, &originals[10..20]).await;
    settle(&env, 20).await;

    let amqp_errors = || {
        worker
            .worker
            .metrics()
            .batch_errors
            .with_label_values(&["amqp"])
            .get()
    };
    let errors_before = amqp_errors();
    let broken = env.topology.shard_queue(1);
    // The worker's session declares the quorum queue again within ~100 ms of losing it;
    // try until the classic queue is declared first.
    let mut channel = env.amqp.create_channel().await.expect("channel");
    for attempt in 1.. {
        delete_queue(&channel, broken.as_str(), "delete shard 1's queue").await;
        let classic = channel
            .queue_declare(
                broken.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if classic.is_ok() {
            break;
        }
        assert!(
            attempt < 20,
            "cannot declare the classic queue: {classic:?}"
        );
        // A refused declare closes the channel.
        channel = env.amqp.create_channel().await.expect("channel");
    }
    let reason = eventually(
        WAIT,
        "the worker not ready for the broken queue",
        || async { ready().err() },
    )
    .await;
    assert!(reason.contains(&format!("queue {broken};")), "{reason}");

    // Shard 0's session survives shard 1's queue being wrong, even when it has to start
    // again: its queue deleted (empty), the session ends and declares only its own queue.
    let shard0 = env.topology.queue.clone();
    delete_queue(&channel, shard0.as_str(), "delete shard 0's queue").await;
    eventually(WAIT, "shard 0 declared and consumed again", || async {
        (consumers(&env, &shard0).await == Some(1)).then_some(())
    })
    .await;
    publish_to(&env, 0, &originals[20..40]).await;
    settle(&env, 40).await;
    assert!(
        amqp_errors() > errors_before,
        "the failing sessions are counted"
    );
    assert!(ready().is_err(), "still not ready while shard 1 is broken");

    // The operator removes the wrong queue: the worker declares it as it should be.
    delete_queue(&channel, broken.as_str(), "delete the classic queue").await;
    eventually(WAIT, "the worker consuming both shards again", || async {
        ready().ok()
    })
    .await;
    publish_to(&env, 1, &originals[40..60]).await;
    settle(&env, 60).await;
    close_channel(&channel, 200, "done").await;
    worker.stop().await.expect("clean stop");
}
