//! Token usage, normalised across providers, and what a response told us about itself.

use serde::Serialize;

/// Token counts of one request, in one meaning for every provider:
/// `input_tokens` counts every prompt token (cache reads and cache writes included),
/// `output_tokens` every generated token (reasoning included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// Usage fields as a provider reports them, possibly spread over several events. A later value
/// replaces an earlier one; a field a later event omits keeps its earlier value (Anthropic's
/// `message_delta` repeats only some of `message_start`'s fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartialUsage {
    /// All prompt tokens, cache included (OpenAI `prompt_tokens`, Gemini `promptTokenCount`).
    pub input_total: Option<u64>,
    /// Prompt tokens outside any cache (Anthropic `input_tokens`, Bedrock `inputTokens`).
    pub input_uncached: Option<u64>,
    pub cache_read: Option<u64>,
    pub cache_write: Option<u64>,
    /// All generated tokens, reasoning included (OpenAI `completion_tokens`).
    pub output_total: Option<u64>,
    /// Generated tokens without reasoning (Gemini `candidatesTokenCount`).
    pub output_visible: Option<u64>,
    pub reasoning: Option<u64>,
}

impl PartialUsage {
    /// Overlays the fields `later` has.
    pub fn merge(&mut self, later: PartialUsage) {
        fn take(slot: &mut Option<u64>, value: Option<u64>) {
            if value.is_some() {
                *slot = value;
            }
        }
        take(&mut self.input_total, later.input_total);
        take(&mut self.input_uncached, later.input_uncached);
        take(&mut self.cache_read, later.cache_read);
        take(&mut self.cache_write, later.cache_write);
        take(&mut self.output_total, later.output_total);
        take(&mut self.output_visible, later.output_visible);
        take(&mut self.reasoning, later.reasoning);
    }

    pub fn is_empty(&self) -> bool {
        *self == PartialUsage::default()
    }

    /// The normalised usage, if the provider reported input or output tokens at all.
    pub fn resolve(&self) -> Option<Usage> {
        let cached = self.cache_read.unwrap_or(0);
        let cache_write = self.cache_write.unwrap_or(0);
        let reasoning = self.reasoning.unwrap_or(0);
        let input = match (self.input_total, self.input_uncached) {
            (Some(total), _) => Some(total),
            (None, Some(uncached)) => Some(uncached + cached + cache_write),
            (None, None) => None,
        };
        let output = match (self.output_total, self.output_visible) {
            (Some(total), _) => Some(total),
            (None, Some(visible)) => Some(visible + reasoning),
            (None, None) => None,
        };
        if input.is_none() && output.is_none() {
            return None;
        }
        Some(Usage {
            input_tokens: input.unwrap_or(0),
            cached_input_tokens: cached,
            cache_write_tokens: cache_write,
            output_tokens: output.unwrap_or(0),
            reasoning_tokens: reasoning,
        })
    }
}

/// An error the provider reported (error body, or an error event inside a stream).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderError {
    /// The provider's error type (`rate_limit_error`, `RESOURCE_EXHAUSTED`, `ThrottlingException`).
    pub kind: String,
    /// A finer code when the provider gives one (`insufficient_quota`).
    pub code: Option<String>,
}

/// Everything read from one response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// The model as the response names it (often dated: `gpt-4o-2024-08-06`).
    pub model: Option<String>,
    pub response_id: Option<String>,
    pub usage: PartialUsage,
    pub error: Option<ProviderError>,
}

impl Observation {
    pub(crate) fn set_model(&mut self, model: Option<&str>) {
        if let Some(model) = model.filter(|m| !m.is_empty())
            && self.model.as_deref() != Some(model)
        {
            self.model = Some(model.to_owned());
        }
    }

    pub(crate) fn set_response_id(&mut self, id: Option<&str>) {
        if self.response_id.is_none()
            && let Some(id) = id.filter(|i| !i.is_empty())
        {
            self.response_id = Some(id.to_owned());
        }
    }

    pub(crate) fn set_error(&mut self, kind: Option<&str>, code: Option<String>) {
        if self.error.is_none() {
            self.error = Some(ProviderError {
                kind: kind.filter(|k| !k.is_empty()).unwrap_or("error").to_owned(),
                code,
            });
        }
    }
}

/// Whether a stream event carried generated output (marks the time to first token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    pub output: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_fields_override_and_missing_ones_are_kept() {
        let mut usage = PartialUsage {
            input_uncached: Some(10),
            cache_read: Some(100),
            cache_write: Some(5),
            output_total: Some(1),
            ..Default::default()
        };
        usage.merge(PartialUsage {
            output_total: Some(42),
            ..Default::default()
        });
        assert_eq!(
            usage.resolve(),
            Some(Usage {
                input_tokens: 115,
                cached_input_tokens: 100,
                cache_write_tokens: 5,
                output_tokens: 42,
                reasoning_tokens: 0,
            })
        );
    }

    #[test]
    fn visible_output_plus_reasoning_is_the_output() {
        let usage = PartialUsage {
            input_total: Some(7),
            output_visible: Some(3),
            reasoning: Some(4),
            ..Default::default()
        };
        assert_eq!(usage.resolve().map(|u| u.output_tokens), Some(7));
        assert_eq!(PartialUsage::default().resolve(), None);
    }
}
