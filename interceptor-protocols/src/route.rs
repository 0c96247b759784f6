//! Which endpoint a request targets, from the provider's adapter, the method and the path.

use serde::{Deserialize, Serialize};

/// The API dialect a provider domain speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Adapter {
    /// OpenAI's own API.
    Openai,
    /// Azure OpenAI (deployment paths with `api-version`, and `/openai/v1/`).
    AzureOpenai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google Gemini API (Generative Language).
    Gemini,
    /// Google Vertex AI.
    VertexAi,
    /// AWS Bedrock runtime.
    Bedrock,
    /// Any provider that speaks the OpenAI API (Mistral, Groq, DeepSeek, ...).
    OpenaiCompatible,
}

impl Adapter {
    /// Stable name used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Adapter::Openai => "openai",
            Adapter::AzureOpenai => "azure-openai",
            Adapter::Anthropic => "anthropic",
            Adapter::Gemini => "gemini",
            Adapter::VertexAi => "vertex-ai",
            Adapter::Bedrock => "bedrock",
            Adapter::OpenaiCompatible => "openai-compatible",
        }
    }
}

/// What kind of work an endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointKind {
    Chat,
    Responses,
    Completions,
    Embeddings,
    Images,
    Audio,
    Batch,
    CountTokens,
    Other,
}

impl EndpointKind {
    pub const ALL: [EndpointKind; 9] = [
        EndpointKind::Chat,
        EndpointKind::Responses,
        EndpointKind::Completions,
        EndpointKind::Embeddings,
        EndpointKind::Images,
        EndpointKind::Audio,
        EndpointKind::Batch,
        EndpointKind::CountTokens,
        EndpointKind::Other,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            EndpointKind::Chat => "chat",
            EndpointKind::Responses => "responses",
            EndpointKind::Completions => "completions",
            EndpointKind::Embeddings => "embeddings",
            EndpointKind::Images => "images",
            EndpointKind::Audio => "audio",
            EndpointKind::Batch => "batch",
            EndpointKind::CountTokens => "count-tokens",
            EndpointKind::Other => "other",
        }
    }
}

/// How the bodies of an endpoint are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat completions and legacy completions (and the OpenAI-compatible providers').
    OpenaiChat,
    /// OpenAI Responses API.
    OpenaiResponses,
    /// Other OpenAI JSON endpoints with a `usage` object (embeddings, images, audio).
    OpenaiPlain,
    /// Anthropic Messages (also on Vertex `rawPredict`).
    Anthropic,
    /// Gemini `GenerateContentResponse` (Gemini API and Vertex AI).
    Gemini,
    /// Bedrock Converse and ConverseStream.
    BedrockConverse,
    /// Bedrock InvokeModel and InvokeModelWithResponseStream (model-native bodies).
    BedrockInvoke,
    /// No usage expected.
    Opaque,
}

/// The endpoint of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: EndpointKind,
    pub dialect: Dialect,
    /// The model named by the path (Gemini, Vertex, Bedrock), or the Azure deployment name.
    pub path_model: Option<String>,
    /// `path_model` is an Azure deployment name, not a model.
    pub path_model_is_deployment: bool,
    /// The path says the response streams (`streamGenerateContent`, `converse-stream`).
    pub path_streams: bool,
    /// Gemini streaming without `alt=sse`: the response is a streamed JSON array.
    pub json_array_stream: bool,
}

impl Route {
    fn new(kind: EndpointKind, dialect: Dialect) -> Self {
        Self {
            kind,
            dialect,
            path_model: None,
            path_model_is_deployment: false,
            path_streams: false,
            json_array_stream: false,
        }
    }

    fn other() -> Self {
        Self::new(EndpointKind::Other, Dialect::Opaque)
    }

    /// Whether the request body is a JSON object whose `model`/`stream` fields matter.
    pub fn reads_request_body(&self) -> bool {
        matches!(
            self.dialect,
            Dialect::OpenaiChat | Dialect::OpenaiResponses | Dialect::OpenaiPlain | Dialect::Anthropic
        )
    }
}

