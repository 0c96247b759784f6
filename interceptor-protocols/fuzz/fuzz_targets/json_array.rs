//! The streamed-JSON-array splitter: split invariance and bounded elements.
#![no_main]

use interceptor_protocols::json_array::JsonArraySplitter;
use libfuzzer_sys::fuzz_target;

fn split(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
    let mut splitter = JsonArraySplitter::new(128);
    let mut out = Vec::new();
    for chunk in chunks {
        splitter.feed(chunk, |e| out.push(e.to_vec()));
    }
    (out, splitter.finish().malformed)
}

fuzz_target!(|data: &[u8]| {
    let Some((&at, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(at).min(body.len());
    let whole = split(&[body]);
    assert_eq!(whole, split(&[&body[..at], &body[at..]]));
    assert!(whole.0.iter().all(|e| e.len() <= 128));
});
