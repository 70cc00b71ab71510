//! How events travel on the queue: one AMQP message carries one or more events as NDJSON
//! (one compact JSON object per line), marked persistent, with the time ingest received them,
//! their count and the trace context of every request they came from. [`Envelope`] is that
//! message: ingest packs events into one and seals it; the worker reads the same headers back
//! through its associated functions. Dead letters are the other message kind
//! ([`dead_letter_properties`]).
//!
//! Packing several events into one confirmed message (a batch request) keeps the broker's
//! message rate from capping the event rate; the worker still judges every line on its own.
//!
//! Bodies are lz4-compressed by default (`content-encoding: lz4`, the block format with its
//! length in front). The broker's work grows with the bytes it writes to its log and reads
//! back, and JSON events compress several times over, so this takes most of the broker's CPU
//! per event away for a few microseconds of ingest's. A body without a content encoding is
//! plain NDJSON, so either side can be upgraded first.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::Value;

/// Content type of every message ingest publishes.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// Header: when ingest received the events, in microseconds since the Unix epoch.
pub const HEADER_RECEIVED_AT: &str = "x-received-at-us";
/// Header: how many events the body carries.
pub const HEADER_EVENT_COUNT: &str = "x-event-count";
/// Header: the source (the write key's name) of each event, in body order, as runs:
/// `[source, count, source, count, …]`. Absent when no event came with a source.
pub const HEADER_SOURCES: &str = "x-sources";
/// Longest source name.
pub const MAX_SOURCE_LEN: usize = 64;
/// Header on dead-lettered messages: why the worker refused them.
pub const HEADER_DEAD_LETTER_REASON: &str = "x-dedup-error";
/// Content encoding of lz4-compressed bodies.
pub const ENCODING_LZ4: &str = "lz4";
/// Most bytes of events ingest packs into one message: a pack takes another event only while
/// it stays under this.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Largest body a message may have or expand to: a full pack, or one event up to ingest's body
/// limit alone. The worker refuses larger messages (dead-lettered unread) rather than
/// allocate them, so its memory is bounded by prefetch × this.
pub const MAX_DECODED_BYTES: usize = 2 << 20;
/// AMQP delivery mode that makes the broker write the message to disk.
const PERSISTENT: u8 = 2;

/// One event's JSON text as an NDJSON line. Compact text (what clients normally send) is
/// copied as it is; text spread over several lines is re-serialised compactly.
pub fn ndjson_line(text: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = Vec::with_capacity(text.len() + 1);
    push_text(&mut line, text)?;
    Ok(line)
}

/// Appends one event's JSON text to `body` as one NDJSON line, as [`ndjson_line`] makes it.
fn push_text(body: &mut Vec<u8>, text: &[u8]) -> Result<(), serde_json::Error> {
    let trimmed = text.trim_ascii();
    if trimmed.contains(&b'\n') {
        let value: Value = serde_json::from_slice(trimmed)?;
        serde_json::to_writer(&mut *body, &value)?;
    } else {
        body.extend_from_slice(trimmed);
    }
    body.push(b'\n');
    Ok(())
}

/// Whether `name` may name a source: 1 to [`MAX_SOURCE_LEN`] ASCII letters, digits, `_`, `-`
/// or `.`, the first a letter or digit. A source name travels in a header, a metric label and
/// a text column, so nothing else is allowed.
pub fn is_source_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=MAX_SOURCE_LEN).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The source of each event of a message, in body order, kept as runs (events from one
/// request, or from one client under load, come in long runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// `("", n)` is a run of `n` events without a source.
    runs: Vec<(String, u32)>,
}

impl Sources {
    /// No sources (the events came without any).
    pub const fn none() -> Self {
        Self { runs: Vec::new() }
    }

    fn push(&mut self, source: Option<&str>) {
        let name = source.unwrap_or("");
        match self.runs.last_mut() {
            Some((last, n)) if last == name => *n += 1,
            _ => self.runs.push((name.to_owned(), 1)),
        }
    }

    /// The header value, or `None` when no event has a source.
    fn header(&self) -> Option<AMQPValue> {
        if self.runs.iter().all(|(name, _)| name.is_empty()) {
            return None;
        }
        let values: Vec<AMQPValue> = self
            .runs
            .iter()
            .flat_map(|(name, n)| {
                [
                    AMQPValue::LongString(name.as_str().into()),
                    AMQPValue::LongUInt(*n),
                ]
            })
            .collect();
        Some(AMQPValue::FieldArray(values.into()))
    }

