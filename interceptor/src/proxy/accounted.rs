//! The response body on its way to the client: counted, read on the side by the provider's
//! accountant (usage, model, errors, time to first token), and — when the interceptor injected
//! `include_usage` — with the extra usage chunk removed again.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use interceptor_protocols::ResponseAccountant;
use interceptor_protocols::strip::UsageChunkStripper;

use super::exchange::Exchange;

/// Output events between two checks of a stream against its hard budgets (bounds the cost: one
/// quota lock per this many deltas).
const HARD_CHECK_EVERY: u64 = 4;

/// A provider response body that accounts for itself.
pub struct Accounted<B> {
    inner: B,
    exchange: Arc<Exchange>,
    accountant: Option<ResponseAccountant>,
    stripper: Option<UsageChunkStripper>,
    /// Reused output buffer of the stripper.
    stripped: Vec<u8>,
    /// Output events at the last hard-budget check; `None` when no hard budget watches the stream.
    hard_checked: Option<u64>,
}

impl<B> Accounted<B> {
    pub fn new(
        inner: B,
        exchange: Arc<Exchange>,
        accountant: ResponseAccountant,
        stripper: Option<UsageChunkStripper>,
    ) -> Self {
        let hard_checked = (accountant.is_stream() && exchange.watches_hard_budgets()).then_some(0);
        Self {
            inner,
            exchange,
            accountant: Some(accountant),
            stripper,
            stripped: Vec::new(),
            hard_checked,
        }
    }

    /// With a hard budget crossed by the stream's live output, the provider-shaped error event that
    /// ends it (the stream is then finished, cut short, and the upstream body dropped).
    fn hard_stop_event(&mut self) -> Option<Bytes> {
        let checked = self.hard_checked?;
        let live = self.accountant.as_mut()?.output_events();
        if live < checked + HARD_CHECK_EVERY {
            return None;
        }
        self.hard_checked = Some(live);
        let stop = self.exchange.hard_stop(live)?;
        let event = crate::quota::reject::stream_error_event(self.exchange.conn().adapter, &stop)?;
        tracing::info!(rule = %stop.rule, limit = stop.limited.name(), live_output_events = live, "stream ended by a hard budget");
        self.exchange
            .fail(format!("ended by the hard budget of rule {}", stop.rule));
        self.finish(false);
        Some(Bytes::from(event))
    }

