//! Simulated provider endpoints: TLS servers in a provider namespace that answer HTTP requests and
//! report the peer they saw (the "provider-side view"), and a plain TCP sink.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::node::ProviderNetns;

/// What the provider saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub peer: SocketAddr,
    pub sni: Option<String>,
}

/// A running simulated provider. Its tasks stop with the runtime.
pub struct Provider {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub sink_connections: Arc<AtomicU64>,
}

impl Provider {
    /// Serves TLS (HTTP/1.1) on each of `tls_addrs` and a TCP sink (accept, write `ok`, close) on each of
    /// `sink_addrs`, all bound inside `netns`.
    pub fn start(
        netns: &ProviderNetns,
        tls: Arc<rustls::ServerConfig>,
        tls_addrs: &[SocketAddr],
        sink_addrs: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_connections = Arc::new(AtomicU64::new(0));
        for addr in tls_addrs {
            let listener = bind_in(netns, *addr)?;
            tokio::spawn(serve_tls(listener, TlsAcceptor::from(tls.clone()), seen.clone()));
        }
        for addr in sink_addrs {
            let listener = bind_in(netns, *addr)?;
            tokio::spawn(serve_sink(listener, sink_connections.clone()));
        }
        Ok(Self {
            seen,
            sink_connections,
        })
    }

    /// Peers seen so far.
    pub fn peers(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn bind_in(netns: &ProviderNetns, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let std_listener = netns.enter(move || listen(addr))?;
    TcpListener::from_std(std_listener).context("registering the provider listener")
}

/// A non-blocking listener with a deep backlog (benchmarks open connections in bursts).
pub fn listen(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn serve_tls(listener: TcpListener, acceptor: TlsAcceptor, seen: Arc<Mutex<Vec<Seen>>>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if let Ok(mut seen) = seen.lock() {
                seen.push(Seen {
                    peer,
                    sni: sni.clone(),
                });
            }
            let body = format!(
                "{{\"object\":\"list\",\"data\":[],\"peer\":\"{peer}\",\"sni\":\"{}\"}}\n",
                sni.as_deref().unwrap_or("")
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(response.as_bytes()).await;
            let _ = tls.shutdown().await;
        });
    }
}

async fn serve_sink(listener: TcpListener, count: Arc<AtomicU64>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        count.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = stream.write_all(b"ok\n").await;
            let _ = stream.shutdown().await;
        });
    }
}
