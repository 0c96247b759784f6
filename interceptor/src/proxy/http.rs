//! The terminated side: an HTTP/1.1 and HTTP/2 server on the client's TLS stream, forwarding each
//! request to the original destination with streaming bodies in both directions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use hyper_util::client::legacy::Client;
use interceptor_protocols::strip::UsageChunkStripper;
use interceptor_protocols::{Dialect, ResponseAccountant, Usage, classify};

use super::ProxyMetrics;
use super::accounted::Accounted;
use super::coalesced::Coalesced;
use super::exchange::QuotaVerdict;
use super::exchange::{ConnInfo, Direction, Exchange, Metered, ResponseMeta};
use super::request_body::{self, BodyDemand, RequestBody};
use crate::accounting::{AccountingSettings, Priced};
use crate::identity::Identity;
use crate::quota::{Decision, Demand, QuotaEngine, reject};
use crate::tls::upstream::{Connector, Upstream, authority};
use crate::tls::upstream_h1::H1Lease;

/// Request bodies sent upstream.
pub type UpstreamBody = Metered<RequestBody>;
/// Response bodies sent to the client: the provider's, or a local one (errors).
pub type ClientBody = Either<Accounted<Coalesced<Incoming>>, Full<Bytes>>;

/// What the HTTP service of one connection needs.
pub struct HttpContext {
    pub conn: Arc<ConnInfo>,
    pub upstream: Arc<Upstream<UpstreamBody>>,
    pub original_dst: SocketAddr,
    /// How requests reach the original destination.
    pub forward: Forward,
    pub metrics: ProxyMetrics,
    pub accounting: Arc<AccountingSettings>,
    pub quota: Arc<QuotaEngine>,
}

/// The upstream side of one client connection.
pub enum Forward {
    /// An HTTP/1.1 client: its requests go one at a time over the connection it holds.
    Http1(H1Lease<UpstreamBody>),
    /// An HTTP/2 client: concurrent requests over the pooled client, HTTP/2 upstream when offered.
    /// Looked up once per connection, not per request.
    Pooled(Client<Connector, UpstreamBody>),
}

/// How one request goes upstream.
enum Via<'a> {
    Lease(&'a H1Lease<UpstreamBody>),
    Pooled(&'a Client<Connector, UpstreamBody>),
    /// A WebSocket upgrade: HTTP/1.1, on a connection of its own.
    Tunnel,
}

impl HttpContext {
    fn via(&self, websocket: bool) -> Via<'_> {
        match &self.forward {
            _ if websocket => Via::Tunnel,
            Forward::Http1(lease) => Via::Lease(lease),
            Forward::Pooled(client) => Via::Pooled(client),
        }
    }
}

/// Serves HTTP on a terminated TLS stream until the client closes it, in the version the TLS
/// handshake settled (ALPN `h2`, else HTTP/1.1: over TLS, HTTP/2 is only ever negotiated, RFC 9113
/// §3.2), so no read goes through version detection.
pub async fn serve<IO>(io: IO, ctx: Arc<HttpContext>, http2: bool) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(request, &ctx).await) }
    });
    let io = TokioIo::new(io);
    let served = if http2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            // Head and body in one buffer: one TLS record (one seal here, one open at the client)
            // where vectored writes make one per part.
            .writev(false)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    served.map_err(|e| e.to_string())
}

