//! Prices per provider and model, and the cost of a request. The built-in table is a data file
//! with its source date; operators override or add models in the policy. Dated model names and
//! deployment prefixes map to their family; an unknown model has no cost, never a guess.
//!
//! Arithmetic is exact: prices are held as integer pico-dollars (1e-12 USD) per token, so a cost
//! is reproducible to the last digit from the token counts and the table.

use std::collections::HashMap;

use serde::Deserialize;
use thiserror::Error;

use crate::usage::Usage;

/// The price table shipped with the interceptor.
pub const BUILTIN_PRICES: &str = include_str!("../data/prices.yaml");

#[derive(Debug, Error)]
pub enum PriceError {
    #[error("price table is not valid: {0}")]
    Parse(#[from] serde_norway::Error),
    #[error("{provider}/{model}: {field} price {value} is negative or not a number")]
    BadPrice {
        provider: String,
        model: String,
        field: String,
        value: f64,
    },
    #[error("{provider}: alias {alias:?} points to unknown model {target:?}")]
    DanglingAlias {
        provider: String,
        alias: String,
        target: String,
    },
}

/// Prices of one model, in US dollars per million tokens, as written in the table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPriceSpec {
    pub input: f64,
    pub output: f64,
    /// Cache reads (OpenAI cached input, Anthropic cache read, Gemini cached content).
    pub cached_input: Option<f64>,
    /// Cache writes (Anthropic cache creation).
    pub cache_write: Option<f64>,
    /// Reasoning tokens, where billed differently from output.
    pub reasoning: Option<f64>,
    /// Higher prices once the prompt exceeds a size (Gemini 2.5 Pro, Claude long context).
    pub long_context: Option<LongContextSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LongContextSpec {
    pub above_input_tokens: u64,
    pub input: f64,
    pub output: f64,
    pub cached_input: Option<f64>,
    pub cache_write: Option<f64>,
}

/// A provider's section of the table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderPricesSpec {
    #[serde(default)]
    pub models: HashMap<String, ModelPriceSpec>,
    /// Other names of a model (`chatgpt-4o-latest: gpt-4o`).
    #[serde(default)]
    pub aliases: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TableFile {
    source_date: String,
    #[serde(default)]
    sources: HashMap<String, String>,
    currency: String,
    providers: HashMap<String, ProviderPricesSpec>,
}

/// Integer prices: pico-dollars per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rates {
    input: u64,
    output: u64,
    cached_input: u64,
    cache_write: u64,
    reasoning: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelPrice {
    base: Rates,
    long_context: Option<(u64, Rates)>,
}

/// The cost of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Exact cost in pico-dollars (1e-12 USD).
    pub picodollars: u128,
}

impl Cost {
    pub fn usd(self) -> f64 {
        self.picodollars as f64 / 1e12
    }
}

/// The price of a model, found under the name `priced_as`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PricedModel {
    /// Shared: a resolved price is handed out per request without copying its name.
    pub priced_as: std::sync::Arc<str>,
    price: ModelPrice,
}

impl PricedModel {
    /// The cost of `usage`: uncached input, cache reads, cache writes, output and reasoning each at
    /// their own rate (cache and reasoning rates default to the input and output rates).
    pub fn cost(&self, usage: &Usage) -> Cost {
        let rates = match self.price.long_context {
            Some((above, long)) if usage.input_tokens > above => long,
            _ => self.price.base,
        };
        let uncached = usage
            .input_tokens
            .saturating_sub(usage.cached_input_tokens)
            .saturating_sub(usage.cache_write_tokens);
        let visible_output = usage.output_tokens.saturating_sub(usage.reasoning_tokens);
        let picodollars = u128::from(uncached) * u128::from(rates.input)
            + u128::from(usage.cached_input_tokens) * u128::from(rates.cached_input)
            + u128::from(usage.cache_write_tokens) * u128::from(rates.cache_write)
            + u128::from(visible_output) * u128::from(rates.output)
            + u128::from(usage.reasoning_tokens) * u128::from(rates.reasoning);
        Cost { picodollars }
    }
}

#[derive(Clone, Debug, Default)]
struct ProviderPrices {
    models: HashMap<String, ModelPrice>,
    aliases: HashMap<String, String>,
}

/// The loaded table.
#[derive(Clone, Debug)]
pub struct PriceTable {
    source_date: String,
    currency: String,
    sources: HashMap<String, String>,
    providers: HashMap<String, ProviderPrices>,
}

impl PriceTable {
    /// The built-in table.
    pub fn builtin() -> Result<Self, PriceError> {
        Self::parse(BUILTIN_PRICES)
    }

    pub fn parse(yaml: &str) -> Result<Self, PriceError> {
        let file: TableFile = serde_norway::from_str(yaml)?;
        let mut table = Self {
            source_date: file.source_date,
            currency: file.currency,
            sources: file.sources,
            providers: HashMap::new(),
        };
        table.apply(&file.providers)?;
        Ok(table)
    }

