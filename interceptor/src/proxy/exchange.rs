//! One proxied request/response exchange: its record, and body wrappers that meter the bytes and emit
//! the record (one structured log line, metrics) once both bodies are done.

use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use interceptor_protocols::{Accounting, Adapter, Route};

use super::ProxyMetrics;
use super::record::Record;
use super::request_body::KeptBody;
use crate::accounting::AccountingSettings;
use crate::identity::{KernelFacts, ProcessDetails};
use crate::kubernetes::{PodAttribution, PodRef};
use crate::quota::Permit;

/// What every request of a connection shares: who, where to.
pub struct ConnInfo {
    pub facts: KernelFacts,
    pub details: Arc<ProcessDetails>,
    /// The pod, as found when the connection was accepted.
    pub pod: PodRef,
    /// The pod directory (to complete the record of a pod not yet listed), on Kubernetes.
    pub pods: Option<Arc<PodAttribution>>,
    /// The TLS server name the client asked for (the provider host).
    pub sni: String,
    /// The provider's name (metrics label, price section) and API dialect.
    pub provider: Arc<str>,
    pub adapter: Adapter,
    /// Bytes of each body kept for the audit log (`audit.content` selected this connection).
    pub content_limit: Option<usize>,
    /// The usage metrics' handles of the connection's last request.
    pub metric_handles: crate::accounting::HandleMemo,
}

