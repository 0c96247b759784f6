//! Anthropic's Messages API as its reference documents it: JSON, or SSE from `message_start` (input
//! and cache usage) to `message_delta` (final output tokens only) and `message_stop`. Responses
//! carry `request-id`; usage includes cache creation and cache read tokens.

use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::openai::REPLY;
use super::{Body, Ledger, Sent, json_body, json_response, json_response_for, sse_response};

pub async fn messages(request: Request<Incoming>, ledger: &Ledger) -> Response<Body> {
    let headers = request.headers().clone();
    let Some(body) = json_body(request).await else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"type": "error", "error": {"type": "invalid_request_error", "message": "invalid JSON body"}}),
        );
    };
    let n = ledger.next();
    let id = format!("req_sim{n}");
    let model = body["model"].as_str().unwrap_or("claude-sonnet-4-5").to_owned();
    let served = format!("{model}-20250929");
    let (input, cache_write, cache_read, output) = (21 + n, 1500, 3000, 70 + n % 9);
    ledger.record(Sent {
        id: id.clone(),
        model: served.clone(),
        input: input + cache_write + cache_read,
        cached: cache_read,
        cache_write,
        output,
        reasoning: 0,
    });
    let mut response = if body["stream"].as_bool() != Some(true) {
        json_response_for(
            &headers,
            StatusCode::OK,
            &json!({"id": "msg_sim1", "type": "message", "role": "assistant", "model": served,
                    "content": [{"type": "text", "text": REPLY.concat()}],
                    "stop_reason": "end_turn", "stop_sequence": null,
                    "usage": {"input_tokens": input, "cache_creation_input_tokens": cache_write,
                              "cache_read_input_tokens": cache_read, "output_tokens": output,
                              "service_tier": "standard"}}),
        )
    } else {
        let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_sim1", "type": "message", "role": "assistant", "model": served,
                       "content": [], "stop_reason": null, "stop_sequence": null,
                       "usage": {"input_tokens": input, "cache_creation_input_tokens": cache_write,
                                 "cache_read_input_tokens": cache_read, "output_tokens": 1}}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event("ping", json!({"type": "ping"})),
        ];
        let repeats = if model == "long-stream" {
            super::openai::LONG_STREAM_REPEATS
        } else {
            1
        };
        events.extend(REPLY.iter().cycle().take(REPLY.len() * repeats).map(|piece| {
            event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}))
        }));
        events.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        // Only the output tokens: the accounting must keep message_start's input and cache tokens.
        events.push(event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        sse_response(events, Duration::from_millis(5))
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("request-id", value);
    }
    response.headers_mut().insert(
        "anthropic-ratelimit-requests-remaining",
        HeaderValue::from_static("49"),
    );
    response
}
