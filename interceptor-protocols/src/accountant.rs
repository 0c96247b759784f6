//! Reads a response body on the side while it streams to the client: picks the framing from the
//! content type (SSE, AWS event-stream, streamed JSON array, JSON object), undoes content encoding,
//! and feeds the adapter's extractor. Memory is bounded by the limits whatever the body size.

use std::io::Write;

use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};

use crate::eventstream::EventStreamDecoder;
use crate::json_array::JsonArraySplitter;
use crate::route::{Adapter, Dialect, EndpointKind, Route};
use crate::sse::{SseEvent, SseParser};
use crate::top_level::{Fields, TopLevelFields};
use crate::usage::{Observation, Signal, Usage};
use crate::{anthropic, bedrock, gemini, openai};

/// Memory limits of one response reader.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest SSE event, event-stream message or JSON array element read (larger ones are skipped).
    pub max_event_bytes: usize,
    /// Largest top-level JSON member kept from a non-streamed body (`usage`, `model`, `error`).
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 4 << 20,
            max_value_bytes: 64 << 10,
        }
    }
}

/// How the usage of a request is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UsageStatus {
    /// The provider reported it.
    Reported,
    /// Counted locally with a tokenizer.
    Estimated,
    /// The endpoint or response does not report usage (errors, model lists, audio, batches).
    NotReported,
    /// Usage was expected but never came (stream cut short, field absent).
    Missing,
    /// The body could not be read (malformed JSON, broken framing, bad compression).
    Malformed,
    /// The body uses a content encoding the reader does not decode.
    Unsupported,
}

impl UsageStatus {
    pub const ALL: [UsageStatus; 6] = [
        UsageStatus::Reported,
        UsageStatus::Estimated,
        UsageStatus::NotReported,
        UsageStatus::Missing,
        UsageStatus::Malformed,
        UsageStatus::Unsupported,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            UsageStatus::Reported => "reported",
            UsageStatus::Estimated => "estimated",
            UsageStatus::NotReported => "none",
            UsageStatus::Missing => "missing",
            UsageStatus::Malformed => "malformed",
            UsageStatus::Unsupported => "unsupported",
        }
    }
}

/// What the response said, once it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accounting {
    pub observation: Observation,
    pub usage: Option<Usage>,
    pub status: UsageStatus,
    /// The response was a stream (SSE, event-stream, streamed JSON array).
    pub stream: bool,
    /// Why the body could not be read, when it could not.
    pub problem: Option<String>,
    /// The stream's events as delivered, kept (bounded) for a tokenizer estimate.
    pub kept_events: Option<KeptEvents>,
}

/// Raw data of the chat events a stream delivered, kept without parsing (the hot path only copies);
/// parsed into text only when an estimate is needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeptEvents {
    /// Each event as a little-endian u32 length and its bytes.
    data: Vec<u8>,
    /// Events were left out: the estimate is a lower bound.
    pub truncated: bool,
}

impl KeptEvents {
    /// Most bytes kept (raw JSON, about four times the text it carries).
    pub const MAX_BYTES: usize = 4 * crate::estimate::MAX_TEXT_BYTES;
    /// Reserved at the first event (a chat chunk is 200–400 bytes).
    const FIRST_RESERVE: usize = 4096;

    fn push(&mut self, event: &[u8]) {
        let Ok(len) = u32::try_from(event.len()) else {
            self.truncated = true;
            return;
        };
        if self.data.len() + 4 + event.len() > Self::MAX_BYTES {
            self.truncated = true;
            return;
        }
        if self.data.capacity() == 0 {
            // Room for a short stream's events at once, not a reallocation every few events.
            self.data.reserve(Self::FIRST_RESERVE.max(4 + event.len()));
        }
        self.data.extend_from_slice(&len.to_le_bytes());
        self.data.extend_from_slice(event);
    }

