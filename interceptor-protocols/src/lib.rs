//! AI provider protocols, read on the side of a proxied exchange: which endpoint a request targets,
//! the incremental parsers for the framings providers stream in (SSE, the AWS event-stream, streamed
//! JSON arrays, large JSON objects), token usage per provider, and cost from a price table.
//!
//! Nothing here does I/O; every parser accepts chunks split at any byte and keeps bounded memory.
//! The crate stands apart from the daemon so the fuzz targets and the parse benchmark build without
//! the daemon's dependencies.

pub mod accountant;
pub mod anthropic;
pub mod bedrock;
pub mod estimate;
pub mod eventstream;
pub mod gemini;
pub mod json_array;
mod needle;
pub mod openai;
pub mod pricing;
mod quick_json;
pub mod request;
pub mod route;
pub mod sse;
pub mod strip;
pub mod top_level;
pub mod usage;

pub use accountant::{Accounting, Limits, ResponseAccountant, UsageStatus};
pub use pricing::{Cost, PriceTable, PricedModel};
pub use route::{Adapter, Dialect, EndpointKind, Route, classify};
pub use usage::{Observation, ProviderError, Usage};

/// Whether a `Content-Type` value names JSON (`application/json`, `…+json`, `application/x-ndjson`; any
/// case), for request and response bodies alike.
pub fn is_json_media_type(value: &[u8]) -> bool {
    value.windows(4).any(|w| w.eq_ignore_ascii_case(b"json"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_media_types() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
        ] {
            assert!(super::is_json_media_type(json.as_bytes()), "{json}");
        }
        for other in [
            "text/event-stream",
            "application/vnd.amazon.eventstream",
            "",
            "js",
        ] {
            assert!(!super::is_json_media_type(other.as_bytes()), "{other}");
        }
    }
}
