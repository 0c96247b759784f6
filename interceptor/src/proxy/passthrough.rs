//! Byte-for-byte relay to the original destination (non-provider SNI, no SNI, bypassed workloads).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncWriteExt as _, copy_bidirectional};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ProxyError;

/// Connects to `original_dst` (the daemon's own connects are never redirected).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(ProxyError::UpstreamConnect(addr, e)),
        Err(_) => Err(ProxyError::UpstreamTimeout(addr, timeout)),
    }
}

/// Sends the bytes already read from the client (`prefix`), then relays both ways until both sides
/// close or `abort`. Returns (bytes to upstream, bytes to client).
pub async fn relay(
    client: &mut TcpStream,
    prefix: &[u8],
    original_dst: SocketAddr,
    connect_timeout: Duration,
    abort: &CancellationToken,
) -> Result<(u64, u64), ProxyError> {
    let mut upstream = connect(original_dst, connect_timeout).await?;
    upstream.write_all(prefix).await.map_err(ProxyError::Relay)?;
    tokio::select! {
        result = copy_bidirectional(client, &mut upstream) => match result {
            Ok((up, down)) => Ok((up + prefix.len() as u64, down)),
            Err(e) => Err(ProxyError::Relay(e)),
        },
        _ = abort.cancelled() => Err(ProxyError::Relay(std::io::Error::other("aborted at shutdown"))),
    }
}
