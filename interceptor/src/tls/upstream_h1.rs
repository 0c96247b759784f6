//! HTTP/1.1 upstream connections for HTTP/1.1 clients. Each client connection keeps the upstream
//! connection of its last request for its next one (no pool lookup and no task per request, which a
//! general pooled client needs to learn when a connection is free again), and parks it in a shared
//! idle pool when the client goes, for the next client of the same destination and server name.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::header::{HOST, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::upstream::{BoxError, Connector, authority};

/// Why an upstream HTTP/1.1 exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connecting")]
    Connect(#[source] BoxError),
    #[error("HTTP/1.1 handshake")]
    Handshake(#[source] hyper::Error),
    #[error("sending the request")]
    Send(#[source] hyper::Error),
    #[error("invalid server name {0:?} for a Host header")]
    Host(String),
}

/// Where parked connections lead: the original destination and the server name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    addr: SocketAddr,
    sni: Arc<str>,
}

struct Parked<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// Idle connections between clients, bounded per key and in age.
pub struct H1Pool<B> {
    idle: Mutex<Idle<B>>,
    max_idle_per_key: usize,
    idle_timeout: Duration,
}

struct Idle<B> {
    by_key: HashMap<PoolKey, VecDeque<Parked<B>>>,
    last_sweep: Instant,
}

impl<B> H1Pool<B> {
    pub fn new(max_idle_per_key: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(Idle {
                by_key: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            max_idle_per_key,
            idle_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle<B>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently parked live connection for `key`; closed and expired ones are dropped.
    fn checkout(&self, key: &PoolKey) -> Option<SendRequest<B>> {
        let mut idle = self.lock();
        let parked = idle.by_key.get_mut(key)?;
        while let Some(candidate) = parked.pop_back() {
            if candidate.since.elapsed() < self.idle_timeout && candidate.sender.is_ready() {
                return Some(candidate.sender);
            }
        }
        None
    }

    /// Keeps a free connection for the next client; the oldest goes when the key is full.
    fn park(&self, key: PoolKey, sender: SendRequest<B>) {
        if self.max_idle_per_key == 0 {
            return;
        }
        let now = Instant::now();
        let timeout = self.idle_timeout;
        let mut idle = self.lock();
        if now.duration_since(idle.last_sweep) >= timeout / 3 {
            idle.last_sweep = now;
            idle.by_key.retain(|_, parked| {
                parked.retain(|p| now.duration_since(p.since) < timeout && !p.sender.is_closed());
                !parked.is_empty()
            });
        }
        let parked = idle.by_key.entry(key).or_default();
        if parked.len() >= self.max_idle_per_key {
            parked.pop_front();
        }
        parked.push_back(Parked { sender, since: now });
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().by_key.values().map(VecDeque::len).sum()
    }
}

/// One client connection's hold on upstream HTTP/1.1 connections to its destination.
pub struct H1Lease<B>
where
    B: hyper::body::Body + Send + 'static,
{
    pool: Arc<H1Pool<B>>,
    key: PoolKey,
    connector: Connector,
    host: HeaderValue,
    /// The connection of the last request, kept for the next.
    current: Mutex<Option<SendRequest<B>>>,
}

impl<B> H1Lease<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A lease on connections made by `connector`, with `sni` as server name and Host header.
    pub fn new(pool: Arc<H1Pool<B>>, connector: Connector, sni: &str) -> Result<Self, H1Error> {
        let host = HeaderValue::try_from(authority(sni, connector.addr().port()))
            .map_err(|_| H1Error::Host(sni.to_owned()))?;
        Ok(Self {
            pool,
            key: PoolKey {
                addr: connector.addr(),
                sni: Arc::from(sni),
            },
            connector,
            host,
            current: Mutex::new(None),
        })
    }

    fn current(&self) -> MutexGuard<'_, Option<SendRequest<B>>> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `request` (origin-form URI) with the Host header of the lease. A reused connection that
    /// turns out closed before the request was written is replaced, once per candidate, as a pooled
    /// client would.
    pub async fn send(&self, mut request: Request<B>) -> Result<Response<Incoming>, H1Error> {
        request.headers_mut().insert(HOST, self.host.clone());
        let mut kept = self.current().take();
        loop {
            let (mut sender, reused) = match kept.take().or_else(|| self.pool.checkout(&self.key)) {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    debug!(error = %e, "reused upstream connection closed; taking another");
                    continue;
                }
                return Err(H1Error::Send(e));
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    *self.current() = Some(sender);
                    return Ok(response);
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => {
                        debug!(error = %failed.error(), "reused upstream connection closed before the request; retrying");
                        request = unsent;
                    }
                    _ => return Err(H1Error::Send(failed.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, H1Error> {
        let tls = self
            .connector
            .connect(&self.key.sni)
            .await
            .map_err(H1Error::Connect)?;
        // Head and body in one TLS record, as the server side writes them.
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(H1Error::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl<B> Drop for H1Lease<B>
where
    B: hyper::body::Body + Send + 'static,
{
    /// The client went: its upstream connection waits in the pool for the next client, once the last
    /// response has been read to its end (a connection whose response was cut short closes instead).
    fn drop(&mut self) {
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut sender) = current.take() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let pool = self.pool.clone();
        let key = self.key.clone();
        if sender.is_ready() {
            pool.park(key, sender);
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.park(key, sender);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;

    /// A plain-TCP HTTP/1.1 upstream (the lease's TLS is covered end to end): serves `/` with the
    /// Host header it got and counts the connections it accepted.
    async fn upstream(connections: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                        let host = request
                            .headers()
                            .get(HOST)
                            .map(|h| h.as_bytes().to_vec())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(host))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn pool_key(addr: SocketAddr) -> PoolKey {
        PoolKey {
            addr,
            sni: Arc::from("api.openai.com"),
        }
    }

    async fn plain_sender(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
        tokio::spawn(connection);
        sender
    }

    async fn get(sender: &mut SendRequest<Full<Bytes>>) -> Bytes {
        sender.ready().await.expect("ready");
        let response = sender
            .send_request(
                Request::builder()
                    .uri("/")
                    .header(HOST, "x")
                    .body(Full::new(Bytes::new()))
                    .expect("request"),
            )
            .await
            .expect("response");
        response.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn a_parked_connection_serves_the_next_client_of_the_same_key_only() {
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = upstream(accepted.clone()).await;
        let pool = H1Pool::new(4, Duration::from_secs(90));
        let mut sender = plain_sender(addr).await;
        assert_eq!(get(&mut sender).await, Bytes::from_static(b"x"));
        pool.park(pool_key(addr), sender);
        assert_eq!(pool.idle_count(), 1);
        let other = PoolKey {
            addr,
            sni: Arc::from("api.anthropic.com"),
        };
        assert!(
            pool.checkout(&other).is_none(),
            "another server name must not get it"
        );
        let mut reused = pool.checkout(&pool_key(addr)).expect("parked connection");
        assert_eq!(get(&mut reused).await, Bytes::from_static(b"x"));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn expired_and_closed_connections_are_not_handed_out_and_the_pool_is_bounded() {
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = upstream(accepted).await;
        let expiring = H1Pool::new(4, Duration::from_millis(20));
        expiring.park(pool_key(addr), plain_sender(addr).await);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(expiring.checkout(&pool_key(addr)).is_none(), "expired");

        let bounded = H1Pool::new(2, Duration::from_secs(90));
        for _ in 0..3 {
            bounded.park(pool_key(addr), plain_sender(addr).await);
        }
        assert_eq!(bounded.idle_count(), 2, "the oldest goes when a key is full");

        // A connection whose server went away is skipped.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closing = listener.local_addr().expect("addr");
        let sender = {
            let connect = plain_sender(closing);
            let (sender, accepted) = tokio::join!(connect, listener.accept());
            drop(accepted.expect("accept"));
            sender
        };
        let pool = H1Pool::new(4, Duration::from_secs(90));
        pool.park(pool_key(closing), sender);
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool
                .lock()
                .by_key
                .values()
                .flatten()
                .any(|p| !p.sender.is_closed())
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the connection task sees the close");
        assert!(pool.checkout(&pool_key(closing)).is_none(), "closed");
    }
}