async fn handle(mut request: Request<Incoming>, ctx: &HttpContext) -> Response<ClientBody> {
    let mut route = classify(
        ctx.conn.adapter,
        request.method().as_str(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    );
    if !ctx.accounting.enabled {
        // Proxy and log only: no body is read.
        route.dialect = Dialect::Opaque;
    }
    let exchange = Exchange::start(
        ctx.conn.clone(),
        ctx.metrics.clone(),
        ctx.accounting.clone(),
        route,
        request.method().clone(),
        request.uri().path(),
    );
    let sni = ctx.conn.sni.as_str();
    if let Some(host) = request_host(&request)
        && !host.eq_ignore_ascii_case(sni)
    {
        let message =
            format!("misdirected request: host {host:?} does not match the TLS server name {sni:?}\n");
        exchange.fail(message.clone());
        return local(&exchange, StatusCode::MISDIRECTED_REQUEST, message);
    }
    let websocket = is_websocket_upgrade(&request);
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut request));

    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, websocket);
    let via = ctx.via(websocket);
    let uri = match via {
        // The lease writes the Host header; the request line keeps the origin form.
        Via::Lease(_) => origin_form(std::mem::take(&mut parts.uri)),
        Via::Pooled(_) | Via::Tunnel => {
            // The pooled client writes the Host header (or `:authority`) from the URI.
            parts.headers.remove(header::HOST);
            upstream_uri(sni, ctx.original_dst.port(), &parts.uri)
        }
    };
    parts.uri = match uri {
        Ok(uri) => uri,
        Err(e) => {
            return local(
                &exchange,
                StatusCode::BAD_REQUEST,
                format!("bad request target: {e}\n"),
            );
        }
    };
    parts.version = Version::HTTP_11;
    let prepared = match request_body::prepare(&exchange, &mut parts.headers, body).await {
        Ok(prepared) => prepared,
        Err(message) => {
            exchange.fail(message.clone());
            return local(&exchange, StatusCode::BAD_REQUEST, format!("{message}\n"));
        }
    };
    if let Some(rejected) = decide_quota(ctx, &exchange, &prepared.demand) {
        return rejected;
    }
    let strip_usage = prepared.usage_injected;
    let collect_output = prepared.collect_output;
    let upstream_request = Request::from_parts(
        parts,
        Metered::new(prepared.body, exchange.clone(), Direction::Up),
    );
    let response = match via {
        Via::Lease(lease) => lease.send(upstream_request).await.map_err(|e| error_chain(&e)),
        Via::Pooled(client) => client
            .request(upstream_request)
            .await
            .map_err(|e| error_chain(&e)),
        Via::Tunnel => ctx
            .upstream
            .client(ctx.original_dst, false)
            .request(upstream_request)
            .await
            .map_err(|e| error_chain(&e)),
    };
    let mut response = match response {
        Ok(response) => response,
        Err(e) => {
            let message = format!("upstream {}: {e}", ctx.original_dst);
            warn!(error = %message, "upstream request failed");
            ctx.metrics.errors.with_label_values(&["upstream"]).inc();
            exchange.fail(message);
            return local(
                &exchange,
                StatusCode::BAD_GATEWAY,
                "upstream request failed\n".into(),
            );
        }
    };
    exchange.responded(response.status());
    exchange.response_meta(ResponseMeta::from_headers(response.headers()));
    if let Some(capture) = exchange.capture() {
        capture.response_encoding(response.headers().get(http::header::CONTENT_ENCODING));
    }
    if let Some(client_upgrade) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let exchange = exchange.clone();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                        debug!(error = %e, "websocket tunnel ended with an error");
                    }
                }
                Err(e) => exchange.fail(format!("upgrade failed: {e}")),
            }
            drop(exchange);
        });
    } else {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    let settings = exchange.settings();
    let mut accountant = if settings.enabled {
        ResponseAccountant::new(
            ctx.conn.adapter,
            exchange.route(),
            response.status().as_u16(),
            response.headers(),
            settings.limits,
        )
    } else {
        ResponseAccountant::disabled()
    };
    if collect_output {
        accountant.collect_output();
    }
    let sse = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let stripper = (strip_usage && sse).then(|| UsageChunkStripper::new(settings.limits.max_event_bytes));
    if stripper.is_some() {
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    let (parts, body) = response.into_parts();
    let mut body = Coalesced::new(body);
    body.prefetch().await;
    Response::from_parts(
        parts,
        Either::Left(Accounted::new(body, exchange, accountant, stripper)),
    )
}

/// Applies the quota rules before forwarding: `Some(response)` when a rule rejects the request (it
/// never reaches the provider), else the reservation is kept on the exchange.
fn decide_quota(
    ctx: &HttpContext,
    exchange: &Arc<Exchange>,
    body: &BodyDemand,
) -> Option<Response<ClientBody>> {
    if ctx.quota.rule_count() == 0 {
        return None;
    }
    let conn = &ctx.conn;
    let route = exchange.route();
    let model = exchange.requested_model().or(route
        .path_model
        .as_deref()
        .filter(|_| !route.path_model_is_deployment));
    let demand = Demand {
        provider: &conn.provider,
        model,
        // About four bytes of JSON per prompt token; the real count replaces it when the request ends.
        input_tokens: body.body_bytes.unwrap_or(0).div_ceil(4),
        max_output_tokens: body.max_output_tokens,
    };
    let identity = Identity {
        facts: &conn.facts,
        details: &conn.details,
        pod: conn.pod.known(),
    };
    let accounting = &ctx.accounting;
    let estimate_cost = |input, output| {
        let usage = Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        };
        match accounting.price(&conn.provider, conn.adapter, model, Some(&usage)) {
            Priced::Priced { cost, .. } => cost.usd(),
            _ => 0.0,
        }
    };
    match ctx.quota.decide(&identity, &demand, &estimate_cost) {
        Decision::Reject(rejection) => {
            let shaped = reject::response(conn.adapter, &rejection);
            info!(
                rule = %rejection.rule,
                limit = rejection.limited.name(),
                message = %rejection.message,
                provider = %conn.provider,
                model,
                tgid = conn.facts.tgid,
                comm = %conn.facts.comm,
                namespace = conn.pod.known().map(|p| &*p.namespace),
                workload = conn.pod.known().map(|p| p.workload.to_string()),
                "request rejected by policy"
            );
            exchange.quota(QuotaVerdict {
                decision: "rejected",
                rule: Some(rejection.rule.clone()),
                limit: Some(rejection.limited.name()),
                permit: None,
            });
            exchange.responded(shaped.status);
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(shaped.body))));
            *response.status_mut() = shaped.status;
            *response.headers_mut() = shaped.headers;
            Some(response)
        }
        Decision::Allow { permit, observed } => {
            let first = observed.first();
            if !permit.is_empty() || first.is_some() {
                exchange.quota(QuotaVerdict {
                    decision: if first.is_some() { "observed" } else { "allowed" },
                    rule: first.map(|o| o.rule.clone()),
                    limit: first.map(|o| o.limited.name()),
                    permit: Some(permit),
                });
            }
            None
        }
    }
}

