//! The operator's policy file: which domains are intercepted and how.
//!
//! The format is a versioned YAML document (`apiVersion`, `kind`) meant to live in a ConfigMap.
//! Every field is documented in the README ("Configuration").

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::HashMap;

use interceptor_protocols::pricing::ProviderPricesSpec;
use serde::Deserialize;

use crate::providers::{self, Adapter};
use crate::quota::cluster::BudgetStoreSpec;
use crate::quota::{Rule, RuleSpec};
use crate::selector::{Selector, SelectorMatcher};

/// The only `apiVersion` this build understands.
pub const API_VERSION: &str = "interceptor.dev/v1alpha1";
/// The only `kind` this build understands.
pub const KIND: &str = "InterceptorPolicy";
/// The built-in default policy.
pub const DEFAULT_POLICY_YAML: &str = include_str!("../default-policy.yaml");

/// Errors found while reading or validating a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading policy {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("policy {source_name}: {message}")]
    Parse { source_name: String, message: String },
    #[error("policy {source_name}: {field}: {message}")]
    Invalid {
        source_name: String,
        field: String,
        message: String,
    },
}

/// The policy document.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// Format version; must be `interceptor.dev/v1alpha1`.
    pub api_version: String,
    /// Document kind; must be `InterceptorPolicy`.
    pub kind: String,
    /// Intercept the built-in catalog of provider domains (default `true`).
    #[serde(default = "default_true")]
    pub builtin_providers: bool,
    /// Extra provider domains, or overrides of built-in ones (same `domain`).
    #[serde(default)]
    pub providers: Vec<ProviderDomain>,
    /// How interception behaves.
    #[serde(default)]
    pub interception: Interception,
    /// How provider addresses are discovered.
    #[serde(default)]
    pub discovery: Discovery,
    /// Token and cost accounting.
    #[serde(default)]
    pub accounting: Accounting,
    /// Price overrides and additions, by provider name (same shape as the built-in price table).
    #[serde(default)]
    pub pricing: HashMap<String, ProviderPricesSpec>,
    /// Quota rules. Every rule that selects a request must allow it.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Where day and month budgets are shared across nodes (default: each node alone).
    #[serde(default)]
    pub budget_store: BudgetStoreSpec,
    /// What the audit log may hold beyond its fixed fields.
    #[serde(default)]
    pub audit: AuditPolicy,
}

/// The JSON Schema of the policy file, pretty-printed (editors validate and complete with it).
pub fn json_schema() -> Result<String, serde_json::Error> {
    let mut schema = schemars::schema_for!(Policy);
    schema.insert(
        "$id".into(),
        serde_json::json!("https://interceptor.dev/schemas/policy-v1alpha1.json"),
    );
    schema.insert(
        "title".into(),
        serde_json::json!("InterceptorPolicy (interceptor.dev/v1alpha1)"),
    );
    serde_json::to_string_pretty(&schema)
}

/// Token and cost accounting settings.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Accounting {
    /// Read provider bodies for usage, model and cost (default `true`). With `false` requests are
    /// still proxied and logged, without reading any body.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// OpenAI-style streams whose client did not ask for usage.
    #[serde(default)]
    pub stream_usage: StreamUsage,
    /// Largest request body read to learn the model and the stream flag (and to inject the usage
    /// option). Larger bodies stream through unread; their model comes from the response.
    #[serde(default = "default_max_request_body")]
    pub max_request_body_bytes: u64,
    /// Memory all request bodies being read may use together; beyond it requests stream through
    /// unread (counted in `interceptor_request_bodies_unread_total`).
    #[serde(default = "default_request_buffer_budget")]
    pub request_buffer_budget_bytes: u64,
}

impl Default for Accounting {
    fn default() -> Self {
        Self {
            enabled: true,
            stream_usage: StreamUsage::default(),
            max_request_body_bytes: default_max_request_body(),
            request_buffer_budget_bytes: default_request_buffer_budget(),
        }
    }
}

/// How usage of OpenAI-style streams is obtained when the client did not ask for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StreamUsage {
    /// Add `stream_options.include_usage=true` to the request and remove the extra usage chunk from
    /// the stream again, so the client sees exactly what it asked for.
    #[default]
    Inject,
    /// Forward the request unchanged and count the prompt and the delivered output with the model's
    /// tokenizer (o200k_base / cl100k_base); the counts are marked `estimated`.
    Estimate,
}

fn default_max_request_body() -> u64 {
    4 << 20
}

