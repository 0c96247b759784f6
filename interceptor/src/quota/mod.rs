//! Quotas: the policy's rules, their counters, decisions before a request is forwarded, settlement
//! with the real usage after it, and rejections shaped like the provider's own errors.

pub mod cluster;
pub mod engine;
pub mod reject;
pub mod spec;
pub mod store;
pub mod window;

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};

pub use engine::{
    BudgetKind, BudgetRecord, BudgetUsage, Decision, Demand, HardStop, Limited, Permit, QuotaEngine,
    Rejection,
};
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

/// `interceptor_quota_budget_usage_ratio`: each budget's use over its limit, read at scrape time (the
/// "budget at 80%" alert watches it).
pub struct BudgetCollector {
    engine: Arc<QuotaEngine>,
    ratio: GaugeVec,
}

impl BudgetCollector {
    pub fn new(engine: Arc<QuotaEngine>) -> prometheus::Result<Self> {
        let ratio = GaugeVec::new(
            Opts::new(
                "interceptor_quota_budget_usage_ratio",
                "Use of a rule's budget in its current window over the limit (1 = exhausted); scope = the \
                 namespace, workload or pod of a per-scope rule, empty for a shared budget",
            ),
            &["rule", "scope", "budget"],
        )?;
        Ok(Self { engine, ratio })
    }
}

impl Collector for BudgetCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.ratio.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.ratio.reset();
        for usage in self.engine.budget_usage() {
            self.ratio
                .with_label_values(&[
                    usage.rule.as_ref(),
                    usage.scope.as_deref().unwrap_or(""),
                    usage.budget.name(),
                ])
                .set(usage.used / usage.limit);
        }
        self.ratio.collect()
    }
}
