//! Token and cost accounting in the daemon: the settings and price table the proxy uses, the
//! metrics, and pricing of a finished exchange.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use interceptor_protocols::{
    Accounting, Adapter, EndpointKind, Limits, PriceTable, PricedModel, Usage, UsageStatus,
};
use prometheus::{
    Counter, CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use tokio::sync::Semaphore;

use crate::genai_metrics::{
    GenAiMetrics, Operation, OperationHandles, operation_name, provider_name as genai_provider_name,
};
use crate::metric_labels::{CappedHandle, CappedVec, IdentityLabels, IdentityValues, MAX_LABELS};
use crate::policy::{Policy, StreamUsage};
use crate::proxy::estimates::EstimatePool;

/// Accounting settings shared by every connection.
pub struct AccountingSettings {
    /// Bodies are read for accounting (the policy's `accounting.enabled`).
    pub enabled: bool,
    pub prices: PriceTable,
    /// Resolved provider → model → price, so dated names are normalised once, not per request (and a
    /// lookup allocates nothing).
    resolved: RwLock<HashMap<Box<str>, ModelPrices>>,
    pub stream_usage: StreamUsage,
    pub max_request_body: u64,
    /// Request-body memory left, in KiB permits.
    pub request_budget: Arc<Semaphore>,
    pub limits: Limits,
    pub metrics: AccountingMetrics,
    /// Where each request's audit line goes (none when the audit log is off).
    pub audit: Option<crate::audit::AuditLog>,
    /// Recent use and rejections for `interceptor status`.
    pub board: Arc<crate::status::StatusBoard>,
    /// Where cut streams' tokenizer estimates wait and run.
    pub estimates: Arc<EstimatePool>,
}

impl AccountingSettings {
    pub fn from_policy(policy: &Policy, metrics: AccountingMetrics) -> anyhow::Result<Self> {
        let prices = policy.price_table()?;
        let accounting = &policy.accounting;
        let budget_kib = usize::try_from(accounting.request_buffer_budget_bytes / 1024)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        let estimates = EstimatePool::for_this_machine(metrics.estimates_skipped.clone());
        Ok(Self {
            enabled: accounting.enabled,
            prices,
            resolved: RwLock::new(HashMap::new()),
            stream_usage: accounting.stream_usage,
            max_request_body: accounting.max_request_body_bytes,
            request_budget: Arc::new(Semaphore::new(budget_kib)),
            limits: Limits::default(),
            metrics,
            audit: None,
            board: Arc::default(),
            estimates,
        })
    }

    /// Prices `usage` of `model` for a provider: the provider's own price section first, then the
    /// section of its API family (Azure OpenAI → openai, Claude on Vertex → anthropic).
    pub fn price(
        &self,
        provider: &str,
        adapter: Adapter,
        model: Option<&str>,
        usage: Option<&Usage>,
    ) -> Priced {
        let Some(usage) = usage else {
            return Priced::NoUsage;
        };
        let Some(model) = model else {
            return Priced::UnknownModel;
        };
        let Some(priced) = self.resolve(provider, adapter, model) else {
            return Priced::UnknownModel;
        };
        Priced::Priced {
            cost: priced.cost(usage),
            priced_as: priced.priced_as,
        }
    }

    /// The price of `model` for `provider`, from the cache or the table.
    fn resolve(&self, provider: &str, adapter: Adapter, model: &str) -> Option<PricedModel> {
        if let Ok(resolved) = self.resolved.read()
            && let Some(found) = resolved.get(provider).and_then(|models| models.get(model))
        {
            return found.clone();
        }
        let family = match adapter {
            Adapter::Openai | Adapter::AzureOpenai => Some("openai"),
            Adapter::Anthropic => Some("anthropic"),
            Adapter::Gemini => Some("gemini"),
            Adapter::VertexAi if model.to_ascii_lowercase().contains("claude") => Some("anthropic"),
            Adapter::VertexAi => Some("gemini"),
            Adapter::Bedrock => Some("bedrock"),
            Adapter::OpenaiCompatible => None,
        };
        let found = std::iter::once(provider)
            .chain(family)
            .find_map(|section| self.prices.lookup(section, model));
        if let Ok(mut resolved) = self.resolved.write() {
            // Model names come from traffic: keep the cache bounded.
            if resolved.values().map(HashMap::len).sum::<usize>() >= RESOLVED_CACHE_ENTRIES {
                resolved.clear();
            }
            resolved
                .entry(provider.into())
                .or_default()
                .insert(model.into(), found.clone());
        }
        found
    }
}

/// One provider's resolved prices: model name as asked → price (none: unknown model).
type ModelPrices = HashMap<Box<str>, Option<PricedModel>>;

/// Distinct (provider, model) names whose price lookups are remembered.
const RESOLVED_CACHE_ENTRIES: usize = 4096;

/// The cost of an exchange, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Priced {
    Priced {
        priced_as: Arc<str>,
        cost: interceptor_protocols::Cost,
    },
    /// Tokens are known but the model has no price: the cost is unknown, never guessed.
    UnknownModel,
    NoUsage,
}