fn default_request_buffer_budget() -> u64 {
    256 << 20
}

/// A provider domain entry.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderDomain {
    /// Domain name, or a pattern with one `*` (e.g. `*.openai.azure.com`).
    pub domain: String,
    /// API dialect; required for domains that are not in the built-in catalog.
    #[serde(default)]
    pub adapter: Option<Adapter>,
    /// Provider name: the `provider` label and the price table section (default: the built-in
    /// name, else the domain).
    #[serde(default)]
    pub name: Option<String>,
    /// Static addresses. When set, the domain is not resolved through DNS.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Destination ports that are intercepted (default `[443]`).
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
}

/// Interception settings.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Interception {
    /// What happens to new connections when the daemon is not running.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Lifetime of the leaf certificates minted per SNI (renewed after two thirds of it).
    #[serde(default = "default_leaf_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leaf_ttl: Duration,
    /// Workloads whose connections are relayed untouched (never decrypted), e.g. clients that pin
    /// certificates. A connection is bypassed when any selector matches.
    #[serde(default)]
    pub bypass: Vec<Selector>,
}

impl Default for Interception {
    fn default() -> Self {
        Self {
            failure_mode: FailureMode::default(),
            leaf_ttl: default_leaf_ttl(),
            bypass: Vec::new(),
        }
    }
}

/// Audit log options.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditPolicy {
    /// Workloads whose prompts and completions (request and response bodies) are written to the audit
    /// log. Empty (default): never. Decided when a connection is accepted, like `bypass`.
    #[serde(default)]
    pub content: Vec<Selector>,
    /// Bytes kept of each body.
    #[serde(default = "default_max_content_bytes")]
    pub max_content_bytes: usize,
}

impl Default for AuditPolicy {
    fn default() -> Self {
        Self {
            content: Vec::new(),
            max_content_bytes: default_max_content_bytes(),
        }
    }
}

fn default_max_content_bytes() -> usize {
    16 * 1024
}

/// Which connections have their bodies in the audit log.
#[derive(Debug, Default)]
pub struct ContentSelection {
    pub matchers: Vec<SelectorMatcher>,
    pub max_bytes: usize,
}

/// Behaviour when the daemon is gone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Programs are detached with the daemon: applications connect directly (default).
    #[default]
    Open,
    /// Programs stay attached (pinned links): connections to targets are refused until a daemon returns.
    Closed,
}

/// Address discovery settings.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Discovery {
    /// Shortest interval between two resolutions of a domain, whatever the record TTL.
    #[serde(default = "default_min_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_refresh: Duration,
    /// Longest interval between two resolutions of a domain.
    #[serde(default = "default_max_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_refresh: Duration,
    /// How long an address that left the DNS answers stays a target (clients may still use it).
    #[serde(default = "default_stale_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stale_grace: Duration,
    /// Delay before retrying a domain whose resolution failed.
    #[serde(default = "default_retry_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry_interval: Duration,
    /// Learn provider addresses from the DNS answers workloads receive (an eBPF program reads each
    /// answer for a provider name and adds its addresses before the answer reaches the workload).
    #[serde(default = "default_true")]
    pub learn_from_dns: bool,
    /// How long an address learned from an answer stays a target after the answer's TTL ran out.
    #[serde(default = "default_dns_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub dns_grace: Duration,
    /// Answer TTLs longer than this are capped (a forged huge TTL cannot pin an address).
    #[serde(default = "default_dns_max_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub dns_max_ttl: Duration,
    /// Count TLS connections whose SNI is a provider but which did not go through the proxy
    /// (`interceptor_escaped_connections_total`), and connections to encrypted-DNS endpoints.
    #[serde(default = "default_true")]
    pub report_escapes: bool,
    /// Names counted as DNS-over-HTTPS endpoints (patterns like provider domains). Their answers
    /// cannot be seen, so workloads using them are reported as a hint.
    #[serde(default = "default_encrypted_dns_names")]
    pub encrypted_dns_names: Vec<String>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            min_refresh: default_min_refresh(),
            max_refresh: default_max_refresh(),
            stale_grace: default_stale_grace(),
            retry_interval: default_retry_interval(),
            learn_from_dns: true,
            dns_grace: default_dns_grace(),
            dns_max_ttl: default_dns_max_ttl(),
            report_escapes: true,
            encrypted_dns_names: default_encrypted_dns_names(),
        }
    }
}