    /// The body ended complete (`last`: its final chunk, not yet read): the rest of its accounting
    /// and its record are a task's, so the client's last bytes are not held up by them.
    fn settle_later(&mut self, last: Option<Bytes>) {
        let Some(accountant) = self.accountant.take() else {
            return;
        };
        let settlement = Settlement {
            accountant: Some(accountant),
            last,
            ended: Instant::now(),
            exchange: self.exchange.clone(),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Settled when the task runs, or when a runtime shutting down drops it unpolled.
            runtime.spawn(async move { drop(settlement) });
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(accountant) = self.accountant.take() {
            self.exchange.accounted(accountant.finish(complete));
        }
    }

    /// Counts (and, for `audit.content`, keeps) what reaches the client.
    fn delivered(&self, data: &Bytes) {
        self.exchange
            .bytes_down
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(capture) = self.exchange.capture() {
            capture.response_data(data);
        }
    }
}

impl<B> Body for Accounted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.accountant.is_none() {
                // Ended: the last data frame already carried the end of the body.
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => {
                    this.exchange.fail(format!("response body: {e}"));
                    this.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let tail = this.take_stripped_tail();
                    this.settle_later(None);
                    return Poll::Ready(tail.map(|data| Ok(Frame::data(data))));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            let ended = this.inner.is_end_stream();
            if ended {
                // hyper stops polling once the body says it ended: the last chunk is read, and the
                // accounting finished as complete, once hyper has it on its way to the client.
                this.settle_later(Some(data.clone()));
            } else if let Some(accountant) = this.accountant.as_mut()
                && accountant.feed(&data)
            {
                this.exchange.first_token();
            }
            let data = match this.stripper.as_mut() {
                None => data,
                Some(stripper) => {
                    this.stripped.clear();
                    // Grows to the largest chunk once, then is reused.
                    this.stripped.reserve(data.len());
                    stripper.push(&data, &mut this.stripped);
                    if ended {
                        stripper.finish(&mut this.stripped);
                    }
                    Bytes::copy_from_slice(&this.stripped)
                }
            };
            let data = match this.hard_stop_event() {
                None => data,
                Some(event) => {
                    let mut joined = Vec::with_capacity(data.len() + event.len());
                    joined.extend_from_slice(&data);
                    joined.extend_from_slice(&event);
                    Bytes::from(joined)
                }
            };
            if data.is_empty() {
                // Held until its event completes, or a removed usage chunk.
                continue;
            }
            this.delivered(&data);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.accountant.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stripper.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl<B> Accounted<B> {
    /// What the stripper still holds when the upstream body ends.
    fn take_stripped_tail(&mut self) -> Option<Bytes> {
        let stripper = self.stripper.as_mut()?;
        self.stripped.clear();
        stripper.finish(&mut self.stripped);
        if self.stripped.is_empty() {
            return None;
        }
        let data = Bytes::copy_from_slice(&self.stripped);
        self.delivered(&data);
        Some(data)
    }
}

/// The end of a complete body's accounting: its last chunk read, the accountant finished and, when
/// the exchange goes with it, the record emitted. Done when dropped, wherever that happens.
struct Settlement {
    accountant: Option<ResponseAccountant>,
    last: Option<Bytes>,
    /// When the body ended (and its last chunk arrived).
    ended: Instant,
    exchange: Arc<Exchange>,
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.exchange.body_ended(self.ended);
        let Some(mut accountant) = self.accountant.take() else {
            return;
        };
        if let Some(last) = self.last.take()
            && accountant.feed(&last)
        {
            self.exchange.first_token_at(self.ended);
        }
        self.exchange.accounted(accountant.finish(true));
    }
}

impl<B> Drop for Accounted<B> {
    fn drop(&mut self) {
        // The client went away (or the exchange was aborted) before the end of the body.
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use futures::StreamExt;
    use http::header::{CONTENT_TYPE, HeaderValue};
    use http_body_util::{Full, StreamBody};
    use interceptor_protocols::{Adapter, Limits, classify};
    use prometheus::Registry;

    use super::*;
    use crate::accounting::{AccountingMetrics, AccountingSettings};
    use crate::audit::{AuditDestination, AuditMetrics, AuditSettings, AuditWriter};
    use crate::metric_labels::IdentityLabels;
    use crate::policy::Policy;
    use crate::proxy::ProxyMetrics;
    use crate::proxy::estimates::EstimatePool;
    use crate::proxy::exchange::test_conn;

    /// A non-streamed chat completion: 120 prompt tokens, 9 completion tokens.
    const CHAT_COMPLETION: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}],"usage":{"prompt_tokens":120,"completion_tokens":9,"total_tokens":129}}"#;