/// What the request body said (when it was read).
#[derive(Debug, Default)]
pub struct RequestSide {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` was added by the interceptor.
    pub usage_injected: bool,
    /// Why the body was forwarded unread, when it was.
    pub unread: Option<&'static str>,
    /// The request body, kept for a tokenizer estimate of the prompt (OpenAI-style streams).
    pub prompt_source: Option<KeptBody>,
}

/// Response headers worth keeping: request id and rate-limit state (values shared with the
/// response, not copied).
#[derive(Debug, Default)]
pub struct ResponseMeta {
    pub request_id: Option<HeaderValue>,
    pub retry_after: Option<HeaderValue>,
    pub remaining_requests: Option<HeaderValue>,
    pub remaining_tokens: Option<HeaderValue>,
}

impl ResponseMeta {
    /// One pass over the response headers (a lookup per candidate name hashes each name). Where
    /// providers differ in naming, the earlier name of each list wins; of repeated headers, the
    /// first value.
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let mut meta = Self::default();
        // Per field: the rank of the name its value came from (lower wins).
        let mut found = [usize::MAX; 4];
        for (name, value) in headers {
            let (field, rank) = match name.as_str() {
                "x-request-id" => (0, 0),
                "request-id" => (0, 1),
                "x-amzn-requestid" => (0, 2),
                "apim-request-id" => (0, 3),
                "retry-after" => (1, 0),
                "retry-after-ms" => (1, 1),
                "x-ratelimit-remaining-requests" => (2, 0),
                "anthropic-ratelimit-requests-remaining" => (2, 1),
                "x-ratelimit-remaining-tokens" => (3, 0),
                "anthropic-ratelimit-tokens-remaining" => (3, 1),
                "anthropic-ratelimit-input-tokens-remaining" => (3, 2),
                _ => continue,
            };
            if rank < found[field] {
                found[field] = rank;
                let slot = match field {
                    0 => &mut meta.request_id,
                    1 => &mut meta.retry_after,
                    2 => &mut meta.remaining_requests,
                    _ => &mut meta.remaining_tokens,
                };
                *slot = Some(value.clone());
            }
        }
        meta
    }
}

/// A header value for a log field: text, at most 128 bytes.
pub fn header_text(value: Option<&HeaderValue>) -> Option<&str> {
    let text = value?.to_str().ok()?;
    Some(&text[..interceptor_protocols::estimate::floor_char_boundary(text, 128)])
}

/// The record of one exchange. Emitted when the last reference (the bodies) is dropped.
pub struct Exchange {
    conn: Arc<ConnInfo>,
    metrics: ProxyMetrics,
    accounting: Arc<AccountingSettings>,
    route: Route,
    method: http::Method,
    /// Path without the query (queries may carry API keys, e.g. Gemini's `?key=`).
    path: String,
    started: Instant,
    ttfb: OnceLock<Duration>,
    status: AtomicU16,
    bytes_up: AtomicU64,
    pub(super) bytes_down: AtomicU64,
    error: OnceLock<String>,
    request: OnceLock<RequestSide>,
    response: OnceLock<ResponseMeta>,
    time_to_first_token: OnceLock<Duration>,
    /// When the response body ended (the record's latency); unset, the record's emission time.
    ended: OnceLock<Duration>,
    outcome: OnceLock<Accounting>,
    quota: OnceLock<QuotaVerdict>,
    /// Bodies kept for the audit log (`audit.content`).
    capture: Option<crate::audit::ContentCapture>,
}

/// The quota decision of an exchange, and the reservation to settle when it ends.
#[derive(Debug)]
pub struct QuotaVerdict {
    /// allowed, rejected, observed (allowed, but an observe-mode rule would have rejected it).
    pub decision: &'static str,
    /// The rule that rejected it (or would have).
    pub rule: Option<Arc<str>>,
    /// The limit concerned.
    pub limit: Option<&'static str>,
    pub permit: Option<Permit>,
}

impl Exchange {
    pub fn start(
        conn: Arc<ConnInfo>,
        metrics: ProxyMetrics,
        accounting: Arc<AccountingSettings>,
        route: Route,
        method: http::Method,
        path: &str,
    ) -> Arc<Self> {
        metrics.requests_active.inc();
        let capture = conn.content_limit.map(crate::audit::ContentCapture::new);
        Arc::new(Self {
            conn,
            metrics,
            accounting,
            route,
            method,
            path: path.to_owned(),
            started: Instant::now(),
            ttfb: OnceLock::new(),
            status: AtomicU16::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            error: OnceLock::new(),
            request: OnceLock::new(),
            response: OnceLock::new(),
            time_to_first_token: OnceLock::new(),
            ended: OnceLock::new(),
            outcome: OnceLock::new(),
            quota: OnceLock::new(),
            capture,
        })
    }

    /// The body capture of an `audit.content` connection.
    pub fn capture(&self) -> Option<&crate::audit::ContentCapture> {
        self.capture.as_ref()
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    pub fn conn(&self) -> &ConnInfo {
        &self.conn
    }

    pub fn settings(&self) -> &AccountingSettings {
        &self.accounting
    }

    /// What the request body said.
    pub fn requested(&self, side: RequestSide) {
        let _ = self.request.set(side);
    }

    /// The model the request body names, when it was read.
    pub fn requested_model(&self) -> Option<&str> {
        self.request.get()?.model.as_deref()
    }

    /// Keeps the response headers worth recording.
    pub fn response_meta(&self, meta: ResponseMeta) {
        let _ = self.response.set(meta);
    }

    /// The first generated output reached the client.
    pub fn first_token(&self) {
        self.first_token_at(Instant::now());
    }

    /// The first generated output arrived at `at` (read later, off the client's path).
    pub fn first_token_at(&self, at: Instant) {
        let _ = self
            .time_to_first_token
            .set(at.saturating_duration_since(self.started));
    }

    /// The response body ended at `at`: the record's latency, however late it is emitted.
    pub fn body_ended(&self, at: Instant) {
        let _ = self.ended.set(at.saturating_duration_since(self.started));
    }

    /// The response body was read to its end (or cut short).
    pub fn accounted(&self, accounting: Accounting) {
        let _ = self.outcome.set(accounting);
    }

    /// Response headers arrived (or a local response was made).
    pub fn responded(&self, status: http::StatusCode) {
        self.status.store(status.as_u16(), Ordering::Relaxed);
        let _ = self.ttfb.set(self.started.elapsed());
    }

    /// Records the first error of the exchange.
    pub fn fail(&self, error: String) {
        let _ = self.error.set(error);
    }

    /// The quota decision (and its reservation).
    /// Whether a rule with hard budgets admitted this request (its stream is watched live).
    pub fn watches_hard_budgets(&self) -> bool {
        self.quota
            .get()
            .and_then(|q| q.permit.as_ref())
            .is_some_and(Permit::has_hard_budgets)
    }

    /// The hard budget that `live_output_tokens` so far take over its limit, if any.
    pub fn hard_stop(&self, live_output_tokens: u64) -> Option<crate::quota::HardStop> {
        self.quota.get()?.permit.as_ref()?.hard_stop(live_output_tokens)
    }

    pub fn quota(&self, verdict: QuotaVerdict) {
        let _ = self.quota.set(verdict);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let latency = self
            .ended
            .get()
            .copied()
            .unwrap_or_else(|| self.started.elapsed());
        let status = self.status.load(Ordering::Relaxed);
        let class = match status {
            0 => "none",
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.metrics.requests_active.dec();
        self.metrics.requests.with_label_values(&[class]).inc();
        self.metrics.request_duration.observe(latency.as_secs_f64());
        Record {
            conn: self.conn.clone(),
            settings: self.accounting.clone(),
            route: self.route.clone(),
            method: self.method.clone(),
            path: std::mem::take(&mut self.path),
            status,
            latency,
            ttfb: self.ttfb.get().copied(),
            ttft: self.time_to_first_token.get().copied(),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            error: self.error.take(),
            request: self.request.take(),
            response: self.response.take(),
            outcome: self.outcome.take(),
            quota: self.quota.take(),
            content: self.capture.as_ref().map(crate::audit::ContentCapture::finish),
            pod: None,
            pod_status: None,
        }
        .finish();
    }
}

/// Which way a metered body flows.
#[derive(Clone, Copy)]
pub enum Direction {
    /// Client → provider.
    Up,
    /// Provider → client.
    Down,
}

/// A body that counts its bytes into the exchange and keeps the exchange alive until it is dropped.
pub struct Metered<B> {
    inner: B,
    exchange: Arc<Exchange>,
    direction: Direction,
}

impl<B> Metered<B> {
    pub fn new(inner: B, exchange: Arc<Exchange>, direction: Direction) -> Self {
        Self {
            inner,
            exchange,
            direction,
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let counter = match this.direction {
                        Direction::Up => &this.exchange.bytes_up,
                        Direction::Down => &this.exchange.bytes_down,
                    };
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(capture) = &this.exchange.capture {
                        match this.direction {
                            Direction::Up => capture.request_data(data),
                            Direction::Down => capture.response_data(data),
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let side = match this.direction {
                    Direction::Up => "request body",
                    Direction::Down => "response body",
                };
                this.exchange.fail(format!("{side}: {e}"));
            }
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection of a process outside any pod to `api.openai.com`, for unit tests.
#[cfg(test)]
pub(crate) fn test_conn(comm: &str, cgroup: &str) -> Arc<ConnInfo> {
    Arc::new(ConnInfo {
        facts: KernelFacts {
            original_dst: std::net::SocketAddr::from(([203, 0, 113, 10], 443)),
            tgid: 42,
            pid: 42,
            uid: 1000,
            gid: 1000,
            cgroup_id: 7,
            netns_cookie: 1,
            socket_cookie: 1,
            comm: comm.into(),
        },
        details: Arc::new(ProcessDetails {
            cgroup: Some(cgroup.into()),
            ..ProcessDetails::default()
        }),
        pod: PodRef::NotAPod,
        pods: None,
        sni: "api.openai.com".into(),
        provider: "openai".into(),
        adapter: Adapter::Openai,
        content_limit: None,
        metric_handles: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_meta_prefers_the_earlier_name_and_the_first_value() {
        let mut headers = http::HeaderMap::new();
        headers.append("apim-request-id", HeaderValue::from_static("azure"));
        headers.append("x-request-id", HeaderValue::from_static("first"));
        headers.append("x-request-id", HeaderValue::from_static("second"));
        headers.append("retry-after-ms", HeaderValue::from_static("1500"));
        headers.append(
            "anthropic-ratelimit-input-tokens-remaining",
            HeaderValue::from_static("9"),
        );
        headers.append(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("10"),
        );
        headers.append("content-type", HeaderValue::from_static("application/json"));
        let meta = ResponseMeta::from_headers(&headers);
        let text = |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(text(&meta.request_id).as_deref(), Some("first"));
        assert_eq!(text(&meta.retry_after).as_deref(), Some("1500"));
        assert_eq!(text(&meta.remaining_requests), None);
        assert_eq!(text(&meta.remaining_tokens).as_deref(), Some("10"));
    }
}
