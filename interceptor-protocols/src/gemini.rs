//! Google Gemini API and Vertex AI `GenerateContentResponse`: `usageMetadata` with cached and
//! thought tokens. Streams repeat `usageMetadata` in every chunk; the last one counts.

use std::borrow::Cow;

use serde::Deserialize;

use crate::needle::{Needle, needle};
use crate::usage::{Observation, PartialUsage, Signal};

static TEXT_KEY: Needle = needle!(b"\"text\"");
static FUNCTION_CALL_KEY: Needle = needle!(b"\"functionCall\"");

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
}

impl UsageMetadata {
    fn partial(&self) -> PartialUsage {
        // Tool-use prompt tokens are billed as input; thoughts as output.
        let input = match (self.prompt_token_count, self.tool_use_prompt_token_count) {
            (None, None) => None,
            (prompt, tool) => Some(prompt.unwrap_or(0) + tool.unwrap_or(0)),
        };
        PartialUsage {
            input_total: input,
            cache_read: self.cached_content_token_count,
            // A chunk without candidates (e.g. only thoughts so far) omits the count: it is zero.
            output_visible: Some(self.candidates_token_count.unwrap_or(0)),
            reasoning: self.thoughts_token_count,
            ..Default::default()
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    code: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response<'a> {
    #[serde(borrow)]
    model_version: Option<Cow<'a, str>>,
    #[serde(borrow)]
    response_id: Option<Cow<'a, str>>,
    usage_metadata: Option<UsageMetadata>,
    #[serde(borrow)]
    error: Option<ErrorBody<'a>>,
}

/// A whole JSON body: one response, or (non-SSE stream buffered whole) an array of them.
pub fn body(observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    let trimmed = body.trim_ascii_start();
    if trimmed.first() == Some(&b'[') {
        let responses: Vec<Response<'_>> = serde_json::from_slice(body)?;
        for response in responses {
            apply(observation, response);
        }
        return Ok(());
    }
    let response: Response<'_> = serde_json::from_slice(body)?;
    apply(observation, response);
    Ok(())
}

/// One streamed response chunk (an SSE `data:` or an element of the JSON array).
pub fn chunk(observation: &mut Observation, data: &[u8]) -> Result<Signal, serde_json::Error> {
    let output = TEXT_KEY.found_in(data) || FUNCTION_CALL_KEY.found_in(data);
    let response: Response<'_> = serde_json::from_slice(data)?;
    apply(observation, response);
    Ok(Signal { output })
}

fn apply(observation: &mut Observation, response: Response<'_>) {
    observation.set_model(response.model_version.as_deref());
    observation.set_response_id(response.response_id.as_deref());
    if let Some(usage) = response.usage_metadata {
        observation.usage.merge(usage.partial());
    }
    if let Some(error) = response.error {
        observation.set_error(error.status.as_deref(), error.code.map(|c| c.to_string()));
    }
}
