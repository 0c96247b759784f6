//! Anthropic Messages API (also used by Claude on Vertex AI and, inside Bedrock's invoke bodies,
//! on Bedrock): usage with cache creation and cache read tokens.

use std::borrow::Cow;

use serde::Deserialize;

use crate::usage::{Observation, PartialUsage, Signal};

#[derive(Deserialize)]
struct UsageBody {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl UsageBody {
    fn partial(&self) -> PartialUsage {
        PartialUsage {
            input_uncached: self.input_tokens,
            cache_read: self.cache_read_input_tokens,
            cache_write: self.cache_creation_input_tokens,
            output_total: self.output_tokens,
            ..Default::default()
        }
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<UsageBody>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// A message, an error, or one stream event: they share the top-level `type` field.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<UsageBody>,
    /// `message_start` carries the message (model, id, first usage).
    #[serde(borrow)]
    message: Option<Message<'a>>,
    #[serde(borrow)]
    error: Option<ErrorBody<'a>>,
}

/// A whole JSON response body (a message, or an error).
pub fn body(observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    let envelope: Envelope<'_> = serde_json::from_slice(body)?;
    apply(observation, envelope);
    Ok(())
}

/// One stream event. `event` is the SSE event name, or `message` when the event type is only in
/// the JSON (Bedrock's invoke stream).
pub fn event(observation: &mut Observation, event: &str, data: &[u8]) -> Result<Signal, serde_json::Error> {
    match event {
        "content_block_delta" => return Ok(Signal { output: true }),
        "ping" | "content_block_start" | "content_block_stop" | "message_stop" => {
            return Ok(Signal::default());
        }
        _ => {}
    }
    let envelope: Envelope<'_> = serde_json::from_slice(data)?;
    let output = envelope.kind.as_deref() == Some("content_block_delta");
    apply(observation, envelope);
    Ok(Signal { output })
}

fn apply(observation: &mut Observation, envelope: Envelope<'_>) {
    observation.set_model(envelope.model.as_deref());
    observation.set_response_id(envelope.id.as_deref());
    if let Some(message) = envelope.message {
        observation.set_model(message.model.as_deref());
        observation.set_response_id(message.id.as_deref());
        if let Some(usage) = message.usage {
            observation.usage.merge(usage.partial());
        }
    }
    if let Some(usage) = envelope.usage {
        observation.usage.merge(usage.partial());
    }
    if let Some(error) = envelope.error {
        observation.set_error(error.kind.as_deref(), None);
    }
}
