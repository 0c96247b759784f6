//! Rejections in the provider's own error shape, so SDKs raise their usual exceptions
//! (`RateLimitError`, `NotFoundError`, `BadRequestError`) and honour `Retry-After`.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use interceptor_protocols::Adapter;
use serde_json::json;

use super::engine::{Limited, Rejection};

/// The header naming the rule that rejected a request.
pub const RULE_HEADER: &str = "x-interceptor-rule";

/// A rejection response: status, headers and JSON body.
pub struct RejectionResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

pub fn response(adapter: Adapter, rejection: &Rejection) -> RejectionResponse {
    let status = match rejection.limited {
        Limited::Model => StatusCode::NOT_FOUND,
        Limited::MaxTokens => StatusCode::BAD_REQUEST,
        _ => StatusCode::TOO_MANY_REQUESTS,
    };
    let message = rejection.message.as_str();
    let budget = matches!(rejection.limited, Limited::TokenBudget | Limited::CostBudget);
    let mut headers = HeaderMap::new();
    let body = match adapter {
        Adapter::Anthropic => {
            let kind = match rejection.limited {
                Limited::Model => "not_found_error",
                Limited::MaxTokens => "invalid_request_error",
                _ => "rate_limit_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Adapter::Gemini | Adapter::VertexAi => {
            let status_text = match rejection.limited {
                Limited::Model => "NOT_FOUND",
                Limited::MaxTokens => "INVALID_ARGUMENT",
                _ => "RESOURCE_EXHAUSTED",
            };
            json!({"error": {"code": status.as_u16(), "message": message, "status": status_text}})
        }
        Adapter::Bedrock => {
            let kind = match rejection.limited {
                Limited::Model => "ResourceNotFoundException",
                Limited::MaxTokens => "ValidationException",
                _ if budget => "ServiceQuotaExceededException",
                _ => "ThrottlingException",
            };
            insert(&mut headers, "x-amzn-errortype", kind);
            json!({"message": message})
        }
        Adapter::Openai | Adapter::AzureOpenai | Adapter::OpenaiCompatible => {
            let (kind, code) = match rejection.limited {
                Limited::Model => ("invalid_request_error", "model_not_found"),
                Limited::MaxTokens => ("invalid_request_error", "invalid_value"),
                _ if budget => ("insufficient_quota", "insufficient_quota"),
                _ => ("rate_limit_exceeded", "rate_limit_exceeded"),
            };
            let param = (rejection.limited == Limited::MaxTokens).then_some("max_tokens");
            json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
        }
    };
    insert(&mut headers, "content-type", "application/json");
    insert(&mut headers, RULE_HEADER, &rejection.rule);
    if let Some(wait) = rejection.retry_after {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        insert(&mut headers, "retry-after", &seconds.to_string());
        insert(
            &mut headers,
            "retry-after-ms",
            &wait.as_millis().max(1).to_string(),
        );
    }
    let unit = match rejection.limited {
        Limited::Requests | Limited::Concurrency => Some("requests"),
        Limited::Tokens | Limited::TokenBudget => Some("tokens"),
        _ => None,
    };
    if let Some(unit) = unit {
        if let Some(limit) = rejection.limit {
            insert(
                &mut headers,
                &format!("x-ratelimit-limit-{unit}"),
                &format!("{}", limit.floor()),
            );
        }
        if let Some(remaining) = rejection.remaining {
            insert(
                &mut headers,
                &format!("x-ratelimit-remaining-{unit}"),
                &format!("{}", remaining.floor()),
            );
        }
        if let Some(reset) = rejection.reset {
            insert(
                &mut headers,
                &format!("x-ratelimit-reset-{unit}"),
                &format!("{:.3}s", reset.as_secs_f64()),
            );
        }
    }
    RejectionResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The last event of a stream ended by a hard budget, in the provider's own in-stream error shape
/// (the SDKs raise their API error on it). `None` for Bedrock, whose binary event stream is not
/// rewritten.
pub fn stream_error_event(adapter: Adapter, stop: &super::HardStop) -> Option<String> {
    let message = stop.message.as_str();
    let event = match adapter {
        Adapter::Anthropic => {
            let body = json!({"type": "error", "error": {"type": "rate_limit_error", "message": message}});
            format!("event: error\ndata: {body}\n\n")
        }
        Adapter::Gemini | Adapter::VertexAi => {
            let body = json!({"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}});
            format!("data: {body}\n\n")
        }
        Adapter::Openai | Adapter::AzureOpenai | Adapter::OpenaiCompatible => {
            let body = json!({"error": {"message": message, "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}});
            format!("data: {body}\n\n")
        }
        Adapter::Bedrock => return None,
    };
    Some(event)
}

fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::quota::spec::Mode;

    fn rejection(limited: Limited) -> Rejection {
        Rejection {
            rule: Arc::from("team-a"),
            mode: Mode::Enforce,
            limited,
            message: "limit".into(),
            retry_after: Some(Duration::from_millis(9_200)),
            limit: Some(6.0),
            remaining: Some(0.0),
            reset: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn each_provider_gets_its_own_shape() {
        let openai = response(Adapter::Openai, &rejection(Limited::Requests));
        assert_eq!(openai.status, 429);
        let body: serde_json::Value = serde_json::from_str(&openai.body).expect("json");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(openai.headers["retry-after"], "10");
        assert_eq!(openai.headers["retry-after-ms"], "9200");
        assert_eq!(openai.headers["x-ratelimit-limit-requests"], "6");
        assert_eq!(openai.headers["x-ratelimit-remaining-requests"], "0");
        assert_eq!(openai.headers[RULE_HEADER], "team-a");
        let quota = response(Adapter::AzureOpenai, &rejection(Limited::CostBudget));
        let body: serde_json::Value = serde_json::from_str(&quota.body).expect("json");
        assert_eq!(body["error"]["type"], "insufficient_quota");

        let anthropic = response(Adapter::Anthropic, &rejection(Limited::Tokens));
        let body: serde_json::Value = serde_json::from_str(&anthropic.body).expect("json");
        assert_eq!(
            (body["type"].as_str(), body["error"]["type"].as_str()),
            (Some("error"), Some("rate_limit_error"))
        );
        assert_eq!(anthropic.headers["x-ratelimit-limit-tokens"], "6");

        let gemini = response(Adapter::Gemini, &rejection(Limited::TokenBudget));
        let body: serde_json::Value = serde_json::from_str(&gemini.body).expect("json");
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(body["error"]["code"], 429);

        let bedrock = response(Adapter::Bedrock, &rejection(Limited::Requests));
        assert_eq!(bedrock.headers["x-amzn-errortype"], "ThrottlingException");
    }

    #[test]
    fn a_denied_model_is_not_found_without_retry() {
        let mut denied = rejection(Limited::Model);
        denied.retry_after = None;
        let openai = response(Adapter::Openai, &denied);
        assert_eq!(openai.status, 404);
        assert!(!openai.headers.contains_key("retry-after"));
        let body: serde_json::Value = serde_json::from_str(&openai.body).expect("json");
        assert_eq!(body["error"]["code"], "model_not_found");
        let anthropic = response(Adapter::Anthropic, &denied);
        assert_eq!(anthropic.status, 404);
        assert!(anthropic.body.contains("not_found_error"));
        let gemini = response(Adapter::VertexAi, &denied);
        assert!(gemini.body.contains("NOT_FOUND"));
    }
}
