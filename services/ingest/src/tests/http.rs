//! ingest's HTTP contract, driven through its router against the real RabbitMQ: every status
//! the design names, what lands on the queue, and what happens when the broker goes away.

use std::sync::Arc;
use std::time::Duration;

use super::support::{IngestUnderTest, ingest_config};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use test_support::client::amqp_url_via;
use test_support::events::{event, ndjson, sample_app_list, samples};
use test_support::{Proxy, TestEnv, eventually};
use tower::ServiceExt;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn send(
    ingest: &IngestUnderTest,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        request = request.header(header::CONTENT_TYPE, ct);
    }
    let response = ingest
        .router
        .clone()
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

async fn post_json(ingest: &IngestUnderTest, uri: &str, value: &Value) -> Answer {
    send(
        ingest,
        "POST",
        uri,
        Some("application/json"),
        value.to_string().into_bytes(),
    )
    .await
}

/// Events the queue holds, decoded from every message's NDJSON body.
async fn queued_events(env: &TestEnv) -> Vec<Value> {
    events_in(env, &env.topology.queue).await
}

/// Events `queue` holds, decoded from every message's NDJSON body.
async fn events_in(env: &TestEnv, queue: &str) -> Vec<Value> {
    env.drain(queue)
        .await
        .iter()
        .flat_map(|(body, _)| {
            dedup_message::message::lines(body)
                .map(|l| serde_json::from_slice(l).expect("JSON line"))
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// A valid event gets 202 {"status":"queued"}, with or without the trailing slash, and is on
/// the queue, untouched, as a persistent message with its received time.
#[tokio::test]
async fn valid_event_is_queued_and_answered_202() {
    let env = TestEnv::new("single").await;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    for uri in ["/product_events/", "/product_events"] {
        let answer = post_json(&ingest, uri, &sample_app_list()).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{uri}: {}",
            answer.body
        );
        assert_eq!(answer.body, json!({"status": "queued"}));
        assert_eq!(answer.headers[header::CONTENT_TYPE], "application/json");
    }
    let messages = env.drain(&env.topology.queue).await;
    assert_eq!(messages.len(), 2);
    let (body, headers) = &messages[0];
    let sent: Value =
        serde_json::from_slice(body.strip_suffix(b"\n").expect("NDJSON line")).expect("JSON");
    assert_eq!(sent, sample_app_list(), "the event travels untouched");
    let headers = headers.as_ref().expect("headers");
    assert!(
        headers
            .inner()
            .contains_key(dedup_message::message::HEADER_RECEIVED_AT)
    );
}

/// The real samples are accepted as they are.
#[tokio::test]
async fn repository_samples_are_accepted() {
    let env = TestEnv::new("samples").await;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    for (name, text) in samples() {
        let answer = send(
            &ingest,
            "POST",
            "/product_events/",
            Some("application/json"),
            text.into_bytes(),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{name}: {}",
            answer.body
        );
    }
}

/// Invalid input gets a 4xx with a clear body and nothing reaches the queue.
#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_queues_nothing() {
    let env = TestEnv::new("bad").await;
    let mut config = ingest_config(&env, RABBITMQ);
    config.max_body_bytes = 4096;
    let ingest = IngestUnderTest::start(&config, true).await;

    let mut missing = event("1");
    missing.as_object_mut().expect("object").remove("sid");
    let answer = post_json(&ingest, "/product_events/", &missing).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body, json!({"sid": ["This field is required."]}));

    let mut blank = event("1");
    blank["product_id"] = json!("   ");
    blank["client_id"] = json!("x".repeat(65));
    let answer = post_json(&ingest, "/product_events/", &blank).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.body,
        json!({
            "client_id": ["Ensure this field has no more than 64 characters."],
            "product_id": ["This field may not be blank."],
        })
    );

    let answer = send(
        &ingest,
        "POST",
        "/product_events/",
        Some("application/json"),
        b"{\"sid\": ".to_vec(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.body["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("JSON parse error")),
        "{}",
        answer.body
    );

    let answer = post_json(&ingest, "/product_events/", &json!([event("1")])).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.body,
        json!({"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]})
    );

    let answer = send(
        &ingest,
        "POST",
        "/product_events/",
        Some("text/plain"),
        event("1").to_string().into_bytes(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(
        answer.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("application/json"))
    );

    let mut huge = event("1");
    huge["padding"] = json!("x".repeat(5000));
    let answer = post_json(&ingest, "/product_events/", &huge).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        answer.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("4096")),
        "{}",
        answer.body
    );

    let answer = send(&ingest, "GET", "/product_events/", None, Vec::new()).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);

    assert_eq!(
        env.ready_messages(&env.topology.queue).await,
        0,
        "nothing invalid was queued"
    );
    assert_eq!(
        ingest
            .metrics
            .events
            .with_label_values(&["rejected", "anonymous"])
            .get(),
        3
    );
}

