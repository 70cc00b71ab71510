//! The dedup key: a 128-bit BLAKE3 hash over an unambiguous encoding of the key fields.
//!
//! Each field is written as its name and a tagged value: missing, null, or a length-prefixed
//! string. So `("a|b", "c")` and `("a", "b|c")` differ, and null, `"None"` and a missing field
//! are three different values (the original joined `str(value)` with `|`, which merged them).

use std::fmt;

use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::{Json, RawEvent};

/// The fields the original deduplicated on, in its order.
pub const DEFAULT_KEY_FIELDS: [&str; 5] = ["client_id", "event_name", "product_id", "sid", "r"];

/// BLAKE3 key-derivation context: changing the encoding means changing this string.
const CONTEXT: &str = "dedup product-event key v1";

const TAG_MISSING: u8 = 0;
const TAG_NULL: u8 = 1;
const TAG_STRING: u8 = 2;
const TAG_OTHER_JSON: u8 = 3;

/// Which fields make two events "the same event".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    fields: Vec<String>,
}

/// A 128-bit dedup key. Stored in PostgreSQL as a `uuid`, so it reads well in `psql`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey(pub [u8; 16]);

impl KeySpec {
    /// A spec over `fields`, in the given order; an empty list or a repeated name is refused.
    pub fn new<S: AsRef<str>>(fields: &[S]) -> Result<Self, String> {
        let fields: Vec<String> = fields
            .iter()
            .map(|f| f.as_ref().trim().to_owned())
            .collect();
        if fields.is_empty() || fields.iter().any(String::is_empty) {
            return Err("the dedup key needs at least one field name, and no blank names".into());
        }
        for (i, f) in fields.iter().enumerate() {
            if fields[..i].contains(f) {
                return Err(format!("the dedup key names field {f:?} twice"));
            }
        }
        Ok(Self { fields })
    }

    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// The key of a validated event. Required fields use their normalised value (so `" 5 "`,
    /// `"5"` and `5` are one value, as the original stored them); other fields their JSON
    /// value (numbers by their exact text).
    pub fn key_of_raw(&self, event: &RawEvent<'_>) -> DedupKey {
        self.key_from(
            |name| event.fields.required_field(name),
            |name| event.get(name),
        )
    }

    /// The key from a lookup of the normalised required fields and one of any other field.
    fn key_from<'a>(
        &self,
        required: impl Fn(&str) -> Option<Option<&'a str>>,
        other: impl Fn(&str) -> Option<&'a RawValue>,
    ) -> DedupKey {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        hasher.update(&(self.fields.len() as u64).to_be_bytes());
        for name in &self.fields {
            write_bytes(&mut hasher, name.as_bytes());
            match required(name) {
                Some(Some(text)) => write_string(&mut hasher, text),
                Some(None) => {
                    hasher.update(&[TAG_NULL]);
                }
                None => write_value(&mut hasher, other(name)),
            }
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        DedupKey(out)
    }
}

impl Default for KeySpec {
    fn default() -> Self {
        Self {
            fields: DEFAULT_KEY_FIELDS.iter().map(|f| (*f).to_owned()).collect(),
        }
    }
}