    /// Adds or replaces models and aliases (the policy's `pricing` section).
    pub fn apply(&mut self, overrides: &HashMap<String, ProviderPricesSpec>) -> Result<(), PriceError> {
        for (provider, spec) in overrides {
            let entry = self.providers.entry(provider.to_ascii_lowercase()).or_default();
            for (model, price) in &spec.models {
                entry
                    .models
                    .insert(model.to_ascii_lowercase(), convert(provider, model, price)?);
            }
            for (alias, target) in &spec.aliases {
                entry
                    .aliases
                    .insert(alias.to_ascii_lowercase(), target.to_ascii_lowercase());
            }
            for (alias, target) in &entry.aliases {
                if !entry.models.contains_key(target) {
                    return Err(PriceError::DanglingAlias {
                        provider: provider.clone(),
                        alias: alias.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn source_date(&self) -> &str {
        &self.source_date
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    pub fn sources(&self) -> &HashMap<String, String> {
        &self.sources
    }

    /// Number of priced models (aliases not counted).
    pub fn model_count(&self) -> usize {
        self.providers.values().map(|p| p.models.len()).sum()
    }

    /// The price of `model` under `provider`: the exact name, an alias, or the name without
    /// deployment prefixes and version/date suffixes.
    pub fn lookup(&self, provider: &str, model: &str) -> Option<PricedModel> {
        let prices = self.providers.get(provider)?;
        let model = model.trim().to_ascii_lowercase();
        for candidate in name_candidates(&model) {
            let name = prices.aliases.get(&candidate).unwrap_or(&candidate);
            if let Some(price) = prices.models.get(name) {
                return Some(PricedModel {
                    priced_as: name.as_str().into(),
                    price: *price,
                });
            }
        }
        None
    }
}

fn convert(provider: &str, model: &str, spec: &ModelPriceSpec) -> Result<ModelPrice, PriceError> {
    let rate = |field: String, value: f64| -> Result<u64, PriceError> {
        if !value.is_finite() || value < 0.0 {
            return Err(PriceError::BadPrice {
                provider: provider.to_owned(),
                model: model.to_owned(),
                field,
                value,
            });
        }
        // Dollars per million tokens → pico-dollars per token.
        Ok((value * 1e6).round() as u64)
    };
    // Cache rates default to the input rate, the reasoning rate to the output rate.
    let rates = |prefix: &'static str,
                 [input, output]: [f64; 2],
                 [cached, write, reasoning]: [Option<f64>; 3]|
     -> Result<Rates, PriceError> {
        let field = |name: &str| {
            if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}.{name}")
            }
        };
        let input = rate(field("input"), input)?;
        let output = rate(field("output"), output)?;
        let optional = |name: &str, value: Option<f64>, default: u64| {
            value
                .map(|v| rate(field(name), v))
                .transpose()
                .map(|v| v.unwrap_or(default))
        };
        Ok(Rates {
            input,
            output,
            cached_input: optional("cachedInput", cached, input)?,
            cache_write: optional("cacheWrite", write, input)?,
            reasoning: optional("reasoning", reasoning, output)?,
        })
    };
    let base = rates(
        "",
        [spec.input, spec.output],
        [spec.cached_input, spec.cache_write, spec.reasoning],
    )?;
    let long_context = match &spec.long_context {
        None => None,
        Some(long) => Some((
            long.above_input_tokens,
            rates(
                "longContext",
                [long.input, long.output],
                [long.cached_input, long.cache_write, None],
            )?,
        )),
    };
    Ok(ModelPrice { base, long_context })
}

/// Names to try for a model, most specific first: as given; without `models/`-style path prefixes;
/// without Bedrock cross-region prefixes; without version and date suffixes.
fn name_candidates(model: &str) -> Vec<String> {
    let mut name = model.rsplit('/').next().unwrap_or(model).to_owned();
    let mut out = vec![model.to_owned()];
    let push = |candidate: &str, out: &mut Vec<String>| {
        if !candidate.is_empty() && !out.iter().any(|c| c == candidate) {
            out.push(candidate.to_owned());
        }
    };
    push(&name, &mut out);
    for prefix in ["us.", "eu.", "apac.", "global.", "us-gov.", "jp.", "au.", "ca."] {
        if let Some(rest) = name.strip_prefix(prefix)
            && rest.contains('.')
        {
            name = rest.to_owned();
            push(&name, &mut out);
            break;
        }
    }
    while let Some(shorter) = strip_suffix_once(&name) {
        name = shorter;
        push(&name, &mut out);
    }
    out
}

/// Removes one version or date suffix: `-v1:0`, `:0`, `-2024-08-06`, `-20240620`, `@20240620`,
/// `-001`, `-0613`, `-latest`, `-preview-05-20`, `-exp-0827`.
fn strip_suffix_once(name: &str) -> Option<String> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((head, tail)) = name.rsplit_once(':')
        && tail.bytes().all(|b| b.is_ascii_digit())
    {
        return Some(head.to_owned());
    }
    if let Some((head, tail)) = name.rsplit_once('@') {
        return Some(head.to_owned()).filter(|_| !tail.is_empty());
    }
    let (head, tail) = name.rsplit_once('-')?;
    let is_version =
        tail.len() >= 2 && tail.starts_with('v') && tail[1..].bytes().all(|b| b.is_ascii_digit());
    if is_version || digits(tail, 8) || digits(tail, 3) || tail == "latest" {
        return Some(head.to_owned());
    }
    // `-2024-08-06`
    if digits(tail, 2)
        && let Some((head2, month)) = head.rsplit_once('-')
        && digits(month, 2)
    {
        if let Some((head3, year)) = head2.rsplit_once('-')
            && digits(year, 4)
        {
            return Some(head3.to_owned());
        }
        // `-preview-05-20`
        if let Some(head3) = head2.strip_suffix("-preview") {
            return Some(head3.to_owned());
        }
    }
    // `-0613` (older OpenAI snapshots), `-exp-0827`.
    if digits(tail, 4) {
        return Some(head.strip_suffix("-exp").unwrap_or(head).to_owned());
    }
    if tail == "preview" || tail == "exp" {
        return Some(head.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        PriceTable::builtin().expect("built-in table parses")
    }

    #[test]
    fn dated_and_prefixed_names_map_to_their_family() {
        let table = table();
        let cases = [
            ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
            ("openai", "gpt-4o-mini", "gpt-4o-mini"),
            ("openai", "chatgpt-4o-latest", "gpt-4o"),
            ("anthropic", "claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
            ("anthropic", "claude-sonnet-4@20250514", "claude-sonnet-4"),
            ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku"),
            ("gemini", "models/gemini-2.0-flash-001", "gemini-2.0-flash"),
            ("gemini", "gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
            (
                "bedrock",
                "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
                "anthropic.claude-3-5-sonnet",
            ),
            ("bedrock", "amazon.nova-pro-v1:0", "amazon.nova-pro"),
        ];
        for (provider, model, family) in cases {
            let priced = table
                .lookup(provider, model)
                .unwrap_or_else(|| panic!("{provider}/{model} has a price"));
            assert_eq!(&*priced.priced_as, family, "{provider}/{model}");
        }
        assert!(table.lookup("openai", "gpt-unknown-9").is_none());
        assert!(table.lookup("nobody", "gpt-4o").is_none());
        assert!(!table.source_date().is_empty());
    }

    #[test]
    fn cost_prices_each_token_class_exactly() {
        let table = PriceTable::parse(
            "sourceDate: '2025-01-01'\ncurrency: USD\nproviders:\n  p:\n    models:\n      m: {input: 2.5, output: 10, cachedInput: 1.25, cacheWrite: 3.75, reasoning: 20}\n",
        )
        .expect("table");
        let priced = table.lookup("p", "m").expect("priced");
        let usage = Usage {
            input_tokens: 1000,
            cached_input_tokens: 200,
            cache_write_tokens: 100,
            output_tokens: 50,
            reasoning_tokens: 10,
        };
        // 700×2.5 + 200×1.25 + 100×3.75 + 40×10 + 10×20 = 2975 dollars per million tokens.
        assert_eq!(priced.cost(&usage).picodollars, 2_975_000_000);
        assert!((priced.cost(&usage).usd() - 0.002975).abs() < 1e-15);
    }

    #[test]
    fn long_context_rates_apply_above_the_threshold() {
        let table = PriceTable::parse(
            "sourceDate: x\ncurrency: USD\nproviders:\n  g:\n    models:\n      pro: {input: 1, output: 2, longContext: {aboveInputTokens: 10, input: 3, output: 4}}\n",
        )
        .expect("table");
        let priced = table.lookup("g", "pro").expect("priced");
        let small = Usage {
            input_tokens: 10,
            output_tokens: 1,
            ..Default::default()
        };
        let large = Usage {
            input_tokens: 11,
            output_tokens: 1,
            ..Default::default()
        };
        assert_eq!(priced.cost(&small).picodollars, 12_000_000);
        assert_eq!(priced.cost(&large).picodollars, 37_000_000);
    }

    #[test]
    fn overrides_add_models_and_bad_tables_are_rejected() {
        let mut table = table();
        let spec: HashMap<String, ProviderPricesSpec> = serde_norway::from_str(
            "mistral:\n  models:\n    mistral-large: {input: 2, output: 6}\n  aliases:\n    mistral-large-latest: mistral-large\n",
        )
        .expect("spec");
        table.apply(&spec).expect("apply");
        assert_eq!(
            table
                .lookup("mistral", "mistral-large-latest")
                .map(|p| p.priced_as.to_string()),
            Some("mistral-large".into())
        );
        let dangling: HashMap<String, ProviderPricesSpec> =
            serde_norway::from_str("x:\n  aliases:\n    a: b\n").expect("spec");
        assert!(matches!(
            table.apply(&dangling),
            Err(PriceError::DanglingAlias { .. })
        ));
        let negative: HashMap<String, ProviderPricesSpec> =
            serde_norway::from_str("x:\n  models:\n    m: {input: -1, output: 1}\n").expect("spec");
        assert!(matches!(table.apply(&negative), Err(PriceError::BadPrice { .. })));
        assert!(PriceTable::parse("sourceDate: x\n").is_err());
    }
}
