//! ingest when the broker misbehaves, against the real RabbitMQ (through a proxy the test
//! cuts or hangs): every event that is not confirmed gets 503 with Retry-After — never 202 —
//! and ingest recovers by itself.

use std::sync::Arc;
use std::time::Duration;

use super::support::{IngestUnderTest, ingest_config, messages_by_r};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use test_support::client::amqp_url_via;
use test_support::events::event;
use test_support::{Proxy, TestEnv, eventually};
use tower::ServiceExt;

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WAIT: Duration = Duration::from_secs(30);

/// Posts one event; the status, the Retry-After header and the body's detail.
async fn post(router: &axum::Router, r: &str) -> (StatusCode, Option<String>, String) {
    let request = Request::post("/product_events/")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(event(r).to_string()))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let detail = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, retry_after, detail)
}

/// A 503 that tells the client when to come back.
fn assert_retry_later(answer: &(StatusCode, Option<String>, String), reason: &str) {
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.2);
    assert_eq!(answer.1.as_deref(), Some("2"), "Retry-After");
    assert!(
        answer.2.contains(reason),
        "{:?} does not say {reason:?}",
        answer.2
    );
}

/// Restores the proxy; ingest reconnects by itself and the next event is accepted.
async fn restore_and_expect_recovery(proxy: &Proxy, ingest: &IngestUnderTest) {
    proxy.restore();
    let publisher = ingest.publisher.clone();
    eventually(WAIT, "ingest to reconnect", || async {
        publisher.is_connected().then_some(())
    })
    .await;
    assert_eq!(post(&ingest.router, "after").await.0, StatusCode::ACCEPTED);
}

/// A broker that accepts the connection, then hangs before the first channel is open, costs
/// ingest one SETUP_WAIT: it gives that connection up and connects again. Unbounded, the
/// setup waited until the client missed the broker's heartbeats (two minutes at RabbitMQ's
/// default), answering 503 all that time.
#[tokio::test]
async fn a_broker_hanging_during_the_setup_is_given_up_after_the_setup_wait() {
    let env = TestEnv::new("setuphang").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    proxy.stall_on(test_support::proxy::AMQP_CHANNEL_OPEN);
    let config = ingest_config(&env, &amqp_url_via(proxy.addr()));
    let ingest = IngestUnderTest::start(&config, false).await;
    eventually(WAIT, "the first channel stalled", || async {
        (proxy.stalled() == 1).then_some(())
    })
    .await;
    assert_retry_later(
        &post(&ingest.router, "during").await,
        "the message broker is unreachable",
    );
    let publisher = ingest.publisher.clone();
    let bound = dedup_message::topology::SETUP_WAIT + Duration::from_secs(8);
    eventually(bound, "ingest to connect again", || async {
        publisher.is_connected().then_some(())
    })
    .await;
    assert_eq!(post(&ingest.router, "after").await.0, StatusCode::ACCEPTED);
    assert_eq!(proxy.stalled(), 1, "only the first connection stalled");
    assert_eq!(messages_by_r(&env).await, vec![vec!["after".to_owned()]]);
}

