//! An event's text in the member order PostgreSQL's `jsonb` keeps, so the insert need not sort.
//!
//! `jsonb` sorts every object's members on input (shorter names first, equal lengths bytewise)
//! and keeps the last of a repeated name. Input already in that order passes the sort's
//! presorted check at once, where a client's order costs a full sort per row; the value stored
//! is the same either way.

use std::borrow::Cow;

use dedup_event::event::RawEvent;

/// `text` (the text `event` was parsed from) with its members in `jsonb` order, a repeated
/// name once with its last value. Borrows `text` when it is already in order.
pub fn ordered<'a>(event: &RawEvent<'a>, text: &'a str) -> Cow<'a, str> {
    let members = event.members();
    let in_order = members
        .windows(2)
        .all(|pair| name_order(&pair[0].0, &pair[1].0).is_lt());
    if in_order {
        return Cow::Borrowed(text.trim());
    }
    // Stable: of a repeated name, the last copy ends last in its run and is the one kept.
    let mut sorted: Vec<_> = members.iter().collect();
    sorted.sort_by(|a, b| name_order(&a.0, &b.0));
    let mut out = String::with_capacity(text.len());
    out.push('{');
    for (i, (name, value)) in sorted.iter().enumerate() {
        if sorted.get(i + 1).is_some_and(|next| next.0 == *name) {
            continue;
        }
        if out.len() > 1 {
            out.push(',');
        }
        match name {
            // Borrowed names had no escapes: their text is the name itself.
            Cow::Borrowed(plain) => {
                out.push('"');
                out.push_str(plain);
                out.push('"');
            }
            Cow::Owned(unescaped) => {
                out.push_str(&serde_json::to_string(unescaped).unwrap_or_else(|_| "\"\"".into()))
            }
        }
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Cow::Owned(out)
}

/// How `jsonb` orders object member names: by length in bytes, then bytewise.
fn name_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use dedup_event::event::parse_raw;
    use serde_json::Value;

    use super::*;

    fn names(text: &str) -> Vec<String> {
        parse_raw(text.as_bytes())
            .expect("ordered text is a valid event")
            .members()
            .iter()
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Members come out shorter names first, then bytewise, the last copy of a repeated name
    /// kept, values untouched (nested objects too), names with escapes re-escaped; it is the
    /// same JSON value (serde_json keeps the last copy of a name, as jsonb does).
    #[test]
    fn jsonb_order_sorts_members_like_jsonb_and_keeps_the_value() {
        let text = r#" {"sid":"s","r":"1","event_name":"e","product_id":"p","client_id":"c","event_datetime":"2025-04-10T12:00:00Z","zz":{"b":1,"a":[2, 3]},"aa":"first","aa":"last","a\"q":"quote","\u00e9":"e-acute","b":null} "#;
        let event = parse_raw(text.as_bytes()).expect("valid");
        let ordered = ordered(&event, text);
        assert!(matches!(ordered, Cow::Owned(_)));
        assert_eq!(
            names(&ordered),
            [
                "b",
                "r",
                "aa",
                "zz",
                "é",
                "a\"q",
                "sid",
                "client_id",
                "event_name",
                "product_id",
                "event_datetime"
            ]
        );
        assert!(ordered.contains(r#""aa":"last""#) && !ordered.contains("first"));
        assert!(ordered.contains(r#""zz":{"b":1,"a":[2, 3]}"#), "{ordered}");
        assert_eq!(
            serde_json::from_str::<Value>(&ordered).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    /// Text already in jsonb order is borrowed as it is (trimmed), not rebuilt.
    #[test]
    fn jsonb_ordered_text_is_borrowed() {
        let text = r#"{"r":"1","sid":"s","client_id":"c","event_name":"e","product_id":"p","event_datetime":"2025-04-10T12:00:00Z"}
"#;
        let event = parse_raw(text.as_bytes()).expect("valid");
        assert_eq!(ordered(&event, text), Cow::Borrowed(text.trim()));
        // A repeated name is out of order even when sorted: it must be rebuilt to drop one.
        let repeated = r#"{"r":"1","r":"2","sid":"s","client_id":"c","event_name":"e","product_id":"p","event_datetime":"2025-04-10T12:00:00Z"}"#;
        let event = parse_raw(repeated.as_bytes()).expect("valid");
        let ordered = ordered(&event, repeated);
        assert!(matches!(ordered, Cow::Owned(_)));
        assert!(ordered.starts_with(r#"{"r":"2","sid""#), "{ordered}");
    }
}
