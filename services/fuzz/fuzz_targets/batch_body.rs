//! Batch-body splitting on arbitrary bodies: it never panics, never returns more items than
//! the limit, and every item is a piece of the body.
#![no_main]

use ingest::body::{BodyKind, batch};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = if selector % 2 == 0 {
        BodyKind::Json
    } else {
        BodyKind::NdJson
    };
    if let Ok(items) = batch(body, kind, LIMIT) {
        assert!(!items.is_empty() && items.len() <= LIMIT);
        let range = body.as_ptr_range();
        for item in items {
            let inside =
                range.start <= item.as_ptr() && item.as_ptr().wrapping_add(item.len()) <= range.end;
            assert!(inside, "an item is not a piece of the body");
        }
    }
});