    /// The generated text of the kept events (content, refusals, reasoning, tool calls).
    pub fn output_text(&self) -> String {
        let mut text = String::new();
        let mut rest = self.data.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let Some((event, tail)) = tail.split_at_checked(len) else {
                break;
            };
            // Events that are not chat chunks ([DONE], errors) carry no text.
            let _ = openai::chat_delta_text(event, &mut text, crate::estimate::MAX_TEXT_BYTES);
            rest = tail;
        }
        text
    }
}

enum Framing {
    Sse(SseParser),
    EventStream(EventStreamDecoder),
    JsonArray(JsonArraySplitter),
    Json(TopLevelFields),
    /// A JSON body read whole from its first chunk by the dialect's quick reader: what it said,
    /// applied when the body ends with nothing but white space after it.
    JsonRead {
        observation: Observation,
        trailing_garbage: bool,
    },
    Skip,
}

/// The decoded-body side: framing plus extractor.
struct Reader {
    dialect: Dialect,
    /// Raw chat events, kept (OpenAI-style streams) when an estimate may be needed.
    kept_events: Option<KeptEvents>,
    framing: Framing,
    observation: Observation,
    output_seen: bool,
    /// Events that carried generated output (a live, lower-bound count of output tokens).
    output_events: u64,
    problem: Option<String>,
    parse_errors: u32,
}

impl Reader {
    fn consume(&mut self, chunk: &[u8]) {
        let Reader {
            dialect,
            kept_events,
            framing,
            observation,
            output_seen,
            output_events,
            problem,
            parse_errors,
        } = self;
        let mut note = |result: Result<Signal, String>| match result {
            Ok(signal) => {
                *output_seen |= signal.output;
                *output_events += u64::from(signal.output);
            }
            Err(e) => {
                *parse_errors += 1;
                problem.get_or_insert(e);
            }
        };
        match framing {
            Framing::Sse(parser) => parser.feed(chunk, |event| {
                if let Some(kept) = kept_events.as_mut() {
                    kept.push(event.data);
                }
                note(sse_event(*dialect, observation, event))
            }),
            Framing::EventStream(decoder) => decoder.feed(chunk, |message| {
                note(bedrock::stream_message(observation, &message).map_err(|e| format!("event-stream: {e}")))
            }),
            Framing::JsonArray(splitter) => splitter.feed(chunk, |element| {
                note(gemini::chunk(observation, element).map_err(|e| format!("stream element: {e}")))
            }),
            Framing::Json(fields) => {
                // Most bodies come in one chunk: the quick reader takes those it reads as serde
                // would (it declines everything else, which the member scanner then reads).
                if fields.untouched()
                    && chunk.len() <= fields.max_value_bytes()
                    && crate::top_level::may_hold_whole_object(chunk)
                    && let Some(read) = quick_json_body(*dialect, chunk)
                {
                    *framing = Framing::JsonRead {
                        observation: read,
                        trailing_garbage: false,
                    };
                } else {
                    fields.feed(chunk);
                }
            }
            Framing::JsonRead { trailing_garbage, .. } => {
                *trailing_garbage |= !chunk.iter().all(u8::is_ascii_whitespace)
            }
            Framing::Skip => {}
        }
    }

    /// Ends the framing; returns whether the body was complete.
    fn finish(&mut self) -> bool {
        let framing = std::mem::replace(&mut self.framing, Framing::Skip);
        match framing {
            Framing::Sse(mut parser) => {
                let summary = parser.finish();
                if summary.oversized_events > 0 {
                    self.problem.get_or_insert(format!(
                        "{} SSE events over the size limit",
                        summary.oversized_events
                    ));
                }
                !summary.truncated
            }
            Framing::EventStream(mut decoder) => match decoder.finish() {
                Ok(_) => true,
                Err(e) => {
                    self.problem.get_or_insert(format!("event-stream: {e}"));
                    false
                }
            },
            Framing::JsonArray(splitter) => {
                let summary = splitter.finish();
                if summary.malformed {
                    self.problem
                        .get_or_insert("streamed JSON array is malformed or truncated".into());
                }
                !summary.malformed
            }
            Framing::JsonRead {
                observation,
                trailing_garbage,
            } => {
                if trailing_garbage {
                    self.problem
                        .get_or_insert("body is not a complete JSON object".into());
                    return false;
                }
                // Only the OpenAI dialects have a quick reader, and nothing else has touched the
                // observation of their JSON bodies.
                self.observation = observation;
                true
            }
            Framing::Json(fields) => match fields.finish() {
                Fields::Object(object) => {
                    if let Err(e) = json_body(self.dialect, &mut self.observation, &object) {
                        self.problem.get_or_insert(format!("JSON body: {e}"));
                    }
                    true
                }
                Fields::Malformed => {
                    self.problem
                        .get_or_insert("body is not a complete JSON object".into());
                    false
                }
            },
            Framing::Skip => true,
        }
    }
}

