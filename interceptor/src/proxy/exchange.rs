//! One proxied request/response exchange: its record, and body wrappers that meter the bytes and emit
//! the record (one structured log line, metrics) once both bodies are done.

use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tracing::info;

use super::ProxyMetrics;
use crate::identity::{KernelFacts, ProcessDetails};

/// What every request of a connection shares: who, where to.
pub struct ConnInfo {
    pub facts: KernelFacts,
    pub details: ProcessDetails,
    /// The TLS server name the client asked for (the provider host).
    pub sni: String,
}

/// The record of one exchange. Emitted when the last reference (the bodies) is dropped.
pub struct Exchange {
    conn: Arc<ConnInfo>,
    metrics: ProxyMetrics,
    method: http::Method,
    /// Path without the query (queries may carry API keys, e.g. Gemini's `?key=`).
    path: String,
    started: Instant,
    ttfb: OnceLock<Duration>,
    status: AtomicU16,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    error: OnceLock<String>,
}

impl Exchange {
    pub fn start(conn: Arc<ConnInfo>, metrics: ProxyMetrics, method: http::Method, path: &str) -> Arc<Self> {
        metrics.requests_active.inc();
        Arc::new(Self {
            conn,
            metrics,
            method,
            path: path.to_owned(),
            started: Instant::now(),
            ttfb: OnceLock::new(),
            status: AtomicU16::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            error: OnceLock::new(),
        })
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
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let latency = self.started.elapsed();
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
        let facts = &self.conn.facts;
        let details = &self.conn.details;
        info!(
            host = %self.conn.sni,
            method = %self.method,
            path = %self.path,
            status,
            bytes_up = self.bytes_up.load(Ordering::Relaxed),
            bytes_down = self.bytes_down.load(Ordering::Relaxed),
            latency_ms = latency.as_secs_f64() * 1000.0,
            ttfb_ms = self.ttfb.get().map(|d| d.as_secs_f64() * 1000.0),
            error = self.error.get().map(String::as_str),
            original_dst = %facts.original_dst,
            tgid = facts.tgid,
            uid = facts.uid,
            comm = %facts.comm,
            exe = details.exe.as_ref().map(|p| p.display().to_string()),
            cgroup = details.cgroup.as_deref(),
            cgroup_id = facts.cgroup_id,
            "request"
        );
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