/// Classifies a request. Unknown paths give `kind=other`, never an error.
pub fn classify(adapter: Adapter, method: &str, path: &str, query: &str) -> Route {
    match adapter {
        Adapter::Openai | Adapter::OpenaiCompatible => openai_route(method, path),
        Adapter::AzureOpenai => azure_route(method, path),
        Adapter::Anthropic => anthropic_route(method, path),
        Adapter::Gemini | Adapter::VertexAi => google_route(method, path, query),
        Adapter::Bedrock => bedrock_route(method, path),
    }
}

/// OpenAI-style paths, matched by their suffix so that provider prefixes (`/v1`, `/openai/v1`,
/// `/api/v1`, `/inference/v1`, none) all work.
fn openai_route(method: &str, path: &str) -> Route {
    let path = path.trim_end_matches('/');
    let post = method.eq_ignore_ascii_case("POST");
    let segments: Vec<&str> = path.rsplit('/').take(3).collect();
    let last = segments.first().copied().unwrap_or_default();
    let before = segments.get(1).copied().unwrap_or_default();
    match (before, last) {
        ("chat", "completions") if post => Route::new(EndpointKind::Chat, Dialect::OpenaiChat),
        (_, "completions") if post => Route::new(EndpointKind::Completions, Dialect::OpenaiChat),
        (_, "responses") if post => Route::new(EndpointKind::Responses, Dialect::OpenaiResponses),
        (_, "embeddings") if post => Route::new(EndpointKind::Embeddings, Dialect::OpenaiPlain),
        ("images", "generations" | "edits" | "variations") if post => {
            Route::new(EndpointKind::Images, Dialect::OpenaiPlain)
        }
        ("audio", "speech" | "transcriptions" | "translations") if post => {
            Route::new(EndpointKind::Audio, Dialect::OpenaiPlain)
        }
        _ if path.ends_with("/batches") || path.contains("/batches/") => {
            Route::new(EndpointKind::Batch, Dialect::Opaque)
        }
        _ => Route::other(),
    }
}

/// Azure OpenAI: `/openai/deployments/{deployment}/chat/completions?api-version=...` and the
/// versionless `/openai/v1/...` paths.
fn azure_route(method: &str, path: &str) -> Route {
    if let Some(rest) = path.strip_prefix("/openai/deployments/")
        && let Some((deployment, _)) = rest.split_once('/')
    {
        let mut route = openai_route(method, path);
        if route.kind != EndpointKind::Other {
            route.path_model = Some(percent_decode(deployment));
            route.path_model_is_deployment = true;
        }
        return route;
    }
    openai_route(method, path)
}

fn anthropic_route(method: &str, path: &str) -> Route {
    let post = method.eq_ignore_ascii_case("POST");
    match path.trim_end_matches('/') {
        "/v1/messages" if post => Route::new(EndpointKind::Chat, Dialect::Anthropic),
        "/v1/messages/count_tokens" if post => Route::new(EndpointKind::CountTokens, Dialect::Opaque),
        "/v1/complete" if post => Route::new(EndpointKind::Completions, Dialect::Opaque),
        p if p.starts_with("/v1/messages/batches") => Route::new(EndpointKind::Batch, Dialect::Opaque),
        _ => Route::other(),
    }
}