fn write_bytes(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn write_string(hasher: &mut blake3::Hasher, text: &str) {
    hasher.update(&[TAG_STRING]);
    write_bytes(hasher, text.as_bytes());
}

fn write_value(hasher: &mut blake3::Hasher, value: Option<&RawValue>) {
    let Some(raw) = value else {
        hasher.update(&[TAG_MISSING]);
        return;
    };
    match Json::of(raw.get()) {
        Json::Null => {
            hasher.update(&[TAG_NULL]);
        }
        Json::String(s) => write_string(hasher, &s),
        Json::Number(n) => write_string(hasher, n),
        Json::Other => {
            // serde_json's map is ordered by key, so this text is canonical.
            let canonical = serde_json::from_str::<Value>(raw.get())
                .map(|v| v.to_string())
                .unwrap_or_else(|_| raw.get().to_owned());
            hasher.update(&[TAG_OTHER_JSON]);
            write_bytes(hasher, canonical.as_bytes());
        }
    }
}

impl DedupKey {
    pub fn as_uuid(&self) -> Uuid {
        Uuid::from_bytes(self.0)
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DedupKey({})", self.as_uuid().simple())
    }
}

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_uuid().simple().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::event::parse_raw;

    fn event_text(overrides: Value) -> String {
        let mut base = json!({
            "client_id": "c1",
            "event_datetime": "2025-04-10T12:34:56Z",
            "event_name": "app_list",
            "product_id": "p1",
            "sid": "s1",
            "r": "r1",
        });
        for (k, v) in overrides.as_object().unwrap() {
            if v == "<remove>" {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base.to_string()
    }

    fn key_of(spec: &KeySpec, overrides: Value) -> DedupKey {
        key_of_text(spec, &event_text(overrides))
    }

    fn key_of_text(spec: &KeySpec, text: &str) -> DedupKey {
        spec.key_of_raw(&parse_raw(text.as_bytes()).expect("a valid event"))
    }

    /// The collisions the original's `"|".join(str(v))` had are gone.
    #[test]
    fn values_the_original_merged_get_different_keys() {
        let spec = KeySpec::default();
        let pairs = [
            // A separator moved between two fields.
            (
                json!({"sid": "a|b", "r": "c"}),
                json!({"sid": "a", "r": "b|c"}),
            ),
            // null versus the string "None" (Python's str(None)).
            (json!({"client_id": null}), json!({"client_id": "None"})),
            // An empty-looking shift across three fields.
            (
                json!({"product_id": "p", "sid": "|s"}),
                json!({"product_id": "p|", "sid": "s"}),
            ),
        ];
        for (a, b) in pairs {
            assert_ne!(
                key_of(&spec, a.clone()),
                key_of(&spec, b.clone()),
                "{a} vs {b}"
            );
        }
    }

    /// For a field outside the required ones, missing, null and "None" are three values.
    #[test]
    fn missing_null_and_none_string_differ_for_optional_fields() {
        let spec = KeySpec::new(&["sid", "platform"]).unwrap();
        let missing = key_of(&spec, json!({"platform": "<remove>"}));
        let null = key_of(&spec, json!({"platform": null}));
        let none = key_of(&spec, json!({"platform": "None"}));
        let empty = key_of(&spec, json!({"platform": ""}));
        let all = [missing, null, none, empty];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{i} vs {j}");
            }
        }
    }

    /// What the original treated as one value stays one key: numbers as decimal text and
    /// surrounding blanks trimmed; fields outside the key do not matter.
    #[test]
    fn equivalent_inputs_share_a_key() {
        let spec = KeySpec::default();
        assert_eq!(
            key_of(&spec, json!({"r": 42})),
            key_of(&spec, json!({"r": "42"}))
        );
        assert_eq!(
            key_of(&spec, json!({"sid": " s1 "})),
            key_of(&spec, json!({}))
        );
        assert_eq!(
            key_of(&spec, json!({"platform": "tv", "ts": "x"})),
            key_of(&spec, json!({"platform": "web"}))
        );
        // event_datetime is not a key field by default.
        assert_eq!(
            key_of(&spec, json!({"event_datetime": "2025-04-10T00:00:00Z"})),
            key_of(&spec, json!({}))
        );
    }

    /// Every key field changes the key, and so do the choice and order of fields.
    #[test]
    fn every_key_field_and_the_field_list_matter() {
        let spec = KeySpec::default();
        let base = key_of(&spec, json!({}));
        for field in DEFAULT_KEY_FIELDS {
            assert_ne!(key_of(&spec, json!({ field: "other" })), base, "{field}");
        }
        let reordered =
            KeySpec::new(&["r", "sid", "product_id", "event_name", "client_id"]).unwrap();
        assert_ne!(key_of(&reordered, json!({})), base);
    }

    /// The key is stable across releases: stored keys must keep matching.
    #[test]
    fn key_is_stable() {
        let key = key_of(&KeySpec::default(), json!({}));
        assert_eq!(key.to_string(), STABLE_KEY);
    }
    const STABLE_KEY: &str = "0579366e86ee3a1a92dbcb649e4a8bbc";

    /// Numbers are keyed by their exact text, in required and other key fields alike: no
    /// float rounding merges two big integers, and a number equals the string of its text.
    #[test]
    fn numbers_are_keyed_by_their_exact_text() {
        let spec = KeySpec::new(&["r", "extra"]).unwrap();
        let with = |r: &str, extra: &str| {
            key_of_text(
                &spec,
                &event_text(json!({}))
                    .replacen('{', &format!(r#"{{"extra":{extra},"#), 1)
                    .replace(r#""r":"r1""#, &format!(r#""r":{r}"#)),
            )
        };
        assert_ne!(
            with("18446744073709551616", "1"),
            with("18446744073709551617", "1")
        );
        assert_ne!(
            with("1", "18446744073709551616"),
            with("1", "18446744073709551617")
        );
        assert_eq!(
            with("18446744073709551617", "1"),
            with(r#""18446744073709551617""#, "1")
        );
        assert_eq!(with("1", "5"), with("1", r#""5""#));
        // Nested values are keyed by their canonical JSON (members sorted).
        assert_eq!(
            with("1", r#"{"b":2,"a":1}"#),
            with("1", r#"{"a":1, "b":2}"#)
        );
    }

    /// One key field's JSON text, drawn from a small pool so that collisions happen: strings
    /// with and without padding, numbers with the same text, null.
    fn field_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            proptest::sample::select(vec!["a", "b", "a|b", "None", "7", "1.50", "é"])
                .prop_map(|s| serde_json::to_string(s).unwrap()),
            proptest::sample::select(vec!["a", "7", "1.50"])
                .prop_map(|s| serde_json::to_string(&format!(" {s}  ")).unwrap()),
            proptest::sample::select(vec!["7", "1.50", "18446744073709551617", "-0"])
                .prop_map(String::from),
        ]
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        /// Two events share a key exactly when their normalised key fields are equal.
        #[test]
        fn keys_are_equal_exactly_when_normalised_fields_are(
            a in proptest::collection::vec(field_text(), 5),
            b in proptest::collection::vec(field_text(), 5),
            a_null in proptest::bool::ANY,
            b_null in proptest::bool::ANY,
        ) {
            let spec = KeySpec::default();
            let text = |fields: &[String], null: bool| {
                let client = if null { "null" } else { &fields[0] };
                format!(
                    r#"{{"client_id":{client},"event_name":{},"product_id":{},"sid":{},"r":{},"event_datetime":"2025-04-10T12:00:00Z"}}"#,
                    fields[1], fields[2], fields[3], fields[4]
                )
            };
            let (ta, tb) = (text(&a, a_null), text(&b, b_null));
            let (ea, eb) = (parse_raw(ta.as_bytes()).unwrap(), parse_raw(tb.as_bytes()).unwrap());
            let normalised = |e: &crate::event::RawEvent<'_>| -> Vec<Option<String>> {
                DEFAULT_KEY_FIELDS
                    .iter()
                    .map(|f| e.fields.required_field(f).flatten().map(str::to_owned))
                    .collect()
            };
            proptest::prop_assert_eq!(
                spec.key_of_raw(&ea) == spec.key_of_raw(&eb),
                normalised(&ea) == normalised(&eb),
                "{} vs {}", ta, tb
            );
        }
    }

    #[test]
    fn spec_rejects_empty_and_repeated_fields() {
        assert!(KeySpec::new::<&str>(&[]).is_err());
        assert!(KeySpec::new(&["sid", " "]).is_err());
        assert!(KeySpec::new(&["sid", "sid"]).is_err());
    }
}
