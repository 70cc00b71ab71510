//! Hostile and careless input through the real binaries: whatever ingest accepts is stored,
//! whatever PostgreSQL still refuses is dead-lettered alone, and no event blocks the queue.

use std::time::Duration;

use chrono::Utc;
use dedup_message::message;
use serde_json::Value;
use test_support::client::post_json;
use test_support::events::{event, ndjson, test_datetime};
use test_support::process::Launch;
use test_support::{TestEnv, eventually};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WAIT: Duration = Duration::from_secs(30);

/// A valid event's text with `from` replaced by `to` (the hostile part).
fn hostile(r: &str, from: &str, to: &str) -> String {
    let text = event(r).to_string();
    assert!(text.contains(from), "{text} has no {from}");
    text.replacen(from, to, 1)
}

/// The inputs that once stalled every worker get a 400 naming the field; the numbers that
/// once merged into one key are two events stored with their exact text; the events posted
/// after all of them are stored, so nothing blocks the queue.
#[tokio::test]
async fn hostile_events_get_400_and_the_queue_keeps_flowing() {
    let env = TestEnv::new("hostile").await;
    let worker = Launch::worker(&env).start().await;
    let ingest = Launch::ingest(&env, RABBITMQ).start().await;
    let addr = ingest.addr();
    let post =
        |body: String| async move { post_json(addr, "/product_events/", body.as_bytes()).await };
    let extra = r#""platform":"android""#;
    let refused: Vec<(String, &str)> = vec![
        (hostile("h", extra, r#""platform":"\u0000""#), "platform"),
        (hostile("h", extra, r#""platform":"\ud800""#), "platform"),
        (hostile("h", extra, r#""platform":1e200000"#), "platform"),
        (hostile("h", r#""r":"h""#, r#""r":"\u0000""#), "r"),
        (
            hostile("h", extra, r#""plat\u0000form":1"#),
            "non_field_errors",
        ),
        (
            hostile("h", &test_datetime(), "0001-01-01T00:30:00+01:00"),
            "event_datetime",
        ),
        (
            hostile("h", &test_datetime(), "9999-12-31T00:00:00Z"),
            "event_datetime",
        ),
        (
            hostile(
                "h",
                r#""client_id":"abc123def456""#,
                &format!(r#""client_id":{}1{}"#, "[".repeat(300), "]".repeat(300)),
            ),
            "client_id",
        ),
        (
            hostile("h", r#""client_id":"abc123def456""#, r#""client_id":[1]"#),
            "client_id",
        ),
    ];
    for (body, field) in &refused {
        let (status, answer) = post(body.clone()).await;
        let shown = &body[..body.len().min(120)];
        // A lone surrogate in a member name is not even JSON to the parser; all else is a field.
        assert_eq!(status, 400, "{shown}: {answer}");
        let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
        assert!(answer.get(field).is_some(), "{shown}: {answer}");
    }
    // Numbers keep their exact text: two big integers are two events, and 1e400 is a
    // client_id, not null.
    for body in [
        hostile("x", r#""r":"x""#, r#""r":18446744073709551616"#),
        hostile("x", r#""r":"x""#, r#""r":18446744073709551617"#),
        hostile(
            "big-id",
            r#""client_id":"abc123def456""#,
            r#""client_id":1e400"#,
        ),
    ] {
        let (status, answer) = post(body).await;
        assert_eq!(status, 202, "{answer}");
    }
    for i in 0..3 {
        let (status, _) = post(event(&format!("after-{i}")).to_string()).await;
        assert_eq!(status, 202);
    }
    eventually(WAIT, "six stored rows", || async {
        (env.stored_rows().await == 6).then_some(())
    })
    .await;
    let stored = env.stored_r_counts().await;
    let rs: Vec<&str> = stored.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        rs,
        [
            "18446744073709551616",
            "18446744073709551617",
            "after-0",
            "after-1",
            "after-2",
            "big-id"
        ]
    );
    let client_id: Option<String> =
        sqlx::query_scalar("SELECT client_id FROM product_events WHERE r = 'big-id'")
            .fetch_one(&env.pg)
            .await
            .expect("row");
    assert_eq!(client_id.as_deref(), Some("1e400"));
    let payload_r: String = sqlx::query_scalar(
        "SELECT payload->>'r' FROM product_events WHERE r = '18446744073709551617'",
    )
    .fetch_one(&env.pg)
    .await
    .expect("row");
    assert_eq!(
        payload_r, "18446744073709551617",
        "jsonb keeps the exact number"
    );
    assert!(ingest.stop().await, "ingest stops cleanly");
    assert!(worker.stop().await, "the worker stops cleanly");
}

/// A batch whose rows PostgreSQL partly refuses (here a CHECK constraint the test adds) is
/// split until each refused row stands alone: those go to the dead-letter queue with the
/// database's reason, every other event of the batch is stored once, and the queue goes on.
#[tokio::test]
async fn rows_postgres_refuses_are_dead_lettered_alone_and_the_rest_stored() {
    let env = TestEnv::new("refused").await;
    let worker = Launch::worker(&env).start().await;
    sqlx::query(
        "ALTER TABLE product_events ADD CONSTRAINT test_refuse_poison CHECK (sid <> 'poison')",
    )
    .execute(&env.pg)
    .await
    .expect("add the check");
    let mut events: Vec<Value> = (0..20).map(|i| event(&format!("ok-{i}"))).collect();
    for i in [3, 11] {
        events[i]["sid"] = "poison".into();
    }
    // One message: the whole batch is one statement until it is split.
    env.publish_raw(
        &ndjson(&events),
        message::Envelope::properties(Utc::now(), events.len()),
    )
    .await;
    env.publish_raw(
        &ndjson(&[event("later")]),
        message::Envelope::properties(Utc::now(), 1),
    )
    .await;
    eventually(WAIT, "19 stored rows and two dead letters", || async {
        (env.stored_rows().await == 19
            && env.ready_messages(&env.topology.dead_letter_queue()).await == 2)
            .then_some(())
    })
    .await;
    let letters = env.drain(&env.topology.dead_letter_queue()).await;
    let mut refused_rs: Vec<String> = letters
        .iter()
        .map(|(body, headers)| {
            let reason = headers
                .as_ref()
                .and_then(|h| h.inner().get(message::HEADER_DEAD_LETTER_REASON).cloned());
            let reason = match reason {
                Some(lapin::types::AMQPValue::LongString(text)) => {
                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                }
                other => panic!("no reason header: {other:?}"),
            };
            assert!(
                reason.contains("refused_by_postgres") && reason.contains("test_refuse_poison"),
                "{reason}"
            );
            let value: Value = serde_json::from_slice(body).expect("the event's JSON");
            value["r"].as_str().expect("r").to_owned()
        })
        .collect();
    refused_rs.sort();
    assert_eq!(refused_rs, ["ok-11", "ok-3"]);
    let counts = env.stored_r_counts().await;
    assert!(counts.iter().all(|(_, n)| *n == 1));
    assert!(counts.iter().any(|(r, _)| r == "later"));
    assert_eq!(
        worker
            .metric("dedup_worker_dead_lettered_total{reason=\"refused_by_postgres\"}")
            .await,
        2.0
    );
    assert_eq!(
        worker.metric("dedup_worker_events_stored_total").await,
        19.0
    );
    assert!(worker.stop().await, "the worker stops cleanly");
}

/// A worker whose every insert fails with an error a retry might fix (here a trigger that
/// raises) holds its deliveries and retries; after STALL_TIMEOUT it reports not ready and
/// sets dedup_worker_stalled, and both clear once the batch commits.
#[tokio::test]
async fn a_worker_that_commits_nothing_stops_being_ready() {
    let env = TestEnv::new("stall").await;
    let worker = Launch::worker(&env)
        .set("STALL_TIMEOUT", "1s")
        .start()
        .await;
    sqlx::query(
        "CREATE FUNCTION test_stall() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'test stall'; END $$",
    )
    .execute(&env.pg)
    .await
    .expect("function");
    sqlx::query(
        "CREATE TRIGGER test_stall BEFORE INSERT ON product_events
         FOR EACH ROW EXECUTE FUNCTION test_stall()",
    )
    .execute(&env.pg)
    .await
    .expect("trigger");
    env.publish_raw(
        &ndjson(&[event("stuck")]),
        message::Envelope::properties(Utc::now(), 1),
    )
    .await;
    let reason = eventually(WAIT, "the worker to report a stall", || async {
        worker.ready().await.err()
    })
    .await;
    assert!(reason.contains("stalled"), "{reason}");
    eventually(WAIT, "dedup_worker_stalled = 1", || async {
        (worker.metric("dedup_worker_stalled").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(env.stored_rows().await, 0);
    sqlx::query("DROP TRIGGER test_stall ON product_events")
        .execute(&env.pg)
        .await
        .expect("drop trigger");
    eventually(
        WAIT,
        "the row stored and the worker ready again",
        || async { (env.stored_rows().await == 1 && worker.ready().await.is_ok()).then_some(()) },
    )
    .await;
    eventually(WAIT, "dedup_worker_stalled = 0", || async {
        (worker.metric("dedup_worker_stalled").await == 0.0).then_some(())
    })
    .await;
    assert!(worker.stop().await, "the worker stops cleanly");
}

/// Partition maintenance creates the days ahead and drops the days past the retention; an
/// event older than the retention is dead-lettered and creates no partition.
#[tokio::test]
async fn partitions_are_created_ahead_dropped_after_retention_and_never_made_by_old_events() {
    let env = TestEnv::new("partitions").await;
    let launch = || {
        Launch::worker(&env)
            .set("RETENTION", "30d")
            .set("PARTITIONS_AHEAD", 2)
    };
    let today = Utc::now().date_naive();
    let days_ago = |n: i64| today - chrono::Duration::days(n);
    let name = |day: chrono::NaiveDate| format!("product_events_p{}", day.format("%Y%m%d"));
    let worker = launch().start().await;
    // Worker start ran the maintenance: yesterday to two days ahead exist.
    let partitions = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'product_events'::regclass ORDER BY 1",
        )
        .fetch_all(&env.pg)
        .await
        .expect("partitions")
    };
    let ahead: Vec<String> = (-2..=1).rev().map(|n| name(days_ago(n))).collect();
    eventually(WAIT, "partitions ahead", || async {
        let have = partitions().await;
        ahead.iter().all(|p| have.contains(p)).then_some(())
    })
    .await;
    // An old partition (as if kept from before) is dropped by the next maintenance.
    sqlx::query("SELECT dedup_ensure_partitions(ARRAY[$1::date, $2::date])")
        .bind(days_ago(40))
        .bind(days_ago(29))
        .execute(&env.pg)
        .await
        .expect("old partitions");
    let maintain = launch().run(&["maintain"]).await;
    assert!(
        maintain.status.success(),
        "{}",
        String::from_utf8_lossy(&maintain.stderr)
    );
    let have = partitions().await;
    assert!(!have.contains(&name(days_ago(40))), "{have:?}");
    assert!(have.contains(&name(days_ago(29))), "{have:?}");
    // Events outside the kept days never reach PostgreSQL.
    let mut old = event("too-old");
    old["event_datetime"] = format!("{}T12:00:00Z", days_ago(45)).into();
    let mut ahead_event = event("too-far-ahead");
    ahead_event["event_datetime"] = format!("{}T12:00:00Z", days_ago(-5)).into();
    env.publish_raw(
        &ndjson(&[old, ahead_event, event("fine")]),
        message::Envelope::properties(Utc::now(), 3),
    )
    .await;
    eventually(WAIT, "one row and two dead letters", || async {
        (env.stored_rows().await == 1
            && env.ready_messages(&env.topology.dead_letter_queue()).await == 2)
            .then_some(())
    })
    .await;
    let have = partitions().await;
    assert!(!have.contains(&name(days_ago(45))), "{have:?}");
    assert!(!have.contains(&name(days_ago(-5))), "{have:?}");
    assert_eq!(
        worker
            .metric("dedup_worker_dead_lettered_total{reason=\"outside_window\"}")
            .await,
        2.0
    );
    assert!(worker.stop().await, "the worker stops cleanly");
}
