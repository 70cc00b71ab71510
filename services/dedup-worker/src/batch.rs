//! Step 1 and 2 of the algorithm, pure: decode and validate every event of a batch of
//! deliveries, set aside what cannot be accepted for the dead-letter queue, compute the keys
//! and collapse duplicates inside the batch.

use std::borrow::Cow;
use std::collections::HashSet;

use chrono::{DateTime, NaiveDate, Utc};
use dedup_event::event::{Fields, RawError};

use crate::redis_tier::Item;
use crate::store::Row;
use dedup_event::{DedupKey, KeySpec, event};
use dedup_message::message::{self, Sources};

/// An event that passed validation, with its key.
#[derive(Debug)]
pub struct Candidate<'a> {
    pub key: DedupKey,
    /// The required fields, normalised (the rest of the event is only in `payload`).
    pub fields: Fields,
    /// The event's JSON text as it travelled, its members put in `jsonb` order (the same
    /// `jsonb` value; PostgreSQL then skips sorting them), stored as the payload.
    pub payload: Cow<'a, str>,
    pub received_at: DateTime<Utc>,
    /// The write key's source it came with, if any.
    pub source: Option<&'a str>,
}

impl Candidate<'_> {
    pub fn day(&self) -> NaiveDate {
        self.fields.event_date()
    }

    /// The event as the Redis tier sees it.
    pub fn item(&self) -> Item {
        Item {
            key: self.key,
            day: self.day(),
        }
    }

    /// The row this event is stored as.
    pub fn row(&self) -> Row<'_> {
        let f = &self.fields;
        Row {
            event_date: self.day(),
            dedup_key: self.key.as_uuid(),
            event_datetime: f.event_datetime,
            client_id: f.client_id.as_deref(),
            event_name: &f.event_name,
            product_id: &f.product_id,
            sid: &f.sid,
            r: &f.r,
            payload: &self.payload,
            received_at: self.received_at,
            source: self.source,
        }
    }
}

/// Why an event went to the dead-letter queue (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Not UTF-8 JSON at all.
    InvalidJson,
    /// JSON, but not a valid event.
    InvalidEvent,
    /// A message whose body cannot be decoded (corrupt compression, unknown content encoding);
    /// it goes to the dead-letter queue whole, as it arrived.
    InvalidEncoding,
    /// An `event_datetime` day outside the partitions the worker keeps (older than the
    /// retention, or further ahead than the partitions it creates).
    OutsideWindow,
    /// PostgreSQL refused the row for its data; isolated from the rest of its batch.
    RefusedByPostgres,
}

impl DeadLetterReason {
    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::InvalidJson => "invalid_json",
            DeadLetterReason::InvalidEvent => "invalid_event",
            DeadLetterReason::InvalidEncoding => "invalid_encoding",
            DeadLetterReason::OutsideWindow => "outside_window",
            DeadLetterReason::RefusedByPostgres => "refused_by_postgres",
        }
    }
}

/// One event (line) the pipeline refuses, kept whole for the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub reason: DeadLetterReason,
    pub detail: String,
}

/// A decoded batch.
#[derive(Debug, Default)]
pub struct Decoded<'a> {
    /// Valid events, first occurrence of each `(day, key)` only.
    pub candidates: Vec<Candidate<'a>>,
    /// Later copies of a key already in this batch.
    pub in_batch_duplicates: u64,
    pub dead_letters: Vec<DeadLetter>,
    /// Every event line seen, valid or not.
    pub consumed: u64,
}

/// Messages without sources, for tests.
#[cfg(test)]
pub const NO_SOURCES: &Sources = &Sources::none();

