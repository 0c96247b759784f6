//! Shutdown signals.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown() -> std::io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