    /// The sources a delivered message names. A header that is not a list of runs yields no
    /// sources, and a name that is not a source name ([`is_source_name`]) counts as none:
    /// anyone who can publish to the queue can write headers.
    pub fn read(properties: &BasicProperties) -> Self {
        let Some(AMQPValue::FieldArray(values)) = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(HEADER_SOURCES))
        else {
            return Self::default();
        };
        let mut runs = Vec::new();
        for pair in values.as_slice().chunks(2) {
            let (name, n) = match pair {
                [AMQPValue::LongString(name), AMQPValue::LongUInt(n)] => (name, *n),
                _ => return Self::default(),
            };
            let name = String::from_utf8_lossy(name.as_bytes());
            let name = if is_source_name(&name) {
                name.into_owned()
            } else {
                String::new()
            };
            runs.push((name, n));
        }
        Self { runs }
    }

    /// Each event's source in body order, then `None` for any events past the runs.
    pub fn per_event(&self) -> impl Iterator<Item = Option<&str>> {
        self.runs
            .iter()
            .flat_map(|(name, n)| {
                let source = (!name.is_empty()).then_some(name.as_str());
                std::iter::repeat_n(source, *n as usize)
            })
            .chain(std::iter::repeat(None))
    }
}

/// One message of events on its way to the queue.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    body: Vec<u8>,
    events: usize,
    /// When ingest received the earliest of the events.
    received_at: Option<DateTime<Utc>>,
    /// The `traceparent` of every request whose events this carries, each once.
    traceparents: Vec<String>,
    sources: Sources,
}

impl Envelope {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an event whose line is `line_len` bytes may join: the envelope holds fewer than
    /// `max_events` events and stays within [`MAX_MESSAGE_BYTES`]. An empty envelope takes any
    /// one event (its size is bounded by ingest's body limit, below [`MAX_DECODED_BYTES`]).
    pub fn has_room(&self, line_len: usize, max_events: usize) -> bool {
        self.events == 0
            || (self.events < max_events.max(1) && self.body.len() + line_len <= MAX_MESSAGE_BYTES)
    }

    /// Adds one event's JSON text as an NDJSON line ([`ndjson_line`]); nothing is added when
    /// the text does not re-serialise.
    pub fn push(
        &mut self,
        text: &[u8],
        received_at: DateTime<Utc>,
        traceparent: Option<&str>,
        source: Option<&str>,
    ) -> Result<(), serde_json::Error> {
        let len = self.body.len();
        if let Err(e) = push_text(&mut self.body, text) {
            self.body.truncate(len);
            return Err(e);
        }
        self.count(received_at, traceparent, source);
        Ok(())
    }

    /// Adds a line [`ndjson_line`] made (compact, newline-terminated) as it is.
    pub fn push_line(
        &mut self,
        line: &[u8],
        received_at: DateTime<Utc>,
        traceparent: Option<&str>,
        source: Option<&str>,
    ) {
        self.body.extend_from_slice(line);
        self.count(received_at, traceparent, source);
    }

    /// Counts the event just written, its received time, its request's trace and its source.
    fn count(
        &mut self,
        received_at: DateTime<Utc>,
        traceparent: Option<&str>,
        source: Option<&str>,
    ) {
        self.events += 1;
        self.sources.push(source);
        self.received_at = Some(
            self.received_at
                .map_or(received_at, |at| at.min(received_at)),
        );
        if let Some(traceparent) = traceparent
            && !self.traceparents.iter().any(|t| t == traceparent)
        {
            self.traceparents.push(traceparent.to_owned());
        }
    }

    /// How many events it carries.
    pub fn events(&self) -> usize {
        self.events
    }

    /// The NDJSON body, uncompressed.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Empties it for the next pack, keeping its allocation.
    pub fn clear(&mut self) {
        self.body.clear();
        self.events = 0;
        self.received_at = None;
        self.traceparents.clear();
        self.sources.runs.clear();
    }

