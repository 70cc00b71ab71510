//! How events travel on the queue: one AMQP message carries one or more events as NDJSON
//! (one compact JSON object per line), marked persistent, with the time ingest received them.
//!
//! Packing several events into one confirmed message (a batch request) keeps the broker's
//! message rate from capping the event rate; the worker still judges every line on its own.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Map, Value};

/// Content type of every message ingest publishes.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// Header: when ingest received the events, in microseconds since the Unix epoch.
pub const HEADER_RECEIVED_AT: &str = "x-received-at-us";
/// Header: how many events the body carries.
pub const HEADER_EVENT_COUNT: &str = "x-event-count";
/// Header on dead-lettered messages: why the worker refused them.
pub const HEADER_DEAD_LETTER_REASON: &str = "x-dedup-error";
/// AMQP delivery mode that makes the broker write the message to disk.
const PERSISTENT: u8 = 2;

/// Appends `event` to `body` as one NDJSON line.
pub fn push_event(body: &mut Vec<u8>, event: &Map<String, Value>) {
    // Serialising a `Map` of `Value`s cannot fail: keys are strings and numbers are finite.
    serde_json::to_writer(&mut *body, event).expect("a JSON map always serialises");
    body.push(b'\n');
}

/// One event's JSON text as an NDJSON line. Compact text (what clients normally send) is
/// copied as it is; text spread over several lines is re-serialised compactly.
pub fn ndjson_line(text: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let trimmed = text.trim_ascii();
    if trimmed.contains(&b'\n') {
        let value: Value = serde_json::from_slice(trimmed)?;
        let mut line = serde_json::to_vec(&value)?;
        line.push(b'\n');
        return Ok(line);
    }
    let mut line = Vec::with_capacity(trimmed.len() + 1);
    line.extend_from_slice(trimmed);
    line.push(b'\n');
    Ok(line)
}

/// Properties for a message of `count` events received at `received_at`.
pub fn properties(received_at: DateTime<Utc>, count: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_RECEIVED_AT.into(),
        AMQPValue::LongLongInt(received_at.timestamp_micros()),
    );
    headers.insert(
        HEADER_EVENT_COUNT.into(),
        AMQPValue::LongLongInt(count as i64),
    );
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_timestamp(u64::try_from(received_at.timestamp()).unwrap_or_default())
        .with_headers(headers)
}

/// When ingest received the message's events; `None` when the header is missing or garbled.
pub fn received_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(HEADER_RECEIVED_AT)? {
        AMQPValue::LongLongInt(us) => DateTime::from_timestamp_micros(*us),
        AMQPValue::Timestamp(s) => DateTime::from_timestamp(i64::try_from(*s).ok()?, 0),
        _ => None,
    }
}

/// The non-blank lines of a message body, each one event.
pub fn lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|b| *b == b'\n')
        .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Events written to a body come back one per line, unchanged, even pretty-printed input.
    #[test]
    fn events_round_trip_through_a_body() {
        let a = json!({"sid": "a\nb", "n": 1}).as_object().unwrap().clone();
        let b = json!({"sid": "c"}).as_object().unwrap().clone();
        let mut body = Vec::new();
        push_event(&mut body, &a);
        push_event(&mut body, &b);
        let back: Vec<Value> = lines(&body)
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(back, [Value::Object(a), Value::Object(b)]);
        assert_eq!(lines(b"\n  \n{}\n").count(), 1);
    }

    /// A compact body travels byte for byte; a pretty-printed one becomes one line with the
    /// same content.
    #[test]
    fn bodies_become_single_lines() {
        assert_eq!(
            ndjson_line(b" {\"a\": 1, \"b\":\"x y\"}\r\n").unwrap(),
            b"{\"a\": 1, \"b\":\"x y\"}\n"
        );
        let pretty = b"{\n  \"a\": 1,\n  \"b\": [1, 2]\n}\n";
        let line = ndjson_line(pretty).unwrap();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, serde_json::json!({"a": 1, "b": [1, 2]}));
    }

    /// The received time survives the headers to the microsecond; messages are persistent.
    #[test]
    fn received_time_survives_the_headers() {
        let at = DateTime::from_timestamp_micros(1_744_287_299_123_456).unwrap();
        let props = properties(at, 3);
        assert_eq!(received_at(&props), Some(at));
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(received_at(&BasicProperties::default()), None);
    }
}