/// A link that hangs without a reset: requests get 503 after CONFIRM_TIMEOUT; missed
/// heartbeats end the link, and ingest reconnects once the broker answers again.
#[tokio::test]
async fn a_hung_broker_link_gives_503_after_the_confirm_timeout_and_is_replaced() {
    let env = TestEnv::new("hung").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = ingest_config(&env, &format!("{}?heartbeat=1", amqp_url_via(proxy.addr())));
    config.confirm_timeout = Duration::from_secs(1);
    let ingest = IngestUnderTest::start(&config, true).await;
    assert_eq!(post(&ingest.router, "before").await.0, StatusCode::ACCEPTED);

    proxy.hang();
    let answer = post(&ingest.router, "hung").await;
    assert_retry_later(&answer, "did not confirm within 1s");
    let publisher = ingest.publisher.clone();
    eventually(WAIT, "missed heartbeats to end the hung link", || async {
        (!publisher.is_connected()).then_some(())
    })
    .await;
    restore_and_expect_recovery(&proxy, &ingest).await;
    // Only the confirmed events are on the queue; the 503'd one may or may not be (the client
    // resends it, and the worker drops the copy).
    let queued: Vec<String> = env
        .drain(&env.topology.queue)
        .await
        .iter()
        .flat_map(|(body, _)| {
            dedup_message::message::lines(body)
                .map(|l| serde_json::from_slice::<Value>(l).expect("JSON")["r"].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(queued.contains(&"\"before\"".to_owned()) && queued.contains(&"\"after\"".to_owned()));
}

/// The link is reset while a confirm is pending: that request gets 503 (not a confirm it
/// never had), and the next requests are confirmed on a new link.
#[tokio::test]
async fn a_link_cut_while_a_confirm_is_pending_gives_503() {
    let env = TestEnv::new("cutpending").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = ingest_config(&env, &amqp_url_via(proxy.addr()));
    config.confirm_timeout = Duration::from_secs(20);
    let ingest = IngestUnderTest::start(&config, true).await;
    proxy.hang();
    let pending = tokio::spawn({
        let router = ingest.router.clone();
        async move { post(&router, "pending").await }
    });
    let metrics = ingest.metrics.clone();
    eventually(WAIT, "the publish to await its confirm", || async {
        (metrics.publishes_in_flight.get() > 0).then_some(())
    })
    .await;
    proxy.cut();
    let answer = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("answered long before the confirm timeout")
        .expect("task");
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.2);
    assert_eq!(answer.1.as_deref(), Some("2"));
    restore_and_expect_recovery(&proxy, &ingest).await;
}

/// The broker nacks (a full queue that rejects publishes): 503, never 202.
#[tokio::test]
async fn a_broker_nack_gives_503() {
    let env = TestEnv::new("nack").await;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    let policy = format!("{}-full", env.name);
    let set = std::process::Command::new("rabbitmqctl")
        .args([
            "set_policy",
            &policy,
            &format!("^{}$", env.topology.queue),
            r#"{"max-length":1,"overflow":"reject-publish"}"#,
            "--apply-to",
            "queues",
        ])
        .output()
        .expect("rabbitmqctl runs (RabbitMQ is installed on this machine)");
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let _clear = PolicyGuard(policy.clone());
    // Policies take effect asynchronously: fill the queue until a publish is refused.
    let accepted = std::sync::atomic::AtomicU32::new(0);
    let nacked = eventually(WAIT, "the full queue to refuse a publish", || async {
        let answer = post(&ingest.router, "fill").await;
        if answer.0 == StatusCode::ACCEPTED {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        (answer.0 == StatusCode::SERVICE_UNAVAILABLE).then_some(answer)
    })
    .await;
    assert_retry_later(&nacked, "refused the message");
    assert_eq!(
        env.ready_messages(&env.topology.queue).await,
        accepted.into_inner(),
        "exactly the confirmed events are on the queue"
    );
}

/// Removes a RabbitMQ policy when dropped.
struct PolicyGuard(String);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

/// The queue is unbound from the exchange: the mandatory publish comes back unroutable and
/// the client gets 503; bound again, events are confirmed.
#[tokio::test]
async fn an_unroutable_publish_gives_503() {
    let env = TestEnv::new("unroutable").await;
    let ingest = IngestUnderTest::start(&ingest_config(&env, RABBITMQ), true).await;
    let channel = env.amqp.create_channel().await.expect("channel");
    let t = &env.topology;
    channel
        .queue_unbind(
            t.queue.as_str().into(),
            t.exchange.as_str().into(),
            t.routing_key(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    let answer = post(&ingest.router, "lost").await;
    assert_retry_later(&answer, "could not route the message");
    channel
        .queue_bind(
            t.queue.as_str().into(),
            t.exchange.as_str().into(),
            t.routing_key(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    assert_eq!(post(&ingest.router, "found").await.0, StatusCode::ACCEPTED);
    assert_eq!(env.ready_messages(&t.queue).await, 1);
}

/// With MAX_IN_FLIGHT_PUBLISHES awaiting confirms, the next request gets 503 at once
/// (back-pressure) instead of queueing in memory.
#[tokio::test]
async fn requests_past_max_in_flight_publishes_get_503_at_once() {
    let env = TestEnv::new("inflight").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = ingest_config(&env, &amqp_url_via(proxy.addr()));
    config.max_in_flight_publishes = 2;
    config.confirm_timeout = Duration::from_secs(20);
    let ingest = Arc::new(IngestUnderTest::start(&config, true).await);
    proxy.hang();
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let router = ingest.router.clone();
            tokio::spawn(async move { post(&router, &format!("waiting-{i}")).await })
        })
        .collect();
    let metrics = ingest.metrics.clone();
    eventually(WAIT, "two publishes awaiting confirms", || async {
        (metrics.publishes_in_flight.get() >= 1 && ingest.publisher.acquire().is_err())
            .then_some(())
    })
    .await;
    let answer = tokio::time::timeout(Duration::from_secs(5), post(&ingest.router, "third"))
        .await
        .expect("answered at once, not after the confirm timeout");
    assert_retry_later(
        &answer,
        "too many events are waiting for the broker (2 in flight)",
    );
    proxy.cut();
    for task in waiting {
        assert_eq!(task.await.expect("task").0, StatusCode::SERVICE_UNAVAILABLE);
    }
}

/// Sends single events named `r` one at a time while the broker is slow, each once the one
/// before is held by ingest, so every flusher has its chance to take it alone. `held`:
/// events ingest holds before the first of them.
async fn post_one_by_one(
    ingest: &IngestUnderTest,
    held: usize,
    rs: Vec<String>,
) -> Vec<tokio::task::JoinHandle<(StatusCode, Option<String>, String)>> {
    let mut answers = Vec::new();
    for (i, r) in rs.into_iter().enumerate() {
        let held = held + i + 1;
        let router = ingest.router.clone();
        answers.push(tokio::spawn(async move { post(&router, &r).await }));
        let publisher = ingest.publisher.clone();
        eventually(WAIT, "ingest to hold the event", || async {
            (publisher.places_taken() >= held).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    answers
}

/// ingest through a proxy the test pauses, with two flushers and `max_events` to a message.
async fn behind_a_pausable_broker(env: &TestEnv, max_events: usize) -> (Proxy, IngestUnderTest) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("addr")).await;
    let mut config = ingest_config(env, &amqp_url_via(proxy.addr()));
    config.confirm_timeout = Duration::from_secs(30);
    config.coalesce_flushers = 2;
    config.max_events_per_message = max_events;
    // The posts declare no length, so each holds a whole MAX_BODY_BYTES of the gate.
    config.max_body_bytes_in_flight = 64 * config.max_body_bytes;
    let ingest = IngestUnderTest::start(&config, true).await;
    (proxy, ingest)
}

/// Pauses the proxy and sends "first", then the events named `later` one by one once its
/// message awaits its confirm; the requests' answers to come.
async fn first_then_later_while_paused(
    proxy: &Proxy,
    ingest: &IngestUnderTest,
    later: &[String],
) -> Vec<tokio::task::JoinHandle<(StatusCode, Option<String>, String)>> {
    proxy.pause();
    let mut answers = post_one_by_one(ingest, 0, vec!["first".to_owned()]).await;
    let metrics = ingest.metrics.clone();
    eventually(
        WAIT,
        "the first event's message to await its confirm",
        || async { (metrics.publishes_in_flight.get() == 1).then_some(()) },
    )
    .await;
    answers.extend(post_one_by_one(ingest, 1, later.to_vec()).await);
    answers
}

/// Resumes the proxy; every request is then answered 202.
async fn resume_and_expect_all_accepted(
    proxy: &Proxy,
    answers: Vec<tokio::task::JoinHandle<(StatusCode, Option<String>, String)>>,
) {
    proxy.resume();
    for answer in answers {
        let answer = answer.await.expect("task");
        assert_eq!(answer.0, StatusCode::ACCEPTED, "{}", answer.2);
    }
}

/// A slow broker: while one message awaits its confirm, the single events arriving meanwhile
/// gather into the next message instead of leaving alone beside it (the broker's cost is
/// mostly per message), and each is confirmed once the broker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arriving_while_a_confirm_is_pending_share_the_next_message() {
    let env = TestEnv::new("gather").await;
    let (proxy, ingest) = behind_a_pausable_broker(&env, 128).await;
    assert_eq!(post(&ingest.router, "warm").await.0, StatusCode::ACCEPTED);
    // The answer can come a moment before its flusher lets go of the event's place.
    let publisher = ingest.publisher.clone();
    eventually(WAIT, "ingest to let go of the first event", || async {
        (publisher.places_taken() == 0).then_some(())
    })
    .await;

    let later: Vec<String> = (0..20).map(|i| format!("later-{i:02}")).collect();
    let answers = first_then_later_while_paused(&proxy, &ingest, &later).await;
    assert_eq!(
        ingest.metrics.publishes_in_flight.get(),
        1,
        "only the first message is out while its confirm is pending"
    );
    resume_and_expect_all_accepted(&proxy, answers).await;
    assert_eq!(
        messages_by_r(&env).await,
        vec![vec!["warm".to_owned()], vec!["first".to_owned()], later],
        "one message each for the events before, and one for all that waited"
    );
}

/// A full message does not wait for a pending confirm: it goes beside it (up to
/// COALESCE_FLUSHERS messages in flight), so a busy ingest is not held to one message per
/// confirm round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_message_goes_beside_a_pending_one() {
    let env = TestEnv::new("fullgoes").await;
    let (proxy, ingest) = behind_a_pausable_broker(&env, 5).await;

    let later: Vec<String> = (0..10).map(|i| format!("later-{i:02}")).collect();
    let answers = first_then_later_while_paused(&proxy, &ingest, &later).await;
    let metrics = ingest.metrics.clone();
    eventually(WAIT, "the full message to go beside the first", || async {
        (metrics.publishes_in_flight.get() == 2).then_some(())
    })
    .await;
    resume_and_expect_all_accepted(&proxy, answers).await;
    // Messages in flight together on different channels reach the queue in either order.
    let mut messages = messages_by_r(&env).await;
    messages.sort();
    assert_eq!(
        messages,
        vec![
            vec!["first".to_owned()],
            later[..5].to_vec(),
            later[5..].to_vec()
        ],
        "the first alone, then two full messages"
    );
}

/// The link is cut while a message awaits its confirm and the next events gather behind it:
/// every request is answered long before the confirm timeout, the pending one with 503; the
/// gathered ones with 503, or 202 if they went out on a new link, and then they are on the
/// queue. Nothing waits on a link that is gone, and ingest goes on on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_while_events_gather_answers_every_request() {
    let env = TestEnv::new("cutgather").await;
    let (proxy, ingest) = behind_a_pausable_broker(&env, 128).await;
    let later: Vec<String> = (0..10).map(|i| format!("later-{i:02}")).collect();
    let answers = first_then_later_while_paused(&proxy, &ingest, &later).await;
    proxy.cut();
    let mut accepted = Vec::new();
    let rs = std::iter::once("first".to_owned()).chain(later.iter().cloned());
    for (r, answer) in rs.zip(answers) {
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .unwrap_or_else(|_| panic!("{r} was not answered long before the confirm timeout"))
            .expect("task");
        if r == "first" || answer.0 != StatusCode::ACCEPTED {
            assert_retry_later(&answer, "");
        } else {
            accepted.push(r);
        }
    }
    proxy.resume();
    restore_and_expect_recovery(&proxy, &ingest).await;
    let queued: Vec<String> = messages_by_r(&env).await.concat();
    for r in accepted.iter().chain(["after".to_owned()].iter()) {
        assert!(
            queued.contains(r),
            "{r} was accepted but is not on the queue: {queued:?}"
        );
    }
}
