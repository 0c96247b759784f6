//! The built-in catalog of AI provider domains and the adapter each one speaks.

use serde::{Deserialize, Serialize};

/// The API dialect a provider domain speaks (chooses the protocol adapter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Adapter {
    /// OpenAI's own API.
    Openai,
    /// Azure OpenAI (deployment paths, `api-version`).
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

/// Built-in provider domains. Wildcards (`*.`) match one or more labels; they cannot be resolved
/// ahead of time and are intercepted when their addresses are known (static addresses or DNS).
pub const BUILTIN_PROVIDERS: &[(&str, Adapter)] = &[
    ("api.openai.com", Adapter::Openai),
    ("*.openai.azure.com", Adapter::AzureOpenai),
    ("*.cognitiveservices.azure.com", Adapter::AzureOpenai),
    ("api.anthropic.com", Adapter::Anthropic),
    ("generativelanguage.googleapis.com", Adapter::Gemini),
    ("aiplatform.googleapis.com", Adapter::VertexAi),
    ("*-aiplatform.googleapis.com", Adapter::VertexAi),
    ("bedrock-runtime.us-east-1.amazonaws.com", Adapter::Bedrock),
    ("bedrock-runtime.us-east-2.amazonaws.com", Adapter::Bedrock),
    ("bedrock-runtime.us-west-2.amazonaws.com", Adapter::Bedrock),
    ("bedrock-runtime.eu-central-1.amazonaws.com", Adapter::Bedrock),
    ("bedrock-runtime.eu-west-1.amazonaws.com", Adapter::Bedrock),
    ("bedrock-runtime.ap-northeast-1.amazonaws.com", Adapter::Bedrock),
    ("bedrock-runtime.*.amazonaws.com", Adapter::Bedrock),
    ("api.mistral.ai", Adapter::OpenaiCompatible),
    ("api.groq.com", Adapter::OpenaiCompatible),
    ("api.deepseek.com", Adapter::OpenaiCompatible),
    ("api.x.ai", Adapter::OpenaiCompatible),
    ("api.together.xyz", Adapter::OpenaiCompatible),
    ("api.fireworks.ai", Adapter::OpenaiCompatible),
    ("openrouter.ai", Adapter::OpenaiCompatible),
    ("api.perplexity.ai", Adapter::OpenaiCompatible),
    ("api.cerebras.ai", Adapter::OpenaiCompatible),
];

/// Whether `name` (lower case, no trailing dot) matches `pattern` (exact, or `*` standing for one
/// or more whole labels or, inside a label like `*-aiplatform`, for a label prefix).
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    match pattern.split_once('*') {
        None => pattern.eq_ignore_ascii_case(name),
        Some((prefix, suffix)) => {
            name.len() > prefix.len() + suffix.len()
                && name
                    .get(..prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
                && name
                    .get(name.len() - suffix.len()..)
                    .is_some_and(|s| s.eq_ignore_ascii_case(suffix))
        }
    }
}

/// The adapter of a built-in domain (exact or wildcard match).
pub fn builtin_adapter(name: &str) -> Option<Adapter> {
    BUILTIN_PROVIDERS
        .iter()
        .find(|(pattern, _)| domain_matches(pattern, name))
        .map(|(_, a)| *a)
}

/// Checks the syntax of a domain pattern: DNS labels, with at most one `*`.
pub fn validate_domain_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    let labels: Vec<&str> = pattern.split('.').collect();
    if labels.len() < 2 {
        return Err("must have at least two labels (e.g. api.example.com)".into());
    }
    if pattern.matches('*').count() > 1 {
        return Err("`*` may appear only once".into());
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must be 1 to 63 characters"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
        {
            return Err(format!("label {label:?} has characters outside a-z, 0-9, '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_matching() {
        assert!(domain_matches("api.openai.com", "API.openai.com."));
        assert!(!domain_matches("api.openai.com", "xapi.openai.com"));
        assert!(domain_matches("*.openai.azure.com", "myres.openai.azure.com"));
        assert!(!domain_matches("*.openai.azure.com", "openai.azure.com"));
        assert!(domain_matches(
            "*-aiplatform.googleapis.com",
            "us-central1-aiplatform.googleapis.com"
        ));
        assert!(!domain_matches(
            "*-aiplatform.googleapis.com",
            "aiplatform.googleapis.com"
        ));
        assert!(domain_matches(
            "bedrock-runtime.*.amazonaws.com",
            "bedrock-runtime.eu-west-3.amazonaws.com"
        ));
    }

    #[test]
    fn builtin_catalog_is_valid_and_finds_adapters() {
        for (pattern, _) in BUILTIN_PROVIDERS {
            assert_eq!(validate_domain_pattern(pattern), Ok(()), "{pattern}");
        }
        assert_eq!(builtin_adapter("api.anthropic.com"), Some(Adapter::Anthropic));
        assert_eq!(
            builtin_adapter("x.cognitiveservices.azure.com"),
            Some(Adapter::AzureOpenai)
        );
        assert_eq!(builtin_adapter("example.com"), None);
    }

    #[test]
    fn rejects_bad_patterns() {
        assert!(validate_domain_pattern("localhost").is_err());
        assert!(validate_domain_pattern("a..b").is_err());
        assert!(validate_domain_pattern("*.*.example.com").is_err());
        assert!(validate_domain_pattern("api.exa mple.com").is_err());
    }
}
