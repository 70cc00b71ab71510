//! What the migrations leave in PostgreSQL, checked on a real server.

use test_support::TestEnv;
use test_support::events::event;

/// Payloads are lz4-compressed, in partitions created after the migration too (a 2 KB event is
/// past the TOAST threshold, so its compression method is the insert's CPU cost).
#[tokio::test]
async fn stored_payloads_are_lz4_compressed() {
    let env = TestEnv::new("lz4").await;
    crate::store::MIGRATOR
        .run(&env.pg)
        .await
        .expect("migrations apply");
    let mut payload = event("lz4");
    payload["padding"] = "product event padding ".repeat(200).into();
    sqlx::query("SELECT dedup_ensure_partitions(ARRAY['2025-04-10'::date])")
        .execute(&env.pg)
        .await
        .expect("partition");
    sqlx::query(
        "INSERT INTO product_events (event_date, dedup_key, event_datetime, event_name, product_id, sid, r, payload, received_at)
         VALUES ('2025-04-10', gen_random_uuid(), now(), 'e', 'p', 's', 'r', $1, now())",
    )
    .bind(&payload)
    .execute(&env.pg)
    .await
    .expect("insert");
    let method: Option<String> =
        sqlx::query_scalar("SELECT pg_column_compression(payload) FROM product_events")
            .fetch_one(&env.pg)
            .await
            .expect("compression method");
    assert_eq!(method.as_deref(), Some("lz4"));
}

/// The worker stores payloads with their members in jsonb order (so PostgreSQL skips sorting
/// them); PostgreSQL must see the very same jsonb value as the client's text, for the real
/// samples and for awkward text: repeated names, escaped and non-ASCII names, nested objects.
#[tokio::test]
async fn reordered_payloads_are_the_same_jsonb_as_the_client_text() {
    let env = TestEnv::new("jsonborder").await;
    let store = crate::store::Store::connect_lazy(
        &env.database_url,
        1,
        std::time::Duration::from_secs(30),
        None,
    )
    .expect("store");
    store.migrate().await.expect("migrations apply");
    let mut texts: Vec<String> = test_support::events::samples()
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    texts.push(
        r#"{"zeta":{"y":1,"x":{"b":[1,{"d":2,"c":3}],"a":null}},"sid":"s","r":"dup","r":"last","event_name":"e","product_id":"p","client_id":null,"event_datetime":"2025-04-10T12:00:00Z","a\"b\\c":"esc","\u00e9t\u00e9":"summer","ключ":"значение","":"empty name","n":1.50,"big":12345678901234567890}"#
            .to_owned(),
    );
    let mut body = Vec::new();
    for text in &texts {
        body.extend_from_slice(&dedup_message::message::ndjson_line(text.as_bytes()).unwrap());
    }
    let decoded = crate::batch::decode(
        [(&body[..], None, crate::batch::NO_SOURCES)],
        &dedup_event::KeySpec::default(),
        &(chrono::NaiveDate::MIN..=chrono::NaiveDate::MAX),
        chrono::Utc::now(),
    );
    assert_eq!(
        decoded.candidates.len(),
        texts.len(),
        "{:?}",
        decoded.dead_letters
    );
    assert!(
        decoded
            .candidates
            .iter()
            .any(|c| matches!(c.payload, std::borrow::Cow::Owned(_))),
        "at least one payload was reordered"
    );
    let mut rows: Vec<_> = decoded.candidates.iter().map(|c| c.row()).collect();
    crate::store::lock_order(&mut rows);
    assert_eq!(
        store.insert(&rows).await.expect("insert"),
        texts.len() as u64
    );
    let keys: Vec<uuid::Uuid> = decoded.candidates.iter().map(|c| c.key.as_uuid()).collect();
    let same: Vec<bool> = sqlx::query_scalar(
        "SELECT p.payload = t.text::jsonb
         FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS t(key, text, n)
         JOIN product_events p ON p.dedup_key = t.key
         ORDER BY t.n",
    )
    .bind(&keys)
    .bind(&texts)
    .fetch_all(&env.pg)
    .await
    .expect("compare");
    assert_eq!(same, vec![true; texts.len()]);
}