/// A batch (JSON array or NDJSON) queues every valid event and reports the invalid ones by
/// index; limits give 413, an empty or all-invalid batch 400.
#[tokio::test]
async fn batch_queues_valid_events_and_reports_invalid_ones_by_index() {
    let env = TestEnv::new("batch").await;
    let mut config = ingest_config(&env, RABBITMQ);
    config.max_batch_events = 500;
    config.max_events_per_message = 100;
    let ingest = IngestUnderTest::start(&config, true).await;

    let mut items: Vec<Value> = (0..300).map(|i| event(&format!("b-{i}"))).collect();
    items[7] = json!({"sid": "only"});
    items[250]["event_datetime"] = json!("yesterday");
    let answer = post_json(
        &ingest,
        "/product_events/batch",
        &Value::Array(items.clone()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["queued"], 298);
    assert_eq!(answer.body["rejected"], 2);
    let indexes: Vec<u64> = answer.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["index"].as_u64().expect("index"))
        .collect();
    assert_eq!(indexes, [7, 250]);
    assert_eq!(
        answer.body["errors"][1]["errors"]["event_datetime"][0]
            .as_str()
            .map(|s| s.starts_with("Datetime has wrong format")),
        Some(true)
    );

    let mut lines = ndjson(&[event("n-1"), event("n-2")]);
    lines.extend_from_slice(b"not json\n");
    let answer = send(
        &ingest,
        "POST",
        "/product_events/batch",
        Some("application/x-ndjson"),
        lines,
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(
        (
            answer.body["queued"].as_u64(),
            answer.body["rejected"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(answer.body["errors"][0]["index"], 2);
    assert_eq!(
        answer.body["errors"][0]["errors"]["non_field_errors"][0]
            .as_str()
            .map(|s| s.starts_with("JSON parse error - ")),
        Some(true),
        "{}",
        answer.body
    );

    // A pretty-printed array: its multi-line item still travels as one NDJSON line.
    let pretty = serde_json::to_vec_pretty(&json!([event("p-1")])).expect("json");
    let answer = send(
        &ingest,
        "POST",
        "/product_events/batch",
        Some("application/json"),
        pretty,
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["queued"], 1);

    let queued = queued_events(&env).await;
    assert_eq!(queued.len(), 301, "298 + 2 + 1 valid events on the queue");
    assert!(queued.iter().all(|e| e["sid"] == "session-123"));

    let too_many: Vec<Value> = (0..501).map(|i| event(&i.to_string())).collect();
    let answer = post_json(&ingest, "/product_events/batch", &Value::Array(too_many)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        post_json(&ingest, "/product_events/batch", &json!([]))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let all_bad = post_json(&ingest, "/product_events/batch", &json!([{"a": 1}, 5])).await;
    assert_eq!(all_bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(all_bad.body["rejected"], 2);
    assert_eq!(env.ready_messages(&env.topology.queue).await, 0);
}

/// Message bodies travel lz4-compressed (content-encoding `lz4`, several times smaller than
/// the NDJSON they carry) unless compression is turned off.
#[tokio::test]
async fn messages_are_lz4_compressed_unless_turned_off() {
    use dedup_message::message::{Compression, ENCODING_LZ4, Envelope};
    let env = TestEnv::new("lz4").await;
    let events: Vec<Value> = (0..50).map(|i| event(&format!("z-{i}"))).collect();
    for compression in [Compression::Lz4, Compression::None] {
        let mut config = ingest_config(&env, RABBITMQ);
        config.message_compression = compression;
        let ingest = IngestUnderTest::start(&config, true).await;
        let answer = post_json(
            &ingest,
            "/product_events/batch",
            &Value::Array(events.clone()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
        let messages = env.drain_raw(&env.topology.queue).await;
        assert_eq!(messages.len(), 1, "50 events fit one message");
        let (data, properties) = &messages[0];
        let body = Envelope::open(data, properties).expect("decodable");
        assert_eq!(
            body.as_ref(),
            ndjson(&events).as_slice(),
            "{compression:?}: the same NDJSON arrives"
        );
        let encoding = properties
            .content_encoding()
            .as_ref()
            .map(|e| e.to_string());
        if compression == Compression::Lz4 {
            assert_eq!(encoding.as_deref(), Some(ENCODING_LZ4));
            assert!(
                data.len() * 3 < body.len(),
                "{} bytes for {}",
                data.len(),
                body.len()
            );
        } else {
            assert_eq!((encoding, data.as_slice()), (None, body.as_ref()));
        }
        drop(ingest);
    }
}

/// Many requests in flight at once all get confirmed, and concurrent events share messages
/// (fewer messages than events) without any event lost or repeated.
#[tokio::test]
async fn concurrent_requests_are_all_confirmed_and_packed() {
    let env = TestEnv::new("concurrent").await;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    let requests = (0..300).map(|i| {
        let ingest = &ingest;
        async move {
            post_json(ingest, "/product_events/", &event(&format!("c-{i}")))
                .await
                .status
        }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::ACCEPTED),
        "{statuses:?}"
    );
    let messages = env.drain(&env.topology.queue).await;
    let mut rs: Vec<String> = messages
        .iter()
        .flat_map(|(body, _)| {
            dedup_message::message::lines(body)
                .map(|l| {
                    serde_json::from_slice::<Value>(l).expect("JSON")["r"]
                        .as_str()
                        .expect("r")
                        .to_owned()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    rs.sort();
    let mut expected: Vec<String> = (0..300).map(|i| format!("c-{i}")).collect();
    expected.sort();
    assert_eq!(
        rs, expected,
        "every confirmed event is on the queue exactly once"
    );
    assert!(
        messages.len() < 300,
        "concurrent events were packed: {} messages",
        messages.len()
    );
}

/// With the broker unreachable, ingest answers 503 with Retry-After (never 202), reports not
/// ready, and recovers by itself when the broker returns.
#[tokio::test]
async fn broker_outage_gives_503_with_retry_after_and_recovers() {
    let env = TestEnv::new("outage").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let ingest =
        IngestUnderTest::start(&ingest_config(&env, &amqp_url_via(proxy.addr())), true).await;
    assert_eq!(
        post_json(&ingest, "/product_events/", &event("before"))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(&ingest, "GET", "/readyz", None, Vec::new())
            .await
            .status,
        StatusCode::OK
    );

    proxy.cut();
    eventually(
        Duration::from_secs(10),
        "ingest to notice the outage",
        || async {
            let answer = post_json(&ingest, "/product_events/", &event("during")).await;
            assert_ne!(
                answer.status,
                StatusCode::ACCEPTED,
                "202 without a broker confirm"
            );
            (answer.status == StatusCode::SERVICE_UNAVAILABLE).then_some(answer)
        },
    )
    .await;
    let answer = post_json(&ingest, "/product_events/", &event("during")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert!(
        answer.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Retry later")),
        "{}",
        answer.body
    );
    let batch = post_json(
        &ingest,
        "/product_events/batch",
        &json!([event("during-batch")]),
    )
    .await;
    assert_eq!(batch.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        send(&ingest, "GET", "/readyz", None, Vec::new())
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&ingest, "GET", "/healthz", None, Vec::new())
            .await
            .status,
        StatusCode::OK,
        "alive, just not ready"
    );

    proxy.restore();
    eventually(Duration::from_secs(15), "ingest to reconnect", || async {
        (post_json(&ingest, "/product_events/", &event("after"))
            .await
            .status
            == StatusCode::ACCEPTED)
            .then_some(())
    })
    .await;
    let rs: Vec<Value> = queued_events(&env)
        .await
        .iter()
        .map(|e| e["r"].clone())
        .collect();
    assert!(
        rs.contains(&json!("before")) && rs.contains(&json!("after")),
        "{rs:?}"
    );
    assert!(
        !rs.contains(&json!("during-batch")),
        "nothing answered 503 was queued by ingest"
    );
}

/// A broker that never connected at all: 503 from the first request.
#[tokio::test]
async fn unreachable_broker_from_the_start_gives_503() {
    let env = TestEnv::new("nobroker").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    proxy.cut();
    let ingest =
        IngestUnderTest::start(&ingest_config(&env, &amqp_url_via(proxy.addr())), false).await;
    let answer = post_json(&ingest, "/product_events/", &event("x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(ingest.metrics.broker_connected.get(), 0);
}

/// Batches are bounded in bytes at every step: a body of tiny items stops being split at the
/// event limit (413 without building a million items), an item over the single-event limit
/// is refused alone, accepted events are packed into messages under the message byte cap,
/// and a batch waits for its share of MAX_BATCH_BYTES_IN_FLIGHT while single events do not.
#[tokio::test]
async fn batches_are_bounded_in_bytes() {
    use dedup_message::message::{Envelope, MAX_MESSAGE_BYTES};
    let env = TestEnv::new("batchbytes").await;
    let mut config = ingest_config(&env, RABBITMQ);
    config.max_body_bytes = 64 * 1024;
    config.max_events_per_message = 1000;
    let ingest = IngestUnderTest::start(&config, true).await;

    // The hostile NDJSON of the issue at the body limit, and the same as a JSON array: a 413
    // naming the event limit (the splitting stops counting past it).
    let tiny = b"1\n".repeat(config.max_batch_body_bytes / 2);
    let array = format!("[{}1]", "1,".repeat(config.max_batch_body_bytes / 2 - 2));
    for (content_type, body) in [
        ("application/x-ndjson", tiny),
        ("application/json", array.into_bytes()),
    ] {
        let answer = send(
            &ingest,
            "POST",
            "/product_events/batch",
            Some(content_type),
            body,
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{}",
            answer.body
        );
        let detail = answer.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("at most 10000"), "{detail}");
    }
    // Past the body limits: 413 before anything is parsed.
    for (uri, content_type, limit) in [
        (
            "/product_events/batch",
            "application/x-ndjson",
            config.max_batch_body_bytes,
        ),
        (
            "/product_events/",
            "application/json",
            config.max_body_bytes,
        ),
    ] {
        let answer = send(
            &ingest,
            "POST",
            uri,
            Some(content_type),
            vec![b'\n'; limit + 1],
        )
        .await;
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
    }

    // 40 events of ~50 KB: one too large alone, the rest packed under the message cap.
    let mut items: Vec<Value> = (0..40)
        .map(|i| {
            let mut e = event(&format!("big-{i}"));
            e["padding"] = "x".repeat(50_000).into();
            e
        })
        .collect();
    items[5]["padding"] = "x".repeat(70_000).into();
    let answer = send(
        &ingest,
        "POST",
        "/product_events/batch",
        Some("application/x-ndjson"),
        ndjson(&items),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["queued"], 39);
    assert_eq!(answer.body["errors"][0]["index"], 5);
    let messages = env.drain_raw(&env.topology.queue).await;
    assert!(messages.len() >= 2, "39 × 50 KB cannot fit one message");
    let mut events = 0;
    for (body, properties) in &messages {
        let plain = Envelope::open(body, properties).expect("decodable");
        assert!(plain.len() <= MAX_MESSAGE_BYTES, "{} bytes", plain.len());
        events += dedup_message::message::lines(&plain).count();
    }
    assert_eq!(events, 39);

    // The gates: with one route's bytes in flight taken, its requests wait; the other
    // route's do not.
    let batch = ndjson(&[event("gated")]);
    let single = event("gated-single").to_string().into_bytes();
    let routes = [
        (
            "/product_events/batch",
            "application/x-ndjson",
            batch,
            &ingest.batch_bytes,
        ),
        (
            "/product_events/",
            "application/json",
            single,
            &ingest.body_bytes,
        ),
    ];
    for (i, (uri, content_type, body, gate)) in routes.iter().enumerate() {
        let held = Arc::clone(gate)
            .acquire_many_owned(gate.available_permits() as u32)
            .await
            .expect("permits");
        let waiting = tokio::spawn({
            let router = ingest.router.clone();
            let request = Request::post(*uri)
                .header(header::CONTENT_TYPE, *content_type)
                .body(Body::from(body.clone()))
                .expect("request");
            async move { router.oneshot(request).await.expect("response").status() }
        });
        let (other_uri, other_type, other_body, _) = &routes[1 - i];
        let other = send(
            &ingest,
            "POST",
            other_uri,
            Some(other_type),
            other_body.clone(),
        )
        .await;
        assert_eq!(
            other.status,
            StatusCode::ACCEPTED,
            "{other_uri} does not wait"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "{uri} waits for its bytes");
        drop(held);
        assert_eq!(waiting.await.expect("task"), StatusCode::ACCEPTED);
    }
}

/// With the queue split into shards, single and batch requests alike put each event on the
/// shard its dedup key picks: every copy of one event on the same queue, and the events spread
/// over all of them.
#[tokio::test]
async fn sharded_queue_gets_each_event_on_the_queue_of_its_key() {
    let mut env = TestEnv::new("shards").await;
    env.topology.shards = 3;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    let spec = dedup_event::key::KeySpec::default();
    let shard_of = |event: &Value| {
        let text = event.to_string();
        let raw = dedup_event::event::parse_raw(text.as_bytes()).expect("valid");
        dedup_message::topology::shard_of(&spec.key_of_raw(&raw).0, 3)
    };
    let singles: Vec<Value> = (0..30).map(|i| event(&format!("single-{i}"))).collect();
    for e in singles.iter().chain(&singles[..10]) {
        let answer = post_json(&ingest, "/product_events/", e).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    }
    let batch: Vec<Value> = (0..30).map(|i| event(&format!("batch-{i}"))).collect();
    let answer = post_json(&ingest, "/product_events/batch", &json!(batch)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["queued"], 30);

    let mut total = 0;
    for shard in 0..3u16 {
        let queue = env.topology.shard_queue(shard);
        let found = events_in(&env, &queue).await;
        assert!(!found.is_empty(), "shard {shard} ({queue}) got no events");
        for e in &found {
            assert_eq!(shard_of(e), shard, "{e} on {queue}");
        }
        // Both copies of a repeated single event are on the same queue.
        for e in &singles[..10] {
            let copies = found.iter().filter(|f| *f == e).count();
            assert_eq!(copies, if shard_of(e) == shard { 2 } else { 0 }, "{e}");
        }
        total += found.len();
    }
    assert_eq!(total, 30 + 10 + 30, "every event on exactly one queue");
}