impl Write for Reader {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.consume(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Identity(Box<Reader>),
    Gzip(Box<flate2::write::GzDecoder<Reader>>),
    Zlib(Box<flate2::write::ZlibDecoder<Reader>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Reader>>),
}

impl Decoder {
    fn reader(&mut self) -> &mut Reader {
        match self {
            Decoder::Identity(reader) => reader,
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib(d) => d.get_mut(),
            Decoder::Brotli(d) => d.get_mut(),
        }
    }

    fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match self {
            Decoder::Identity(reader) => {
                reader.consume(chunk);
                Ok(())
            }
            Decoder::Gzip(d) => d.write_all(chunk),
            Decoder::Zlib(d) => d.write_all(chunk),
            Decoder::Brotli(d) => d.write_all(chunk),
        }
    }

    fn into_reader(self) -> (Reader, Option<String>) {
        match self {
            Decoder::Identity(reader) => (*reader, None),
            Decoder::Gzip(d) => match d.finish() {
                Ok(reader) => (reader, None),
                Err(e) => (dummy_reader(), Some(format!("gzip: {e}"))),
            },
            Decoder::Zlib(d) => match d.finish() {
                Ok(reader) => (reader, None),
                Err(e) => (dummy_reader(), Some(format!("deflate: {e}"))),
            },
            Decoder::Brotli(d) => match d.into_inner() {
                Ok(reader) => (reader, None),
                Err(reader) => (reader, Some("brotli: stream ended early".into())),
            },
        }
    }
}

fn dummy_reader() -> Reader {
    Reader {
        dialect: Dialect::Opaque,
        kept_events: None,
        framing: Framing::Skip,
        observation: Observation::default(),
        output_seen: false,
        output_events: 0,
        problem: None,
        parse_errors: 0,
    }
}

/// Reads one response body on the side.
pub struct ResponseAccountant {
    decoder: Option<Decoder>,
    /// An observation saved when the decoder failed mid-stream.
    salvaged: Option<Reader>,
    decode_error: Option<String>,
    unsupported_encoding: Option<String>,
    expects_usage: bool,
    stream: bool,
    first_output_reported: bool,
}