fn default_dns_grace() -> Duration {
    Duration::from_secs(120)
}
fn default_dns_max_ttl() -> Duration {
    Duration::from_secs(3600)
}
/// Well-known public DNS-over-HTTPS endpoints.
fn default_encrypted_dns_names() -> Vec<String> {
    [
        "dns.google",
        "dns64.dns.google",
        "cloudflare-dns.com",
        "*.cloudflare-dns.com",
        "one.one.one.one",
        "dns.quad9.net",
        "*.quad9.net",
        "doh.opendns.com",
        "dns.adguard-dns.com",
        "*.nextdns.io",
        "doh.cleanbrowsing.org",
        "doh.mullvad.net",
        "dns.alidns.com",
        "doh.pub",
    ]
    .map(String::from)
    .to_vec()
}

fn default_true() -> bool {
    true
}
fn default_ports() -> Vec<u16> {
    vec![443]
}
fn default_min_refresh() -> Duration {
    Duration::from_secs(5)
}
fn default_max_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_stale_grace() -> Duration {
    Duration::from_secs(600)
}
fn default_retry_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_leaf_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// A provider domain after merging the built-in catalog with the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderTarget {
    pub domain: String,
    pub adapter: Adapter,
    /// Provider name (metrics label, price table section).
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<u16>,
}

impl ProviderTarget {
    /// Whether the daemon resolves this domain through DNS (exact names without static addresses).
    pub fn resolvable(&self) -> bool {
        self.addresses.is_empty() && !self.domain.contains('*')
    }
}

impl Policy {
    /// The built-in default policy.
    pub fn builtin() -> Result<Self, PolicyError> {
        Self::parse(DEFAULT_POLICY_YAML, "<built-in>")
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read(path.to_owned(), e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates policy text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let policy: Policy = serde_norway::from_str(text).map_err(|e| PolicyError::Parse {
            source_name: source_name.to_owned(),
            message: e.to_string(),
        })?;
        policy.validate(source_name)?;
        Ok(policy)
    }

    /// Checks everything serde cannot: versions, domain syntax, adapters, duplicates, ranges.
    pub fn validate(&self, source_name: &str) -> Result<(), PolicyError> {
        let invalid = |field: String, message: String| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            field,
            message,
        };
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion".into(),
                format!(
                    "{:?} is not supported (expected {API_VERSION:?})",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(invalid(
                "kind".into(),
                format!("{:?} is not supported (expected {KIND:?})", self.kind),
            ));
        }
        let mut seen = HashSet::new();
        for (i, entry) in self.providers.iter().enumerate() {
            let field = |name: &str| format!("providers[{i}].{name}");
            let domain = entry.domain.to_ascii_lowercase();
            providers::validate_domain_pattern(&domain)
                .map_err(|m| invalid(field("domain"), format!("{:?}: {m}", entry.domain)))?;
            if !seen.insert(domain.clone()) {
                return Err(invalid(
                    field("domain"),
                    format!("{:?} is listed twice", entry.domain),
                ));
            }
            if entry.adapter.is_none() && providers::builtin_adapter(&domain).is_none() {
                return Err(invalid(
                    field("domain"),
                    format!(
                        "unknown provider domain {:?}: it is not in the built-in catalog, so set `adapter` \
                         (openai, azure-openai, anthropic, gemini, vertex-ai, bedrock, openai-compatible)",
                        entry.domain
                    ),
                ));
            }
            if entry.ports.is_empty() {
                return Err(invalid(field("ports"), "must list at least one port".into()));
            }
            if entry.ports.len() > interceptor_ebpf::PORTS_PER_DOMAIN {
                return Err(invalid(
                    field("ports"),
                    format!("at most {} ports per domain", interceptor_ebpf::PORTS_PER_DOMAIN),
                ));
            }
            if entry.ports.contains(&0) {
                return Err(invalid(field("ports"), "0 is not a valid port".into()));
            }
            if let Some(addr) = entry
                .addresses
                .iter()
                .find(|a| a.is_unspecified() || a.is_multicast())
            {
                return Err(invalid(
                    field("addresses"),
                    format!("{addr} cannot be a provider address"),
                ));
            }
        }
        for (i, selector) in self.interception.bypass.iter().enumerate() {
            selector
                .compile()
                .map_err(|m| invalid(format!("interception.bypass[{i}]"), m))?;
        }
        for (i, selector) in self.audit.content.iter().enumerate() {
            selector
                .compile()
                .map_err(|m| invalid(format!("audit.content[{i}]"), m))?;
        }
        let mut names = HashSet::new();
        let known = if self.rules.iter().any(|r| !r.providers.is_empty()) {
            self.provider_names()
        } else {
            HashSet::new()
        };
        for (i, rule) in self.rules.iter().enumerate() {
            let label = if rule.name.is_empty() {
                format!("rules[{i}]")
            } else {
                format!("rules[{i}] ({})", rule.name)
            };
            rule.compile()
                .map_err(|(field, message)| invalid(format!("{label}.{field}"), message))?;
            if !names.insert(rule.name.as_str()) {
                return Err(invalid(
                    format!("{label}.name"),
                    format!("{:?} is used by an earlier rule", rule.name),
                ));
            }
            if let Some(unknown) = rule.providers.iter().find(|p| !known.contains(p.as_str())) {
                return Err(invalid(
                    format!("{label}.providers"),
                    format!("{unknown:?} is not a provider of this policy (known: {})", {
                        let mut list: Vec<&str> = known.iter().map(String::as_str).collect();
                        list.sort_unstable();
                        list.join(", ")
                    }),
                ));
            }
        }
        if let Some(redis) = &self.budget_store.redis {
            redis
                .validate()
                .map_err(|(field, message)| invalid(format!("budgetStore.redis.{field}"), message))?;
        }
        let ttl = self.interception.leaf_ttl;
        if ttl < Duration::from_secs(600) || ttl > Duration::from_secs(397 * 24 * 3600) {
            return Err(invalid(
                "interception.leafTtl".into(),
                format!("{} is outside 10m..397d", humantime::format_duration(ttl)),
            ));
        }
        let accounting = &self.accounting;
        if accounting.max_request_body_bytes > accounting.request_buffer_budget_bytes {
            return Err(invalid(
                "accounting.maxRequestBodyBytes".into(),
                format!(
                    "{} is larger than requestBufferBudgetBytes {}",
                    accounting.max_request_body_bytes, accounting.request_buffer_budget_bytes
                ),
            ));
        }
        if let Err(e) = self.price_table() {
            return Err(invalid("pricing".into(), e.to_string()));
        }
        let d = &self.discovery;
        if d.min_refresh.is_zero() || d.retry_interval.is_zero() {
            return Err(invalid(
                "discovery".into(),
                "minRefresh and retryInterval must be positive".into(),
            ));
        }
        for (i, name) in d.encrypted_dns_names.iter().enumerate() {
            if let Err(e) = providers::validate_domain_pattern(name) {
                return Err(invalid(format!("discovery.encryptedDnsNames[{i}]"), e));
            }
        }
        if d.dns_max_ttl.is_zero() {
            return Err(invalid("discovery.dnsMaxTtl".into(), "must be positive".into()));
        }
        if d.min_refresh > d.max_refresh {
            return Err(invalid(
                "discovery.minRefresh".into(),
                format!(
                    "{} is longer than maxRefresh {}",
                    humantime::format_duration(d.min_refresh),
                    humantime::format_duration(d.max_refresh)
                ),
            ));
        }
        Ok(())
    }

