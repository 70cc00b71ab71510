//! Events for tests: valid ones with a chosen key, and the real samples from `shared/samples`.

use serde_json::{Value, json};

/// A valid event whose key is decided by `r` (all other key fields fixed).
pub fn event(r: &str) -> Value {
    json!({
        "event_name": "app_list",
        "event_datetime": "2025-04-10T12:34:56.000Z",
        "client_id": "abc123def456",
        "product_id": "prod-001",
        "sid": "session-123",
        "r": r,
        "platform": "android",
        "price": 499,
    })
}

/// The sample `app_list.json`, as clients send it (a copy lives here so a clone without the
/// shared folder still tests against the real shape).
pub fn sample_app_list() -> Value {
    json!({
        "event_name": "app_list",
        "event_datetime": "2025-04-10T12:34:56.000Z",
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

/// The real samples from the shared folder beside the checkout, by file name; empty when the
/// folder is not there.
pub fn shared_samples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/samples");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).ok()?,
            ))
        })
        .collect();
    out.sort();
    out
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
