//! The queue depth the worker exports (and the operator scales on) counts messages in flight:
//! ready and unacknowledged, read from the real broker's management API.

use std::time::Duration;

use super::support::{WorkerUnderTest, worker_config};
use chrono::Utc;
use dedup_message::message;
use dedup_runtime::queue_depth::{DepthError, DepthReader, vhost_of};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use test_support::env::RABBITMQ_URL;
use test_support::events::{event, ndjson};
use test_support::{TestEnv, eventually};

const MANAGEMENT: &str = "http://guest:guest@127.0.0.1:15672";

/// The worker's `dedup_queue_messages` gauge for `queue` and `state`, if it has one.
fn gauge(registry: &prometheus::Registry, queue: &str, state: &str) -> Option<f64> {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "dedup_queue_messages")
        .and_then(|family| {
            family.get_metric().iter().find_map(|m| {
                let labels = m.get_label();
                let has = |k: &str, v: &str| labels.iter().any(|l| l.name() == k && l.value() == v);
                (has("queue", queue) && has("state", state)).then(|| m.get_gauge().get_value())
            })
        })
}

/// 10 messages, 4 of them delivered and held unacked: the reader sees 6 ready and 4 unacked;
/// the worker's gauges show the 4 held by someone else and 3 dead letters while it drains
/// the rest, then the main queue at zero once the held ones are released and stored.
#[tokio::test]
async fn depth_counts_ready_and_unacknowledged_messages() {
    let env = TestEnv::new("depth").await;
    for i in 0..10 {
        env.publish_raw(
            &ndjson(&[event(&format!("d-{i}"))]),
            message::Envelope::properties(Utc::now(), 1),
        )
        .await;
    }
    let holder = env.amqp.create_channel().await.expect("channel");
    holder
        .basic_qos(4, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = holder
        .basic_consume(
            env.topology.queue.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            consumer
                .next()
                .await
                .expect("a delivery")
                .expect("delivery"),
        );
    }

    let reader = DepthReader::new(MANAGEMENT, Duration::from_secs(5)).expect("reader");
    let vhost = vhost_of(RABBITMQ_URL);
    // The management API refreshes its figures every few seconds.
    eventually(Duration::from_secs(20), "6 ready and 4 unacked", || async {
        let depth = reader
            .read(&vhost, &env.topology.queue)
            .await
            .expect("read the depth");
        ((depth.ready, depth.unacked) == (6, 4)).then_some(())
    })
    .await;

    let missing = reader.read(&vhost, "no-such-queue-for-dedup-tests").await;
    assert!(
        matches!(missing, Err(DepthError::NoSuchQueue { .. })),
        "{missing:?}"
    );
    let closed =
        DepthReader::new("http://guest:guest@127.0.0.1:9", Duration::from_secs(2)).expect("reader");
    assert!(matches!(
        closed.read(&vhost, &env.topology.queue).await,
        Err(DepthError::Unreachable(_))
    ));

    // Three dead letters, which no worker consumes.
    for i in 0..3 {
        holder
            .basic_publish(
                "".into(),
                env.topology.dead_letter_queue().as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                format!("letter {i}").as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish a dead letter");
    }
    let mut config = worker_config(&env);
    config.queue_depth_interval = Duration::from_millis(500);
    let worker = WorkerUnderTest::start(config, None).await;
    let registry = worker.worker.metrics().registry.clone();
    let reported = |queue: &str, state: &str| gauge(&registry, queue, state);
    eventually(
        Duration::from_secs(30),
        "the gauges to show 4 held elsewhere and 3 dead letters",
        || async {
            let seen = env.stored_rows().await == 6
                && reported(&env.topology.queue, "ready") == Some(0.0)
                && reported(&env.topology.queue, "unacked") == Some(4.0)
                && reported(&env.topology.dead_letter_queue(), "ready") == Some(3.0);
            seen.then_some(())
        },
    )
    .await;
    // Released, the 4 go to the worker.
    let _ = holder.close(200, "done".into()).await;
    drop(held);
    eventually(
        Duration::from_secs(30),
        "the gauges to read an empty queue",
        || async {
            let settled = env.stored_rows().await == 10
                && reported(&env.topology.dead_letter_queue(), "ready") == Some(3.0)
                && reported(&env.topology.queue, "ready") == Some(0.0)
                && reported(&env.topology.queue, "unacked") == Some(0.0);
            settled.then_some(())
        },
    )
    .await;
    worker.stop().await.expect("clean stop");
}

/// A shard past the worker's AMQP_QUEUE_SHARDS that holds messages (ingest splitting the queue
/// into more shards than the workers consume) is not consumed, and is reported: its gauge
/// shows the stranded messages, for the backlog alert.
#[tokio::test]
async fn a_shard_past_the_workers_count_is_reported_not_consumed() {
    let mut env = TestEnv::new("stranded").await;
    // ingest's view: two shards, so both queues exist; two events on the second.
    env.topology.shards = 2;
    env.declare().await;
    for i in 0..2 {
        env.publish_raw_to(
            1,
            &ndjson(&[event(&format!("s-{i}"))]),
            message::Envelope::properties(Utc::now(), 1),
        )
        .await;
    }
    // The worker's view: one shard.
    let mut config = worker_config(&env);
    config.amqp.topology.shards = 1;
    config.queue_depth_interval = Duration::from_millis(300);
    let worker = WorkerUnderTest::start(config, None).await;
    let registry = worker.worker.metrics().registry.clone();
    let stranded = env.topology.shard_queue(1);
    eventually(
        Duration::from_secs(30),
        "the stranded shard's gauge",
        || async { (gauge(&registry, &stranded, "ready") == Some(2.0)).then_some(()) },
    )
    .await;
    assert_eq!(
        env.stored_rows().await,
        0,
        "nothing consumed from the stranded shard"
    );
    assert_eq!(env.ready_messages(&stranded).await, 2);
    worker.stop().await.expect("clean stop");
}
