//! The operator's queue-depth reader end to end: it reads the management URL from the
//! pipeline's Secret (served here by a mocked API server) and asks the real local RabbitMQ,
//! which holds a queue split into two shards filled to a known depth with part of it
//! unacknowledged, then takes a steady stream of messages (the publish rate of the
//! `messageRate` metric).
//!
//! And KEDA's side: the ScaledObject's queue pattern, sent to the real management API as
//! KEDA's RabbitMQ scaler sends it, lists exactly the pipeline's shards.

use std::time::{Duration, Instant};

use dedup_message::topology::{close_channel, close_connection};
use dedup_operator::controller::broker_depth;
use dedup_operator::crd::{AutoscalingMode, DedupPipeline, DedupPipelineSpec, ScaleMetric};
use dedup_operator::scale::Observation;
use futures::StreamExt;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MANAGEMENT: &str = "http://guest:guest@127.0.0.1:15672";

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Declares the quorum queue `queue` and publishes `messages` messages to it.
async fn fill(channel: &lapin::Channel, queue: &str, messages: usize) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("declare");
    for i in 0..messages {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                Default::default(),
            )
            .await
            .expect("publish");
    }
}

#[tokio::test]
async fn operator_reads_ready_and_unacked_from_the_real_broker() {
    let queue = format!("dedup_operator_depth_{}", std::process::id());
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ is not reachable at {AMQP}: {e}; run scripts/ensure-services.sh")
        });
    let channel = conn.create_channel().await.expect("channel");
    fill(&channel, &queue, 12).await;
    // The second shard of the queue, with 4 ready messages: the workers consume both, so the
    // depth is their sum.
    let second = format!("{queue}.1");
    fill(&channel, &second, 4).await;
    let holder = conn.create_channel().await.expect("channel");
    holder
        .basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = holder
        .basic_consume(
            queue.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..5 {
        consumer.next().await.expect("delivery").expect("delivery");
    }

    let mut spec: DedupPipelineSpec = serde_yaml::from_str(
        "secrets:\n  rabbitmqUrl: {name: broker, key: url}\n  rabbitmqManagementUrl: {name: broker, key: management}\n  redisUrl: {name: r, key: url}\n  databaseUrl: {name: d, key: url}\n",
    )
    .expect("spec");
    spec.dedup.queue = queue.clone();
    spec.dedup.queue_shards = 2;
    let mut pipeline = DedupPipeline::new("events", spec);
    pipeline.metadata.namespace = Some("prod".into());
    let pipeline = std::sync::Arc::new(pipeline);

    // The mocked API server answers every Secret read with the broker's URLs.
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            assert_eq!(
                request.uri().path(),
                "/api/v1/namespaces/prod/secrets/broker"
            );
            let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "broker"},
                "data": {"url": b64(AMQP), "management": b64(MANAGEMENT)}});
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&secret).expect("json"),
            )));
        }
    });
    let client = Client::new(service, "default");
    let read = broker_depth(Default::default());
    let deadline = Instant::now() + Duration::from_secs(20);
    // The management API refreshes its figures every few seconds.
    let last = loop {
        let observation = read(client.clone(), pipeline.clone()).await;
        if observation == Observation::Depth(16) || Instant::now() >= deadline {
            break observation;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The messageRate metric: while messages keep arriving, the broker's publish rate.
    let mut rated = (*pipeline).clone();
    rated.spec.worker.autoscaling.metric = ScaleMetric::MessageRate;
    let rated = std::sync::Arc::new(rated);
    let publisher = tokio::spawn({
        let (channel, queue) = (channel.clone(), queue.clone());
        async move {
            loop {
                let _ = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"rate",
                        Default::default(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let rate = loop {
        let observation = read(client.clone(), rated.clone()).await;
        if matches!(observation, Observation::Rate(r) if r > 10.0) || Instant::now() >= deadline {
            break observation;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    publisher.abort();
    // Clean up before asserting, so a failure leaves no queue behind.
    close_channel(&holder, 200, "done").await;
    for q in [&queue, &second] {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    close_connection(&conn, 200, "done").await;
    assert_eq!(
        last,
        Observation::Depth(16),
        "7 ready + 5 unacknowledged on the first shard, 4 ready on the second"
    );
    assert!(
        matches!(rate, Observation::Rate(r) if r > 10.0 && r < 1000.0),
        "about 100 messages/s published, read {rate:?}"
    );
}

/// `GET path` on the local management API as guest; the status and the body as JSON.
async fn management_get(path: &str) -> (u16, serde_json::Value) {
    let addr = "127.0.0.1:15672".parse().expect("address");
    let auth = format!("Basic {}", b64("guest:guest"));
    let answer =
        test_support::client::http_exchange(addr, "GET", path, &[("Authorization", &auth)], b"")
            .await;
    let body = serde_json::from_str(&answer.body).unwrap_or(serde_json::Value::Null);
    (answer.status, body)
}

/// What Go's `url.QueryEscape` leaves as it is (KEDA escapes the pattern with it).
const QUERY_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// In `keda` mode with three shards, the ScaledObject's trigger, sent to the real management API
/// the way KEDA's RabbitMQ scaler sends a `useRegex` trigger (one page of 100, `sum` of each
/// queue's `messages`), counts the three shards and nothing else: not a shard past the count, the
/// dead-letter queue, a longer name, or a queue whose name differs only in case (RabbitMQ
/// matches the pattern caselessly unless it says otherwise).
#[tokio::test]
async fn keda_trigger_sums_exactly_the_shards_on_the_real_broker() {
    let queue = format!("dedup_keda_{}", std::process::id());
    let mut spec: DedupPipelineSpec = serde_yaml::from_str(
        "secrets:\n  rabbitmqUrl: {name: b, key: url}\n  rabbitmqManagementUrl: {name: b, key: m}\n  redisUrl: {name: r, key: url}\n  databaseUrl: {name: d, key: url}\n",
    )
    .expect("spec");
    spec.dedup.queue = queue.clone();
    spec.dedup.queue_shards = 3;
    spec.worker.autoscaling.mode = AutoscalingMode::Keda;
    let scaled = dedup_operator::resources::scaled_object(&DedupPipeline::new("events", spec));
    let trigger = &scaled["spec"]["triggers"][0]["metadata"];
    assert_eq!(
        (&trigger["useRegex"], &trigger["operation"]),
        (&json!("true"), &json!("sum")),
        "{trigger}"
    );
    let pattern = trigger["queueName"].as_str().expect("queueName");
    let vhost = trigger["vhostName"].as_str().expect("vhostName");

    let counted = [
        (queue.clone(), 1),
        (format!("{queue}.1"), 2),
        (format!("{queue}.2"), 4),
    ];
    let not_counted = [
        (format!("{queue}.3"), 8),
        (format!("{queue}.dlq"), 16),
        (format!("{}.1", queue.to_uppercase()), 32),
        (format!("{queue}X1"), 64),
    ];
    let conn = lapin::Connection::connect(AMQP, Default::default())
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ is not reachable at {AMQP}: {e}; run scripts/ensure-services.sh")
        });
    let channel = conn.create_channel().await.expect("channel");
    for (name, messages) in counted.iter().chain(&not_counted) {
        fill(&channel, name, *messages).await;
    }
    // The management API refreshes its figures every few seconds: wait until every queue shows
    // all its messages, so the sum below is read from complete figures.
    let vhost_path = percent_encoding::utf8_percent_encode(vhost, QUERY_ESCAPE).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = Vec::new();
    loop {
        pending.clear();
        for (name, messages) in counted.iter().chain(&not_counted) {
            let (_, info) = management_get(&format!("/api/queues/{vhost_path}/{name}")).await;
            if info["messages"] != json!(messages) {
                pending.push(format!("{name}: {}", info["messages"]));
            }
        }
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, listed) = management_get(&format!(
        "/api/queues/{vhost_path}?page=1&use_regex=true&pagination=false&name={}&page_size=100",
        percent_encoding::utf8_percent_encode(pattern, QUERY_ESCAPE)
    ))
    .await;
    for (name, _) in counted.iter().chain(&not_counted) {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    close_connection(&conn, 200, "done").await;

    assert!(
        pending.is_empty(),
        "the management API never showed {pending:?}"
    );
    assert_eq!(status, 200, "{listed}");
    let items = listed["items"].as_array().expect("a page of items");
    let mut names: Vec<&str> = items.iter().filter_map(|q| q["name"].as_str()).collect();
    names.sort_unstable();
    let expected: Vec<&str> = counted.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, expected, "the queues {pattern} lists");
    let sum: u64 = items.iter().filter_map(|q| q["messages"].as_u64()).sum();
    assert_eq!(sum, 7, "KEDA's sum over {names:?}");
}
