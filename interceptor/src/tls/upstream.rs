//! The upstream side: verified TLS to the original destination with the client's SNI, and
//! connection pools per (destination address, SNI, HTTP/2 allowed).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::upstream_h1::{H1Error, H1Lease, H1Pool};

/// System trust store bundles looked for (Debian, RHEL, Alpine layouts).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Idle upstream connections kept per destination and server name.
const MAX_IDLE_PER_KEY: usize = 64;
/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Errors setting up the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading CA bundle {0}: {1}")]
    Bundle(PathBuf, String),
    #[error("TLS client configuration: {0}")]
    Config(String),
}

/// Verified TLS clients and their pools.
pub struct Upstream<B> {
    h1: Arc<ClientConfig>,
    h1_h2: Arc<ClientConfig>,
    connect_timeout: Duration,
    pools: Mutex<HashMap<(SocketAddr, bool), Client<Connector, B>>>,
    /// HTTP/1.1 connections parked between clients.
    parked: Arc<H1Pool<B>>,
}

impl<B> Upstream<B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Trusts webpki's roots, the system bundle if present, and `extra_bundle`.
    pub fn new(extra_bundle: Option<&Path>, connect_timeout: Duration) -> Result<Self, UpstreamError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(system) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
            // A malformed system bundle is not fatal: webpki's roots remain.
            let _ = add_bundle(&mut roots, system);
        }
        if let Some(extra) = extra_bundle {
            let added = add_bundle(&mut roots, extra)?;
            if added == 0 {
                return Err(UpstreamError::Bundle(
                    extra.to_owned(),
                    "no certificate in the file".into(),
                ));
            }
        }
        let roots = Arc::new(roots);
        let config = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, UpstreamError> {
            let mut config = ClientConfig::builder_with_provider(super::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| UpstreamError::Config(e.to_string()))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(Self {
            h1: config(&[b"http/1.1"])?,
            h1_h2: config(&[b"h2", b"http/1.1"])?,
            connect_timeout,
            pools: Mutex::new(HashMap::new()),
            parked: Arc::new(H1Pool::new(MAX_IDLE_PER_KEY, IDLE_TIMEOUT)),
        })
    }

    /// A connector to `addr` offering HTTP/1.1 only, or HTTP/2 and HTTP/1.1 when `h2`.
    pub fn connector(&self, addr: SocketAddr, h2: bool) -> Connector {
        let tls = if h2 { self.h1_h2.clone() } else { self.h1.clone() };
        Connector {
            addr,
            tls: TlsConnector::from(tls),
            timeout: self.connect_timeout,
        }
    }

    /// HTTP/1.1 connections to `addr` for one client connection to `sni`: the connection of its last
    /// request is kept for the next, and parked for other clients when it goes.
    pub fn lease(&self, addr: SocketAddr, sni: &str) -> Result<H1Lease<B>, H1Error> {
        H1Lease::new(self.parked.clone(), self.connector(addr, false), sni)
    }

    /// The pooled client for connections to `addr`; HTTP/2 is offered only when `h2` (the client offered
    /// it). The pool inside is keyed by SNI (the request URI's host).
    pub fn client(&self, addr: SocketAddr, h2: bool) -> Client<Connector, B> {
        let mut pools = self.pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pools
            .entry((addr, h2))
            .or_insert_with(|| {
                let connector = self.connector(addr, h2);
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(IDLE_TIMEOUT)
                    .pool_max_idle_per_host(MAX_IDLE_PER_KEY)
                    .build(connector)
            })
            .clone()
    }
}

/// `host`, or `host:port` for a port other than HTTPS's, as URIs and Host headers write it.
pub fn authority(host: &str, port: u16) -> String {
    if port == 443 {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

fn add_bundle(roots: &mut RootCertStore, path: &Path) -> Result<usize, UpstreamError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| UpstreamError::Bundle(path.to_owned(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| UpstreamError::Bundle(path.to_owned(), e.to_string()))?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    Ok(added)
}

/// Connects to one fixed address (the original destination), whatever the URI says, and uses the
/// URI's host as SNI.
#[derive(Clone)]
pub struct Connector {
    addr: SocketAddr,
    tls: TlsConnector,
    timeout: Duration,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamConnection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("request URI without host")?;
            let tls = this.connect(host).await?;
            Ok(UpstreamConnection(TokioIo::new(tls)))
        })
    }
}

impl Connector {
    /// TCP to the fixed address, then verified TLS with `server_name` as SNI.
    pub async fn connect(&self, server_name: &str) -> Result<TlsStream<TcpStream>, BoxError> {
        let server_name = ServerName::try_from(server_name.to_owned())?;
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("connecting to {} timed out after {:?}", self.addr, self.timeout))??;
        tcp.set_nodelay(true)?;
        Ok(self.tls.connect(server_name, tcp).await?)
    }

    /// Where it connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A TLS connection to the provider.
pub struct UpstreamConnection(TokioIo<TlsStream<TcpStream>>);

impl Connection for UpstreamConnection {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.0.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for UpstreamConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
