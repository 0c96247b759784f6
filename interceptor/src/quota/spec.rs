//! Rules as operators write them in the policy's `rules:` list, and their validation.

use serde::Deserialize;

use crate::selector::{Selector, SelectorMatcher};

/// One rule: which requests it selects, and what it allows them.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// Unique name: metrics label, `x-interceptor-rule` header, counter identity across reloads.
    pub name: String,
    /// Which identities the rule applies to (every field optional; `{}` or no `match`: everyone).
    #[serde(default, rename = "match")]
    pub selector: Option<Selector>,
    /// Provider names the rule applies to (e.g. `openai`, `anthropic`); empty: all.
    #[serde(default)]
    pub providers: Vec<String>,
    /// `enforce` rejects; `observe` only counts what it would have rejected.
    #[serde(default)]
    pub mode: Mode,
    /// How the rule's counters are split: one for everything it selects (`rule`, default), or one per
    /// namespace, workload or pod.
    #[serde(default)]
    pub per: Scope,
    /// Model globs allowed (empty: all) and denied (deny wins).
    #[serde(default)]
    pub models: ModelsSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Observe => "observe",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Rule,
    Namespace,
    Workload,
    Pod,
}

#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// Which tokens the token limits count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    #[default]
    Total,
    Input,
    Output,
}

/// Limits; each is optional.
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsSpec {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
    pub tokens_per_hour: Option<f64>,
    pub tokens_per_day: Option<f64>,
    /// Which tokens the token limits count (default `total`).
    #[serde(default)]
    pub token_type: TokenType,
    pub cost_per_day_usd: Option<f64>,
    pub cost_per_month_usd: Option<f64>,
    pub max_concurrent: Option<u32>,
    /// Largest `max_tokens` (or equivalent) a request may ask for.
    pub max_tokens_per_request: Option<u64>,
    /// Output tokens reserved for a request that sets no `max_tokens` (default 1024).
    pub estimated_output_tokens: Option<u64>,
    /// Hard budgets: a streamed response whose live output would take `tokensPerDay`,
    /// `costPerDayUsd` or `costPerMonthUsd` over its limit is ended with the provider's own
    /// in-stream error event (enforce mode only; not for Bedrock's binary event streams).
    #[serde(default)]
    pub hard_budgets: bool,
}

/// Default output reservation of a request without `max_tokens`.
pub const DEFAULT_ESTIMATED_OUTPUT_TOKENS: u64 = 1024;

/// A validated rule, ready to match.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub selector: Option<SelectorMatcher>,
    pub providers: Vec<String>,
    pub mode: Mode,
    pub per: Scope,
    pub allow: Vec<globset::GlobMatcher>,
    pub deny: Vec<globset::GlobMatcher>,
    pub limits: LimitsSpec,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Rule => "rule",
            Scope::Namespace => "namespace",
            Scope::Workload => "workload",
            Scope::Pod => "pod",
        }
    }
}

