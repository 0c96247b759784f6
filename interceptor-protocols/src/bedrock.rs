//! AWS Bedrock runtime: Converse/ConverseStream (camelCase `usage`) and InvokeModel /
//! InvokeModelWithResponseStream (model-native bodies; the stream wraps them in base64 `chunk`
//! events, the last one with `amazon-bedrock-invocationMetrics`). Requests are SigV4-signed and
//! are never modified.

use std::borrow::Cow;

use base64::Engine;
use http::HeaderMap;
use serde::Deserialize;

use crate::eventstream::Message;
use crate::needle::{Needle, needle};
use crate::usage::{Observation, PartialUsage, Signal};

static USAGE_KEY: Needle = needle!(b"\"usage\"");
/// Keys of generated output in the model-native stream chunks (Nova, Llama, Titan, Claude).
static OUTPUT_KEYS: [Needle; 4] = [
    needle!(b"\"outputText\""),
    needle!(b"\"generation\""),
    needle!(b"\"completion\""),
    needle!(b"\"text\""),
];

/// Converse usage; also Amazon Nova's invoke bodies.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_write_input_tokens: Option<u64>,
}

impl ConverseUsage {
    fn partial(&self) -> PartialUsage {
        PartialUsage {
            input_uncached: self.input_tokens,
            cache_read: self.cache_read_input_tokens,
            cache_write: self.cache_write_input_tokens,
            output_total: self.output_tokens,
            ..Default::default()
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvocationMetrics {
    input_token_count: Option<u64>,
    output_token_count: Option<u64>,
    cache_read_input_token_count: Option<u64>,
    cache_write_input_token_count: Option<u64>,
}

impl InvocationMetrics {
    fn partial(&self) -> PartialUsage {
        PartialUsage {
            input_uncached: self.input_token_count,
            cache_read: self.cache_read_input_token_count,
            cache_write: self.cache_write_input_token_count,
            output_total: self.output_token_count,
            ..Default::default()
        }
    }
}

/// A Converse response or ConverseStream `metadata` event.
#[derive(Deserialize)]
struct ConverseBody {
    usage: Option<ConverseUsage>,
}

/// The usage-bearing fields of the model-native bodies Bedrock hosts (Anthropic, Nova, Titan,
/// Llama, Mistral, Cohere all differ).
#[derive(Deserialize)]
struct NativeBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(rename = "amazon-bedrock-invocationMetrics")]
    invocation_metrics: Option<InvocationMetrics>,
    /// Meta Llama.
    prompt_token_count: Option<u64>,
    generation_token_count: Option<u64>,
    /// Amazon Titan text.
    #[serde(rename = "inputTextTokenCount")]
    input_text_token_count: Option<u64>,
}

/// Usage reported in InvokeModel response headers (authoritative for every model).
pub fn headers(observation: &mut Observation, headers: &HeaderMap) {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let usage = PartialUsage {
        input_uncached: number("x-amzn-bedrock-input-token-count"),
        output_total: number("x-amzn-bedrock-output-token-count"),
        cache_read: number("x-amzn-bedrock-cache-read-input-token-count"),
        cache_write: number("x-amzn-bedrock-cache-write-input-token-count"),
        ..Default::default()
    };
    observation.usage.merge(usage);
    if let Some(kind) = headers.get("x-amzn-errortype").and_then(|v| v.to_str().ok()) {
        // `ThrottlingException:http://internal.amazon.com/coral/...`
        let kind = kind.split(':').next().unwrap_or(kind);
        observation.set_error(Some(kind), None);
    }
}

/// A whole Converse response body.
pub fn converse_body(observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    let parsed: ConverseBody = serde_json::from_slice(body)?;
    if let Some(usage) = parsed.usage {
        observation.usage.merge(usage.partial());
    }
    Ok(())
}

/// A whole InvokeModel response body (model-native). Header usage, when present, wins.
pub fn invoke_body(observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    let from_headers = observation.usage;
    native(observation, body)?;
    if !from_headers.is_empty() {
        observation.usage = from_headers;
    }
    Ok(())
}

fn native(observation: &mut Observation, json: &[u8]) -> Result<Signal, serde_json::Error> {
    let parsed: NativeBody<'_> = serde_json::from_slice(json)?;
    let mut output = false;
    if let Some(kind) = parsed.kind.as_deref() {
        // Anthropic's own events and messages.
        output = crate::anthropic::event(observation, kind, json)?.output;
    } else if USAGE_KEY.found_in(json) {
        converse_body(observation, json)?;
    }
    if parsed.prompt_token_count.is_some() || parsed.generation_token_count.is_some() {
        observation.usage.merge(PartialUsage {
            input_uncached: parsed.prompt_token_count,
            output_total: parsed.generation_token_count,
            ..Default::default()
        });
    }
    if let Some(input) = parsed.input_text_token_count {
        observation.usage.merge(PartialUsage {
            input_uncached: Some(input),
            ..Default::default()
        });
    }
    if let Some(metrics) = parsed.invocation_metrics {
        observation.usage.merge(metrics.partial());
    }
    Ok(Signal { output })
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    bytes: Cow<'a, str>,
}

/// The reason a stream message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("payload is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("chunk bytes are not base64: {0}")]
    Base64(#[from] base64::DecodeError),
}

/// One event-stream message of `converse-stream` or `invoke-with-response-stream`.
pub fn stream_message(observation: &mut Observation, message: &Message<'_>) -> Result<Signal, MessageError> {
    let headers = &message.headers;
    if matches!(headers.message_type, Some("exception" | "error")) {
        let kind = headers
            .exception_type
            .or(headers.error_code)
            .unwrap_or("exception");
        observation.set_error(Some(kind), None);
        return Ok(Signal::default());
    }
    match headers.event_type {
        Some("contentBlockDelta") => Ok(Signal { output: true }),
        Some("metadata") => {
            converse_body(observation, message.payload)?;
            Ok(Signal::default())
        }
        Some("chunk") => {
            let chunk: Chunk<'_> = serde_json::from_slice(message.payload)?;
            let decoded = base64::engine::general_purpose::STANDARD.decode(chunk.bytes.as_bytes())?;
            let signal = native(observation, &decoded)?;
            let output = signal.output || OUTPUT_KEYS.iter().any(|key| key.found_in(&decoded));
            Ok(Signal { output })
        }
        _ => Ok(Signal::default()),
    }
}
