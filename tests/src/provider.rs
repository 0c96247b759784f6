//! Simulated provider endpoints in a provider namespace, faithful to the public API documents where
//! the tests depend on them:
//!
//! * `GET /v1/models` — reports the peer, SNI and HTTP version it saw (the "provider-side view");
//! * `POST /v1/chat/completions`, `/v1/responses`, `/v1/embeddings` — OpenAI ([`openai`]);
//! * `POST /v1/chat/completions/unaccounted` — the same chat completions on a path that is no OpenAI
//!   endpoint, so the interceptor forwards it unread (`kind=other`): the proxy bench's baseline of
//!   accounting's cost within one daemon;
//! * `POST /v1/messages` — Anthropic Messages, JSON or SSE, with cache tokens ([`anthropic`]);
//! * `POST /v1[beta]/models/{model}:generateContent` and `:streamGenerateContent` — Gemini ([`gemini`]);
//! * `GET /sse?chunks=N&interval_ms=M` — N SSE events M ms apart;
//! * `GET /ws` — WebSocket echo;
//! * `GET /reset` — headers and some body, then the connection is reset;
//! * `POST /echo-size` — answers how many body bytes it received;
//!
//! and a plain TCP sink (accept, write `ok`, close) for connection-level tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::node::ProviderNetns;

pub mod anthropic;
pub mod gemini;
pub mod ledger;
pub mod openai;

pub use ledger::{Ledger, Sent};

/// Chat completions on a path the interceptor does not account for (see the module's list).
pub const UNACCOUNTED_CHAT_PATH: &str = "/v1/chat/completions/unaccounted";

/// What the provider saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub peer: SocketAddr,
    pub sni: Option<String>,
    pub path: String,
    pub version: String,
}

/// A running simulated provider. Its tasks stop with the runtime.
pub struct Provider {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub sink_connections: Arc<AtomicU64>,
    /// The usage of every response sent.
    pub ledger: Ledger,
}

pub type Body = BoxBody<Bytes, std::io::Error>;

impl Provider {
    /// Serves HTTPS (HTTP/1.1 and HTTP/2) on each of `tls_addrs` and a TCP sink on each of `sink_addrs`,
    /// all bound inside `netns`.
    pub fn start(
        netns: &ProviderNetns,
        tls: Arc<rustls::ServerConfig>,
        tls_addrs: &[SocketAddr],
        sink_addrs: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_connections = Arc::new(AtomicU64::new(0));
        let ledger = Ledger::default();
        for addr in tls_addrs {
            let listener = bind_in(netns, *addr)?;
            tokio::spawn(serve_tls(
                listener,
                TlsAcceptor::from(tls.clone()),
                seen.clone(),
                ledger.clone(),
            ));
        }
        for addr in sink_addrs {
            let listener = bind_in(netns, *addr)?;
            tokio::spawn(serve_sink(listener, sink_connections.clone()));
        }
        Ok(Self {
            seen,
            sink_connections,
            ledger,
        })
    }

    /// Requests seen so far.
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

async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    seen: Arc<Mutex<Vec<Seen>>>,
    ledger: Ledger,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        // As real API front ends do: small SSE events go out at once.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let seen = seen.clone();
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let service = hyper::service::service_fn(move |request| {
                let seen = seen.clone();
                let sni = sni.clone();
                let ledger = ledger.clone();
                async move { Ok::<_, Infallible>(route(request, peer, sni, &seen, &ledger).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    sni: Option<String>,
    seen: &Mutex<Vec<Seen>>,
    ledger: &Ledger,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if let Ok(mut seen) = seen.lock() {
        seen.push(Seen {
            peer,
            sni: sni.clone(),
            path: path.clone(),
            version: format!("{:?}", request.version()),
        });
    }
    let method = request.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/v1/models") | (Method::GET, "/") => json_response(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1_721_172_741, "owned_by": "system"}],
                "peer": peer.to_string(),
                "sni": sni.unwrap_or_default(),
                "http_version": format!("{:?}", request.version()),
            }),
        ),
        (Method::POST, "/v1/chat/completions" | UNACCOUNTED_CHAT_PATH) => {
            openai::chat_completions(request, ledger).await
        }
        (Method::POST, "/v1/responses") => openai::responses(request, ledger).await,
        (Method::POST, "/v1/embeddings") => openai::embeddings(request, ledger).await,
        (Method::POST, "/v1/messages") => anthropic::messages(request, ledger).await,
        (Method::POST, p) if p.starts_with("/v1beta/models/") || p.starts_with("/v1/models/") => {
            gemini::models(request, ledger).await
        }

        (Method::POST, "/echo-size") => {
            let size = match request.into_body().collect().await {
                Ok(body) => body.to_bytes().len(),
                Err(_) => return json_response(StatusCode::BAD_REQUEST, &json!({"error": "body"})),
            };
            json_response(StatusCode::OK, &json!({ "received": size }))
        }
        (Method::GET, "/sse") => sse(&request),
        (Method::GET, "/ws") => websocket(request),
        (Method::GET, "/reset") => reset(),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": format!("Unknown path {path}"), "type": "invalid_request_error"}}),
        ),
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON response, gzip-compressed when the client accepts it (as the real APIs do).
pub fn json_response_for(
    request_headers: &http::HeaderMap,
    status: StatusCode,
    value: &Value,
) -> Response<Body> {
    let accepts_gzip = request_headers
        .get(http::header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut response = json_response(status, value);
    if accepts_gzip {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        if encoder.write_all(value.to_string().as_bytes()).is_ok()
            && let Ok(compressed) = encoder.finish()
        {
            *response.body_mut() = full(compressed);
            response.headers_mut().insert(
                http::header::CONTENT_ENCODING,
                http::HeaderValue::from_static("gzip"),
            );
        }
    }
    response
}

/// Reads a JSON request body.
pub async fn json_body(request: Request<Incoming>) -> Option<Value> {
    let bytes = request.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

/// An SSE response from events (already formatted), `interval` apart.
pub fn sse_response(events: Vec<String>, interval: Duration) -> Response<Body> {
    sse_response_with_tail(events, interval, 0)
}

/// [`sse_response`] whose last `tail` events follow the one before them at once: what a provider
/// sends when generation ends (OpenAI's usage chunk and `[DONE]` right after the finish chunk).
pub fn sse_response_with_tail(events: Vec<String>, interval: Duration, tail: usize) -> Response<Body> {
    let paced = events.len().saturating_sub(tail);
    let stream = futures::stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
        if i > 0 && i < paced && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Ok::<_, std::io::Error>(Frame::data(Bytes::from(event)))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    response
}

fn query_number(request: &Request<Incoming>, name: &str, default: u64) -> u64 {
    request
        .uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sse(request: &Request<Incoming>) -> Response<Body> {
    let chunks = query_number(request, "chunks", 10);
    let interval = Duration::from_millis(query_number(request, "interval_ms", 50));
    let events = (0..chunks).map(|i| format!("data: {{\"n\":{i}}}\n\n")).collect();
    sse_response(events, interval)
}

fn reset() -> Response<Body> {
    let stream = futures::stream::iter(0..3).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i < 2 {
            Ok(Frame::data(Bytes::from(format!("data: {{\"n\":{i}}}\n\n"))))
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated upstream reset",
            ))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

fn websocket(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "not a websocket handshake"}),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    headers.insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
    if let Ok(value) = http::HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", value);
    }
    response
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