impl Rule {
    /// The limits and model lists in one line, as written in the policy.
    pub fn summary(&self) -> String {
        let l = &self.limits;
        let mut parts: Vec<String> = [
            ("requestsPerMinute", l.requests_per_minute),
            ("tokensPerMinute", l.tokens_per_minute),
            ("tokensPerHour", l.tokens_per_hour),
            ("tokensPerDay", l.tokens_per_day),
            ("costPerDayUsd", l.cost_per_day_usd),
            ("costPerMonthUsd", l.cost_per_month_usd),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
        .collect();
        if let Some(n) = l.max_concurrent {
            parts.push(format!("maxConcurrent={n}"));
        }
        if let Some(n) = l.max_tokens_per_request {
            parts.push(format!("maxTokensPerRequest={n}"));
        }
        let globs = |list: &[globset::GlobMatcher]| {
            list.iter()
                .map(|g| g.glob().glob().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.allow.is_empty() {
            parts.push(format!("models.allow=[{}]", globs(&self.allow)));
        }
        if !self.deny.is_empty() {
            parts.push(format!("models.deny=[{}]", globs(&self.deny)));
        }
        if !self.providers.is_empty() {
            parts.push(format!("providers=[{}]", self.providers.join(",")));
        }
        if parts.is_empty() {
            "no limits".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

impl RuleSpec {
    /// Validates and compiles; the error names the field (relative to the rule) and what is wrong.
    pub fn compile(&self) -> Result<Rule, (String, String)> {
        if self.name.trim().is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        let selector = match &self.selector {
            Some(selector) if !selector_is_empty(selector) => {
                Some(selector.compile().map_err(|m| ("match".to_owned(), m))?)
            }
            _ => None,
        };
        let glob = |field: &str, pattern: &String| {
            globset::Glob::new(pattern)
                .map(|g| g.compile_matcher())
                .map_err(|e| (field.to_owned(), format!("{pattern:?} is not a valid glob: {e}")))
        };
        let allow: Vec<globset::GlobMatcher> = self
            .models
            .allow
            .iter()
            .map(|p| glob("models.allow", p))
            .collect::<Result<_, _>>()?;
        let deny: Vec<globset::GlobMatcher> = self
            .models
            .deny
            .iter()
            .map(|p| glob("models.deny", p))
            .collect::<Result<_, _>>()?;
        let limits = &self.limits;
        for (field, value) in [
            ("requestsPerMinute", limits.requests_per_minute),
            ("tokensPerMinute", limits.tokens_per_minute),
            ("tokensPerHour", limits.tokens_per_hour),
            ("tokensPerDay", limits.tokens_per_day),
            ("costPerDayUsd", limits.cost_per_day_usd),
            ("costPerMonthUsd", limits.cost_per_month_usd),
        ] {
            if let Some(value) = value
                && !(value.is_finite() && value > 0.0)
            {
                return Err((
                    format!("limits.{field}"),
                    format!("{value} must be a positive number"),
                ));
            }
        }
        for (field, value) in [
            ("maxTokensPerRequest", limits.max_tokens_per_request),
            ("estimatedOutputTokens", limits.estimated_output_tokens),
            ("maxConcurrent", limits.max_concurrent.map(u64::from)),
        ] {
            if value == Some(0) {
                return Err((format!("limits.{field}"), "must be at least 1".into()));
            }
        }
        let has_limit = [
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.tokens_per_hour,
            limits.tokens_per_day,
            limits.cost_per_day_usd,
            limits.cost_per_month_usd,
        ]
        .iter()
        .any(Option::is_some)
            || limits.max_concurrent.is_some()
            || limits.max_tokens_per_request.is_some()
            || !allow.is_empty()
            || !deny.is_empty();
        if !has_limit {
            return Err((
                "limits".into(),
                "the rule sets no limit and no model list: it would do nothing".into(),
            ));
        }
        Ok(Rule {
            name: self.name.clone(),
            selector,
            providers: self.providers.clone(),
            mode: self.mode,
            per: self.per,
            allow,
            deny,
            limits: limits.clone(),
        })
    }
}

fn selector_is_empty(selector: &Selector) -> bool {
    selector.namespace.is_none()
        && selector.pod_labels.is_empty()
        && selector.service_account.is_none()
        && selector.workload.is_none()
        && selector.exe.is_none()
        && selector.comm.is_none()
        && selector.uid.is_none()
        && selector.cgroup.is_none()
}

impl Rule {
    /// Whether the model is allowed (deny wins; an unknown model passes an allow list only when the
    /// list is empty).
    pub fn model_allowed(&self, model: Option<&str>) -> bool {
        match model {
            Some(model) => {
                !self.deny.iter().any(|g| g.is_match(model))
                    && (self.allow.is_empty() || self.allow.iter().any(|g| g.is_match(model)))
            }
            None => self.allow.is_empty(),
        }
    }
}