/// Gemini API (`/v1beta/models/{model}:{method}`) and Vertex AI
/// (`/v1/projects/{p}/locations/{l}/publishers/{publisher}/models/{model}:{method}`).
fn google_route(method: &str, path: &str, query: &str) -> Route {
    if !method.eq_ignore_ascii_case("POST") {
        return Route::other();
    }
    if path.ends_with("/chat/completions") {
        // Vertex AI's OpenAI-compatible endpoint.
        return Route::new(EndpointKind::Chat, Dialect::OpenaiChat);
    }
    if path.contains("/batchPredictionJobs") || path.contains("/batches") {
        return Route::new(EndpointKind::Batch, Dialect::Opaque);
    }
    let Some((resource, verb)) = path.rsplit_once(':') else {
        return Route::other();
    };
    let model = resource
        .rsplit_once("/models/")
        .map(|(_, m)| m)
        .or_else(|| resource.rsplit_once("/tunedModels/").map(|(_, m)| m))
        .filter(|m| !m.is_empty() && !m.contains('/'));
    let anthropic = resource.contains("/publishers/anthropic/");
    let mut route = match verb {
        "generateContent" => Route::new(EndpointKind::Chat, Dialect::Gemini),
        "streamGenerateContent" => {
            let mut route = Route::new(EndpointKind::Chat, Dialect::Gemini);
            route.path_streams = true;
            route.json_array_stream = !query.split('&').any(|pair| pair == "alt=sse");
            route
        }
        "embedContent" | "batchEmbedContents" => Route::new(EndpointKind::Embeddings, Dialect::Gemini),
        "countTokens" => Route::new(EndpointKind::CountTokens, Dialect::Opaque),
        "predict" if !anthropic => Route::new(EndpointKind::Images, Dialect::Opaque),
        "batchGenerateContent" => Route::new(EndpointKind::Batch, Dialect::Opaque),
        "rawPredict" if anthropic => Route::new(EndpointKind::Chat, Dialect::Anthropic),
        "streamRawPredict" if anthropic => {
            let mut route = Route::new(EndpointKind::Chat, Dialect::Anthropic);
            route.path_streams = true;
            route
        }
        _ => Route::other(),
    };
    if route.kind != EndpointKind::Other {
        route.path_model = model.map(percent_decode);
    }
    route
}

/// Bedrock runtime: `/model/{modelId}/{invoke|invoke-with-response-stream|converse|converse-stream}`.
fn bedrock_route(method: &str, path: &str) -> Route {
    if !method.eq_ignore_ascii_case("POST") {
        return Route::other();
    }
    if path.starts_with("/async-invoke") {
        return Route::new(EndpointKind::Batch, Dialect::Opaque);
    }
    let Some(rest) = path.strip_prefix("/model/") else {
        return Route::other();
    };
    let Some((model, action)) = rest.rsplit_once('/') else {
        return Route::other();
    };
    let mut route = match action {
        "invoke" => Route::new(EndpointKind::Chat, Dialect::BedrockInvoke),
        "invoke-with-response-stream" => Route::new(EndpointKind::Chat, Dialect::BedrockInvoke),
        "converse" => Route::new(EndpointKind::Chat, Dialect::BedrockConverse),
        "converse-stream" => Route::new(EndpointKind::Chat, Dialect::BedrockConverse),
        "count-tokens" => Route::new(EndpointKind::CountTokens, Dialect::Opaque),
        _ => return Route::other(),
    };
    route.path_streams = action.ends_with("stream");
    route.path_model = Some(percent_decode(model));
    route
}

