//! The top-level member scanner: split invariance, and whatever it rebuilds from a valid JSON
//! object is valid JSON.
#![no_main]

use interceptor_protocols::top_level::{Fields, TopLevelFields};
use libfuzzer_sys::fuzz_target;

const WANTED: &[&str] = &["model", "usage", "id", "error"];

fn scan(chunks: &[&[u8]]) -> Fields {
    let mut scanner = TopLevelFields::new(WANTED, 64);
    for chunk in chunks {
        scanner.feed(chunk);
    }
    scanner.finish()
}

fuzz_target!(|data: &[u8]| {
    let Some((&at, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(at).min(body.len());
    let whole = scan(&[body]);
    assert_eq!(whole, scan(&[&body[..at], &body[at..]]));
    let input_is_object = serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object());
    if let (true, Fields::Object(object)) = (input_is_object, &whole) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(object).is_ok(),
            "rebuilt object is JSON"
        );
    }
});
