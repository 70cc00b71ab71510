//! What the migrations leave in PostgreSQL, checked on a real server.

use test_support::TestEnv;
use test_support::events::event;

/// Payloads are lz4-compressed, in partitions created after the migration too (a 2 KB event is
/// past the TOAST threshold, so its compression method is the insert's CPU cost).
#[tokio::test]
async fn stored_payloads_are_lz4_compressed() {
    let env = TestEnv::new("lz4").await;
    dedup_worker::store::MIGRATOR
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
