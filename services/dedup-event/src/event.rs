//! One product event as the original service validated it: required fields, their limits and
//! its error messages, so existing clients see the same answers.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::{datetime, storable};

/// Field name → messages, the shape the original answered 400 with
/// (`{"sid": ["This field is required."]}`).
pub type FieldErrors = BTreeMap<String, Vec<String>>;

/// The key under which errors about the body as a whole are reported.
pub const NON_FIELD_ERRORS: &str = "non_field_errors";

/// The required string fields and their maximum length in characters, as the original declared
/// them. `client_id` alone may be null.
pub const STRING_FIELDS: [(&str, usize); 5] = [
    ("client_id", 64),
    ("event_name", 255),
    ("product_id", 36),
    ("sid", 128),
    ("r", 128),
];

/// The required fields of an event, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    pub client_id: Option<String>,
    pub event_datetime: DateTime<Utc>,
    pub event_name: String,
    pub product_id: String,
    pub sid: String,
    pub r: String,
}

/// Why a raw body is not a valid event.
#[derive(Debug, Clone, PartialEq)]
pub enum RawError {
    /// Not JSON at all: the parser's message.
    Malformed(String),
    /// JSON, but not a valid event.
    Invalid(FieldErrors),
}

/// An event read from JSON text without building its whole tree: its required fields,
/// validated, and a borrowed view of every other field.
pub struct RawEvent<'a> {
    pub fields: Fields,
    object: RawObject<'a>,
}

impl<'a> RawEvent<'a> {
    /// Any member's JSON text (the last one when a name repeats).
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.object.get(name)
    }

    /// Every member's name (unescaped) and JSON text, in text order, repeats included.
    pub fn members(&self) -> &[(Cow<'a, str>, &'a RawValue)] {
        &self.object.0
    }
}

/// A JSON object's members in text order, values left unparsed. A list, not a hash map: an
/// event has a few dozen members and only a handful are ever looked up, so hashing every name
/// would cost more than the rest of the parse.
struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawObject<'a> {
    /// The member's text; the last one wins when a name repeats, as in a map.
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(member, _)| member == name)
            .map(|(_, raw)| *raw)
    }

    /// Every member PostgreSQL could not store, with the reason, under the member's name.
    fn unstorable(&self) -> FieldErrors {
        let mut errors = FieldErrors::new();
        for (name, value) in &self.0 {
            if let Err(why) = storable::check_name(name) {
                errors.insert(
                    NON_FIELD_ERRORS.to_owned(),
                    vec![format!("A member name: {}", why.message())],
                );
            } else if let Err(why) = storable::check(value.get().as_bytes(), 1) {
                errors.insert(name.to_string(), vec![why.message()]);
            }
        }
        errors
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Members<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(64));
                while let Some((Name(name), value)) = map.next_entry()? {
                    members.push((name, value));
                }
                Ok(RawObject(members))
            }
        }
        deserializer.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// A member name borrowed from the text when it has no escapes (serde's own `Cow<str>` always
/// allocates, which would cost one allocation per member of every event).
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Name<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(name.to_owned())))
            }
        }
        deserializer.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

/// Reads and validates one event from JSON text, parsing only the fields it needs (the hot
/// path of ingest and the worker, where the text itself is what travels on and is stored).
/// Every member is checked against what PostgreSQL can store, so a valid event is a storable
/// one.
pub fn parse_raw(bytes: &[u8]) -> Result<RawEvent<'_>, RawError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_raw_str(text),
        // Valid JSON is valid UTF-8: the full parser says where it is not.
        Err(_) => Err(not_an_event(serde_json::from_slice::<Value>(bytes))),
    }
}

/// [`parse_raw`] of text already known to be UTF-8. The whole text is checked once here, not
/// again piece by piece while parsing (which `from_slice` does for every string and raw value).
pub fn parse_raw_str(text: &str) -> Result<RawEvent<'_>, RawError> {
    match serde_json::from_str::<RawObject<'_>>(text) {
        Ok(object) => {
            let mut errors = object.unstorable();
            match validate_fields(|name| object.get(name)) {
                Ok(fields) if errors.is_empty() => return Ok(RawEvent { fields, object }),
                Ok(_) => {}
                Err(field_errors) => {
                    for (name, messages) in field_errors {
                        errors.entry(name).or_insert(messages);
                    }
                }
            }
            Err(RawError::Invalid(errors))
        }
        // Not an object, or not JSON: the full parser gives the original's messages.
        Err(_) => Err(not_an_event(serde_json::from_str::<Value>(text))),
    }
}