impl ResponseAccountant {
    /// Starts reading a response to a request on `route`.
    pub fn new(adapter: Adapter, route: &Route, status: u16, headers: &HeaderMap, limits: Limits) -> Self {
        let success = (200..300).contains(&status);
        // Errors are read with the adapter's own body format even on endpoints without usage.
        let dialect = if success || route.dialect != Dialect::Opaque {
            route.dialect
        } else {
            error_dialect(adapter)
        };
        let content_type = header_str(headers, CONTENT_TYPE).as_bytes();
        let starts_with = |prefix: &[u8]| {
            content_type
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        let framing = if dialect == Dialect::Opaque {
            Framing::Skip
        } else if starts_with(b"text/event-stream") {
            Framing::Sse(SseParser::new(limits.max_event_bytes))
        } else if starts_with(b"application/vnd.amazon.eventstream") {
            Framing::EventStream(EventStreamDecoder::new())
        } else if content_type.is_empty() || crate::is_json_media_type(content_type) {
            if route.json_array_stream {
                Framing::JsonArray(JsonArraySplitter::new(limits.max_event_bytes))
            } else {
                Framing::Json(TopLevelFields::new(
                    wanted_members(dialect),
                    limits.max_value_bytes,
                ))
            }
        } else {
            Framing::Skip
        };
        let stream = matches!(
            framing,
            Framing::Sse(_) | Framing::EventStream(_) | Framing::JsonArray(_)
        );
        let reports_usage = match dialect {
            Dialect::OpenaiChat | Dialect::OpenaiResponses | Dialect::Anthropic => true,
            Dialect::BedrockConverse | Dialect::BedrockInvoke => true,
            Dialect::Gemini => route.kind != EndpointKind::Embeddings,
            Dialect::OpenaiPlain => route.kind == EndpointKind::Embeddings,
            Dialect::Opaque => false,
        };
        let expects_usage = success && reports_usage && !matches!(framing, Framing::Skip);
        let mut reader = Reader {
            dialect,
            kept_events: None,
            framing,
            observation: Observation::default(),
            output_seen: false,
            output_events: 0,
            problem: None,
            parse_errors: 0,
        };
        if adapter == Adapter::Bedrock {
            bedrock::headers(&mut reader.observation, headers);
        }
        let mut unsupported_encoding = None;
        let decoder = match header_str(headers, CONTENT_ENCODING)
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "identity" => Decoder::Identity(Box::new(reader)),
            _ if matches!(reader.framing, Framing::Skip) => Decoder::Identity(Box::new(reader)),
            "gzip" | "x-gzip" => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(reader))),
            "deflate" => Decoder::Zlib(Box::new(flate2::write::ZlibDecoder::new(reader))),
            "br" => Decoder::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(
                reader, 8192,
            ))),
            other => {
                unsupported_encoding = Some(other.to_owned());
                reader.framing = Framing::Skip;
                Decoder::Identity(Box::new(reader))
            }
        };
        Self {
            decoder: Some(decoder),
            salvaged: None,
            decode_error: None,
            unsupported_encoding,
            expects_usage,
            stream,
            first_output_reported: false,
        }
    }

    /// A reader that reads nothing (accounting switched off).
    pub fn disabled() -> Self {
        Self {
            decoder: Some(Decoder::Identity(Box::new(dummy_reader()))),
            salvaged: None,
            decode_error: None,
            unsupported_encoding: None,
            expects_usage: false,
            stream: false,
            first_output_reported: false,
        }
    }

    /// Whether the response is a stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// Keeps the events of an OpenAI-style stream (for a tokenizer estimate when the stream ends
    /// without usage). Costs one copy per event; parsing waits until an estimate is needed.
    pub fn collect_output(&mut self) {
        if let Some(decoder) = self.decoder.as_mut() {
            let reader = decoder.reader();
            if reader.dialect == Dialect::OpenaiChat && matches!(reader.framing, Framing::Sse(_)) {
                reader.kept_events.get_or_insert_with(KeptEvents::default);
            }
        }
    }

    /// Stream events so far that carried generated output: one per content delta, a live lower bound
    /// of the output tokens (providers send one or a few tokens per delta).
    pub fn output_events(&mut self) -> u64 {
        self.decoder.as_mut().map_or(0, |d| d.reader().output_events)
    }

    /// Reads a chunk of the body as it passed to the client. Returns true when this chunk carried
    /// the first generated output (time to first token).
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let Some(decoder) = self.decoder.as_mut() else {
            return false;
        };
        if let Err(e) = decoder.write(chunk) {
            self.decode_error = Some(format!("content decoding: {e}"));
            // Keep what was read before the corruption.
            if let Some(decoder) = self.decoder.take() {
                self.salvaged = Some(decoder.into_reader().0);
            }
            return false;
        }
        let reader = decoder.reader();
        if reader.output_seen && !self.first_output_reported {
            self.first_output_reported = true;
            return true;
        }
        false
    }

    /// Ends the body. `complete` is false when it was cut short (client gone, upstream reset).
    pub fn finish(mut self, complete: bool) -> Accounting {
        let (mut reader, decode_error) = match (self.decoder.take(), self.salvaged.take()) {
            (Some(decoder), _) => decoder.into_reader(),
            (None, Some(reader)) => (reader, None),
            (None, None) => (dummy_reader(), None),
        };
        let framing_complete = reader.finish();
        let problem = self.decode_error.or(decode_error).or(reader.problem);
        let usage = reader.observation.usage.resolve();
        let status = if usage.is_some() {
            UsageStatus::Reported
        } else if self.unsupported_encoding.is_some() {
            UsageStatus::Unsupported
        } else if problem.is_some() && (complete || framing_complete) {
            UsageStatus::Malformed
        } else if !self.expects_usage {
            UsageStatus::NotReported
        } else {
            UsageStatus::Missing
        };
        let problem = problem.or_else(|| {
            self.unsupported_encoding
                .as_ref()
                .map(|e| format!("content encoding {e:?} is not decoded"))
        });
        Accounting {
            observation: reader.observation,
            usage,
            status,
            stream: self.stream,
            problem,
            kept_events: reader.kept_events.take(),
        }
    }
}

