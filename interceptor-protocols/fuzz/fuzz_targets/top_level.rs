//! The top-level member scanner: split invariance (the whole-body walk agrees with the state machine), whatever it rebuilds from a valid JSON object is
//! valid JSON, and without a size limit it keeps exactly the wanted members serde_json reads (the
//! last occurrence of a duplicate, as serde_json does).
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
    // One byte at a time is the state machine alone; a whole body takes the one-slice walk.
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(whole, scan(&bytes), "the whole-body walk and the state machine disagree");
    let input_is_object = serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object());
    if let (true, Fields::Object(object)) = (input_is_object, &whole) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(object).is_ok(),
            "rebuilt object is JSON"
        );
    }
    if input_is_object {
        let mut unlimited = TopLevelFields::new(WANTED, usize::MAX);
        unlimited.feed(body);
        let Fields::Object(object) = unlimited.finish() else {
            panic!("a JSON object was scanned as malformed");
        };
        let original: serde_json::Value = serde_json::from_slice(body).expect("checked above");
        let rebuilt: serde_json::Value = serde_json::from_slice(&object).expect("rebuilt object is JSON");
        for key in WANTED {
            assert_eq!(rebuilt.get(key), original.get(key), "member {key}");
        }
        let kept = rebuilt.as_object().map_or(0, |o| o.len());
        assert!(kept <= WANTED.len(), "only wanted members are kept");
    }
});
