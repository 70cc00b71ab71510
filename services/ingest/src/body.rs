//! Reading request bodies: content types, size limits, and splitting a batch (JSON array or
//! NDJSON) into items, each judged on its own.

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// What a request declared its body to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    NdJson,
}

/// The body kind from `Content-Type`; a missing header means JSON, as old clients assume.
pub fn kind(headers: &HeaderMap, allow_ndjson: bool) -> Result<BodyKind> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Json);
    };
    let text = value.to_str().unwrap_or_default();
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        e if e.starts_with("application/") && e.ends_with("+json") => Ok(BodyKind::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines"
            if allow_ndjson =>
        {
            Ok(BodyKind::NdJson)
        }
        _ => Err(Error::UnsupportedMediaType(text.to_owned())),
    }
}

/// Reads a body of at most `limit` bytes into one buffer sized from its announced length, so
/// a body costs its own size once (collecting chunks and joining them would hold it twice);
/// a longer one is 413 as soon as it passes the limit.
pub async fn read_limited(
    body: axum::body::Body,
    limit: usize,
    announced: Option<usize>,
) -> Result<Bytes> {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, limit);
    let mut out = Vec::with_capacity(announced.unwrap_or(0).min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Error::BodyTooLarge { limit }
            } else {
                Error::MalformedJson(format!("could not read the request body: {e}"))
            }
        })?;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}

/// The items of a batch body, each the text of one event, judged later on its own. A JSON
/// array that does not parse fails as a whole (no item boundaries can be trusted); an NDJSON
/// line that is not JSON fails alone, when it is validated.
/// Stops counting at `max_events + 1`, so a body of a million tiny items costs no more than
/// one at the limit.
pub fn batch(bytes: &[u8], kind: BodyKind, max_events: usize) -> Result<Vec<&[u8]>> {
    let items: Vec<&[u8]> = match kind {
        BodyKind::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let items =
                serde::de::DeserializeSeed::deserialize(Items { limit: max_events }, &mut de)
                    .and_then(|items| de.end().map(|()| items));
            match items {
                Ok(items) => items,
                Err(e) if e.to_string().starts_with(TOO_MANY) => {
                    return Err(Error::TooManyEvents {
                        count: max_events + 1,
                        limit: max_events,
                    });
                }
                // Say why: not JSON at all, or JSON but not an array.
                Err(_) => {
                    return Err(match serde_json::from_slice::<IgnoredAny>(bytes) {
                        Err(e) => Error::MalformedJson(e.to_string()),
                        Ok(_) => Error::MalformedJson(
                            "a batch must be a JSON array of events, or NDJSON with \
                             Content-Type: application/x-ndjson"
                                .to_owned(),
                        ),
                    });
                }
            }
        }
        BodyKind::NdJson => dedup_message::message::lines(bytes)
            .take(max_events.saturating_add(1))
            .collect(),
    };
    if items.len() > max_events {
        return Err(Error::TooManyEvents {
            count: items.len(),
            limit: max_events,
        });
    }
    if items.is_empty() {
        return Err(Error::EmptyBatch);
    }
    Ok(items)
}

/// The start of the error a JSON array with too many items stops with.
const TOO_MANY: &str = "more items than the batch limit";

/// A JSON array's items as their own text, refused past `limit` items.
struct Items {
    limit: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Items {
    type Value = Vec<&'de [u8]>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Items {
    type Value = Vec<&'de [u8]>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if items.len() == self.limit {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            items.push(item.get().as_bytes());
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(ct) = content_type {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        h
    }

    #[test]
    fn content_types_map_to_body_kinds() {
        let cases = [
            (None, true, Some(BodyKind::Json)),
            (Some("application/json"), false, Some(BodyKind::Json)),
            (
                Some("Application/JSON; charset=utf-8"),
                false,
                Some(BodyKind::Json),
            ),
            (
                Some("application/vnd.events+json"),
                false,
                Some(BodyKind::Json),
            ),
            (Some("application/x-ndjson"), true, Some(BodyKind::NdJson)),
            (Some("application/x-ndjson"), false, None),
            (Some("text/plain"), true, None),
            (Some("application/x-www-form-urlencoded"), false, None),
        ];
        for (ct, ndjson, want) in cases {
            assert_eq!(
                kind(&headers(ct), ndjson).ok(),
                want,
                "{ct:?} ndjson={ndjson}"
            );
        }
    }

    #[test]
    fn ndjson_lines_are_split_and_blank_lines_skipped() {
        let items = batch(
            b"{\"a\":1}\n\nnot json\n {\"b\":2}\r\n",
            BodyKind::NdJson,
            10,
        )
        .unwrap();
        assert_eq!(items, [&b"{\"a\":1}"[..], b"not json", b" {\"b\":2}\r"]);
    }

    #[test]
    fn array_items_are_their_own_text() {
        let items = batch(
            b"[ {\"a\": [1, 2]} ,\n{\"b\":\"]\"}, 5 ]",
            BodyKind::Json,
            10,
        )
        .unwrap();
        assert_eq!(items, [&b"{\"a\": [1, 2]}"[..], b"{\"b\":\"]\"}", b"5"]);
    }

    #[test]
    fn batch_limits_and_shapes_are_enforced() {
        assert!(matches!(
            batch(b"[1,2,3]", BodyKind::Json, 2),
            Err(Error::TooManyEvents { count: 3, limit: 2 })
        ));
        assert!(matches!(
            batch(b"a\nb\nc\n", BodyKind::NdJson, 2),
            Err(Error::TooManyEvents { .. })
        ));
        assert!(matches!(
            batch(b"[]", BodyKind::Json, 2),
            Err(Error::EmptyBatch)
        ));
        assert!(matches!(
            batch(b"\n\n", BodyKind::NdJson, 2),
            Err(Error::EmptyBatch)
        ));
        assert!(matches!(
            batch(b"{\"a\":1}", BodyKind::Json, 2),
            Err(Error::MalformedJson(_))
        ));
        assert!(matches!(
            batch(b"[{", BodyKind::Json, 2),
            Err(Error::MalformedJson(_))
        ));
    }
}
