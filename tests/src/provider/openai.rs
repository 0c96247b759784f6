//! OpenAI's API as its reference documents it: Chat Completions (JSON, and SSE with
//! `stream_options.include_usage`: `"usage":null` on every chunk and a final `"choices":[]` usage
//! chunk), the Responses API (JSON, and typed SSE events ending with `response.completed`) and
//! Embeddings (float or base64). Every response carries `x-request-id`; JSON is gzip-compressed when
//! the client accepts it. The model `rate-limited` gets a 429 with rate-limit headers; the model
//! `broken-body` a 200 JSON body cut in the middle ([`BROKEN_BODY`]); the model `slow-stream`
//! streams its chunks [`SLOW_INTERVAL`] apart; the model `long-stream` repeats the reply
//! [`LONG_STREAM_REPEATS`] times.

use std::time::Duration;

use base64::Engine as _;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{
    Body, Ledger, Sent, json_body, json_response, json_response_for, sse_response, sse_response_with_tail,
};

/// The reply text, split in stream deltas.
pub const REPLY: [&str; 4] = ["Hello", " from the", " simulated", " provider."];

fn bad_json() -> Response<Body> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": null, "code": null}}),
    )
}

fn with_request_id(mut response: Response<Body>, id: &str) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
        .headers_mut()
        .insert("openai-processing-ms", HeaderValue::from_static("42"));
    response
}

/// Time between the chunks of the model `slow-stream`.
pub const SLOW_INTERVAL: Duration = Duration::from_millis(400);

/// The body sent for the model `broken-body`.
pub const BROKEN_BODY: &str = r#"{"id":"chatcmpl-broken","model":"gpt-4o-mini","usage":{"prompt_tok"#;

/// Token counts of chat completion number `n`.
pub fn chat_usage(n: u64) -> (u64, u64, u64) {
    (1200 + n, 1024, 50 + n % 7)
}

/// How many times the model `long-stream` (OpenAI and Anthropic) repeats the reply in its stream.
pub const LONG_STREAM_REPEATS: usize = 50;

/// The chat completion SSE events for `model`, as OpenAI sends them.
pub fn chat_stream_events(model: &str, include_usage: bool, usage: &Value) -> Vec<String> {
    chat_stream_events_repeated(model, include_usage, usage, 1)
}

/// [`chat_stream_events`] with the reply deltas repeated `repeats` times.
pub fn chat_stream_events_repeated(
    model: &str,
    include_usage: bool,
    usage: &Value,
    repeats: usize,
) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let mut chunk = json!({"id": "chatcmpl-sim1", "object": "chat.completion.chunk", "created": 1_732_400_000, "model": model,
               "system_fingerprint": "fp_sim", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        format!("data: {chunk}\n\n")
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    events.extend(
        REPLY
            .iter()
            .cycle()
            .take(REPLY.len() * repeats)
            .map(|piece| chunk(json!({"content": piece}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-sim1", "object": "chat.completion.chunk", "created": 1_732_400_000, "model": model,
                   "system_fingerprint": "fp_sim", "choices": [], "usage": usage})
        ));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

pub async fn chat_completions(request: Request<Incoming>, ledger: &Ledger) -> Response<Body> {
    let headers = request.headers().clone();
    let Some(body) = json_body(request).await else {
        return bad_json();
    };
    let n = ledger.next();
    let id = format!("req_sim{n}");
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    if model == "rate-limited" {
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
        );
        let h = response.headers_mut();
        h.insert("retry-after", HeaderValue::from_static("20"));
        h.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-remaining-tokens", HeaderValue::from_static("1500"));
        return with_request_id(response, &id);
    }
    if model == "broken-body" {
        let mut response = json_response(StatusCode::OK, &json!({}));
        *response.body_mut() = super::full(BROKEN_BODY);
        return with_request_id(response, &id);
    }
    // The provider reports the dated snapshot it ran.
    let served = format!("{model}-2024-07-18");
    let (prompt, cached, completion) = chat_usage(n);
    let usage = json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    });
    let stream = body["stream"].as_bool() == Some(true);
    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    if !stream || include_usage {
        ledger.record(Sent {
            id: id.clone(),
            model: served.clone(),
            input: prompt,
            cached,
            cache_write: 0,
            output: completion,
            reasoning: 0,
        });
    }
    if !stream {
        let response = json_response_for(
            &headers,
            StatusCode::OK,
            &json!({
                "id": "chatcmpl-sim1", "object": "chat.completion", "created": 1_732_400_000, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY.concat(), "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage, "service_tier": "default", "system_fingerprint": "fp_sim"
            }),
        );
        return with_request_id(response, &id);
    }
    let repeats = if model == "long-stream" {
        LONG_STREAM_REPEATS
    } else {
        1
    };
    let events = chat_stream_events_repeated(&served, include_usage, &usage, repeats);
    let interval = if model == "slow-stream" {
        SLOW_INTERVAL
    } else {
        Duration::from_millis(5)
    };
    // Generation ends with the finish chunk: the usage chunk (when asked for) and `[DONE]` follow it at
    // once, as OpenAI sends them; only the generated chunks are paced.
    let tail = 1 + usize::from(include_usage);
    with_request_id(sse_response_with_tail(events, interval, tail), &id)
}