    /// The built-in price table with the policy's `pricing` applied.
    pub fn price_table(
        &self,
    ) -> Result<interceptor_protocols::PriceTable, interceptor_protocols::pricing::PriceError> {
        let mut table = interceptor_protocols::PriceTable::builtin()?;
        table.apply(&self.pricing)?;
        Ok(table)
    }

    /// The compiled rules (validated by [`Policy::validate`]).
    pub fn compiled_rules(&self) -> Vec<Rule> {
        self.rules.iter().filter_map(|r| r.compile().ok()).collect()
    }

    /// The names of the providers this policy intercepts.
    fn provider_names(&self) -> HashSet<String> {
        self.provider_targets().into_iter().map(|t| t.name).collect()
    }

    /// The compiled `audit.content` selectors and the body limit (validated by [`Policy::validate`]).
    pub fn content_selection(&self) -> ContentSelection {
        ContentSelection {
            matchers: self
                .audit
                .content
                .iter()
                .filter_map(|s| s.compile().ok())
                .collect(),
            max_bytes: self.audit.max_content_bytes,
        }
    }

    /// The compiled bypass selectors (validated by [`Policy::validate`]).
    pub fn bypass_matchers(&self) -> Vec<SelectorMatcher> {
        self.interception
            .bypass
            .iter()
            .filter_map(|s| s.compile().ok())
            .collect()
    }