impl Priced {
    pub fn status(&self) -> &'static str {
        match self {
            Priced::Priced { .. } => "priced",
            Priced::UnknownModel => "unknown_model",
            Priced::NoUsage => "no_usage",
        }
    }
}

/// Accounting metrics.
#[derive(Clone)]
pub struct AccountingMetrics {
    /// Identity labels in use and their per-family caps.
    pub labels: Arc<IdentityLabels>,
    pub genai: GenAiMetrics,
    requests: CappedVec<IntCounterVec>,
    pub usage: IntCounterVec,
    tokens: CappedVec<IntCounterVec>,
    cost: CappedVec<CounterVec>,
    pub unpriced: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub provider_errors: IntCounterVec,
    pub unread_bodies: IntCounterVec,
    pub usage_injected: IntCounter,
    /// Cut streams recorded without a tokenizer estimate because the estimate queue was full.
    pub estimates_skipped: IntCounter,
}

impl AccountingMetrics {
    pub fn register(registry: &Registry, labels: Arc<IdentityLabels>) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "interceptor_provider_requests_total",
                "Requests to AI providers, by provider, endpoint kind, model (priced family, else as \
                 requested), whether they streamed, HTTP status class and identity",
            ),
            &labels.names(&["provider", "kind", "model", "stream", "status_class"]),
        )?;
        let usage = IntCounterVec::new(
            Opts::new(
                "interceptor_usage_results_total",
                "How the usage of each request is known: reported, estimated, none (endpoint reports \
                 none), missing (stream cut short), malformed (unreadable body), unsupported (encoding)",
            ),
            &["provider", "result"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "interceptor_tokens_total",
                "Tokens by provider, priced model family (or `unpriced`), type (input counts cache \
                 reads and writes; output counts reasoning), whether estimated with a tokenizer, and identity",
            ),
            &labels.names(&["provider", "model", "type", "estimated"]),
        )?;
        let cost = CounterVec::new(
            Opts::new(
                "interceptor_cost_usd_total",
                "Cost in US dollars from the price table, by provider, priced model family and identity",
            ),
            &labels.names(&["provider", "model"]),
        )?;
        let unpriced = IntCounterVec::new(
            Opts::new(
                "interceptor_unpriced_requests_total",
                "Requests with token usage but no price for their model (cost unknown)",
            ),
            &["provider"],
        )?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "interceptor_time_to_first_token_seconds",
                "Time from the request to the first generated output of a stream",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]),
            &["provider"],
        )?;
        let provider_errors = IntCounterVec::new(
            Opts::new(
                "interceptor_provider_errors_total",
                "Error responses and in-stream errors from providers, by provider, HTTP status and \
                 provider error type",
            ),
            &["provider", "status", "type"],
        )?;
        let unread_bodies = IntCounterVec::new(
            Opts::new(
                "interceptor_request_bodies_unread_total",
                "Request bodies forwarded without reading them (too_large, budget_exhausted, not_json)",
            ),
            &["reason"],
        )?;
        let usage_injected = IntCounter::new(
            "interceptor_stream_usage_injected_total",
            "Streams whose request got stream_options.include_usage (hidden from the client again)",
        )?;
        let estimates_skipped = IntCounter::new(
            "interceptor_usage_estimates_skipped_total",
            "Streams cut before their usage that were not estimated with the tokenizer because the \
             estimate queue was full (recorded with usage missing)",
        )?;
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(usage.clone()),
            Box::new(tokens.clone()),
            Box::new(cost.clone()),
            Box::new(unpriced.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(provider_errors.clone()),
            Box::new(unread_bodies.clone()),
            Box::new(usage_injected.clone()),
            Box::new(estimates_skipped.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Self {
            genai: GenAiMetrics::register(registry, &labels)?,
            requests: labels.family("interceptor_provider_requests_total", requests),
            tokens: labels.family("interceptor_tokens_total", tokens),
            cost: labels.family("interceptor_cost_usd_total", cost),
            labels,
            usage,
            unpriced,
            time_to_first_token,
            provider_errors,
            unread_bodies,
            usage_injected,
            estimates_skipped,
        })
    }

    /// Records a finished exchange; `memo` (the connection's) keeps the handles for its next one.
    pub fn record(&self, exchange: &Measured<'_>, memo: Option<&HandleMemo>) {
        let provider = exchange.provider;
        let accounting = exchange.accounting;
        let labels = &*self.labels;
        let identity = &exchange.identity;
        let mut buffer = [""; MAX_LABELS];
        let stream = if accounting.is_some_and(|a| a.stream) {
            "true"
        } else {
            "false"
        };
        let requested = label_value(exchange.requested_model.unwrap_or(""));
        let response_model = label_value(exchange.response_model.unwrap_or(""));
        let family = match exchange.priced {
            Priced::Priced { priced_as, .. } => &**priced_as,
            _ => "unpriced",
        };
        let request_model = if family == "unpriced" { &*requested } else { family };
        let status_class = status_class(exchange.status);
        let result = accounting.map_or(UsageStatus::NotReported, |a| a.status).name();
        let estimated = if accounting.is_some_and(|a| a.status == UsageStatus::Estimated) {
            "true"
        } else {
            "false"
        };
        let error_type = accounting
            .and_then(|a| a.observation.error.as_ref())
            .map(|e| label_value(&e.kind));
        let failed = exchange.status >= 400 || error_type.is_some();
        if failed {
            let status = exchange.status.to_string();
            self.provider_errors
                .with_label_values(&[provider, &status, error_type.as_deref().unwrap_or("")])
                .inc();
        }
        let genai_error = match (&error_type, exchange.status) {
            (Some(kind), _) => &**kind,
            (None, status) if status >= 400 => status_class,
            _ => "",
        };
        // Failures are rare and vary: their handles are looked up, not memoized.
        let mut memo = memo.filter(|_| !failed).and_then(|memo| memo.0.try_lock().ok());
        let mut unmemoized = Handles::default();
        let handles = match memo.as_deref_mut() {
            Some(memo) => memo.select(&[
                provider,
                exchange.kind.name(),
                &requested,
                &response_model,
                family,
                stream,
                status_class,
                result,
                estimated,
                exchange.host,
                identity.namespace,
                identity.workload,
                identity.pod,
                identity.process,
            ]),
            None => &mut unmemoized,
        };
        handles
            .requests
            .get_or_insert_with(|| {
                let fixed = [
                    provider,
                    exchange.kind.name(),
                    request_model,
                    stream,
                    status_class,
                ];
                let n = labels.values(&mut buffer, &fixed, identity);
                self.requests.handle(&buffer[..n])
            })
            .metric()
            .inc();
        handles
            .usage
            .get_or_insert_with(|| self.usage.with_label_values(&[provider, result]))
            .inc();
        let usage = accounting.and_then(|a| a.usage);
        self.genai.record(
            labels,
            identity,
            &Operation {
                operation: operation_name(exchange.adapter, exchange.kind),
                provider: genai_provider_name(provider),
                request_model: &requested,
                response_model: &response_model,
                server_address: exchange.host,
                error_type: genai_error,
                duration_seconds: exchange.duration.as_secs_f64(),
                first_chunk_seconds: exchange.first_chunk.map(|d| d.as_secs_f64()),
                tokens: usage.map(|u| (u.input_tokens, u.output_tokens)),
            },
            &mut handles.genai,
        );
        let Some(usage) = usage else {
            return;
        };
        match exchange.priced {
            Priced::Priced { priced_as, cost } => handles
                .cost
                .get_or_insert_with(|| {
                    let n = labels.values(&mut buffer, &[provider, priced_as], identity);
                    self.cost.handle(&buffer[..n])
                })
                .metric()
                .inc_by(cost.usd()),
            _ => handles
                .unpriced
                .get_or_insert_with(|| self.unpriced.with_label_values(&[provider]))
                .inc(),
        }
        let counts = [
            ("input", usage.input_tokens),
            ("cached_input", usage.cached_input_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("output", usage.output_tokens),
            ("reasoning", usage.reasoning_tokens),
        ];
        for (slot, (kind, count)) in handles.tokens.iter_mut().zip(counts) {
            if count > 0 {
                slot.get_or_insert_with(|| {
                    let n = labels.values(&mut buffer, &[provider, family, kind, estimated], identity);
                    self.tokens.handle(&buffer[..n])
                })
                .metric()
                .inc_by(count);
            }
        }
    }
}

