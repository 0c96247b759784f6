//! OpenAI (and Azure OpenAI, and OpenAI-compatible providers): chat completions, legacy
//! completions, the Responses API, embeddings, images and audio.

use std::borrow::Cow;

use serde::Deserialize;

use crate::needle::{Needle, needle};
use crate::usage::{Observation, PartialUsage, Signal};

static USAGE_OBJECT: Needle = needle!(b"\"usage\":{");
static USAGE_OBJECT_SPACED: Needle = needle!(b"\"usage\": {");
static ERROR_KEY: Needle = needle!(b"\"error\"");
static TOOL_CALLS: Needle = needle!(b"\"tool_calls\":[");
static OUTPUT_KEYS: [Needle; 4] = [
    needle!(b"\"content\":\""),
    needle!(b"\"text\":\""),
    needle!(b"\"reasoning_content\":\""),
    needle!(b"\"refusal\":\""),
];

/// Both usage shapes: chat/completions/embeddings (`prompt_tokens`) and Responses/images/audio
/// (`input_tokens`).
#[derive(Deserialize)]
struct UsageBody {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<InputDetails>,
    input_tokens_details: Option<InputDetails>,
    completion_tokens_details: Option<OutputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

impl UsageBody {
    fn partial(&self) -> PartialUsage {
        let input = self.prompt_tokens.or(self.input_tokens);
        let mut output = self.completion_tokens.or(self.output_tokens);
        if output.is_none()
            && let (Some(total), Some(input)) = (self.total_tokens, input)
        {
            // Embeddings report prompt and total tokens only.
            output = Some(total.saturating_sub(input));
        }
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .or(self.input_tokens_details.as_ref())
            .and_then(|d| d.cached_tokens);
        let reasoning = self
            .completion_tokens_details
            .as_ref()
            .or(self.output_tokens_details.as_ref())
            .and_then(|d| d.reasoning_tokens);
        PartialUsage {
            input_total: input,
            cache_read: cached,
            output_total: output,
            reasoning,
            ..Default::default()
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    code: Option<serde_json::Value>,
}

/// A chat completion, completion, embeddings, image or audio response (or one stream chunk).
#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<UsageBody>,
    /// Groq puts the usage of streams under `x_groq`.
    x_groq: Option<Groq>,
    #[serde(borrow)]
    error: Option<ErrorBody<'a>>,
}

#[derive(Deserialize)]
struct Groq {
    usage: Option<UsageBody>,
}

/// A whole JSON response body (non-streamed, or an error).
pub fn body(observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    let response: Response<'_> = serde_json::from_slice(body)?;
    apply(observation, response);
    Ok(())
}

fn apply(observation: &mut Observation, response: Response<'_>) {
    observation.set_model(response.model.as_deref());
    observation.set_response_id(response.id.as_deref());
    if let Some(usage) = response.usage.or(response.x_groq.and_then(|g| g.usage)) {
        observation.usage.merge(usage.partial());
    }
    if let Some(error) = response.error {
        observation.set_error(error.kind.as_deref(), error.code.and_then(|c| code_text(&c)));
    }
}

/// One chat/completions stream event (`data: {...}` or `data: [DONE]`).
pub fn chat_event(observation: &mut Observation, data: &[u8]) -> Result<Signal, serde_json::Error> {
    if data == b"[DONE]" {
        return Ok(Signal::default());
    }
    let output = carries_output(data);
    // Only the first chunk (model, id), usage chunks and errors need a full parse.
    if observation.model.is_none()
        || USAGE_OBJECT.found_in(data)
        || USAGE_OBJECT_SPACED.found_in(data)
        || ERROR_KEY.found_in(data)
    {
        let response: Response<'_> = serde_json::from_slice(data)?;
        apply(observation, response);
    }
    Ok(Signal { output })
}

/// Whether a chat chunk delivers generated text, a refusal, reasoning or a tool call.
fn carries_output(data: &[u8]) -> bool {
    OUTPUT_KEYS.iter().any(|key| {
        key.positions(data)
            .any(|at| data.get(at + key.len()) != Some(&b'"'))
    }) || TOOL_CALLS.found_in(data)
}

#[derive(Deserialize)]
struct DeltaChunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<DeltaChoice<'a>>,
}

#[derive(Deserialize)]
struct DeltaChoice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    /// Legacy completions stream `text`.
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Vec<ToolCallDelta<'a>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// Appends the generated text of a chat/completions stream chunk (content, refusal, reasoning,
/// tool-call names and arguments) to `out`, up to `max` bytes in all.
pub fn chat_delta_text(data: &[u8], out: &mut String, max: usize) -> Result<(), serde_json::Error> {
    if data == b"[DONE]" {
        return Ok(());
    }
    let chunk: DeltaChunk<'_> = serde_json::from_slice(data)?;
    let mut push = |text: &str| {
        let room = max.saturating_sub(out.len());
        out.push_str(&text[..crate::estimate::floor_char_boundary(text, room)]);
    };
    for choice in &chunk.choices {
        if let Some(text) = &choice.text {
            push(text);
        }
        let Some(delta) = &choice.delta else { continue };
        for text in [&delta.content, &delta.refusal, &delta.reasoning_content]
            .into_iter()
            .flatten()
        {
            push(text);
        }
        for call in &delta.tool_calls {
            if let Some(function) = &call.function {
                for text in [&function.name, &function.arguments].into_iter().flatten() {
                    push(text);
                }
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    response: Option<Response<'a>>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
}

/// One Responses API stream event. `response.created`/`in_progress` name the model;
/// `response.completed`, `response.incomplete` and `response.failed` carry the usage.
pub fn responses_event(
    observation: &mut Observation,
    event: &str,
    data: &[u8],
) -> Result<Signal, serde_json::Error> {
    if event.ends_with(".delta") {
        return Ok(Signal { output: true });
    }
    let interesting = event.starts_with("response.")
        && !event.starts_with("response.output_")
        && !event.starts_with("response.content_part")
        || event == "error"
        || event == "message";
    if !interesting {
        return Ok(Signal::default());
    }
    let parsed: ResponsesEvent<'_> = serde_json::from_slice(data)?;
    let kind = parsed.kind.as_deref().unwrap_or(event);
    if kind.ends_with(".delta") {
        return Ok(Signal { output: true });
    }
    if kind == "error" {
        observation.set_error(Some("error"), parsed.code.map(Cow::into_owned));
    }
    if let Some(response) = parsed.response {
        apply(observation, response);
    }
    Ok(Signal::default())
}

/// An error `code` may be a string, a number or null.
fn code_text(code: &serde_json::Value) -> Option<String> {
    match code {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_detection_ignores_empty_and_role_only_chunks() {
        assert!(!carries_output(
            br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(carries_output(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(carries_output(
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#
        ));
        assert!(!carries_output(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#));
    }
}
