//! The proxy: accepts redirected connections, finds who made them and where they were going, and
//! handles them (at this stage: a byte-for-byte relay to the original destination).

pub mod accept;
pub mod passthrough;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::{TcpListener, TcpSocket};

use crate::ebpf::AttributionMap;
use crate::identity::Enricher;

/// Errors of the proxy, classified by origin so metrics can label them.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the proxy listener {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("no attribution record for client {0}: it was not redirected by the eBPF programs")]
    NoRecord(SocketAddr),
    #[error("connecting to the original destination {0}: {1}")]
    UpstreamConnect(SocketAddr, std::io::Error),
    #[error("connecting to the original destination {0}: timed out after {1:?}")]
    UpstreamTimeout(SocketAddr, Duration),
    #[error("relay: {0}")]
    Relay(std::io::Error),
}

impl ProxyError {
    /// Label for metrics: where the failure came from.
    pub fn origin(&self) -> &'static str {
        match self {
            ProxyError::Bind(..) => "internal",
            ProxyError::NoRecord(_) => "downstream",
            ProxyError::UpstreamConnect(..) | ProxyError::UpstreamTimeout(..) => "upstream",
            ProxyError::Relay(_) => "relay",
        }
    }
}

/// Metrics of the proxy.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub connections: IntCounterVec,
    pub active: IntGauge,
    pub bytes: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: Histogram,
}

impl ProxyMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let connections = IntCounterVec::new(
            Opts::new(
                "interceptor_connections_total",
                "Connections accepted by the proxy, by outcome",
            ),
            &["outcome"],
        )?;
        let active = IntGauge::new("interceptor_connections_active", "Connections being handled")?;
        let bytes = IntCounterVec::new(
            Opts::new("interceptor_relayed_bytes_total", "Bytes relayed, by direction"),
            &["direction"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "interceptor_connection_errors_total",
                "Connection failures, by origin",
            ),
            &["origin"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "interceptor_connection_duration_seconds",
                "Lifetime of proxied connections",
            )
            .buckets(vec![0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0]),
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            connections,
            active,
            bytes,
            errors,
            duration,
        })
    }
}

/// What every connection handler shares.
pub struct ProxyContext {
    pub attribution: Arc<AttributionMap>,
    pub enricher: Arc<Enricher>,
    pub metrics: ProxyMetrics,
    pub upstream_connect_timeout: Duration,
}

/// Binds one listener per address on the same port: loopback (both families) for callers in the
/// daemon's namespace, and the node addresses for callers in other namespaces. With `port` 0 the first
/// listener picks a free port and the others reuse it.
pub fn bind(node_addresses: &[IpAddr], port: u16) -> Result<(Vec<TcpListener>, u16), ProxyError> {
    let mut addresses = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    addresses.extend(node_addresses.iter().copied());
    let mut listeners = Vec::with_capacity(addresses.len());
    let mut port = port;
    for address in addresses {
        let addr = SocketAddr::new(address, port);
        let listener = listen(addr).map_err(|e| ProxyError::Bind(addr, e))?;
        if port == 0 {
            port = listener
                .local_addr()
                .map_err(|e| ProxyError::Bind(addr, e))?
                .port();
        }
        listeners.push(listener);
    }
    Ok((listeners, port))
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
