//! The proxy: accepts redirected connections, finds who made them and where they were going, and
//! handles them (at this stage: a byte-for-byte relay to the original destination).

pub mod accept;
pub mod accounted;
pub mod classify;
pub mod coalesced;
pub mod connection;
pub mod estimates;
pub mod exchange;
pub mod http;
pub mod passthrough;
pub mod record;
pub mod replayed;
pub mod request_body;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::{TcpListener, TcpSocket};

use interceptor_protocols::Adapter;

use crate::accounting::AccountingSettings;
use crate::ebpf::AttributionMap;
use crate::identity::Enricher;
use crate::kubernetes::PodAttribution;
use crate::providers::domain_matches;
use crate::quota::QuotaEngine;
use crate::selector::SelectorMatcher;
use crate::tls::leaf::LeafCerts;
use crate::tls::upstream::Upstream;
use arc_swap::ArcSwap;

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
    pub tls_handshakes: IntCounterVec,
    pub requests: IntCounterVec,
    pub requests_active: IntGauge,
    pub request_duration: Histogram,
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
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "interceptor_tls_connections_total",
                "Redirected connections by how they were handled (terminated, passthrough_*, \
                 client_rejected_certificate, handshake_failed, not_tls, closed_before_hello)",
            ),
            &["outcome"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "interceptor_http_requests_total",
                "Requests proxied on terminated connections, by status class",
            ),
            &["status_class"],
        )?;
        let requests_active = IntGauge::new(
            "interceptor_http_requests_active",
            "Requests (and streams) in flight",
        )?;
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "interceptor_http_request_duration_seconds",
                "Request duration until the response body ended",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )?;
        for collector in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(active.clone()),
            Box::new(bytes.clone()),
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(requests.clone()),
            Box::new(requests_active.clone()),
            Box::new(request_duration.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Self {
            connections,
            active,
            bytes,
            errors,
            duration,
            tls_handshakes,
            requests,
            requests_active,
            request_duration,
        })
    }
}

/// What every connection handler shares.
pub struct ProxyContext {
    pub attribution: Arc<AttributionMap>,
    pub enricher: Arc<Enricher>,
    pub metrics: ProxyMetrics,
    pub upstream_connect_timeout: Duration,
    /// How long a client may take to send its ClientHello and finish the handshake.
    pub hello_timeout: Duration,
    /// A client silent for this long is taken for a server-speaks-first protocol and relayed.
    pub first_byte_timeout: Duration,
    /// Provider domains whose SNI is terminated, with their adapter and name.
    pub providers: Vec<ProviderRoute>,
    pub accounting: Arc<AccountingSettings>,
    /// Processes whose connections are relayed untouched.
    pub bypass: Arc<ArcSwap<Vec<SelectorMatcher>>>,
    /// Workloads whose bodies go to the audit log.
    pub audit_content: Arc<ArcSwap<crate::policy::ContentSelection>>,
    /// Pod metadata, on Kubernetes.
    pub pods: Option<Arc<PodAttribution>>,
    /// Quota rules and counters.
    pub quota: Arc<QuotaEngine>,
    pub leaves: Arc<LeafCerts>,
    pub upstream: Arc<Upstream<http::UpstreamBody>>,
}

/// A provider domain pattern and how its traffic is read.
#[derive(Clone, Debug)]
pub struct ProviderRoute {
    pub pattern: String,
    pub adapter: Adapter,
    pub name: Arc<str>,
}

impl ProxyContext {
    /// The provider whose domain `sni` matches (exact names win over wildcards).
    pub fn provider(&self, sni: &str) -> Option<&ProviderRoute> {
        self.providers
            .iter()
            .find(|p| !p.pattern.contains('*') && domain_matches(&p.pattern, sni))
            .or_else(|| self.providers.iter().find(|p| domain_matches(&p.pattern, sni)))
    }
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
