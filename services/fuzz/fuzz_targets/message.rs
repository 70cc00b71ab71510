//! Message decoding on arbitrary bodies and content encodings: it never panics, never
//! allocates past the decoded-size cap, and its lines are non-blank slices of the body.
#![no_main]

use dedup_message::message::{Envelope, MAX_DECODED_BYTES, lines};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let properties = match selector % 4 {
        0 => BasicProperties::default(),
        1 => BasicProperties::default().with_content_encoding("lz4".into()),
        2 => BasicProperties::default().with_content_encoding("identity".into()),
        _ => BasicProperties::default().with_content_encoding("gzip".into()),
    };
    if let Ok(decoded) = Envelope::open(body, &properties) {
        assert!(decoded.len() <= MAX_DECODED_BYTES);
        for line in lines(&decoded) {
            assert!(!line.trim_ascii().is_empty());
        }
    }
});
