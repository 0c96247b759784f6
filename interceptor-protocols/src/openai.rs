//! OpenAI (and Azure OpenAI, and OpenAI-compatible providers): chat completions, legacy
//! completions, the Responses API, embeddings, images and audio.

use std::borrow::Cow;

use serde::Deserialize;

use crate::needle::{Needle, needle};
use crate::quick_json::{Reader, first_time};
use crate::usage::{Observation, PartialUsage, Signal};

static USAGE_KEY: Needle = needle!(b"\"usage\":");
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
#[derive(Deserialize, Default, Debug, PartialEq, Eq)]
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

#[derive(Deserialize, Debug, PartialEq, Eq)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Debug, PartialEq, Eq)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

impl UsageBody {
    /// A usage object (or `null`) read with `quick_json`; `None` leaves it to serde.
    fn quick(reader: &mut Reader<'_>) -> Option<Option<Self>> {
        let mut usage = Self::default();
        let mut seen = 0;
        let present = reader.object_or_null(|reader, name| {
            let (index, slot) = match name {
                b"prompt_tokens" => (0, &mut usage.prompt_tokens),
                b"completion_tokens" => (1, &mut usage.completion_tokens),
                b"input_tokens" => (2, &mut usage.input_tokens),
                b"output_tokens" => (3, &mut usage.output_tokens),
                b"total_tokens" => (4, &mut usage.total_tokens),
                b"prompt_tokens_details" => {
                    return details_into(reader, &mut seen, 5, &mut usage.prompt_tokens_details);
                }
                b"input_tokens_details" => {
                    return details_into(reader, &mut seen, 6, &mut usage.input_tokens_details);
                }
                b"completion_tokens_details" => {
                    return details_into(reader, &mut seen, 7, &mut usage.completion_tokens_details);
                }
                b"output_tokens_details" => {
                    return details_into(reader, &mut seen, 8, &mut usage.output_tokens_details);
                }
                _ => return reader.skip(),
            };
            first_time(&mut seen, index)?;
            *slot = reader.u64_or_null()?;
            Some(())
        })?;
        Some(present.then_some(usage))
    }

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

/// A details object: one count that matters.
trait Details {
    /// The count's member name.
    const FIELD: &'static [u8];
    fn with(count: Option<u64>) -> Self;
}

impl Details for InputDetails {
    const FIELD: &'static [u8] = b"cached_tokens";
    fn with(cached_tokens: Option<u64>) -> Self {
        Self { cached_tokens }
    }
}

impl Details for OutputDetails {
    const FIELD: &'static [u8] = b"reasoning_tokens";
    fn with(reasoning_tokens: Option<u64>) -> Self {
        Self { reasoning_tokens }
    }
}

/// Reads member `index` of a usage object, a details object (or `null`), into `slot`; `None`
/// leaves the body to serde.
fn details_into<T: Details>(
    reader: &mut Reader<'_>,
    seen: &mut u32,
    index: u32,
    slot: &mut Option<T>,
) -> Option<()> {
    first_time(seen, index)?;
    *slot = reader
        .one_member_or_null(T::FIELD, Reader::u64_or_null)?
        .map(T::with);
    Some(())
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

impl<'a> Response<'a> {
    /// Reads `body` as serde would, with `quick_json`; errors and anything `quick_json` declines
    /// are left to serde.
    fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        match Self::quick(body) {
            Some(response) => Ok(response),
            None => serde_json::from_slice(body),
        }
    }

    fn quick(body: &'a [u8]) -> Option<Self> {
        let mut response = Response {
            id: None,
            model: None,
            usage: None,
            x_groq: None,
            error: None,
        };
        let mut seen = 0;
        Reader::new(body).whole_object(|reader, name| {
            match name {
                b"id" => {
                    first_time(&mut seen, 0)?;
                    response.id = reader.str_or_null()?.map(Cow::Borrowed);
                }
                b"model" => {
                    first_time(&mut seen, 1)?;
                    response.model = reader.str_or_null()?.map(Cow::Borrowed);
                }
                b"usage" => {
                    first_time(&mut seen, 2)?;
                    response.usage = UsageBody::quick(reader)?;
                }
                b"x_groq" => {
                    first_time(&mut seen, 3)?;
                    response.x_groq = reader
                        .one_member_or_null(b"usage", UsageBody::quick)?
                        .map(|usage| Groq { usage });
                }
                // The Responses API sends `"error": null` on success; error bodies themselves are
                // rare, and serde reads them.
                b"error" => {
                    first_time(&mut seen, 4)?;
                    if !reader.null() {
                        return None;
                    }
                }
                _ => reader.skip()?,
            }
            Some(())
        })?;
        Some(response)
    }
}

/// Whether `quick_json`, where it reads `body` (as a response or a stream chunk), reads what serde
/// reads. For the fuzz targets and the tests.
#[doc(hidden)]
pub fn quick_agrees_with_serde(body: &[u8]) -> bool {
    let Some(quick) = Response::quick(body) else {
        return true;
    };
    let Ok(serde) = serde_json::from_slice::<Response<'_>>(body) else {
        return false;
    };
    quick.id == serde.id
        && quick.model == serde.model
        && quick.usage == serde.usage
        && quick.x_groq.map(|g| g.usage) == serde.x_groq.map(|g| g.usage)
        && serde.error.is_none()
}

