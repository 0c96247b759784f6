//! The Gemini API as its reference documents it: `models/{model}:generateContent` (JSON) and
//! `:streamGenerateContent` (SSE with `alt=sse`, else a streamed JSON array), every chunk with a
//! cumulative `usageMetadata` (cached content and thought tokens included), `modelVersion` and
//! `responseId`.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};

use super::openai::REPLY;
use super::{Body, Ledger, Sent, json_body, json_response, json_response_for, sse_response};

pub async fn models(request: Request<Incoming>, ledger: &Ledger) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let sse = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
    let headers = request.headers().clone();
    let Some((model, method)) = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))
        .and_then(|rest| rest.split_once(':'))
    else {
        return not_found(&path);
    };
    let (model, method) = (model.to_owned(), method.to_owned());
    if !matches!(method.as_str(), "generateContent" | "streamGenerateContent") {
        return not_found(&path);
    }
    if json_body(request).await.is_none() {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"code": 400, "message": "Invalid JSON payload received.", "status": "INVALID_ARGUMENT"}}),
        );
    }
    let n = ledger.next();
    let response_id = format!("sim-resp-{n}");
    let (prompt, cached, candidates, thoughts) = (540 + n, 512, 30 + n % 4, 20);
    ledger.record(Sent {
        id: response_id.clone(),
        model: model.clone(),
        input: prompt,
        cached,
        cache_write: 0,
        output: candidates + thoughts,
        reasoning: thoughts,
    });
    let chunk = |text: &str, candidates_so_far: u64, last: bool| {
        let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if last {
            candidate["finishReason"] = json!("STOP");
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": {
                "promptTokenCount": prompt,
                "candidatesTokenCount": candidates_so_far,
                "cachedContentTokenCount": cached,
                "thoughtsTokenCount": thoughts,
                "totalTokenCount": prompt + candidates_so_far + thoughts,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
            },
            "modelVersion": model,
            "responseId": response_id,
        })
    };
    if method == "generateContent" {
        return json_response_for(
            &headers,
            StatusCode::OK,
            &chunk(&REPLY.concat(), candidates, true),
        );
    }
    let pieces: Vec<Value> = REPLY
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let last = i + 1 == REPLY.len();
            let so_far = if last { candidates } else { (i as u64 + 1) * 3 };
            chunk(piece, so_far, last)
        })
        .collect();
    if sse {
        let events = pieces.iter().map(|p| format!("data: {p}\r\n\r\n")).collect();
        return sse_response(events, Duration::from_millis(5));
    }
    // A streamed JSON array, one element per chunk.
    let count = pieces.len();
    let parts = pieces.into_iter().enumerate().map(move |(i, p)| {
        let prefix = if i == 0 { "[" } else { ",\r\n" };
        let suffix = if i + 1 == count { "]" } else { "" };
        Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("{prefix}{p}{suffix}"))))
    });
    let stream = futures::stream::iter(parts).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        frame
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

fn not_found(path: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": {"code": 404, "message": format!("{path} is not found"), "status": "NOT_FOUND"}}),
    )
}