    /// An exchange of `POST /v1/chat/completions` whose record goes to an audit file of its own (its
    /// accounting settings first changed by `tune`), and the accountant of a 200 response of
    /// `content_type`.
    fn audited_exchange(
        name: &str,
        content_type: &'static str,
        tune: impl FnOnce(&mut AccountingSettings),
    ) -> (Arc<Exchange>, ResponseAccountant, PathBuf, AuditWriter) {
        let dir = std::env::temp_dir().join(format!("interceptor-settle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("audit.log");
        let registry = Registry::new();
        let labels = Arc::new(IdentityLabels::new(&[], 10, &registry).expect("labels"));
        let metrics = AccountingMetrics::register(&registry, labels).expect("metrics");
        let policy = Policy::builtin().expect("built-in policy");
        let mut settings = AccountingSettings::from_policy(&policy, metrics).expect("settings");
        let audit = AuditSettings {
            destination: AuditDestination::File(path.clone()),
            max_bytes: 1 << 20,
            keep: 1,
            queue: 16,
        };
        let (log, writer) =
            crate::audit::start(&audit, AuditMetrics::register(&registry).expect("audit metrics"))
                .expect("audit start")
                .expect("audit on");
        settings.audit = Some(log);
        tune(&mut settings);
        let route = classify(Adapter::Openai, "POST", "/v1/chat/completions", "");
        let exchange = Exchange::start(
            test_conn("python3", "/test.slice"),
            ProxyMetrics::register(&registry).expect("proxy metrics"),
            Arc::new(settings),
            route.clone(),
            http::Method::POST,
            "/v1/chat/completions",
        );
        exchange.responded(http::StatusCode::OK);
        let mut headers = http::HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        let accountant = ResponseAccountant::new(Adapter::Openai, &route, 200, &headers, Limits::default());
        (exchange, accountant, path, writer)
    }

    /// [`audited_exchange`] with the accounted response body of `CHAT_COMPLETION`, one chunk, as
    /// hyper hands it over.
    fn exchange_with_audit(name: &str) -> (Accounted<Full<Bytes>>, PathBuf, AuditWriter) {
        let (exchange, accountant, path, writer) = audited_exchange(name, "application/json", |_| {});
        let body = Accounted::new(
            Full::new(Bytes::from_static(CHAT_COMPLETION)),
            exchange,
            accountant,
            None,
        );
        (body, path, writer)
    }

    /// Polls `body` once, as hyper does, outside any task.
    fn poll_once<B>(body: &mut Accounted<B>) -> Option<Bytes>
    where
        B: Body<Data = Bytes, Error = Infallible> + Unpin,
    {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            Poll::Ready(Some(Err(never))) => match never {},
            Poll::Ready(None) | Poll::Pending => None,
        }
    }

    /// The audit lines written so far (waiting up to 5 s for the first).
    fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
        for _ in 0..500 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if !text.is_empty() {
                return text
                    .lines()
                    .map(|line| serde_json::from_str(line).expect("a JSON audit line"))
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Vec::new()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_complete_body_settles_after_the_client_has_it_with_the_latency_of_its_end() {
        let (mut body, path, writer) = exchange_with_audit("task");
        let data = poll_once(&mut body).expect("the whole body in one frame");
        assert_eq!(&data[..], CHAT_COMPLETION, "bytes pass unchanged");
        assert!(body.is_end_stream(), "the body says it ended with its last chunk");
        // The settlement is a task of its own: while this one holds the thread, nothing is recorded.
        std::thread::sleep(Duration::from_millis(80));
        drop(body);
        assert!(
            std::fs::read_to_string(&path).unwrap_or_default().is_empty(),
            "recorded before its task ran"
        );
        tokio::task::yield_now().await;
        writer.drain(Duration::from_secs(5)).await;
        let lines = audit_lines(&path);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["tokens"]["input"], 120);
        assert_eq!(line["tokens"]["output"], 9);
        assert_eq!(line["usage"], "reported");
        assert_eq!(line["model"], "gpt-4o-mini-2024-07-18");
        // Latency runs to the body's end, not to when the deferred record was emitted (80 ms later).
        let latency = line["latency_ms"].as_f64().expect("latency");
        assert!(latency < 80.0, "latency {latency} ms includes the deferral");
        remove_audit_dir(&path);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cut_stream_is_recorded_without_an_estimate_when_the_estimate_queue_is_full() {
        let skipped = prometheus::IntCounter::new("skipped", "estimates skipped").expect("counter");
        let estimates = EstimatePool::new(1, 0, skipped.clone());
        let _busy = estimates.admit().expect("the pool's only place");
        let pool = estimates.clone();
        let (exchange, mut accountant, path, writer) =
            audited_exchange("cut-full", "text/event-stream", move |settings| {
                settings.estimates = pool
            });
        accountant.collect_output();
        // One generated chunk, then the client goes away before the usage chunk.
        let chunk = Bytes::from_static(
            b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there\"}}]}\n\n",
        );
        let frames = futures::stream::iter([Ok::<_, Infallible>(Frame::data(chunk.clone()))])
            .chain(futures::stream::pending());
        let mut body = Accounted::new(StreamBody::new(frames), exchange, accountant, None);
        assert_eq!(poll_once(&mut body), Some(chunk), "the chunk passes unchanged");
        assert!(!body.is_end_stream());
        drop(body);
        tokio::task::yield_now().await;
        writer.drain(Duration::from_secs(5)).await;
        let lines = audit_lines(&path);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["usage"], "missing", "{}", lines[0]);
        assert_eq!(lines[0]["estimated"], false, "{}", lines[0]);
        assert_eq!(skipped.get(), 1, "the stream turned away is counted");
        assert_eq!(estimates.admitted(), 1, "only the place held by the test");
        remove_audit_dir(&path);
    }

    fn remove_audit_dir(path: &Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn without_a_runtime_a_complete_body_settles_at_once() {
        let (mut body, path, _writer) = exchange_with_audit("inline");
        let data = poll_once(&mut body).expect("the whole body in one frame");
        assert_eq!(&data[..], CHAT_COMPLETION);
        assert!(body.is_end_stream());
        drop(body);
        let lines = audit_lines(&path);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["tokens"]["input"], 120);
        assert_eq!(lines[0]["tokens"]["output"], 9);
        assert_eq!(lines[0]["usage"], "reported");
        remove_audit_dir(&path);
    }
}
