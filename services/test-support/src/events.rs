//! Events for tests: valid ones with a chosen key, and the real samples from `samples/`.

use chrono::{Duration, NaiveDate, Utc};
use serde_json::{Value, json};

/// The day test events happen on: yesterday (UTC), inside ingest's accepted window and never
/// in the future, so the events are accepted whatever day the tests run.
pub fn test_day() -> NaiveDate {
    (Utc::now() - Duration::days(1)).date_naive()
}

/// Noon of [`test_day`], as events carry it.
pub fn test_datetime() -> String {
    format!("{}T12:34:56.000Z", test_day())
}

/// A valid event whose key is decided by `r` (all other key fields fixed).
pub fn event(r: &str) -> Value {
    json!({
        "event_name": "app_list",
        "event_datetime": test_datetime(),
        "client_id": "abc123def456",
        "product_id": "prod-001",
        "sid": "session-123",
        "r": r,
        "platform": "android",
        "price": 499,
    })
}

/// The sample `app_list.json`, as clients send it, dated [`test_day`].
pub fn sample_app_list() -> Value {
    json!({
        "event_name": "app_list",
        "event_datetime": test_datetime(),
        "event_date": "2025-04-10",
        "client_id": "abc123def456",
        "product_id": "prod-001",
        "sid": "session-123",
        "ts": "2025-04-10T15:34:56.000+03:00",
        "r": "999888777666555",
        "platform": "android",
        "user_agent": "ru.mts.mtstv/1.2.345",
        "price": 499,
        "dt_add": "2025-04-10T15:34:59.123Z",
        "event_receive_timestamp": 1744287299,
        "event_receive_dt_str": "2025-04-10 15:34:59.123456"
    })
}

/// The real samples in the repository's `samples/` folder, by file name, each dated
/// [`test_day`] (their own dates lie outside ingest's accepted window). Fails loudly when the
/// folder is missing or empty: the samples are part of the repository.
pub fn samples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the samples folder {} is missing: {e}", dir.display()));
    let mut out: Vec<(String, String)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).expect("a readable sample");
            let mut value: Value = serde_json::from_str(&text).expect("a JSON sample");
            value["event_datetime"] = json!(test_datetime());
            (
                e.file_name().to_string_lossy().into_owned(),
                value.to_string(),
            )
        })
        .collect();
    assert!(!out.is_empty(), "no samples in {}", dir.display());
    out.sort();
    out
}

/// `n` valid events with the keys `{tag}-0` … `{tag}-{n-1}`.
pub fn unique(n: usize, tag: &str) -> Vec<Value> {
    (0..n).map(|i| event(&format!("{tag}-{i}"))).collect()
}

/// NDJSON body of `events`.
pub fn ndjson(events: &[Value]) -> Vec<u8> {
    let mut body = Vec::new();
    for e in events {
        body.extend_from_slice(e.to_string().as_bytes());
        body.push(b'\n');
    }
    body
}
