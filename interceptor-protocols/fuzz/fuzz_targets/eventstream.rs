//! The AWS event-stream decoder: any bytes, split anywhere, decode the same messages (or fail the
//! same way) as in one piece, and never accept a message whose CRCs do not match.
#![no_main]

use interceptor_protocols::eventstream::EventStreamDecoder;
use libfuzzer_sys::fuzz_target;

fn decode(chunks: &[&[u8]]) -> (Vec<(Option<String>, Vec<u8>)>, String) {
    let mut decoder = EventStreamDecoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk, |m| {
            out.push((m.headers.event_type.map(str::to_owned), m.payload.to_vec()))
        });
    }
    let end = format!("{:?}", decoder.finish());
    (out, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(body.len());
    assert_eq!(decode(&[body]), decode(&[&body[..at], &body[at..]]));
});
