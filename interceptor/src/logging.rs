//! Structured logging through `tracing`; `log` records (aya-log) are forwarded into it.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The target of the per-request `request` line.
pub const REQUEST_TARGET: &str = "interceptor::request";

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`RUST_LOG` wins when set).
/// `quiet_requests`: the audit log already has a line per request, so the `request` log line is off
/// unless the filter names [`REQUEST_TARGET`] itself.
pub fn init(format: LogFormat, filter: &str, quiet_requests: bool) -> anyhow::Result<()> {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| EnvFilter::try_new(&text).ok().map(|parsed| (parsed, text)));
    let (mut filter, text) = match from_env {
        Some(found) => found,
        None => (EnvFilter::try_new(filter)?, filter.to_owned()),
    };
    if quiet_requests && !text.contains(REQUEST_TARGET) {
        filter = filter.add_directive(format!("{REQUEST_TARGET}=off").parse()?);
    }
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Plain => registry
            .with(fmt::layer().with_writer(std::io::stdout))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stdout),
            )
            .try_init()?,
    }
    Ok(())
}
