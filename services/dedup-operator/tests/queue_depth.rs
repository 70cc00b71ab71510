//! The operator's queue-depth reader end to end: it reads the management URL from the
//! pipeline's Secret (served here by a mocked API server) and asks the real local RabbitMQ,
//! which holds a queue split into two shards filled to a known depth with part of it
//! unacknowledged, then takes a steady stream of messages (the publish rate of the
//! `messageRate` metric).

use std::time::{Duration, Instant};

use dedup_operator::controller::broker_depth;
use dedup_operator::crd::{DedupPipeline, DedupPipelineSpec, ScaleMetric};
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
    let _ = holder.close(200, "done".into()).await;
    for q in [&queue, &second] {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
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
