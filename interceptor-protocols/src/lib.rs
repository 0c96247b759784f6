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
