//! Queue shards on a real three-node RabbitMQ cluster (started by the test, beside the shared
//! broker): the shards' leaders spread over the nodes, and a node that leads a shard killed
//! under load loses no accepted event and stores none twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use test_support::client::post_json;
use test_support::events::event;
use test_support::process::{Launch, Service};
use test_support::rabbitmq_cluster::RabbitCluster;
use test_support::{TestEnv, eventually};

const SHARDS: u16 = 3;

/// Posts `body` until ingest accepts it (202), as a client that retries does; every retry of
/// an event the broker already took is a repeat the pipeline must drop.
async fn post_until_accepted(ingest: &Service, path: &str, body: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (status, answer) = post_json(ingest.addr(), path, body.as_bytes()).await;
        match status {
            202 => return attempts,
            // The broker did not confirm in time or the link is being rebuilt: retry.
            503 => {}
            other => panic!("POST {path} answered {other}: {answer}"),
        }
        assert!(
            Instant::now() < deadline,
            "ingest refused {path} for 60 s (last: {status} {answer})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events `from..to` as single requests, every one posted twice (a client's blind retry), and
/// every tenth also inside a batch request with a neighbour.
async fn post_range(ingest: &Service, from: usize, to: usize) -> u32 {
    let mut retries = 0;
    for i in from..to {
        let e = event(&format!("c-{i}")).to_string();
        for _ in 0..2 {
            retries += post_until_accepted(ingest, "/product_events/", &e).await - 1;
        }
        if i % 10 == 0 {
            let batch =
                serde_json::json!([event(&format!("c-{i}")), event(&format!("c-{}", i + 1))])
                    .to_string();
            retries += post_until_accepted(ingest, "/product_events/batch", &batch).await - 1;
        }
    }
    retries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_over_cluster_nodes_and_a_lost_leader_loses_nothing() {
    let mut cluster = tokio::task::spawn_blocking(|| RabbitCluster::start("shards"))
        .await
        .expect("the cluster starts");
    let env = TestEnv::new("rmqcluster").await;
    let queues: Vec<String> = dedup_message::topology::shard_queues(&env.topology.queue, SHARDS);

    // ingest on node 0 declares the topology: each queue's leader goes where the fewest are.
    let ingest = Launch::ingest(&env, &cluster.url(0))
        .set("AMQP_QUEUE_SHARDS", SHARDS)
        .start()
        .await;
    let leaders = tokio::task::block_in_place(|| cluster.leaders(0));
    let shard_leaders: BTreeMap<&str, &str> = queues
        .iter()
        .map(|q| {
            let leader = leaders
                .get(q)
                .unwrap_or_else(|| panic!("{q} is not declared as a quorum queue: {leaders:?}"));
            (q.as_str(), leader.as_str())
        })
        .collect();
    let led_by: BTreeSet<&str> = shard_leaders.values().copied().collect();
    assert_eq!(
        led_by.len(),
        3,
        "the three shards' leaders are on three nodes: {shard_leaders:?}"
    );

    // The victim leads a shard and is not the node ingest publishes through; the worker
    // consumes through the third node.
    let victim = (1..3)
        .find(|&i| led_by.contains(cluster.nodes[i].as_str()))
        .expect("a node other than 0 leads a shard");
    let survivor = 3 - victim;
    let victim_queue = shard_leaders
        .iter()
        .find(|(_, leader)| **leader == cluster.nodes[victim])
        .map(|(q, _)| (*q).to_owned())
        .expect("the victim's shard");
    let worker = Launch::worker(&env)
        .set("RABBITMQ_URL", cluster.url(survivor))
        .set("AMQP_QUEUE_SHARDS", SHARDS)
        .start()
        .await;

    let before = post_range(&ingest, 0, 150).await;
    eventually(
        Duration::from_secs(30),
        "the first 150 events stored",
        || async { (env.stored_rows().await == 150).then_some(()) },
    )
    .await;

    // Kill the shard's leader while events keep coming.
    let posting = post_range(&ingest, 150, 200);
    let killing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cluster = &mut cluster;
        tokio::task::block_in_place(|| cluster.kill(victim));
    };
    let (during, ()) = tokio::join!(posting, killing);
    let running = tokio::task::block_in_place(|| cluster.running_nodes(survivor));
    assert!(
        !running.contains(&cluster.nodes[victim]),
        "{} is down before the last 100 events: {running:?}",
        cluster.nodes[victim]
    );
    // About a third of these go to the shard whose leader is gone.
    let after = post_range(&ingest, 200, 300).await;

    eventually(Duration::from_secs(60), "all 300 events stored", || async {
        (env.stored_rows().await >= 300).then_some(())
    })
    .await;
    // Late copies (retries whose first copy was taken) must still be dropped: give them time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = env.stored_r_counts().await;
    assert_eq!(counts.len(), 300, "each event stored: {counts:?}");
    assert!(
        counts.iter().all(|(_, n)| *n == 1),
        "every event stored once: {:?}",
        counts.iter().filter(|(_, n)| *n != 1).collect::<Vec<_>>()
    );

    // The shard lost its leader and got a new one on a node still running.
    let now = tokio::task::block_in_place(|| cluster.leaders(survivor));
    let new_leader = now.get(&victim_queue).expect("the shard is still there");
    assert_ne!(
        new_leader, &cluster.nodes[victim],
        "{victim_queue} has a leader on a live node"
    );
    assert!(ingest.ready().await.is_ok(), "ingest still ready");
    assert!(worker.ready().await.is_ok(), "the worker still ready");
    eprintln!(
        "retries by the client: {before} before the kill, {during} around it, {after} after; \
         leaders before: {shard_leaders:?}; {victim_queue} now led by {new_leader}"
    );
}

/// With RabbitMQ's default locator, shards declared through one node all have their leader
/// there: the worker says so (gauge and log) while it lasts, and stops once
/// `rabbitmq-queues rebalance quorum` has spread them, as its message tells the user to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reports_shard_leaders_all_on_one_node_until_they_are_rebalanced() {
    let cluster =
        tokio::task::spawn_blocking(|| RabbitCluster::start_with_default_locator("onenode"))
            .await
            .expect("the cluster starts");
    let env = TestEnv::new("rmqonenode").await;
    let queues: Vec<String> = dedup_message::topology::shard_queues(&env.topology.queue, SHARDS);

    // The worker declares the shards through node 0 and reads them through node 1's
    // management API.
    let worker = Launch::worker(&env)
        .set("RABBITMQ_URL", cluster.url(0))
        .set("RABBITMQ_MANAGEMENT_URL", cluster.management_url(1))
        .set("AMQP_QUEUE_SHARDS", SHARDS)
        .set("QUEUE_DEPTH_INTERVAL", "200ms")
        .start()
        .await;
    let led_by = shard_leader_nodes(&cluster, &queues);
    assert_eq!(
        led_by.iter().collect::<Vec<_>>(),
        vec![&cluster.nodes[0]],
        "every shard led by the declaring node"
    );
    leaders_on_one_node_reported(&worker, true).await;
    // Its depth gauges came through node 1 too: one pair per shard and the dead letters.
    assert_eq!(
        worker
            .metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("dedup_queue_messages{") && l.contains("state=\"ready\""))
            .count(),
        queues.len() + 1,
        "a ready gauge for each shard and the dead-letter queue"
    );

    tokio::task::block_in_place(|| cluster.rebalance(0));
    let led_by = shard_leader_nodes(&cluster, &queues);
    assert!(led_by.len() > 1, "rebalanced over the nodes: {led_by:?}");
    leaders_on_one_node_reported(&worker, false).await;
    assert!(worker.stop().await, "the worker stops cleanly");
}

/// The nodes leading `queues`, asked of node 0.
fn shard_leader_nodes(cluster: &RabbitCluster, queues: &[String]) -> BTreeSet<String> {
    let leaders = tokio::task::block_in_place(|| cluster.leaders(0));
    queues
        .iter()
        .map(|q| {
            leaders
                .get(q)
                .unwrap_or_else(|| panic!("{q} is not a quorum queue: {leaders:?}"))
                .clone()
        })
        .collect()
}

/// Waits until the worker's gauge says the shard leaders are (or are not) all on one node.
async fn leaders_on_one_node_reported(worker: &Service, together: bool) {
    let want = f64::from(u8::from(together));
    eventually(
        Duration::from_secs(30),
        &format!("the worker's dedup_queue_shard_leaders_on_one_node to be {want}"),
        || async {
            (worker.metric("dedup_queue_shard_leaders_on_one_node").await == want).then_some(())
        },
    )
    .await;
}