/// Decodes message bodies (each with the time ingest received it and its events' sources)
/// into a batch. Events whose day is outside `days` are set aside: no event may make
/// PostgreSQL create a partition the maintenance step would not keep.
pub fn decode<'a>(
    messages: impl IntoIterator<Item = (&'a [u8], Option<DateTime<Utc>>, &'a Sources)>,
    spec: &KeySpec,
    days: &std::ops::RangeInclusive<NaiveDate>,
    now: DateTime<Utc>,
) -> Decoded<'a> {
    let mut out = Decoded::default();
    let mut seen: HashSet<(NaiveDate, DedupKey)> = HashSet::new();
    for (body, received_at, sources) in messages {
        let received_at = received_at.unwrap_or(now);
        let mut sources = sources.per_event();
        for line in message::lines(body) {
            out.consumed += 1;
            let source = sources.next().flatten();
            let raw = match std::str::from_utf8(line) {
                Ok(raw) => raw,
                Err(e) => {
                    out.dead_letters.push(DeadLetter {
                        body: line.to_vec(),
                        reason: DeadLetterReason::InvalidJson,
                        detail: e.to_string(),
                    });
                    continue;
                }
            };
            // Only the fields the key and the columns need are parsed; the text is stored.
            let event = match event::parse_raw_str(raw) {
                Ok(event) => event,
                Err(RawError::Malformed(detail)) => {
                    out.dead_letters.push(DeadLetter {
                        body: line.to_vec(),
                        reason: DeadLetterReason::InvalidJson,
                        detail,
                    });
                    continue;
                }
                Err(RawError::Invalid(errors)) => {
                    let detail = serde_json::to_string(&errors).unwrap_or_default();
                    out.dead_letters.push(DeadLetter {
                        body: line.to_vec(),
                        reason: DeadLetterReason::InvalidEvent,
                        detail,
                    });
                    continue;
                }
            };
            if !days.contains(&event.fields.event_date()) {
                out.dead_letters.push(DeadLetter {
                    body: line.to_vec(),
                    reason: DeadLetterReason::OutsideWindow,
                    detail: format!(
                        "event day {} is outside the kept partitions {} to {}",
                        event.fields.event_date(),
                        days.start(),
                        days.end()
                    ),
                });
                continue;
            }
            let key = spec.key_of_raw(&event);
            if seen.insert((event.fields.event_date(), key)) {
                out.candidates.push(Candidate {
                    key,
                    payload: crate::jsonb::ordered(&event, raw),
                    fields: event.fields,
                    received_at,
                    source,
                });
            } else {
                out.in_batch_duplicates += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn line(r: &str, day: &str) -> String {
        json!({
            "client_id": "c", "event_datetime": format!("{day}T10:00:00Z"), "event_name": "e",
            "product_id": "p", "sid": "s", "r": r, "extra": [1, 2]
        })
        .to_string()
    }

    fn any_day() -> std::ops::RangeInclusive<NaiveDate> {
        NaiveDate::MIN..=NaiveDate::MAX
    }

    fn body(lines: &[String]) -> Vec<u8> {
        let mut b = lines.join("\n").into_bytes();
        b.push(b'\n');
        b
    }

    /// Copies inside one batch are collapsed; the first copy is the one kept.
    #[test]
    fn in_batch_copies_collapse_to_the_first() {
        let a = body(&[
            line("1", "2025-04-10"),
            line("2", "2025-04-10"),
            line("1", "2025-04-10"),
        ]);
        let b = body(&[line("2", "2025-04-10")]);
        let decoded = decode(
            [(&a[..], None, NO_SOURCES), (&b[..], None, NO_SOURCES)],
            &KeySpec::default(),
            &any_day(),
            Utc::now(),
        );
        assert_eq!(decoded.consumed, 4);
        assert_eq!(decoded.candidates.len(), 2);
        assert_eq!(decoded.in_batch_duplicates, 2);
        assert_eq!(decoded.candidates[0].fields.r, "1");
        assert!(decoded.candidates[0].payload.contains("\"extra\":[1,2]"));
    }

    /// The same key on two different event days is two events: uniqueness is per day.
    #[test]
    fn same_key_on_another_day_is_not_an_in_batch_duplicate() {
        let a = body(&[line("1", "2025-04-10"), line("1", "2025-04-11")]);
        let decoded = decode(
            [(&a[..], None, NO_SOURCES)],
            &KeySpec::default(),
            &any_day(),
            Utc::now(),
        );
        assert_eq!(decoded.candidates.len(), 2);
        assert_eq!(decoded.in_batch_duplicates, 0);
    }

    /// Bad lines are set aside one by one with a reason; the good lines around them go on.
    #[test]
    fn bad_lines_are_dead_lettered_alone() {
        let mut a = body(&[line("1", "2025-04-10")]);
        a.extend_from_slice(b"{not json\n");
        a.extend_from_slice(b"{\"sid\": \"only\"}\n");
        a.extend_from_slice(&[0xff, 0xfe, b'\n']);
        a.extend_from_slice(body(&[line("2", "2025-04-10")]).as_slice());
        let decoded = decode(
            [(&a[..], None, NO_SOURCES)],
            &KeySpec::default(),
            &any_day(),
            Utc::now(),
        );
        assert_eq!(decoded.consumed, 5);
        assert_eq!(decoded.candidates.len(), 2);
        let reasons: Vec<_> = decoded.dead_letters.iter().map(|d| d.reason).collect();
        assert_eq!(
            reasons,
            [
                DeadLetterReason::InvalidJson,
                DeadLetterReason::InvalidEvent,
                DeadLetterReason::InvalidJson
            ]
        );
        assert_eq!(decoded.dead_letters[0].body, b"{not json");
        assert!(
            decoded.dead_letters[1]
                .detail
                .contains("This field is required.")
        );
    }

    /// Events on days outside the kept partitions are dead-lettered, the rest go on.
    #[test]
    fn days_outside_the_partitions_are_dead_lettered() {
        let a = body(&[
            line("1", "2025-04-09"),
            line("2", "2025-04-10"),
            line("3", "2025-04-12"),
        ]);
        let days = NaiveDate::from_ymd_opt(2025, 4, 10).unwrap()
            ..=NaiveDate::from_ymd_opt(2025, 4, 11).unwrap();
        let decoded = decode(
            [(&a[..], None, NO_SOURCES)],
            &KeySpec::default(),
            &days,
            Utc::now(),
        );
        assert_eq!(decoded.candidates.len(), 1);
        assert_eq!(decoded.candidates[0].fields.r, "2");
        let reasons: Vec<_> = decoded.dead_letters.iter().map(|d| d.reason).collect();
        assert_eq!(reasons, [DeadLetterReason::OutsideWindow; 2]);
        assert!(decoded.dead_letters[0].detail.contains("2025-04-09"));
    }

    /// A message without the received-time header gets the processing time.
    #[test]
    fn missing_received_time_falls_back_to_now() {
        let now = Utc::now();
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let a = body(&[line("1", "2025-04-10")]);
        let b = body(&[line("2", "2025-04-10")]);
        let decoded = decode(
            [(&a[..], Some(at), NO_SOURCES), (&b[..], None, NO_SOURCES)],
            &KeySpec::default(),
            &any_day(),
            now,
        );
        assert_eq!(decoded.candidates[0].received_at, at);
        assert_eq!(decoded.candidates[1].received_at, now);
    }

    /// Each event keeps its own source, counted by line, even past a line that is refused.
    #[test]
    fn sources_follow_their_lines() {
        use dedup_message::message::{Compression, Envelope};
        let now = Utc::now();
        let mut envelope = Envelope::new();
        envelope.push_line(
            format!("{}\n", line("1", "2025-04-10")).as_bytes(),
            now,
            None,
            Some("web"),
        );
        envelope.push_line(b"{\"not\": \"an event\"}\n", now, None, Some("ios"));
        envelope.push_line(
            format!("{}\n", line("2", "2025-04-10")).as_bytes(),
            now,
            None,
            Some("ios"),
        );
        envelope.push_line(
            format!("{}\n", line("3", "2025-04-10")).as_bytes(),
            now,
            None,
            None,
        );
        let (_, properties) = envelope.seal(Compression::None);
        let sources = Sources::read(&properties);
        let decoded = decode(
            [(envelope.body(), None, &sources)],
            &KeySpec::default(),
            &any_day(),
            now,
        );
        assert_eq!(decoded.dead_letters.len(), 1);
        let stored: Vec<Option<&str>> = decoded.candidates.iter().map(|c| c.row().source).collect();
        assert_eq!(stored, [Some("web"), Some("ios"), None]);
    }
}
