//! The bedrock usage extractor behind the response accountant: any body, framing and chunking gives
//! the same accounting as in one piece, and never panics.
#![no_main]

use interceptor_protocols::{Adapter, Limits, ResponseAccountant, classify};
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 4] = ["/model/m/converse", "/model/m/converse-stream", "/model/m/invoke", "/model/m/invoke-with-response-stream"];
const CONTENT_TYPES: [&str; 4] = [
    "application/json",
    "text/event-stream",
    "application/vnd.amazon.eventstream",
    "application/json; charset=UTF-8",
];

fn account(selector: u8, chunks: &[&[u8]]) -> (interceptor_protocols::Accounting, bool) {
    let route = classify(Adapter::Bedrock, "POST", PATHS[usize::from(selector & 3)], if selector & 64 != 0 { "alt=sse" } else { "" });
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPES[usize::from((selector >> 2) & 3)]),
    );
    if selector & 16 != 0 {
        headers.insert(http::header::CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
    }
    let status = if selector & 32 != 0 { 429 } else { 200 };
    let limits = Limits { max_event_bytes: 1024, max_value_bytes: 256 };
    let mut accountant = ResponseAccountant::new(Adapter::Bedrock, &route, status, &headers, limits);
    let mut first_output = false;
    for chunk in chunks {
        first_output |= accountant.feed(chunk);
    }
    (accountant.finish(true), first_output)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Some((&at, body)) = rest.split_first() else { return };
    let at = usize::from(at).min(body.len());
    let whole = account(selector, &[body]);
    let split = account(selector, &[&body[..at], &body[at..]]);
    assert_eq!(whole, split);
});
