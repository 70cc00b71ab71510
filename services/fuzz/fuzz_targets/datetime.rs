//! The ISO 8601 parser on arbitrary text: it never panics, and what it reads is a real
//! instant whose UTC day has a four-digit year (one partition name per day).
#![no_main]

use chrono::Datelike;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(at) = dedup_event::datetime::parse(text) {
        let year = at.year();
        // A year-1 date-time east of UTC is year 0 in UTC: the window refuses it later.
        assert!((0..=10_000).contains(&year), "{text} read as year {year}");
    }
});
