//! The event validator on arbitrary bytes: it never panics, and what it accepts is storable
//! (the check passes on the whole text), keeps its value when put in jsonb order, and has a
//! key.
#![no_main]

use dedup_event::KeySpec;
use dedup_event::event::parse_raw;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = parse_raw(data) else { return };
    assert!(
        dedup_event::storable::check(data, 0).is_ok(),
        "accepted but not storable"
    );
    let text = std::str::from_utf8(data).expect("accepted text is UTF-8");
    let ordered = dedup_worker::jsonb::ordered(&event, text);
    serde_json::from_str::<serde::de::IgnoredAny>(&ordered).expect("ordered text is JSON");
    // serde_json's tree holds no number past f64 (1e400): compare where it can hold both.
    // Ordering drops the earlier copies of a repeated name, so the ordered text may parse
    // where the client's did not; never the other way round.
    match (
        serde_json::from_str::<Value>(text),
        serde_json::from_str::<Value>(&ordered),
    ) {
        (Ok(before), Ok(after)) => assert_eq!(before, after, "jsonb order changed the value"),
        (Ok(before), Err(e)) => panic!("ordering broke {before:?}: {e}"),
        (Err(_), _) => {}
    }
    let _ = KeySpec::default().key_of_raw(&event);
    for (field, limit) in dedup_event::event::STRING_FIELDS {
        if let Some(Some(value)) = event.fields.required_field(field) {
            assert!(value.chars().count() <= limit, "{field} over its limit");
            assert!(!value.contains('\0'), "{field} holds NUL");
        }
    }
});