/// Decodes `%XX` escapes (model IDs and ARNs in paths); invalid escapes stay as they are.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(value) = u8::from_str_radix(hex, 16)
        {
            out.push(value);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(adapter: Adapter, method: &str, path: &str) -> &'static str {
        classify(adapter, method, path, "").kind.name()
    }

    #[test]
    fn openai_family_paths() {
        use Adapter::*;
        assert_eq!(kind(Openai, "POST", "/v1/chat/completions"), "chat");
        assert_eq!(kind(Openai, "POST", "/v1/completions"), "completions");
        assert_eq!(kind(Openai, "POST", "/v1/responses"), "responses");
        assert_eq!(kind(Openai, "POST", "/v1/embeddings"), "embeddings");
        assert_eq!(kind(Openai, "POST", "/v1/images/generations"), "images");
        assert_eq!(kind(Openai, "POST", "/v1/audio/transcriptions"), "audio");
        assert_eq!(kind(Openai, "POST", "/v1/batches"), "batch");
        assert_eq!(kind(Openai, "GET", "/v1/batches/batch_1"), "batch");
        assert_eq!(kind(Openai, "GET", "/v1/models"), "other");
        assert_eq!(kind(Openai, "GET", "/v1/chat/completions"), "other");
        assert_eq!(
            kind(OpenaiCompatible, "POST", "/openai/v1/chat/completions"),
            "chat"
        );
        assert_eq!(kind(OpenaiCompatible, "POST", "/chat/completions"), "chat");
        assert_eq!(kind(OpenaiCompatible, "POST", "/api/v1/chat/completions"), "chat");
    }

    #[test]
    fn azure_deployments_and_v1_paths() {
        let route = classify(
            Adapter::AzureOpenai,
            "POST",
            "/openai/deployments/prod-gpt4o/chat/completions",
            "api-version=2024-10-21",
        );
        assert_eq!(route.kind, EndpointKind::Chat);
        assert_eq!(route.path_model.as_deref(), Some("prod-gpt4o"));
        assert!(route.path_model_is_deployment);
        assert_eq!(
            kind(Adapter::AzureOpenai, "POST", "/openai/deployments/emb/embeddings"),
            "embeddings"
        );
        assert_eq!(
            kind(Adapter::AzureOpenai, "POST", "/openai/v1/responses"),
            "responses"
        );
        assert_eq!(kind(Adapter::AzureOpenai, "GET", "/openai/deployments"), "other");
    }

    #[test]
    fn anthropic_paths() {
        assert_eq!(kind(Adapter::Anthropic, "POST", "/v1/messages"), "chat");
        assert_eq!(
            kind(Adapter::Anthropic, "POST", "/v1/messages/count_tokens"),
            "count-tokens"
        );
        assert_eq!(kind(Adapter::Anthropic, "POST", "/v1/messages/batches"), "batch");
        assert_eq!(kind(Adapter::Anthropic, "GET", "/v1/models"), "other");
    }

    #[test]
    fn gemini_and_vertex_paths() {
        let route = classify(
            Adapter::Gemini,
            "POST",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "alt=sse",
        );
        assert_eq!(route.kind, EndpointKind::Chat);
        assert_eq!(route.path_model.as_deref(), Some("gemini-2.5-flash"));
        assert!(route.path_streams && !route.json_array_stream);
        let route = classify(
            Adapter::Gemini,
            "POST",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "",
        );
        assert!(route.json_array_stream);
        assert_eq!(
            kind(
                Adapter::Gemini,
                "POST",
                "/v1beta/models/text-embedding-004:embedContent"
            ),
            "embeddings"
        );
        assert_eq!(
            kind(
                Adapter::Gemini,
                "POST",
                "/v1beta/models/gemini-2.5-pro:countTokens"
            ),
            "count-tokens"
        );
        let route = classify(
            Adapter::VertexAi,
            "POST",
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:generateContent",
            "",
        );
        assert_eq!(route.path_model.as_deref(), Some("gemini-2.0-flash-001"));
        let route = classify(
            Adapter::VertexAi,
            "POST",
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict",
            "",
        );
        assert_eq!(route.dialect, Dialect::Anthropic);
        assert_eq!(route.path_model.as_deref(), Some("claude-sonnet-4@20250514"));
        assert_eq!(kind(Adapter::Gemini, "GET", "/v1beta/models"), "other");
    }

    #[test]
    fn bedrock_paths_decode_model_ids() {
        let route = classify(
            Adapter::Bedrock,
            "POST",
            "/model/us.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream",
            "",
        );
        assert_eq!(route.dialect, Dialect::BedrockConverse);
        assert!(route.path_streams);
        assert_eq!(
            route.path_model.as_deref(),
            Some("us.anthropic.claude-3-5-sonnet-20240620-v1:0")
        );
        let route = classify(
            Adapter::Bedrock,
            "POST",
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fx/invoke",
            "",
        );
        assert_eq!(
            route.path_model.as_deref(),
            Some("arn:aws:bedrock:us-east-1:1:inference-profile/x")
        );
        assert!(!route.path_streams);
        assert_eq!(
            kind(Adapter::Bedrock, "POST", "/guardrail/x/version/1/apply"),
            "other"
        );
    }
}