/// The metric handles of a connection's last request, reused while its label values repeat (a
/// keep-alive connection mostly asks for the same model and gets the same status): its next request
/// costs no label hashing and no map lookup. One per connection; a request that finds it busy
/// (concurrent HTTP/2 streams) looks its handles up instead.
#[derive(Default)]
pub struct HandleMemo(Mutex<Memo>);

#[derive(Default)]
struct Memo {
    /// Every label value the handles were made from, each followed by 0xff (never in UTF-8 text).
    key: Vec<u8>,
    scratch: Vec<u8>,
    handles: Handles,
}

impl Memo {
    /// The handles for these label values: the kept ones if the values are the same, else none yet.
    fn select(&mut self, values: &[&str]) -> &mut Handles {
        self.scratch.clear();
        for value in values {
            self.scratch.extend_from_slice(value.as_bytes());
            self.scratch.push(0xff);
        }
        if self.scratch != self.key {
            std::mem::swap(&mut self.scratch, &mut self.key);
            self.handles = Handles::default();
        }
        &mut self.handles
    }
}

/// Handles of one request's label sets, filled as they are first needed.
#[derive(Default)]
struct Handles {
    requests: Option<CappedHandle<IntCounter>>,
    usage: Option<IntCounter>,
    genai: OperationHandles,
    cost: Option<CappedHandle<Counter>>,
    unpriced: Option<IntCounter>,
    /// input, cached_input, cache_write, output, reasoning.
    tokens: [Option<CappedHandle<IntCounter>>; 5],
}

