//! The OpenTelemetry GenAI client metrics, as they appear in Prometheus, so existing GenAI dashboards
//! work on our data: `gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds` and
//! `gen_ai_client_operation_time_to_first_chunk_seconds`, with `gen_ai_*` attributes (semantic
//! conventions v1.37) plus the operator's identity labels.

use interceptor_protocols::{Adapter, EndpointKind};
use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};

use crate::metric_labels::{CappedHandle, CappedVec, IdentityLabels, IdentityValues, MAX_LABELS};

/// `gen_ai.client.token.usage` bucket boundaries (semantic conventions).
const TOKEN_BUCKETS: [f64; 14] = [
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// `gen_ai.client.operation.duration` bucket boundaries (semantic conventions), also used for the
/// time to first chunk.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// `gen_ai.provider.name` of a provider (well-known values of the conventions; others keep our name).
pub fn provider_name(provider: &str) -> &str {
    match provider {
        "azure-openai" => "azure.ai.openai",
        "gemini" => "gcp.gemini",
        "vertex-ai" => "gcp.vertex_ai",
        "bedrock" => "aws.bedrock",
        "mistral" => "mistral_ai",
        "xai" => "x_ai",
        other => other,
    }
}

/// `gen_ai.operation.name` of an endpoint.
pub fn operation_name(adapter: Adapter, kind: EndpointKind) -> &'static str {
    match (adapter, kind) {
        (Adapter::Gemini | Adapter::VertexAi, EndpointKind::Chat) => "generate_content",
        (_, EndpointKind::Chat | EndpointKind::Responses) => "chat",
        (_, EndpointKind::Completions) => "text_completion",
        (_, EndpointKind::Embeddings) => "embeddings",
        (_, kind) => kind.name(),
    }
}

/// One finished operation, as the GenAI metrics see it.
pub struct Operation<'a> {
    pub operation: &'static str,
    pub provider: &'a str,
    pub request_model: &'a str,
    pub response_model: &'a str,
    pub server_address: &'a str,
    /// `error.type`: empty on success.
    pub error_type: &'a str,
    pub duration_seconds: f64,
    pub first_chunk_seconds: Option<f64>,
    /// (input, output) tokens, when known.
    pub tokens: Option<(u64, u64)>,
}

/// The three GenAI client histograms.
#[derive(Clone)]
pub struct GenAiMetrics {
    token_usage: CappedVec<HistogramVec>,
    duration: CappedVec<HistogramVec>,
    first_chunk: CappedVec<HistogramVec>,
}

const COMMON: [&str; 5] = [
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "server_address",
];

impl GenAiMetrics {
    pub fn register(registry: &Registry, identity: &IdentityLabels) -> prometheus::Result<Self> {
        let mut token_labels = COMMON.to_vec();
        token_labels.push("gen_ai_token_type");
        let token_usage = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_token_usage",
                "Number of input and output tokens used per operation (OpenTelemetry gen_ai.client.token.usage)",
            )
            .buckets(TOKEN_BUCKETS.to_vec()),
            &identity.names(&token_labels),
        )?;
        let mut duration_labels = COMMON.to_vec();
        duration_labels.push("error_type");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_duration_seconds",
                "GenAI operation duration (OpenTelemetry gen_ai.client.operation.duration)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &identity.names(&duration_labels),
        )?;
        let first_chunk = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_time_to_first_chunk_seconds",
                "Time to receive the first chunk of a streamed response (OpenTelemetry \
                 gen_ai.client.operation.time_to_first_chunk)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &identity.names(&COMMON),
        )?;
        registry.register(Box::new(token_usage.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(first_chunk.clone()))?;
        Ok(Self {
            token_usage: identity.family("gen_ai_client_token_usage", token_usage),
            duration: identity.family("gen_ai_client_operation_duration_seconds", duration),
            first_chunk: identity.family("gen_ai_client_operation_time_to_first_chunk_seconds", first_chunk),
        })
    }

    /// Records a finished operation.
    pub fn record(
        &self,
        labels: &IdentityLabels,
        identity: &IdentityValues<'_>,
        op: &Operation<'_>,
        handles: &mut OperationHandles,
    ) {
        let common = [
            op.operation,
            op.provider,
            op.request_model,
            op.response_model,
            op.server_address,
        ];
        let mut buffer = [""; MAX_LABELS];
        if let Some((input, output)) = op.tokens {
            for (slot, (token_type, count)) in handles
                .tokens
                .iter_mut()
                .zip([("input", input), ("output", output)])
            {
                slot.get_or_insert_with(|| {
                    let n = labels.values(&mut buffer, &and(common, token_type), identity);
                    self.token_usage.handle(&buffer[..n])
                })
                .metric()
                .observe(count as f64);
            }
        }
        handles
            .duration
            .get_or_insert_with(|| {
                let n = labels.values(&mut buffer, &and(common, op.error_type), identity);
                self.duration.handle(&buffer[..n])
            })
            .metric()
            .observe(op.duration_seconds);
        if let Some(seconds) = op.first_chunk_seconds {
            handles
                .first_chunk
                .get_or_insert_with(|| {
                    let n = labels.values(&mut buffer, &common, identity);
                    self.first_chunk.handle(&buffer[..n])
                })
                .metric()
                .observe(seconds);
        }
    }
}

