//! The queue depth the worker exports (and the operator scales on) counts messages in flight:
//! ready and unacknowledged, read from the real broker's management API.

use std::time::Duration;

use super::support::{WorkerUnderTest, delete_queue, worker_config};
use chrono::Utc;
use dedup_message::message;
use dedup_message::topology::close_channel;
use dedup_runtime::queue_depth::{DepthError, DepthReader, Placement, vhost_of};
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

/// The `role` and `main_queue` labels of the worker's `dedup_queue_messages` gauges for `queue`:
/// one pair for all its states.
fn roles(registry: &prometheus::Registry, queue: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "dedup_queue_messages")
        .flat_map(|family| family.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "queue" && l.value() == queue)
        })
        .map(|m| {
            let label = |k: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == k)
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default()
            };
            (label("role"), label("main_queue"))
        })
        .collect();
    found.dedup();
    found
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
    let nothing = reader
        .list(&vhost, "^no-such-queue-for-dedup-tests\\..*$")
        .await
        .expect("an empty listing");
    assert!(nothing.is_empty(), "{nothing:?}");
    let closed =
        DepthReader::new("http://guest:guest@127.0.0.1:9", Duration::from_secs(2)).expect("reader");
    assert!(matches!(
        closed.read(&vhost, &env.topology.queue).await,
        Err(DepthError::Unreachable(_))
    ));
    assert!(matches!(
        closed.list(&vhost, "^.*$").await,
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
    close_channel(&holder, 200, "done").await;
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

/// The shards past the worker's AMQP_QUEUE_SHARDS that hold messages (ingest splitting the
/// queue into more shards than the workers consume, or the count lowered before they drained)
/// are not consumed, and are reported, every one of them, past a gap in their numbers too:
/// their gauges show the stranded messages, for the backlog alert. A stranded queue deleted
/// since loses its gauges, so the alert does not go on firing for it.
#[tokio::test]
async fn the_shards_past_the_workers_count_are_reported_not_consumed() {
    let mut env = TestEnv::new("stranded").await;
    // ingest's view: four shards, so all four queues exist; events on the second and fourth.
    env.topology.shards = 4;
    env.declare().await;
    for (shard, events) in [(1, 2), (3, 3)] {
        for i in 0..events {
            env.publish_raw_to(
                shard,
                &ndjson(&[event(&format!("s{shard}-{i}"))]),
                message::Envelope::properties(Utc::now(), 1),
            )
            .await;
        }
    }
    let channel = env.amqp.create_channel().await.expect("channel");
    // A gap: shard 2's queue deleted (by hand, say), shard 3's still there.
    delete_queue(
        &channel,
        &env.topology.shard_queue(2),
        "delete shard 2's queue",
    )
    .await;
    // The worker's view: one shard.
    let mut config = worker_config(&env);
    config.amqp.topology.shards = 1;
    config.queue_depth_interval = Duration::from_millis(300);
    let worker = WorkerUnderTest::start(config, None).await;
    let registry = worker.worker.metrics().registry.clone();
    let (first, second) = (env.topology.shard_queue(1), env.topology.shard_queue(3));
    eventually(
        Duration::from_secs(30),
        "both stranded shards' gauges",
        || async {
            (gauge(&registry, &first, "ready") == Some(2.0)
                && gauge(&registry, &second, "ready") == Some(3.0))
            .then_some(())
        },
    )
    .await;
    for missing in [2, 4] {
        assert_eq!(
            gauge(&registry, &env.topology.shard_queue(missing), "ready"),
            None,
            "no gauge for a shard that does not exist"
        );
    }
    assert_eq!(
        gauge(&registry, &env.topology.dead_letter_queue(), "ready"),
        Some(0.0),
        "the dead-letter queue is gauged as itself"
    );
    // The labels the alerts sum a queue's shards by and leave the dead letters out by.
    let main = env.topology.queue.clone();
    for (queue, role) in [
        (&main, "events"),
        (&first, "events"),
        (&second, "events"),
        (&env.topology.dead_letter_queue(), "dead_letter"),
    ] {
        assert_eq!(
            roles(&registry, queue),
            vec![(role.to_owned(), main.clone())],
            "{queue}'s role and main queue"
        );
    }
    assert_eq!(
        env.stored_rows().await,
        0,
        "nothing consumed from the stranded shards"
    );
    assert_eq!(env.ready_messages(&first).await, 2);
    assert_eq!(env.ready_messages(&second).await, 3);

    delete_queue(&channel, &second, "delete shard 3's queue").await;
    eventually(
        Duration::from_secs(30),
        "the deleted shard's gauges to go",
        || async {
            (gauge(&registry, &second, "ready").is_none()
                && gauge(&registry, &second, "unacked").is_none())
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        gauge(&registry, &first, "ready"),
        Some(2.0),
        "the shard still there is still reported"
    );
    worker.stop().await.expect("clean stop");
}

/// Where each shard's leader is, as the real broker reports it: one node leads and holds them
/// all, which on a single-node broker is no warning.
#[tokio::test]
async fn the_shards_placement_is_read_and_one_node_alone_is_no_warning() {
    let mut env = TestEnv::new("placement").await;
    env.topology.shards = 2;
    env.declare().await;
    let reader = DepthReader::new(MANAGEMENT, Duration::from_secs(5)).expect("reader");
    let vhost = vhost_of(RABBITMQ_URL);
    let mut placements = Vec::new();
    for queue in env.topology.queues() {
        let (_, placement) = reader.read_placed(&vhost, &queue).await.expect("read");
        let leader = placement
            .leader
            .clone()
            .expect("a quorum queue has a leader");
        assert_eq!(
            placement.members,
            vec![leader],
            "{queue}: one member, its leader"
        );
        placements.push(placement);
    }
    assert_eq!(crate::leaders_together(&placements), None);

    let mut config = worker_config(&env);
    config.amqp.topology.shards = 2;
    config.queue_depth_interval = Duration::from_millis(300);
    let worker = WorkerUnderTest::start(config, None).await;
    let registry = worker.worker.metrics().registry.clone();
    let queue = env.topology.shard_queue(1);
    eventually(Duration::from_secs(30), "shard 1's gauge", || async {
        gauge(&registry, &queue, "ready").map(|_| ())
    })
    .await;
    let together = registry
        .gather()
        .iter()
        .find(|f| f.name() == "dedup_queue_shard_leaders_on_one_node")
        .map(|f| f.get_metric()[0].get_gauge().get_value());
    assert_eq!(together, Some(0.0));
    worker.stop().await.expect("clean stop");
}

/// The judgement itself: two or more queues, every leader on one node, replicas on several.
#[test]
fn leaders_together_needs_several_queues_one_leader_and_several_nodes() {
    let placed = |leader: Option<&str>, members: &[&str]| Placement {
        leader: leader.map(str::to_owned),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    };
    let cluster = ["a", "b", "c"];
    let on_a = placed(Some("a"), &cluster);
    let on_b = placed(Some("b"), &cluster);
    assert_eq!(
        crate::leaders_together(&[on_a.clone(), on_a.clone(), on_a.clone()]),
        Some("a")
    );
    assert_eq!(
        crate::leaders_together(&[on_a.clone(), on_b, on_a.clone()]),
        None
    );
    assert_eq!(
        crate::leaders_together(std::slice::from_ref(&on_a)),
        None,
        "one queue"
    );
    assert_eq!(crate::leaders_together(&[]), None);
    let alone = placed(Some("a"), &["a"]);
    assert_eq!(
        crate::leaders_together(&[alone.clone(), alone]),
        None,
        "a single-node broker"
    );
    let classic = placed(None, &[]);
    assert_eq!(crate::leaders_together(&[classic.clone(), classic]), None);
    assert_eq!(
        crate::leaders_together(&[on_a, placed(None, &[])]),
        None,
        "a queue without a leader"
    );
}

/// The verdict changes only on a round that read every shard: a round missing one (its read
/// failed) keeps the warning raised, or keeps it down, until a full round says otherwise.
#[test]
fn a_round_missing_a_shard_keeps_the_last_verdict() {
    let placed = |leader: &str| Placement {
        leader: Some(leader.to_owned()),
        members: vec!["a".into(), "b".into(), "c".into()],
    };
    let together = [placed("a"), placed("a"), placed("a")];
    let spread = [placed("a"), placed("b"), placed("c")];
    let mut verdict = crate::LeaderVerdict::default();
    assert_eq!(
        verdict.judge(3, &spread),
        None,
        "spread from the start: no change"
    );
    assert_eq!(
        verdict.judge(3, &together[..2]),
        None,
        "two of three read, both on a: not judged"
    );
    assert_eq!(verdict.judge(3, &together), Some(Some("a")));
    assert_eq!(verdict.judge(3, &together), None, "said once");
    assert_eq!(
        verdict.judge(3, &spread[1..]),
        None,
        "a round missing a shard does not clear it"
    );
    assert_eq!(
        verdict.judge(3, &[]),
        None,
        "nor does a round that read nothing"
    );
    assert_eq!(verdict.judge(3, &spread), Some(None));
}

/// A queue's role comes from the worker's topology, not from its name: a dead-letter queue
/// named anything is `dead_letter`, a queue named like one (`….dlq`) that is not is `events`.
#[test]
fn queue_labels_take_the_role_from_the_topology() {
    let mut topology = dedup_message::topology::Topology::prefixed("roles");
    topology.shards = 3;
    topology.dead_letter_queue_name = Some("parked".into());
    let of = |queue: &str| {
        let labels = crate::QueueLabels::of(&topology, queue);
        labels.with("ready").map(str::to_owned)
    };
    assert_eq!(
        of("roles.events.2"),
        ["roles.events.2", "ready", "events", "roles.events"]
    );
    assert_eq!(
        of("parked"),
        ["parked", "ready", "dead_letter", "roles.events"]
    );
    assert_eq!(
        of("roles.events.dlq"),
        ["roles.events.dlq", "ready", "events", "roles.events"],
        "not this topology's dead-letter queue"
    );
}

/// The shard listing follows RabbitMQ's pages to the last (five queues, two per page, against
/// the real management API) and leaves out a queue whose name differs only in case (the API
/// matches caselessly unless the pattern says otherwise); a refusal (a wrong password: 401) is
/// an error that says so, not an empty listing.
#[tokio::test]
async fn the_listing_reads_every_page_and_reports_a_refusal() {
    let mut env = TestEnv::new("listing").await;
    env.topology.shards = 6;
    env.declare().await;
    // Exclusive: the broker deletes it with the test's connection, whatever the test does.
    let other_case = format!("{}.1", env.topology.queue.to_uppercase());
    let channel = env.amqp.create_channel().await.expect("channel");
    channel
        .queue_declare(
            other_case.as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare a queue named like shard 1 in capitals");
    let vhost = vhost_of(RABBITMQ_URL);
    let pattern = dedup_message::topology::shard_queue_pattern(&env.topology.queue);
    let expected: Vec<String> = (1..6).map(|n| env.topology.shard_queue(n)).collect();
    for page_size in [2, 500] {
        let reader = DepthReader::new(MANAGEMENT, Duration::from_secs(5))
            .expect("reader")
            .with_page_size(page_size);
        let mut names: Vec<String> = reader
            .list(&vhost, &pattern)
            .await
            .expect("list the shards")
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        assert_eq!(names, expected, "{page_size} per page");
    }
    let refused = DepthReader::new(
        "http://guest:not-the-password@127.0.0.1:15672",
        Duration::from_secs(5),
    )
    .expect("reader")
    .list(&vhost, &pattern)
    .await;
    match refused {
        Err(e @ DepthError::Status { status: 401, .. }) => {
            assert!(
                !e.to_string().contains("not-the-password"),
                "the password is not shown: {e}"
            );
        }
        other => panic!("a 401 refusal, got {other:?}"),
    }
}
