//! Quotas: the policy's rules, their counters, decisions before a request is forwarded, settlement
//! with the real usage after it, and rejections shaped like the provider's own errors.

pub mod cluster;
pub mod engine;
pub mod reject;
pub mod spec;
pub mod store;
pub mod window;

use prometheus::{IntCounterVec, Opts, Registry};

pub use engine::{BudgetKind, BudgetRecord, Decision, Demand, Limited, Permit, QuotaEngine, Rejection};
pub use spec::{Mode, Rule, RuleSpec};

/// Decision metrics.
#[derive(Clone)]
pub struct QuotaMetrics {
    decisions: IntCounterVec,
}

impl QuotaMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "interceptor_quota_decisions_total",
                "Decisions per matching rule: outcome = allowed, rejected, observed (an observe-mode \
                 rule that would have rejected); limit = the limit concerned (none when allowed)",
            ),
            &["rule", "outcome", "limit"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(Self { decisions })
    }

    /// Metrics in a registry of their own (tests, benchmarks).
    pub fn detached() -> prometheus::Result<Self> {
        Self::register(&Registry::new())
    }

    fn count(&self, rule: &str, outcome: &str, limited: Limited) {
        self.decisions
            .with_label_values(&[rule, outcome, limited.name()])
            .inc();
    }

    /// The counter of a rule's allowed requests (resolved once per rule, not per request).
    fn allowed_counter(&self, rule: &str) -> prometheus::IntCounter {
        self.decisions.with_label_values(&[rule, "allowed", "none"])
    }
}
