//! Byte-for-byte relay of a redirected connection to its original destination.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ProxyContext, ProxyError};
use crate::identity::{KernelFacts, ProcessDetails};

/// Handles one accepted connection and logs one line when it ends.
pub async fn handle(
    ctx: &Arc<ProxyContext>,
    mut client: TcpStream,
    peer: SocketAddr,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let metrics = &ctx.metrics;
    let Some(record) = ctx.attribution.take(peer) else {
        let error = ProxyError::NoRecord(peer);
        metrics.connections.with_label_values(&["no_record"]).inc();
        metrics.errors.with_label_values(&[error.origin()]).inc();
        warn!(error = %error, "connection refused");
        return;
    };
    metrics.active.inc();
    let facts = KernelFacts::from(&record);
    let enricher = ctx.enricher.clone();
    let facts_for_details = facts.clone();
    let details = tokio::task::spawn_blocking(move || enricher.details(&facts_for_details));
    let upstream = connect(facts.original_dst, ctx.upstream_connect_timeout);
    let (details, upstream) = tokio::join!(details, upstream);
    let details = details.unwrap_or_default();

    let outcome = match upstream {
        Ok(mut upstream) => {
            tokio::select! {
                result = copy_bidirectional(&mut client, &mut upstream) => match result {
                    Ok((up, down)) => Ok((up, down)),
                    Err(e) => Err(ProxyError::Relay(e)),
                },
                _ = abort.cancelled() => Err(ProxyError::Relay(std::io::Error::other("aborted at shutdown"))),
            }
        }
        Err(e) => Err(e),
    };
    metrics.active.dec();
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed.as_secs_f64());
    match &outcome {
        Ok((up, down)) => {
            metrics.connections.with_label_values(&["relayed"]).inc();
            metrics.bytes.with_label_values(&["upstream"]).inc_by(*up);
            metrics.bytes.with_label_values(&["downstream"]).inc_by(*down);
        }
        Err(e) => {
            metrics.connections.with_label_values(&["failed"]).inc();
            metrics.errors.with_label_values(&[e.origin()]).inc();
        }
    }
    log_connection(peer, &facts, &details, &outcome, elapsed.as_secs_f64() * 1000.0);
}

async fn connect(addr: SocketAddr, timeout: std::time::Duration) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(ProxyError::UpstreamConnect(addr, e)),
        Err(_) => Err(ProxyError::UpstreamTimeout(addr, timeout)),
    }
}

fn log_connection(
    peer: SocketAddr,
    facts: &KernelFacts,
    details: &ProcessDetails,
    outcome: &Result<(u64, u64), ProxyError>,
    duration_ms: f64,
) {
    let exe = details.exe.as_ref().map(|p| p.display().to_string());
    let (bytes_up, bytes_down, error) = match outcome {
        Ok((up, down)) => (*up, *down, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    info!(
        client = %peer,
        original_dst = %facts.original_dst,
        tgid = facts.tgid,
        pid = facts.pid,
        uid = facts.uid,
        gid = facts.gid,
        user = details.user.as_deref(),
        comm = %facts.comm,
        exe = exe.as_deref(),
        cmdline = details.cmdline.as_deref(),
        cgroup_id = facts.cgroup_id,
        cgroup = details.cgroup.as_deref(),
        netns_cookie = facts.netns_cookie,
        bytes_up,
        bytes_down,
        duration_ms,
        error = error.as_deref(),
        "connection closed"
    );
}