    /// The provider domains to intercept: the built-in catalog (if enabled) with the policy's entries
    /// replacing or extending it.
    pub fn provider_targets(&self) -> Vec<ProviderTarget> {
        let mut targets: Vec<ProviderTarget> = Vec::new();
        if self.builtin_providers {
            targets.extend(
                providers::BUILTIN_PROVIDERS
                    .iter()
                    .map(|(domain, adapter, name)| ProviderTarget {
                        domain: (*domain).to_owned(),
                        adapter: *adapter,
                        name: (*name).to_owned(),
                        addresses: Vec::new(),
                        ports: default_ports(),
                    }),
            );
        }
        for entry in &self.providers {
            let domain = entry.domain.to_ascii_lowercase();
            let builtin = providers::builtin_provider(&domain);
            let adapter = entry.adapter.or(builtin.map(|(adapter, _)| adapter));
            let Some(adapter) = adapter else { continue };
            let name = entry
                .name
                .clone()
                .or(builtin.map(|(_, name)| name.to_owned()))
                .unwrap_or_else(|| domain.clone());
            let target = ProviderTarget {
                domain: domain.clone(),
                adapter,
                name,
                addresses: entry.addresses.clone(),
                ports: entry.ports.clone(),
            };
            match targets.iter_mut().find(|t| t.domain == domain) {
                Some(existing) => *existing = target,
                None => targets.push(target),
            }
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, "test.yaml")
    }

    const HEADER: &str = "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\n";

    #[test]
    fn builtin_policy_is_valid() {
        let policy = Policy::builtin().expect("built-in policy");
        let targets = policy.provider_targets();
        assert!(
            targets
                .iter()
                .any(|t| t.domain == "api.openai.com" && t.resolvable())
        );
        assert!(
            targets
                .iter()
                .any(|t| t.domain == "*.openai.azure.com" && !t.resolvable())
        );
    }

    #[test]
    fn policy_entries_override_builtins() {
        let policy = parse(&format!(
            "{HEADER}providers:\n  - domain: api.openai.com\n    addresses: [203.0.113.10]\n"
        ))
        .expect("valid");
        let targets = policy.provider_targets();
        let openai: Vec<_> = targets.iter().filter(|t| t.domain == "api.openai.com").collect();
        assert_eq!(openai.len(), 1);
        assert_eq!(openai[0].adapter, Adapter::Openai);
        assert_eq!(
            openai[0].addresses,
            vec!["203.0.113.10".parse::<IpAddr>().expect("ip")]
        );
        assert!(!openai[0].resolvable());
    }

    #[test]
    fn unknown_domain_without_adapter_is_rejected_with_field() {
        let err = parse(&format!("{HEADER}providers:\n  - domain: llm.example.com\n")).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("providers[0].domain"), "{text}");
        assert!(
            text.contains("unknown provider domain \"llm.example.com\""),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_and_versions_are_rejected() {
        let err = parse(&format!("{HEADER}provider: []\n")).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `provider`"), "{err}");
        let err = parse("apiVersion: v2\nkind: InterceptorPolicy\n").expect_err("version");
        assert!(err.to_string().contains("apiVersion"), "{err}");
    }

    #[test]
    fn bypass_selectors_are_validated() {
        let policy = parse(&format!(
            "{HEADER}interception:\n  bypass:\n    - {{exe: \"/usr/bin/*\", uid: 1000}}\n    - {{namespace: legacy, workload: Deployment/pinned}}\n"
        ))
        .expect("valid");
        assert_eq!(policy.bypass_matchers().len(), 2);
        let err = parse(&format!("{HEADER}interception:\n  bypass:\n    - {{}}\n")).expect_err("empty");
        assert!(err.to_string().contains("interception.bypass[0]"), "{err}");
        let err = parse(&format!(
            "{HEADER}interception:\n  bypass:\n    - {{exe: \"[\"}}\n"
        ))
        .expect_err("glob");
        assert!(err.to_string().contains("not a valid glob"), "{err}");
    }

    #[test]
    fn duplicate_domains_and_bad_ports_are_rejected() {
        let dup = format!(
            "{HEADER}providers:\n  - {{domain: a.example.com, adapter: openai}}\n  - {{domain: A.example.com, adapter: openai}}\n"
        );
        assert!(parse(&dup).expect_err("dup").to_string().contains("listed twice"));
        let port =
            format!("{HEADER}providers:\n  - {{domain: a.example.com, adapter: openai, ports: [0]}}\n");
        assert!(
            parse(&port)
                .expect_err("port")
                .to_string()
                .contains("providers[0].ports")
        );
    }
}
