//! The request body on its way to the provider. Bodies of endpoints whose JSON matters (model,
//! stream flag) are read first, within a per-request limit and a global memory budget, and may get
//! `stream_options.include_usage` injected; all others, and bodies over the limits, stream through
//! unread.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use interceptor_protocols::Dialect;
use interceptor_protocols::request::{inject_include_usage, probe};
use tokio::sync::OwnedSemaphorePermit;

use super::exchange::{Exchange, RequestSide};
use crate::policy::StreamUsage;

/// A request body: what was read ahead (replayed first), then the rest of the client's stream.
pub struct RequestBody {
    head: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
    /// Memory budget held while the read-ahead bytes are alive.
    _permit: Option<OwnedSemaphorePermit>,
}

impl RequestBody {
    fn streaming(body: Incoming) -> Self {
        Self {
            head: None,
            trailers: None,
            rest: Some(body),
            _permit: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(head) = this.head.take() {
            this._permit = None;
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.trailers.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(head),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + head);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + head);
                }
                hint
            }
        }
    }
}

/// The body to send upstream, and whether the usage option was injected.
pub struct Prepared {
    pub body: RequestBody,
    pub usage_injected: bool,
    /// An OpenAI-style stream: keep its generated text for a tokenizer estimate in case it ends
    /// without usage (estimate mode, or a client that cancels before the usage chunk).
    pub collect_output: bool,
    /// What the body says a quota decision needs (defaults when it was not read).
    pub demand: BodyDemand,
}

/// What a read body says about the request's size, for quota reservations (its model is on the
/// exchange).
#[derive(Clone, Debug, Default)]
pub struct BodyDemand {
    pub max_output_tokens: Option<u64>,
    /// Body size in bytes (declared or read), when known.
    pub body_bytes: Option<u64>,
}

/// Reads the body ahead when its JSON matters and it fits; records what it says on the exchange.
/// Fails only when the client's body itself fails (reset, malformed framing).
pub async fn prepare(
    exchange: &Exchange,
    headers: &mut HeaderMap,
    body: Incoming,
) -> Result<Prepared, String> {
    let settings = exchange.settings();
    let route = exchange.route();
    let passthrough = |reason: Option<&'static str>, body| {
        match reason {
            Some(reason) => record_unread(exchange, reason),
            None => exchange.requested(RequestSide::default()),
        }
        Ok(Prepared {
            body: RequestBody::streaming(body),
            usage_injected: false,
            collect_output: false,
            demand: BodyDemand {
                body_bytes: declared_length(headers),
                ..BodyDemand::default()
            },
        })
    };
    let json = headers
        .get(CONTENT_TYPE)
        .is_none_or(|v| interceptor_protocols::is_json_media_type(v.as_bytes()));
    if !route.reads_request_body() || !json {
        return passthrough(None, body);
    }
    let max = settings.max_request_body;
    let declared = declared_length(headers);
    if declared.is_some_and(|len| len > max) {
        return passthrough(Some("too_large"), body);
    }
    let reserve = declared.unwrap_or(max).div_ceil(1024).max(1);
    let permit = u32::try_from(reserve)
        .ok()
        .and_then(|kib| settings.request_budget.clone().try_acquire_many_owned(kib).ok());
    let Some(permit) = permit else {
        return passthrough(Some("budget_exhausted"), body);
    };

    let mut body = body;
    let mut buffer = ReadAhead::default();
    let mut trailers = None;
    let mut ended = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the request body: {e}"))?;
        match frame.into_data() {
            Ok(data) => {
                buffer.push(data);
                if buffer.len() as u64 > max {
                    ended = false;
                    break;
                }
            }
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                break;
            }
        }
    }
    let rest = (!ended).then_some(body);
    let read_ahead = |head: Bytes, trailers, rest, permit| RequestBody {
        head: Some(head).filter(|h| !h.is_empty()),
        trailers,
        rest,
        _permit: permit,
    };
    let unread = |body, body_bytes| Prepared {
        body,
        usage_injected: false,
        collect_output: false,
        demand: BodyDemand {
            body_bytes: Some(body_bytes),
            ..BodyDemand::default()
        },
    };
    if rest.is_some() {
        // Chunked body over the limit: forward it all without reading it.
        record_unread(exchange, "too_large");
        let read = buffer.len() as u64;
        return Ok(unread(
            read_ahead(buffer.freeze(), trailers, rest, Some(permit)),
            read,
        ));
    }
    let buffer = buffer.freeze();
    let body_bytes = buffer.len() as u64;
    let facts = match probe(&buffer) {
        Ok(facts) => facts,
        Err(_) => {
            record_unread(exchange, "not_json");
            let read = buffer.len() as u64;
            return Ok(unread(read_ahead(buffer, trailers, None, Some(permit)), read));
        }
    };
    let inject = settings.stream_usage == StreamUsage::Inject
        && route.dialect == Dialect::OpenaiChat
        && facts.stream
        && !facts.include_usage;
    let mut head = buffer.clone();
    let mut usage_injected = false;
    if inject && let Ok(rewritten) = inject_include_usage(&head, &facts) {
        head = Bytes::from(rewritten);
        usage_injected = true;
        settings.metrics.usage_injected.inc();
        if headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(head.len()));
        }
    }
    let collect_output = facts.stream && route.dialect == Dialect::OpenaiChat;
    // An estimate may need the prompt: keep the body as the client sent it (shared, not copied;
    // still counted in the budget) and parse it only if an estimate is made.
    let (prompt_source, permit) = if collect_output {
        let kept = KeptBody {
            body: buffer,
            _permit: permit,
        };
        (Some(kept), None)
    } else {
        (None, Some(permit))
    };
    let demand = BodyDemand {
        max_output_tokens: facts.max_output_tokens,
        body_bytes: Some(body_bytes),
    };
    exchange.requested(RequestSide {
        model: facts.model,
        stream: facts.stream,
        usage_injected,
        unread: None,
        prompt_source,
    });
    Ok(Prepared {
        body: read_ahead(head, trailers, None, permit),
        usage_injected,
        collect_output,
        demand,
    })
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A request body kept for a later estimate, with its share of the read-ahead budget.
#[derive(Debug)]
pub struct KeptBody {
    pub body: Bytes,
    _permit: OwnedSemaphorePermit,
}

/// Bytes read ahead: the first frame as it came (most bodies are one frame: no copy), later
/// frames appended to a copy.
#[derive(Default)]
struct ReadAhead {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl ReadAhead {
    fn push(&mut self, data: Bytes) {
        match (&mut self.first, &mut self.more) {
            (None, _) => self.first = Some(data),
            (Some(first), None) => {
                let mut joined = BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(&data);
                self.more = Some(joined);
            }
            (Some(_), Some(more)) => more.extend_from_slice(&data),
        }
    }

    fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(more)) => more.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn freeze(self) -> Bytes {
        match (self.first, self.more) {
            (_, Some(more)) => more.freeze(),
            (Some(first), None) => first,
            (None, None) => Bytes::new(),
        }
    }
}

/// The body goes upstream without being read (counted by reason).
fn record_unread(exchange: &Exchange, reason: &'static str) {
    exchange
        .settings()
        .metrics
        .unread_bodies
        .with_label_values(&[reason])
        .inc();
    exchange.requested(RequestSide {
        unread: Some(reason),
        ..Default::default()
    });
}