fn header_str(headers: &HeaderMap, name: http::header::HeaderName) -> &str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The body format of an adapter's error responses.
fn error_dialect(adapter: Adapter) -> Dialect {
    match adapter {
        Adapter::Openai | Adapter::AzureOpenai | Adapter::OpenaiCompatible => Dialect::OpenaiPlain,
        Adapter::Anthropic => Dialect::Anthropic,
        Adapter::Gemini | Adapter::VertexAi => Dialect::Gemini,
        Adapter::Bedrock => Dialect::BedrockConverse,
    }
}

fn wanted_members(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        Dialect::OpenaiChat | Dialect::OpenaiResponses | Dialect::OpenaiPlain => {
            &["id", "model", "usage", "error", "x_groq"]
        }
        Dialect::Anthropic => &["type", "id", "model", "usage", "error"],
        Dialect::Gemini => &["modelVersion", "responseId", "usageMetadata", "error"],
        Dialect::BedrockConverse => &["usage"],
        Dialect::BedrockInvoke => &[
            "type",
            "id",
            "model",
            "usage",
            "amazon-bedrock-invocationMetrics",
            "prompt_token_count",
            "generation_token_count",
            "inputTextTokenCount",
        ],
        Dialect::Opaque => &[],
    }
}

fn json_body(dialect: Dialect, observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    match dialect {
        Dialect::OpenaiChat | Dialect::OpenaiResponses | Dialect::OpenaiPlain => {
            openai::body(observation, body)
        }
        Dialect::Anthropic => anthropic::body(observation, body),
        Dialect::Gemini => gemini::body(observation, body),
        Dialect::BedrockConverse => bedrock::converse_body(observation, body),
        Dialect::BedrockInvoke => bedrock::invoke_body(observation, body),
        Dialect::Opaque => Ok(()),
    }
}

/// A whole JSON body read by the dialect's quick reader, or `None` (no quick reader, or one that
/// declined the body).
fn quick_json_body(dialect: Dialect, body: &[u8]) -> Option<Observation> {
    match dialect {
        Dialect::OpenaiChat | Dialect::OpenaiResponses | Dialect::OpenaiPlain => {
            let mut observation = Observation::default();
            openai::quick_body(&mut observation, body).then_some(observation)
        }
        _ => None,
    }
}

fn sse_event(dialect: Dialect, observation: &mut Observation, event: SseEvent<'_>) -> Result<Signal, String> {
    let result = match dialect {
        Dialect::OpenaiChat => openai::chat_event(observation, event.data),
        Dialect::OpenaiResponses => openai::responses_event(observation, event.event, event.data),
        Dialect::OpenaiPlain => openai::body(observation, event.data).map(|_| Signal::default()),
        Dialect::Anthropic => anthropic::event(observation, event.event, event.data),
        Dialect::Gemini => gemini::chunk(observation, event.data),
        Dialect::BedrockConverse | Dialect::BedrockInvoke | Dialect::Opaque => Ok(Signal::default()),
    };
    result.map_err(|e| format!("SSE event {:?}: {e}", event.event))
}
