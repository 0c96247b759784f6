//! The built-in catalog of AI provider domains and the adapter each one speaks.

pub use interceptor_protocols::Adapter;

/// Built-in provider domains. Wildcards (`*.`) match one or more labels; they cannot be resolved
/// ahead of time and are intercepted when their addresses are known (static addresses or DNS).
/// Each entry: domain pattern, adapter, provider name (the price table section and the `provider`
/// label).
pub const BUILTIN_PROVIDERS: &[(&str, Adapter, &str)] = &[
    ("api.openai.com", Adapter::Openai, "openai"),
    ("*.openai.azure.com", Adapter::AzureOpenai, "azure-openai"),
    (
        "*.cognitiveservices.azure.com",
        Adapter::AzureOpenai,
        "azure-openai",
    ),
    ("api.anthropic.com", Adapter::Anthropic, "anthropic"),
    ("generativelanguage.googleapis.com", Adapter::Gemini, "gemini"),
    ("aiplatform.googleapis.com", Adapter::VertexAi, "vertex-ai"),
    ("*-aiplatform.googleapis.com", Adapter::VertexAi, "vertex-ai"),
    (
        "bedrock-runtime.us-east-1.amazonaws.com",
        Adapter::Bedrock,
        "bedrock",
    ),
    (
        "bedrock-runtime.us-east-2.amazonaws.com",
        Adapter::Bedrock,
        "bedrock",
    ),
    (
        "bedrock-runtime.us-west-2.amazonaws.com",
        Adapter::Bedrock,
        "bedrock",
    ),
    (
        "bedrock-runtime.eu-central-1.amazonaws.com",
        Adapter::Bedrock,
        "bedrock",
    ),
    (
        "bedrock-runtime.eu-west-1.amazonaws.com",
        Adapter::Bedrock,
        "bedrock",
    ),
    (
        "bedrock-runtime.ap-northeast-1.amazonaws.com",
        Adapter::Bedrock,
        "bedrock",
    ),
    ("bedrock-runtime.*.amazonaws.com", Adapter::Bedrock, "bedrock"),
    ("api.mistral.ai", Adapter::OpenaiCompatible, "mistral"),
    ("api.groq.com", Adapter::OpenaiCompatible, "groq"),
    ("api.deepseek.com", Adapter::OpenaiCompatible, "deepseek"),
    ("api.x.ai", Adapter::OpenaiCompatible, "xai"),
    ("api.together.xyz", Adapter::OpenaiCompatible, "together"),
    ("api.fireworks.ai", Adapter::OpenaiCompatible, "fireworks"),
    ("openrouter.ai", Adapter::OpenaiCompatible, "openrouter"),
    ("api.perplexity.ai", Adapter::OpenaiCompatible, "perplexity"),
    ("api.cerebras.ai", Adapter::OpenaiCompatible, "cerebras"),
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

/// The adapter and provider name of a built-in domain (exact or wildcard match).
pub fn builtin_provider(name: &str) -> Option<(Adapter, &'static str)> {
    BUILTIN_PROVIDERS
        .iter()
        .find(|(pattern, _, _)| domain_matches(pattern, name))
        .map(|(_, adapter, provider)| (*adapter, *provider))
}

/// The adapter of a built-in domain.
pub fn builtin_adapter(name: &str) -> Option<Adapter> {
    builtin_provider(name).map(|(adapter, _)| adapter)
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
        for (pattern, _, _) in BUILTIN_PROVIDERS {
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