/// The error for text that is not a JSON object, from the full parser's verdict on it.
fn not_an_event(parsed: serde_json::Result<Value>) -> RawError {
    match parsed {
        Err(e) => RawError::Malformed(e.to_string()),
        Ok(Value::Null) => RawError::Invalid(non_field_error("No data provided")),
        Ok(other) => RawError::Invalid(non_field_error(&format!(
            "Invalid data. Expected a dictionary, but got {}.",
            python_type_name(&other)
        ))),
    }
}

/// [`parse_raw`] when only the verdict and the required fields matter.
pub fn validate_raw(bytes: &[u8]) -> Result<Fields, RawError> {
    parse_raw(bytes).map(|raw| raw.fields)
}

impl Fields {
    /// A required string field's normalised value (`None` for a null `client_id`), or `None`
    /// for a field that is not one of [`STRING_FIELDS`].
    pub fn required_field(&self, name: &str) -> Option<Option<&str>> {
        match name {
            "client_id" => Some(self.client_id.as_deref()),
            "event_name" => Some(Some(&self.event_name)),
            "product_id" => Some(Some(&self.product_id)),
            "sid" => Some(Some(&self.sid)),
            "r" => Some(Some(&self.r)),
            _ => None,
        }
    }

    /// The UTC day of `event_datetime`: the partition the event is stored in. It comes from the
    /// event itself, never from arrival time, so a retried event lands in the same partition.
    pub fn event_date(&self) -> NaiveDate {
        self.event_datetime.date_naive()
    }
}

/// The rules for the required fields, over a lookup of each member's text.
fn validate_fields<'a>(get: impl Fn(&str) -> Option<&'a RawValue>) -> Result<Fields, FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut strings: [Option<String>; 5] = Default::default();
    for (slot, (name, max_len)) in strings.iter_mut().zip(STRING_FIELDS) {
        let allow_null = name == "client_id";
        match string_field(get(name), max_len, allow_null) {
            Ok(value) => *slot = value,
            Err(message) => {
                errors.insert(name.to_owned(), vec![message]);
            }
        }
    }
    let event_datetime = match get("event_datetime").map(|raw| Json::of(raw.get())) {
        None => Err(REQUIRED.to_owned()),
        Some(Json::Null) => Err(NOT_NULL.to_owned()),
        Some(Json::String(text)) => {
            datetime::parse(&text).ok_or_else(|| datetime::WRONG_FORMAT.into())
        }
        Some(_) => Err(datetime::WRONG_FORMAT.to_owned()),
    };
    let event_datetime = match event_datetime {
        Ok(at) => Some(at),
        Err(message) => {
            errors.insert("event_datetime".to_owned(), vec![message]);
            None
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let [client_id, event_name, product_id, sid, r] = strings;
    match (event_datetime, event_name, product_id, sid, r) {
        (Some(event_datetime), Some(event_name), Some(product_id), Some(sid), Some(r)) => {
            Ok(Fields {
                client_id,
                event_datetime,
                event_name,
                product_id,
                sid,
                r,
            })
        }
        // Unreachable: a required field without a value has an error recorded above.
        _ => Err(non_field_error("Invalid data.")),
    }
}

/// A member's JSON text by kind: strings unescaped, numbers as their exact text.
pub(crate) enum Json<'a> {
    Null,
    String(Cow<'a, str>),
    Number(&'a str),
    Other,
}

impl<'a> Json<'a> {
    pub(crate) fn of(text: &'a str) -> Self {
        match text.as_bytes().first() {
            Some(b'n') => Json::Null,
            Some(b'"') => match serde_json::from_str::<Cow<'a, str>>(text) {
                Ok(s) => Json::String(s),
                Err(_) => Json::Other,
            },
            Some(b'-' | b'0'..=b'9') => Json::Number(text),
            _ => Json::Other,
        }
    }
}

const REQUIRED: &str = "This field is required.";
const NOT_NULL: &str = "This field may not be null.";
const BLANK: &str = "This field may not be blank.";
const NOT_A_STRING: &str = "Not a valid string.";

/// One string field the way DRF's `CharField` read it: surrounding white space is trimmed,
/// blank is refused, length counts characters. A number becomes its exact text as sent (no
/// float rounding: `18446744073709551617` stays itself); any other non-string is refused.
fn string_field(
    value: Option<&RawValue>,
    max_len: usize,
    allow_null: bool,
) -> Result<Option<String>, String> {
    let text = match value.map(|raw| Json::of(raw.get())) {
        None => return Err(REQUIRED.to_owned()),
        Some(Json::Null) if allow_null => return Ok(None),
        Some(Json::Null) => return Err(NOT_NULL.to_owned()),
        Some(Json::String(s)) => s.trim().to_owned(),
        Some(Json::Number(n)) => n.to_owned(),
        Some(Json::Other) => return Err(NOT_A_STRING.to_owned()),
    };
    if text.is_empty() {
        return Err(BLANK.to_owned());
    }
    if text.chars().count() > max_len {
        return Err(format!(
            "Ensure this field has no more than {max_len} characters."
        ));
    }
    Ok(Some(text))
}

/// The range of `event_datetime` an event may have, around the time it is judged. Each day in
/// it is a partition the event may create, so the window bounds what any client can make
/// PostgreSQL create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// How far in the past `event_datetime` may lie.
    pub max_age: std::time::Duration,
    /// How far in the future (clients' clocks run ahead).
    pub max_future: std::time::Duration,
}