pub async fn responses(request: Request<Incoming>, ledger: &Ledger) -> Response<Body> {
    let headers = request.headers().clone();
    let Some(body) = json_body(request).await else {
        return bad_json();
    };
    let n = ledger.next();
    let id = format!("req_sim{n}");
    let model = body["model"].as_str().unwrap_or("gpt-4.1").to_owned();
    let served = format!("{model}-2025-04-14");
    let (input, cached, output, reasoning) = (300 + n, 256, 40 + n % 5, 13);
    ledger.record(Sent {
        id: id.clone(),
        model: served.clone(),
        input,
        cached,
        cache_write: 0,
        output,
        reasoning,
    });
    let text = REPLY.concat();
    let message = json!({"id": "msg_sim1", "type": "message", "status": "completed", "role": "assistant",
                         "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let response_object = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_sim1", "object": "response", "created_at": 1_741_290_958, "status": status, "error": null,
               "incomplete_details": null, "instructions": null, "max_output_tokens": null, "model": served,
               "output": output, "parallel_tool_calls": true, "previous_response_id": null,
               "reasoning": {"effort": null, "summary": null}, "store": true, "temperature": 1.0,
               "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
               "truncation": "disabled", "usage": usage, "user": null, "metadata": {}})
    };
    let usage = json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": cached},
                       "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
                       "total_tokens": input + output});
    if body["stream"].as_bool() != Some(true) {
        let response = json_response_for(
            &headers,
            StatusCode::OK,
            &response_object("completed", json!([message]), usage),
        );
        return with_request_id(response, &id);
    }
    let mut sequence = 0;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        format!("event: {kind}\ndata: {data}\n\n")
    };
    let mut events = vec![
        event(
            "response.created",
            json!({"response": response_object("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.in_progress",
            json!({"response": response_object("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": {"id": "msg_sim1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for piece in REPLY {
        events.push(event(
            "response.output_text.delta",
            json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push(event(
        "response.output_text.done",
        json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "text": text}),
    ));
    events.push(event(
        "response.content_part.done",
        json!({"item_id": "msg_sim1", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}),
    ));
    events.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": message}),
    ));
    events.push(event(
        "response.completed",
        json!({"response": response_object("completed", json!([message]), usage)}),
    ));
    with_request_id(sse_response(events, Duration::from_millis(5)), &id)
}

pub async fn embeddings(request: Request<Incoming>, ledger: &Ledger) -> Response<Body> {
    let headers = request.headers().clone();
    let Some(body) = json_body(request).await else {
        return bad_json();
    };
    let n = ledger.next();
    let id = format!("req_sim{n}");
    let model = body["model"]
        .as_str()
        .unwrap_or("text-embedding-3-small")
        .to_owned();
    let inputs = match &body["input"] {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let prompt = 8 * inputs as u64 + n;
    ledger.record(Sent {
        id: id.clone(),
        model: model.clone(),
        input: prompt,
        cached: 0,
        cache_write: 0,
        output: 0,
        reasoning: 0,
    });
    let vector = [0.0023064255f32, -0.009327292, -0.0028842222, 0.017194842];
    let embedding = if body["encoding_format"].as_str() == Some("base64") {
        let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(vector)
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": embedding}))
        .collect();
    let response = json_response_for(
        &headers,
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
    );
    with_request_id(response, &id)
}