/// What the usage metrics take from one finished exchange.
pub struct Measured<'a> {
    pub provider: &'a str,
    pub adapter: Adapter,
    pub kind: EndpointKind,
    pub status: u16,
    pub host: &'a str,
    pub requested_model: Option<&'a str>,
    /// The model the provider reports it ran.
    pub response_model: Option<&'a str>,
    pub accounting: Option<&'a Accounting>,
    pub priced: &'a Priced,
    pub identity: IdentityValues<'a>,
    pub duration: Duration,
    pub first_chunk: Option<Duration>,
}

/// `2xx`, `4xx`, ... of an HTTP status.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// A label value from provider-controlled text: at most 64 characters of `[A-Za-z0-9_.-]` (others
/// become `_`), so a misbehaving upstream cannot blow up the metrics' cardinality or format.
fn label_value(text: &str) -> Cow<'_, str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | ':' | '@');
    if text.len() <= 64 && text.chars().all(allowed) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .take(64)
            .map(|c| if allowed(c) { c } else { '_' })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded_and_plain() {
        assert_eq!(label_value("rate_limit_error"), "rate_limit_error");
        assert_eq!(label_value("bad \"type\"\n"), "bad__type__");
        assert_eq!(label_value(&"x".repeat(500)).len(), 64);
    }

    fn settings(policy: &str) -> AccountingSettings {
        let policy = Policy::parse(policy, "test.yaml").expect("policy");
        let registry = Registry::new();
        AccountingSettings::from_policy(
            &policy,
            AccountingMetrics::register(
                &registry,
                Arc::new(IdentityLabels::new(&[], 100, &registry).expect("labels")),
            )
            .expect("metrics"),
        )
        .expect("settings")
    }

    const HEADER: &str = "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\n";

    fn reported(model: &str, input: u64, output: u64) -> Accounting {
        Accounting {
            observation: interceptor_protocols::Observation {
                model: Some(model.into()),
                ..Default::default()
            },
            usage: Some(Usage {
                input_tokens: input,
                output_tokens: output,
                ..Usage::default()
            }),
            status: UsageStatus::Reported,
            stream: false,
            problem: None,
            kept_events: None,
        }
    }

    fn measured<'a>(
        accounting: &'a Accounting,
        priced: &'a Priced,
        status: u16,
        namespace: &'a str,
    ) -> Measured<'a> {
        Measured {
            provider: "openai",
            adapter: Adapter::Openai,
            kind: EndpointKind::Chat,
            status,
            host: "api.openai.com",
            requested_model: accounting.observation.model.as_deref(),
            response_model: accounting.observation.model.as_deref(),
            accounting: Some(accounting),
            priced,
            identity: IdentityValues {
                namespace,
                ..IdentityValues::default()
            },
            duration: Duration::from_millis(20),
            first_chunk: None,
        }
    }

    #[test]
    fn a_connection_memo_counts_like_lookups_and_follows_changed_labels() {
        let registry = Registry::new();
        let labels = Arc::new(
            IdentityLabels::new(&[crate::metric_labels::IdentityLabel::Namespace], 2, &registry)
                .expect("labels"),
        );
        let metrics = AccountingMetrics::register(&registry, labels).expect("metrics");
        let memo = HandleMemo::default();
        let unpriced = Priced::UnknownModel;
        let mini = reported("gpt-4o-mini", 10, 5);
        let other = reported("o3", 7, 3);
        for _ in 0..3 {
            metrics.record(&measured(&mini, &unpriced, 200, "a"), Some(&memo));
        }
        metrics.record(&measured(&other, &unpriced, 200, "a"), Some(&memo));
        metrics.record(&measured(&mini, &unpriced, 200, "a"), Some(&memo));
        // Past the cap of two label sets: the overflow series, counted through the memo too.
        metrics.record(&measured(&mini, &unpriced, 200, "b"), Some(&memo));
        metrics.record(&measured(&mini, &unpriced, 200, "b"), Some(&memo));
        // A failure bypasses the memo (and overflows as a third set).
        metrics.record(&measured(&mini, &unpriced, 500, "a"), Some(&memo));
        let overflow = crate::metric_labels::OVERFLOW;
        let requests = |model: &str, class: &str, namespace: &str| {
            metrics
                .requests
                .get(&["openai", "chat", model, "false", class, namespace])
                .get()
        };
        assert_eq!(requests("gpt-4o-mini", "2xx", "a"), 4);
        assert_eq!(requests("o3", "2xx", "a"), 1);
        assert_eq!(requests("gpt-4o-mini", "2xx", overflow), 2);
        assert_eq!(requests("gpt-4o-mini", "5xx", overflow), 1);
        let mut exposition = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut exposition)
            .expect("encode");
        // The assertions' own lookups of refused sets count too (two of them above).
        assert!(
            exposition.contains(
                "interceptor_metric_series_overflow_total{metric=\"interceptor_provider_requests_total\"} 5"
            ),
            "{exposition}"
        );
        let tokens = |kind: &str, namespace: &str| {
            metrics
                .tokens
                .get(&["openai", "unpriced", kind, "false", namespace])
                .get()
        };
        assert_eq!(tokens("input", "a"), 3 * 10 + 7 + 10 + 10);
        assert_eq!(tokens("output", "a"), 3 * 5 + 3 + 5 + 5);
        assert_eq!(tokens("input", overflow), 2 * 10);
        assert_eq!(metrics.unpriced.with_label_values(&["openai"]).get(), 8);
        let key = memo.0.lock().expect("memo").key.clone();
        assert!(
            key.ends_with(b"\xffb\xff\xff\xff\xff"),
            "the memo holds the last memoized label values"
        );
    }

    #[test]
    fn provider_sections_win_and_families_are_the_fallback() {
        let settings = settings(&format!(
            "{HEADER}pricing:\n  azure-openai:\n    models:\n      gpt-4o: {{input: 5, output: 15}}\n"
        ));
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 0,
            ..Default::default()
        };
        let azure = settings.price(
            "azure-openai",
            Adapter::AzureOpenai,
            Some("gpt-4o-2024-08-06"),
            Some(&usage),
        );
        assert!(
            matches!(&azure, Priced::Priced { cost, .. } if cost.picodollars == 5_000_000_000_000),
            "{azure:?}"
        );
        // Not in the Azure section: the OpenAI family's price.
        let mini = settings.price(
            "azure-openai",
            Adapter::AzureOpenai,
            Some("gpt-4o-mini"),
            Some(&usage),
        );
        assert!(
            matches!(&mini, Priced::Priced { priced_as, .. } if &**priced_as == "gpt-4o-mini"),
            "{mini:?}"
        );
        let claude = settings.price(
            "vertex-ai",
            Adapter::VertexAi,
            Some("claude-sonnet-4@20250514"),
            Some(&usage),
        );
        assert!(
            matches!(&claude, Priced::Priced { priced_as, .. } if &**priced_as == "claude-sonnet-4"),
            "{claude:?}"
        );
        assert_eq!(
            settings.price(
                "groq",
                Adapter::OpenaiCompatible,
                Some("llama-3.3-70b"),
                Some(&usage)
            ),
            Priced::UnknownModel
        );
        assert_eq!(
            settings.price("openai", Adapter::Openai, Some("gpt-4o"), None),
            Priced::NoUsage
        );
    }
}