impl Window {
    /// `Ok` when `at` lies inside the window around `now`, else the field's message.
    pub fn check(&self, at: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), String> {
        let age = chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::MAX);
        let ahead = chrono::Duration::from_std(self.max_future).unwrap_or(chrono::Duration::MAX);
        let earliest = now
            .checked_sub_signed(age)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let latest = now
            .checked_add_signed(ahead)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        if (earliest..=latest).contains(&at) {
            Ok(())
        } else {
            Err(format!(
                "Ensure this date-time is no more than {} in the past and {} in the future.",
                humantime::format_duration(self.max_age),
                humantime::format_duration(self.max_future)
            ))
        }
    }

    /// [`Window::check`] in the shape of a 400 answer.
    pub fn check_fields(&self, fields: &Fields, now: DateTime<Utc>) -> Result<(), FieldErrors> {
        self.check(fields.event_datetime, now)
            .map_err(|message| FieldErrors::from([("event_datetime".to_owned(), vec![message])]))
    }
}

/// An error about the body as a whole, in the original's shape.
pub fn non_field_error(message: &str) -> FieldErrors {
    FieldErrors::from([(NON_FIELD_ERRORS.to_owned(), vec![message.to_owned()])])
}

/// The Python type name the original's messages used for a JSON value.
fn python_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn valid() -> Value {
        json!({
            "client_id": "abc123def456",
            "event_datetime": "2025-04-10T12:34:56.000Z",
            "event_name": "app_list",
            "product_id": "prod-001",
            "sid": "session-123",
            "r": "999888777666555",
            "platform": "android",
        })
    }

    /// Text checked as UTF-8 once gets the same verdict as bytes parsed piece by piece: valid
    /// events, broken JSON (with the parser's position), non-objects, null, invalid fields and
    /// bytes that are not UTF-8 inside and outside strings.
    #[test]
    fn utf8_checked_once_gives_the_same_verdicts() {
        let cases: Vec<Vec<u8>> = vec![
            valid().to_string().into_bytes(),
            with("r", json!("caf\u{e9} \u{1F600}"))
                .to_string()
                .into_bytes(),
            br#"{"sid": "s", "r": "#.to_vec(),
            b"[1, 2]".to_vec(),
            b"null".to_vec(),
            with("sid", json!(7)).to_string().into_bytes(),
            with("sid", json!("a\u{0}b")).to_string().into_bytes(),
        ];
        for case in &cases {
            let by_bytes = serde_json::from_slice::<RawObject<'_>>(case).map(|o| o.0.len());
            let text = std::str::from_utf8(case).expect("UTF-8 case");
            assert_eq!(
                parse_raw(case).map(|e| e.fields),
                parse_raw_str(text).map(|e| e.fields),
                "{text}"
            );
            assert_eq!(
                by_bytes.is_ok(),
                serde_json::from_str::<RawObject<'_>>(text).is_ok(),
                "{text}"
            );
        }
        let mut not_utf8 = valid().to_string().into_bytes();
        let at = not_utf8.len() - 3;
        not_utf8[at] = 0xff;
        match parse_raw(&not_utf8).map(|e| e.fields) {
            Err(RawError::Malformed(detail)) => assert!(
                detail.contains("invalid unicode code point") && detail.contains("column"),
                "{detail}"
            ),
            other => panic!("bytes that are not UTF-8 were judged {other:?}"),
        }
        assert!(matches!(
            parse_raw(b"\xff{}"),
            Err(RawError::Malformed(detail)) if detail.contains("line 1 column 1")
        ));
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = valid();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = valid();
        v.as_object_mut().unwrap().remove(field);
        v
    }

    fn validate_value(value: Value) -> Result<Fields, FieldErrors> {
        match validate_raw(value.to_string().as_bytes()) {
            Ok(fields) => Ok(fields),
            Err(RawError::Invalid(errors)) => Err(errors),
            Err(RawError::Malformed(m)) => panic!("{value}: malformed: {m}"),
        }
    }

    fn errors_of(value: Value) -> FieldErrors {
        validate_value(value).expect_err("expected a validation error")
    }

    fn errors_of_text(text: &str) -> FieldErrors {
        match validate_raw(text.as_bytes()) {
            Err(RawError::Invalid(errors)) => errors,
            other => panic!("{text}: expected field errors, got {other:?}"),
        }
    }

    /// The real sample events in the repository are accepted as they are.
    #[test]
    fn sample_events_are_accepted() {
        for name in [
            "app_list.json",
            "content_play.json",
            "tv_app_list_full.json",
        ] {
            let path = format!("{}/../../samples/{name}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let fields = validate_raw(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(!fields.event_name.is_empty());
        }
        let fields = validate_value(valid()).unwrap();
        assert_eq!(fields.event_date().to_string(), "2025-04-10");
    }

    /// Each required field, when missing, is named with the original's message.
    #[test]
    fn each_missing_field_is_reported_by_name() {
        for field in [
            "client_id",
            "event_datetime",
            "event_name",
            "product_id",
            "sid",
            "r",
        ] {
            assert_eq!(
                errors_of(without(field)),
                FieldErrors::from([(field.to_owned(), vec![REQUIRED.to_owned()])]),
                "{field}"
            );
        }
    }

    /// All bad fields are reported at once, not just the first.
    #[test]
    fn every_bad_field_is_reported_together() {
        let mut v = without("sid");
        v["r"] = json!("");
        v["event_datetime"] = json!("yesterday");
        let errors = errors_of(v);
        assert_eq!(
            errors.keys().collect::<Vec<_>>(),
            ["event_datetime", "r", "sid"]
        );
        assert_eq!(errors["r"], [BLANK]);
        assert_eq!(errors["event_datetime"], [datetime::WRONG_FORMAT]);
    }

    /// Table of single-field inputs and the outcome the original gave them.
    #[test]
    fn string_fields_follow_the_original_rules() {
        let long = |n: usize| Value::String("x".repeat(n));
        type Case<'a> = (&'a str, Value, Result<Option<&'a str>, String>);
        let cases: Vec<Case<'_>> = vec![
            ("sid", json!(12345), Ok(Some("12345"))),
            ("r", json!(1.5), Ok(Some("1.5"))),
            ("sid", json!("  padded  "), Ok(Some("padded"))),
            ("client_id", Value::Null, Ok(None)),
            ("sid", Value::Null, Err(NOT_NULL.into())),
            ("sid", json!("   "), Err(BLANK.into())),
            ("client_id", json!(""), Err(BLANK.into())),
            ("sid", json!(true), Err(NOT_A_STRING.into())),
            ("sid", json!(["a"]), Err(NOT_A_STRING.into())),
            ("sid", json!({"a": 1}), Err(NOT_A_STRING.into())),
            ("client_id", long(64), Ok(Some(&*"x".repeat(64).leak()))),
            (
                "client_id",
                long(65),
                Err("Ensure this field has no more than 64 characters.".into()),
            ),
            (
                "product_id",
                long(37),
                Err("Ensure this field has no more than 36 characters.".into()),
            ),
            (
                "event_name",
                long(256),
                Err("Ensure this field has no more than 255 characters.".into()),
            ),
            (
                "r",
                long(129),
                Err("Ensure this field has no more than 128 characters.".into()),
            ),
            // Length counts characters, not bytes.
            (
                "product_id",
                Value::String("é".repeat(36)),
                Ok(Some(&*"é".repeat(36).leak())),
            ),
        ];
        for (field, value, expected) in cases {
            let outcome = validate_value(with(field, value.clone()));
            match (&outcome, &expected) {
                (Ok(fields), Ok(want)) => {
                    assert_eq!(fields.required_field(field), Some(*want), "{field}={value}");
                }
                (Err(errors), Err(want)) => {
                    assert_eq!(
                        errors,
                        &FieldErrors::from([(field.to_owned(), vec![want.clone()])])
                    );
                }
                _ => panic!("{field}={value}: got {outcome:?}, want {expected:?}"),
            }
        }
    }

    /// A date-time must be a string in ISO 8601; null and numbers are refused.
    #[test]
    fn event_datetime_must_be_an_iso_string() {
        assert_eq!(
            errors_of(with("event_datetime", Value::Null))["event_datetime"],
            [NOT_NULL]
        );
        assert_eq!(
            errors_of(with("event_datetime", json!(1744287299)))["event_datetime"],
            [datetime::WRONG_FORMAT]
        );
        let naive = validate_value(with("event_datetime", json!("2025-04-10 23:59:59"))).unwrap();
        assert_eq!(
            naive.event_datetime.to_rfc3339(),
            "2025-04-10T23:59:59+00:00"
        );
        // The partition day is the UTC day, whatever offset the client used.
        let shifted =
            validate_value(with("event_datetime", json!("2025-04-11T01:00:00+03:00"))).unwrap();
        assert_eq!(shifted.event_date().to_string(), "2025-04-10");
    }

    /// Escaped member names and repeated members read as a map would: the last copy counts.
    #[test]
    fn escaped_and_repeated_members_read_like_a_map() {
        let mut escaped_key = valid();
        escaped_key.as_object_mut().unwrap().remove("sid");
        let escaped = escaped_key
            .to_string()
            .replacen('{', r#"{"s\u0069d":"via-escape","#, 1);
        assert_eq!(validate_raw(escaped.as_bytes()).unwrap().sid, "via-escape");
        let repeated = valid()
            .to_string()
            .replacen('{', r#"{"sid":"overridden","#, 1);
        assert_eq!(
            validate_raw(repeated.as_bytes()).unwrap().sid,
            "session-123"
        );
        let last = valid().to_string().replacen('}', r#","sid":"last"}"#, 1);
        assert_eq!(validate_raw(last.as_bytes()).unwrap().sid, "last");
        // Broken JSON anywhere, in a skipped member too, is malformed with the parser's message.
        let valid_text = valid().to_string();
        let broken: Vec<String> = vec![
            "{\"sid\": ".to_owned(),
            valid_text.replacen('{', r#"{"extra":[1,],"#, 1),
            valid_text.replacen('{', r#"{"extra":"\x","#, 1),
            format!("{valid_text} trailing"),
        ];
        for input in broken {
            let message = serde_json::from_str::<Value>(&input)
                .unwrap_err()
                .to_string();
            assert_eq!(
                validate_raw(input.as_bytes()),
                Err(RawError::Malformed(message)),
                "{input}"
            );
        }
    }

    /// What PostgreSQL cannot store is refused under the member's name (or as a non-field
    /// error for a member name), beside the other fields' errors; non-strings in string
    /// fields are refused, never read as null.
    #[test]
    fn unstorable_members_are_refused_by_name() {
        let valid_text = valid().to_string();
        let add = |member: &str| valid_text.replacen('{', &format!("{{{member},"), 1);
        let cases: Vec<(String, &str, storable::Unstorable)> = vec![
            (add(r#""x":"\u0000""#), "x", storable::Unstorable::Nul),
            (
                add(r#""x":["a\ud800"]"#),
                "x",
                storable::Unstorable::LoneSurrogate,
            ),
            (
                add(r#""x":1e200000"#),
                "x",
                storable::Unstorable::NumberOutOfRange,
            ),
            (
                add(r#""x":{"y":1e-20000}"#),
                "x",
                storable::Unstorable::NumberOutOfRange,
            ),
            (
                add(&format!(r#""x":{}1{}"#, "[".repeat(200), "]".repeat(200))),
                "x",
                storable::Unstorable::TooDeep,
            ),
            (
                valid_text.replace(r#""sid":"session-123""#, r#""sid":"a\u0000b""#),
                "sid",
                storable::Unstorable::Nul,
            ),
            (
                add(r#""n\u0000me":1"#),
                NON_FIELD_ERRORS,
                storable::Unstorable::Nul,
            ),
        ];
        for (text, field, why) in cases {
            let errors = errors_of_text(&text);
            let message = errors
                .get(field)
                .unwrap_or_else(|| panic!("{text}: {errors:?}"));
            assert!(message[0].ends_with(&why.message()), "{text}: {message:?}");
        }
        // A lone surrogate in a member name is refused by the JSON parser itself.
        assert!(matches!(
            validate_raw(add(r#""\ud800":1"#).as_bytes()),
            Err(RawError::Malformed(_))
        ));
        // Several problems at once: each field keeps its own message.
        let both = add(r#""x":"\u0000""#).replace(r#""r":"999888777666555""#, r#""r":[]"#);
        let errors = errors_of_text(&both);
        assert_eq!(errors["r"], [NOT_A_STRING]);
        assert!(errors.contains_key("x"));
        // Numbers in string fields keep their exact text: no float rounding.
        let exact = valid_text.replace(r#""r":"999888777666555""#, r#""r":18446744073709551617"#);
        assert_eq!(
            validate_raw(exact.as_bytes()).unwrap().r,
            "18446744073709551617"
        );
        // 1e400 is a number PostgreSQL takes: in a string field it is its text, not null.
        let big = valid_text.replace(r#""client_id":"abc123def456""#, r#""client_id":1e400"#);
        assert_eq!(
            validate_raw(big.as_bytes()).unwrap().client_id.as_deref(),
            Some("1e400")
        );
        let nested = valid_text.replace(
            r#""client_id":"abc123def456""#,
            &format!(r#""client_id":{}{}"#, "[".repeat(150), "]".repeat(150)),
        );
        assert!(errors_of_text(&nested).contains_key("client_id"));
    }

    /// The accepted window of event date-times, at its edges.
    #[test]
    fn event_datetimes_outside_the_window_are_refused() {
        let day = std::time::Duration::from_secs(86_400);
        let window = Window {
            max_age: 30 * day,
            max_future: day,
        };
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .to_utc();
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        assert!(window.check(at("2026-11-02T12:00:00Z"), now).is_ok());
        assert!(window.check(at("2026-12-03T12:00:00Z"), now).is_ok());
        let old = window.check(at("2026-11-02T11:59:59Z"), now).unwrap_err();
        assert_eq!(
            old,
            "Ensure this date-time is no more than 30days in the past and 1day in the future."
        );
        assert!(window.check(at("2026-12-03T12:00:01Z"), now).is_err());
        // Year 1 at +01:00 is year 0 in UTC: far outside any window.
        let fields = validate_raw(
            valid()
                .to_string()
                .replace("2025-04-10T12:34:56.000Z", "0001-01-01T00:30:00+01:00")
                .as_bytes(),
        )
        .unwrap();
        assert!(window.check_fields(&fields, now).is_err());
    }

    /// A body that is not an object gets the original's non-field error.
    #[test]
    fn non_objects_get_a_non_field_error() {
        assert_eq!(
            errors_of(json!([1, 2])),
            non_field_error("Invalid data. Expected a dictionary, but got list.")
        );
        assert_eq!(
            errors_of(json!("text")),
            non_field_error("Invalid data. Expected a dictionary, but got str.")
        );
        assert_eq!(errors_of(Value::Null), non_field_error("No data provided"));
    }
}