/// The handles of one operation's label sets, filled as they are first needed (kept by
/// `accounting::HandleMemo` while a connection's label values repeat).
#[derive(Default)]
pub struct OperationHandles {
    tokens: [Option<CappedHandle<Histogram>>; 2],
    duration: Option<CappedHandle<Histogram>>,
    first_chunk: Option<CappedHandle<Histogram>>,
}

fn and<'a>(common: [&'a str; 5], last: &'a str) -> [&'a str; 6] {
    let [a, b, c, d, e] = common;
    [a, b, c, d, e, last]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metric_labels::IdentityLabel;

    #[test]
    fn names_follow_the_conventions() {
        assert_eq!(provider_name("bedrock"), "aws.bedrock");
        assert_eq!(provider_name("openai"), "openai");
        assert_eq!(provider_name("together"), "together");
        assert_eq!(operation_name(Adapter::Openai, EndpointKind::Chat), "chat");
        assert_eq!(
            operation_name(Adapter::Gemini, EndpointKind::Chat),
            "generate_content"
        );
        assert_eq!(
            operation_name(Adapter::Openai, EndpointKind::Completions),
            "text_completion"
        );
        assert_eq!(
            operation_name(Adapter::Anthropic, EndpointKind::CountTokens),
            "count-tokens"
        );
    }

    #[test]
    fn records_tokens_duration_and_first_chunk_with_identity() {
        let registry = Registry::new();
        let labels = IdentityLabels::new(
            &[IdentityLabel::Namespace, IdentityLabel::Workload],
            100,
            &registry,
        )
        .expect("labels");
        let metrics = GenAiMetrics::register(&registry, &labels).expect("register");
        let identity = IdentityValues {
            namespace: "team-a",
            workload: "Deployment/chat",
            ..IdentityValues::default()
        };
        metrics.record(
            &labels,
            &identity,
            &Operation {
                operation: "chat",
                provider: "openai",
                request_model: "gpt-4o-mini",
                response_model: "gpt-4o-mini-2024-07-18",
                server_address: "api.openai.com",
                error_type: "",
                duration_seconds: 0.5,
                first_chunk_seconds: Some(0.1),
                tokens: Some((100, 20)),
            },
            &mut OperationHandles::default(),
        );
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .expect("encode");
        assert!(text.contains(
            "gen_ai_client_token_usage_sum{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"openai\",\
             gen_ai_request_model=\"gpt-4o-mini\",gen_ai_response_model=\"gpt-4o-mini-2024-07-18\",\
             gen_ai_token_type=\"input\",k8s_namespace_name=\"team-a\",k8s_workload_name=\"Deployment/chat\",\
             server_address=\"api.openai.com\"} 100"
        ), "{text}");
        assert!(
            text.contains("gen_ai_client_operation_duration_seconds_count{"),
            "{text}"
        );
        assert!(
            text.contains("gen_ai_client_operation_time_to_first_chunk_seconds_sum{"),
            "{text}"
        );
    }
}
