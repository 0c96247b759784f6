//! The SSE parser: any bytes, split anywhere, give the same events as in one piece.
#![no_main]

use interceptor_protocols::sse::SseParser;
use libfuzzer_sys::fuzz_target;

fn events(chunks: &[&[u8]]) -> (Vec<(String, Vec<u8>)>, bool) {
    let mut parser = SseParser::new(256);
    let mut out = Vec::new();
    for chunk in chunks {
        parser.feed(chunk, |e| out.push((e.event.to_owned(), e.data.to_vec())));
    }
    let summary = parser.finish();
    (out, summary.truncated)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(body.len());
    let whole = events(&[body]);
    let split = events(&[&body[..at], &body[at..]]);
    assert_eq!(whole, split);
    for (_, event) in &whole.0 {
        assert!(event.len() <= 256, "events stay within the limit");
    }
});