/// A whole JSON response body read by the quick reader alone; false (with `observation`
/// untouched) when it declined the body.
pub fn quick_body(observation: &mut Observation, body: &[u8]) -> bool {
    let Some(response) = Response::quick(body) else {
        return false;
    };
    apply(observation, response);
    true
}

/// A whole JSON response body (non-streamed, or an error).
pub fn body(observation: &mut Observation, body: &[u8]) -> Result<(), serde_json::Error> {
    apply(observation, Response::parse(body)?);
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
    if observation.model.is_none() || has_usage_object(data) || ERROR_KEY.found_in(data) {
        apply(observation, Response::parse(data)?);
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

/// Whether a chunk has a usage object (`"usage":{` or `"usage": {`), with one search for both.
fn has_usage_object(data: &[u8]) -> bool {
    USAGE_KEY.positions(data).any(|at| {
        let value = &data[at + USAGE_KEY.len()..];
        value.starts_with(b"{") || value.starts_with(b" {")
    })
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
    fn the_quick_reader_reads_responses_and_chunks_as_serde_does() {
        let read = [
            r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"there\"\n\u00e9","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0}},"service_tier":"default","system_fingerprint":"fp_1"}"#,
            r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
            r#"{"id":"c","choices":[{"delta":{"role":"assistant","content":""}}],"usage":null}"#,
            r#"{"object":"list","data":[{"embedding":[0.1,-2e-3,1E+2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
            r#"{"id":"resp_1","model":"gpt-4o","usage":{"input_tokens":8,"input_tokens_details":{"cached_tokens":null},"output_tokens":4,"output_tokens_details":null}}"#,
            r#"{"id":"g","model":"llama","x_groq":{"id":"req_1","usage":{"prompt_tokens":3,"completion_tokens":2}}}"#,
            " { \"model\" : \"m\" , \"usage\" : { } }\r\n",
            r#"{"id":"resp_2","object":"response","status":"completed","error":null,"model":"gpt-4o","output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":5,"output_tokens":2}}"#,
            r#"{"model":"modèle"}"#,
        ];
        for body in read {
            assert!(Response::quick(body.as_bytes()).is_some(), "{body}");
            assert!(quick_agrees_with_serde(body.as_bytes()), "{body}");
        }
        // Left to serde: errors, duplicates, escaped names, numbers a u64 does not take, arrays as
        // structs, bad JSON. Whatever serde makes of them stands.
        let declined = [
            r#"{"error":{"type":"invalid_request_error","code":null}}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"error":null,"error":null}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":1}}}"#,
            r#"{"mod\u0065l":"m"}"#,
            r#"{"usage":{"prompt_tokens":1.0}}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
            r#"{"usage":[1,2]}"#,
            r#"{"model":"m"} trailing"#,
            r#"{"model":"m",}"#,
            r#"{"id":"\ud800"}"#,
        ];
        for body in declined {
            assert!(Response::quick(body.as_bytes()).is_none(), "{body}");
        }
        let mut observation = Observation::default();
        body(&mut observation, r#"{"mod\u0065l":"m"}"#.as_bytes()).expect("serde reads escaped names");
        assert_eq!(observation.model.as_deref(), Some("m"));
        assert!(body(&mut Observation::default(), br#"{"model":"a","model":"b"}"#).is_err());
    }

    #[test]
    fn one_search_finds_a_usage_object_as_searches_for_both_spellings_do() {
        let by_spelling = |data: &[u8]| {
            memchr::memmem::find(data, b"\"usage\":{").is_some()
                || memchr::memmem::find(data, b"\"usage\": {").is_some()
        };
        let fixtures = concat!(
            include_str!("../tests/fixtures/openai/chat-stream-usage.sse"),
            include_str!("../tests/fixtures/openai/chat-stream-no-usage.sse"),
            include_str!("../tests/fixtures/openai/chat-reasoning.json"),
        );
        let mut events: Vec<&[u8]> = fixtures
            .lines()
            .map(|line| line.strip_prefix("data: ").unwrap_or(line).as_bytes())
            .collect();
        events.extend(
            [
                r#"{"choices":[{"delta":{"refusal":"No"}}],"usage": {"prompt_tokens":1}}"#,
                r#"{"choices":[],"usage":  {"prompt_tokens":1}}"#,
                r#"{"usage":null,"x":{"usage":{"a":1}}}"#,
                r#"""""usage":{"#,
            ]
            .map(str::as_bytes),
        );
        // Every prefix and suffix of each event too: keys cut at their start, middle and end.
        let mut checked = 0;
        for event in events {
            for cut in 0..=event.len() {
                for part in [&event[..cut], &event[cut..]] {
                    assert_eq!(
                        has_usage_object(part),
                        by_spelling(part),
                        "{}",
                        String::from_utf8_lossy(part)
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 5_000, "only {checked} inputs");
        assert!(has_usage_object(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#));
        assert!(!has_usage_object(br#"{"choices":[{"delta":{}}],"usage":null}"#));
    }

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
