//! What the usage fuzz targets share: one body read by one provider's accountant, whole and split.

use interceptor_protocols::{Accounting, Adapter, Limits, ResponseAccountant, classify};

const CONTENT_TYPES: [&str; 4] = [
    "application/json",
    "text/event-stream",
    "application/vnd.amazon.eventstream",
    "application/json; charset=UTF-8",
];

/// Reads `body` as a response of `adapter` to one of `paths`, in `chunks`. `selector` picks the
/// path (bits 0-1), content type (2-3), gzip (4), an error status (5) and `alt=sse` (6).
fn account(adapter: Adapter, paths: &[&str; 4], selector: u8, chunks: &[&[u8]]) -> (Accounting, bool) {
    let query = if selector & 64 != 0 { "alt=sse" } else { "" };
    let route = classify(adapter, "POST", paths[usize::from(selector & 3)], query);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPES[usize::from((selector >> 2) & 3)]),
    );
    if selector & 16 != 0 {
        headers.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
    }
    let status = if selector & 32 != 0 { 429 } else { 200 };
    let limits = Limits {
        max_event_bytes: 1024,
        max_value_bytes: 256,
    };
    let mut accountant = ResponseAccountant::new(adapter, &route, status, &headers, limits);
    let mut first_output = false;
    for chunk in chunks {
        first_output |= accountant.feed(chunk);
    }
    (accountant.finish(true), first_output)
}

/// The fuzz input is a selector byte, a split offset byte and the body: any body, framing and
/// chunking must give the same accounting as in one piece, and never panic.
pub fn check_usage(adapter: Adapter, paths: &[&str; 4], data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((&at, body)) = rest.split_first() else {
        return;
    };
    let at = usize::from(at).min(body.len());
    if adapter == Adapter::Openai {
        assert!(
            interceptor_protocols::openai::quick_agrees_with_serde(body),
            "the quick reader and serde disagree"
        );
    }
    let whole = account(adapter, paths, selector, &[body]);
    let split = account(adapter, paths, selector, &[&body[..at], &body[at..]]);
    assert_eq!(whole, split);
}