    /// The bytes to publish and every property: persistent, content type and encoding, the
    /// received time, the event count, the trace links and the sources.
    pub fn seal(&self, compression: Compression) -> (Cow<'_, [u8]>, BasicProperties) {
        let (bytes, encoding) = encode(&self.body, compression);
        let mut properties =
            Self::properties(self.received_at.unwrap_or_else(Utc::now), self.events);
        if let Some(encoding) = encoding {
            properties = properties.with_content_encoding(encoding.into());
        }
        if let Some(first) = self.traceparents.first() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                crate::trace_context::HEADER_TRACEPARENT.into(),
                AMQPValue::LongString(first.as_str().into()),
            );
            if self.traceparents.len() > 1 {
                let all: Vec<AMQPValue> = self
                    .traceparents
                    .iter()
                    .map(|t| AMQPValue::LongString(t.as_str().into()))
                    .collect();
                headers.insert(
                    crate::trace_context::HEADER_TRACEPARENTS.into(),
                    AMQPValue::FieldArray(all.into()),
                );
            }
            properties = properties.with_headers(headers);
        }
        if let Some(sources) = self.sources.header() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(HEADER_SOURCES.into(), sources);
            properties = properties.with_headers(headers);
        }
        (bytes, properties)
    }

    /// Properties for a message of `count` events received at `received_at`, without trace
    /// links or content encoding (for a body built elsewhere, such as a test's hostile one).
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

    /// A delivered body as NDJSON, decompressed according to its content encoding. The error says
    /// why it cannot be read (the message then goes to the dead-letter queue whole).
    pub fn open<'a>(data: &'a [u8], properties: &BasicProperties) -> Result<Cow<'a, [u8]>, String> {
        match properties.content_encoding().as_ref().map(|e| e.as_str()) {
            None | Some("") | Some("identity") if data.len() > MAX_DECODED_BYTES => Err(format!(
                "body of {} bytes, more than the {MAX_DECODED_BYTES} allowed",
                data.len()
            )),
            None | Some("") | Some("identity") => Ok(Cow::Borrowed(data)),
            Some(ENCODING_LZ4) => {
                let (size, packed) = lz4_flex::block::uncompressed_size(data)
                    .map_err(|e| format!("lz4 body without its length: {e}"))?;
                if size > MAX_DECODED_BYTES {
                    return Err(format!(
                        "lz4 body claims {size} bytes, more than the {MAX_DECODED_BYTES} allowed"
                    ));
                }
                let mut out = vec![0; size];
                let written = lz4_flex::block::decompress_into(packed, &mut out)
                    .map_err(|e| format!("corrupt lz4 body: {e}"))?;
                if written != size {
                    return Err(format!(
                        "corrupt lz4 body: {written} bytes decoded, {size} announced"
                    ));
                }
                Ok(Cow::Owned(out))
            }
            Some(other) => Err(format!(
                "unsupported content encoding {other:?} (ingest sends lz4 or none)"
            )),
        }
    }

    /// How many events a delivered message says it carries (1 when it does not say).
    pub fn event_count(properties: &BasicProperties) -> usize {
        match properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(HEADER_EVENT_COUNT))
        {
            Some(AMQPValue::LongLongInt(n)) => usize::try_from(*n).unwrap_or(1).max(1),
            _ => 1,
        }
    }
}

/// Properties of a dead letter: persistent, opaque bytes, and why the worker refused them.
pub fn dead_letter_properties(reason: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_DEAD_LETTER_REASON.into(),
        AMQPValue::LongString(reason.into()),
    );
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from("application/octet-stream"))
        .with_headers(headers)
}

/// How ingest compresses message bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    /// Plain NDJSON.
    None,
    /// lz4 (block format, length first).
    #[default]
    Lz4,
}