/// A response made by the proxy itself.
fn local(exchange: &Arc<Exchange>, status: StatusCode, body: String) -> Response<ClientBody> {
    exchange.responded(status);
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The host the request names (URI authority for HTTP/2, else the Host header), without port or
/// trailing dot.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    let host = match request.uri().authority() {
        Some(authority) => authority.host(),
        None => host_of(request.headers().get(header::HOST)?.to_str().ok()?),
    };
    Some(host.trim_end_matches('.'))
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`; user info skipped), read the way
/// `http::uri::Authority::host` reads it, without parsing (and copying) the whole authority.
fn host_of(authority: &str) -> &str {
    let after_user = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if after_user.starts_with('[') {
        return after_user.find(']').map_or(after_user, |end| &after_user[..=end]);
    }
    after_user.split_once(':').map_or(after_user, |(host, _)| host)
}

fn upstream_uri(sni: &str, port: u16, original: &Uri) -> Result<Uri, http::Error> {
    let path = original.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme("https")
        .authority(authority(sni, port))
        .path_and_query(path)
        .build()
}

/// The request target in origin form (`/path?query`): as received from an HTTP/1.1 client (kept as
/// is), or cut from an absolute-form target.
fn origin_form(original: Uri) -> Result<Uri, http::Error> {
    if original.scheme().is_none() && original.authority().is_none() {
        return Ok(original);
    }
    let path = original.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Ok(Uri::try_from(path)?)
}

fn is_websocket_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Hop-by-hop headers removed from every forwarded message (`Connection`, `Upgrade` and `TE` depend on
/// the message).
static ALWAYS_REMOVED: [HeaderName; 6] = [
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    ALWAYS_REMOVED.contains(name) || [header::CONNECTION, header::UPGRADE, header::TE].contains(name)
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection` and the standard set.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` pass (WebSocket handshakes).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a lookup per hop-by-hop name.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &ALWAYS_REMOVED {
        headers.remove(name);
    }
    if !te_trailers {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-test"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn te_trailers_and_websocket_upgrade_survive() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(
            headers.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert_eq!(
            headers.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            headers.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn host_comes_from_authority_or_header() {
        let request = Request::builder()
            .uri("https://API.openai.com/v1/models")
            .body(())
            .expect("request");
        assert_eq!(request_host(&request), Some("API.openai.com"));
        let request = Request::builder()
            .uri("/v1")
            .header("host", "api.openai.com:443")
            .body(())
            .expect("request");
        assert_eq!(request_host(&request), Some("api.openai.com"));
        let request = Request::builder().uri("/v1").body(()).expect("request");
        assert_eq!(request_host(&request), None);
        let request = Request::builder()
            .uri("/v1")
            .header("host", "api.openai.com.")
            .body(())
            .expect("request");
        assert_eq!(request_host(&request), Some("api.openai.com"));
    }

    #[test]
    fn hosts_are_read_as_http_reads_authorities() {
        for authority in [
            "api.openai.com",
            "api.openai.com:443",
            "user@api.openai.com:8443",
            "[2001:db8::1]:443",
            "[2001:db8::1]",
            "a@b@c.example:1",
            "",
        ] {
            let parsed: Option<http::uri::Authority> = authority.parse().ok();
            if let Some(parsed) = parsed {
                assert_eq!(host_of(authority), parsed.host(), "{authority}");
            }
        }
        assert_eq!(host_of("[2001:db8::1]:443"), "[2001:db8::1]");
    }

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let absolute: Uri = "https://api.openai.com/v1/chat/completions?x=1"
            .parse()
            .expect("uri");
        assert_eq!(
            origin_form(absolute).expect("uri").to_string(),
            "/v1/chat/completions?x=1"
        );
        let origin: Uri = "/v1/models".parse().expect("uri");
        assert_eq!(origin_form(origin.clone()).expect("uri"), origin);
        let bare: Uri = "https://api.openai.com".parse().expect("uri");
        assert_eq!(origin_form(bare).expect("uri").to_string(), "/");
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_and_non_default_port() {
        let uri: Uri = "/v1beta/models/x:generateContent?alt=sse".parse().expect("uri");
        assert_eq!(
            upstream_uri("generativelanguage.googleapis.com", 443, &uri)
                .expect("uri")
                .to_string(),
            "https://generativelanguage.googleapis.com/v1beta/models/x:generateContent?alt=sse"
        );
        assert_eq!(
            upstream_uri("h.example", 8443, &uri)
                .expect("uri")
                .authority()
                .map(|a| a.as_str()),
            Some("h.example:8443")
        );
    }
}
