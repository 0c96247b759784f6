//! The accept loop: bounded concurrency, one task and one span per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info_span, warn};

use super::ProxyContext;
use super::connection;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until `stop_accepting`; each runs until done or `abort`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    abort: CancellationToken,
) {
    loop {
        // Backpressure: with every permit taken, new clients wait in the listen backlog.
        let permit = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let conn_id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", conn_id, %peer);
        let ctx = ctx.clone();
        let abort = abort.clone();
        tracker.spawn(
            async move {
                let _permit = permit;
                connection::handle(&ctx, stream, peer, abort).await;
            }
            .instrument(span),
        );
    }
}