/// The bytes to publish for `body` and their content encoding. A body compression would not
/// shrink goes as it is.
fn encode(body: &[u8], compression: Compression) -> (Cow<'_, [u8]>, Option<&'static str>) {
    match compression {
        Compression::None => (Cow::Borrowed(body), None),
        Compression::Lz4 => {
            let packed = lz4_flex::block::compress_prepend_size(body);
            if packed.len() < body.len() {
                (Cow::Owned(packed), Some(ENCODING_LZ4))
            } else {
                (Cow::Borrowed(body), None)
            }
        }
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
        let a = json!({"sid": "a\nb", "n": 1});
        let b = json!({"sid": "c"});
        let mut body = Vec::new();
        push_text(&mut body, a.to_string().as_bytes()).unwrap();
        push_text(
            &mut body,
            serde_json::to_string_pretty(&b).unwrap().as_bytes(),
        )
        .unwrap();
        let back: Vec<Value> = lines(&body)
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(back, [a, b]);
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
        let props = Envelope::properties(at, 3);
        assert_eq!(Envelope::received_at(&props), Some(at));
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(Envelope::received_at(&BasicProperties::default()), None);
    }

    fn encoded(encoding: &str) -> BasicProperties {
        BasicProperties::default().with_content_encoding(encoding.into())
    }

    /// A compressible body is sent lz4-compressed and comes back byte for byte; one that would
    /// not shrink, or with compression off, goes plain.
    #[test]
    fn bodies_round_trip_through_lz4() {
        let mut body = Vec::new();
        for i in 0..20 {
            let event = json!({"sid": format!("s{i}"), "event_name": "app_list", "r": "x"});
            push_text(&mut body, event.to_string().as_bytes()).unwrap();
        }
        let (packed, encoding) = encode(&body, Compression::Lz4);
        assert_eq!(encoding, Some(ENCODING_LZ4));
        assert!(
            packed.len() < body.len() / 2,
            "{} of {}",
            packed.len(),
            body.len()
        );
        assert_eq!(
            Envelope::open(&packed, &encoded(ENCODING_LZ4)).unwrap(),
            &body[..]
        );

        let (plain, encoding) = encode(&body, Compression::None);
        assert_eq!((&plain[..], encoding), (&body[..], None));
        assert_eq!(
            Envelope::open(&plain, &BasicProperties::default()).unwrap(),
            &body[..]
        );

        let tiny = b"{}\n";
        let (same, encoding) = encode(tiny, Compression::Lz4);
        assert_eq!((&same[..], encoding), (&tiny[..], None));
    }

    /// Bodies that cannot be read say why instead of being guessed at or allocated blindly.
    #[test]
    fn unreadable_bodies_are_refused_with_the_reason() {
        let lz4 = encoded(ENCODING_LZ4);
        let body = b"{\"sid\":\"a\"}\n".repeat(50);
        let (packed, _) = encode(&body, Compression::Lz4);
        let mut corrupt = packed.to_vec();
        corrupt.truncate(corrupt.len() / 2);
        assert!(
            Envelope::open(&corrupt, &lz4)
                .unwrap_err()
                .contains("corrupt lz4 body")
        );
        assert!(
            Envelope::open(b"ab", &lz4)
                .unwrap_err()
                .contains("without its length")
        );
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"xxxx");
        assert!(
            Envelope::open(&huge, &lz4)
                .unwrap_err()
                .contains("more than")
        );
        let gzip = Envelope::open(b"....", &encoded("gzip")).unwrap_err();
        assert!(
            gzip.contains("unsupported content encoding \"gzip\""),
            "{gzip}"
        );
    }

    /// An envelope takes events while under its event and byte caps; an empty one takes any
    /// single event, however large.
    #[test]
    fn envelopes_have_room_within_both_caps() {
        let mut envelope = Envelope::new();
        assert!(
            envelope.has_room(MAX_MESSAGE_BYTES * 2, 3),
            "empty takes any event"
        );
        let at = Utc::now();
        for _ in 0..2 {
            envelope.push_line(b"{}\n", at, None, None);
        }
        assert!(envelope.has_room(10, 3));
        assert!(
            !envelope.has_room(MAX_MESSAGE_BYTES, 3),
            "past the byte cap"
        );
        envelope.push_line(b"{}\n", at, None, None);
        assert!(!envelope.has_room(3, 3), "at the event cap");
        assert!(
            !envelope.has_room(3, 0),
            "a cap of 0 packs one event per message"
        );
        envelope.clear();
        assert_eq!((envelope.events(), envelope.body()), (0, &b""[..]));
    }

    /// Text that does not re-serialise leaves the envelope as it was.
    #[test]
    fn a_refused_event_adds_nothing() {
        let mut envelope = Envelope::new();
        envelope.push(b"{\"a\":1}", Utc::now(), None, None).unwrap();
        assert!(
            envelope
                .push(b"{\n\"a\": [}", Utc::now(), None, None)
                .is_err()
        );
        assert_eq!(envelope.events(), 1);
        assert_eq!(envelope.body(), b"{\"a\":1}\n");
    }

    /// Sealing writes every header: persistent, content type and encoding, the earliest
    /// received time, the count, and each request's traceparent once; the worker's readers
    /// get them back.
    #[test]
    fn sealed_envelopes_carry_every_header() {
        let early = DateTime::from_timestamp_micros(1_744_287_299_000_001).unwrap();
        let late = DateTime::from_timestamp_micros(1_744_287_299_500_000).unwrap();
        let a = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let b = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut envelope = Envelope::new();
        for (i, (at, trace)) in [
            (late, Some(a)),
            (early, Some(b)),
            (late, Some(a)),
            (late, None),
        ]
        .into_iter()
        .enumerate()
        {
            let event = json!({"sid": format!("s{i}"), "event_name": "app_list", "r": "x"});
            envelope
                .push(event.to_string().as_bytes(), at, trace, None)
                .unwrap();
        }
        let (bytes, properties) = envelope.seal(Compression::Lz4);
        assert_eq!(properties.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            properties.content_type().as_ref().map(|t| t.as_str()),
            Some(CONTENT_TYPE)
        );
        assert_eq!(Envelope::event_count(&properties), 4);
        assert_eq!(Envelope::received_at(&properties), Some(early));
        assert_eq!(
            Envelope::open(&bytes, &properties).unwrap(),
            envelope.body()
        );
        let links = crate::trace_context::extract(&properties);
        let ids: Vec<String> = links.iter().map(|c| c.trace_id().to_string()).collect();
        assert_eq!(
            ids,
            [
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "0af7651916cd43dd8448eb211c80319c"
            ]
        );
        let headers = properties.headers().clone().unwrap();
        match headers
            .inner()
            .get(crate::trace_context::HEADER_TRACEPARENTS)
        {
            Some(AMQPValue::FieldArray(all)) => assert_eq!(all.as_slice().len(), 2),
            other => panic!("{other:?}"),
        }
        // One request, one traceparent: no list.
        let mut single = Envelope::new();
        single.push_line(b"{}\n", early, Some(a), None);
        let (_, properties) = single.seal(Compression::None);
        let headers = properties.headers().clone().unwrap();
        assert!(!headers.contains_key(crate::trace_context::HEADER_TRACEPARENTS));
        assert_eq!(Envelope::event_count(&BasicProperties::default()), 1);
    }

    /// Each event's source comes back in body order; messages without sources carry no header,
    /// and hostile headers name no source.
    #[test]
    fn sources_travel_with_their_events() {
        let mut envelope = Envelope::new();
        let at = Utc::now();
        for source in [Some("web"), Some("web"), Some("ios"), None, Some("web")] {
            envelope.push_line(b"{}\n", at, None, source);
        }
        let (_, properties) = envelope.seal(Compression::None);
        let sources = Sources::read(&properties);
        let each: Vec<Option<&str>> = sources.per_event().take(7).collect();
        assert_eq!(
            each,
            [
                Some("web"),
                Some("web"),
                Some("ios"),
                None,
                Some("web"),
                None,
                None
            ]
        );

        envelope.clear();
        envelope.push_line(b"{}\n", at, None, None);
        let (_, properties) = envelope.seal(Compression::None);
        assert!(
            !properties
                .headers()
                .clone()
                .unwrap()
                .contains_key(HEADER_SOURCES)
        );
        assert_eq!(Sources::read(&properties).per_event().next(), Some(None));

        let hostile = |values: Vec<AMQPValue>| {
            let mut headers = FieldTable::default();
            headers.insert(HEADER_SOURCES.into(), AMQPValue::FieldArray(values.into()));
            let properties = BasicProperties::default().with_headers(headers);
            let sources = Sources::read(&properties);
            let each: Vec<Option<String>> = sources
                .per_event()
                .take(2)
                .map(|s| s.map(str::to_owned))
                .collect();
            each
        };
        let name = |s: &str| AMQPValue::LongString(s.into());
        assert_eq!(
            hostile(vec![
                name("a\u{0}b"),
                AMQPValue::LongUInt(1),
                name("ok"),
                AMQPValue::LongUInt(1)
            ]),
            [None, Some("ok".to_owned())]
        );
        assert_eq!(
            hostile(vec![name("web")]),
            [None, None],
            "a run without its count"
        );
        assert_eq!(
            hostile(vec![AMQPValue::LongUInt(1), name("web")]),
            [None, None]
        );
    }

    #[test]
    fn source_names_are_narrow() {
        for good in [
            "web",
            "ios-app",
            "a",
            "team.web_2",
            &"x".repeat(MAX_SOURCE_LEN),
        ] {
            assert!(is_source_name(good), "{good}");
        }
        for bad in [
            "",
            "-web",
            ".x",
            "a b",
            "é",
            "a\u{0}",
            "a\"b",
            &"x".repeat(MAX_SOURCE_LEN + 1),
        ] {
            assert!(!is_source_name(bad), "{bad:?}");
        }
    }

    /// A dead letter is persistent and says why.
    #[test]
    fn dead_letters_carry_their_reason() {
        let properties = dead_letter_properties("invalid_json: expected value");
        assert_eq!(properties.delivery_mode(), &Some(PERSISTENT));
        let headers = properties.headers().clone().unwrap();
        assert_eq!(
            headers.inner().get(HEADER_DEAD_LETTER_REASON),
            Some(&AMQPValue::LongString(
                "invalid_json: expected value".into()
            ))
        );
    }
}
