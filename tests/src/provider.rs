//! Simulated provider endpoints in a provider namespace, faithful to the public API documents where
//! the tests depend on them:
//!
//! * `GET /v1/models` — reports the peer, SNI and HTTP version it saw (the "provider-side view");
//! * `POST /v1/chat/completions` — OpenAI Chat Completions, JSON or SSE (`stream`, `stream_options.include_usage`);
//! * `POST /v1/messages` — Anthropic Messages, JSON or SSE (message_start … message_stop);
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
}

type Body = BoxBody<Bytes, std::io::Error>;

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

async fn serve_tls(listener: TcpListener, acceptor: TlsAcceptor, seen: Arc<Mutex<Vec<Seen>>>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let service = hyper::service::service_fn(move |request| {
                let seen = seen.clone();
                let sni = sni.clone();
                async move { Ok::<_, Infallible>(route(request, peer, sni, &seen).await) }
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
        (Method::POST, "/v1/chat/completions") => chat_completions(request).await,
        (Method::POST, "/v1/messages") => messages(request).await,
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

fn full(bytes: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// An SSE response from events (already formatted), `interval` apart.
fn sse_response(events: Vec<String>, interval: Duration) -> Response<Body> {
    let stream = futures::stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
        if i > 0 && !interval.is_zero() {
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

async fn json_body(request: Request<Incoming>) -> Option<Value> {
    let bytes = request.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

/// The reply text, split in stream deltas.
const REPLY: [&str; 4] = ["Hello", " from the", " simulated", " provider."];
const PROMPT_TOKENS: u64 = 12;
const COMPLETION_TOKENS: u64 = 7;

async fn chat_completions(request: Request<Incoming>) -> Response<Body> {
    let Some(body) = json_body(request).await else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": null, "code": null}}),
        );
    };
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let usage = json!({
        "prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    });
    if body["stream"].as_bool() != Some(true) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-sim1", "object": "chat.completion", "created": 1_732_400_000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY.concat(), "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage, "service_tier": "default", "system_fingerprint": "fp_sim"
            }),
        );
    }
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-sim1", "object": "chat.completion.chunk", "created": 1_732_400_000, "model": model,
                   "system_fingerprint": "fp_sim", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    events.extend(
        REPLY
            .iter()
            .map(|piece| chunk(json!({"content": piece}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-sim1", "object": "chat.completion.chunk", "created": 1_732_400_000, "model": model,
                   "system_fingerprint": "fp_sim", "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".to_owned());
    sse_response(events, Duration::from_millis(5))
}

async fn messages(request: Request<Incoming>) -> Response<Body> {
    let Some(body) = json_body(request).await else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"type": "error", "error": {"type": "invalid_request_error", "message": "invalid JSON body"}}),
        );
    };
    let model = body["model"].as_str().unwrap_or("claude-sonnet-4-5").to_owned();
    let usage = json!({"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS,
                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    if body["stream"].as_bool() != Some(true) {
        return json_response(
            StatusCode::OK,
            &json!({"id": "msg_sim1", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": REPLY.concat()}],
                    "stop_reason": "end_turn", "stop_sequence": null, "usage": usage}),
        );
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_sim1", "type": "message", "role": "assistant", "model": model,
                   "content": [], "stop_reason": null, "stop_sequence": null,
                   "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    events.extend(REPLY.iter().map(|piece| {
        event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}))
    }));
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": COMPLETION_TOKENS}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse_response(events, Duration::from_millis(5))
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
