//! Decisions: every rule that selects a request must allow it (all-must-pass, so a team's rule can
//! never lift a global cap). Checks and reservations happen under one lock, so concurrent requests
//! cannot both take the last of a budget; the real usage replaces the reservation when the request
//! ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use interceptor_protocols::Usage;

use super::QuotaMetrics;
use super::spec::{DEFAULT_ESTIMATED_OUTPUT_TOKENS, Mode, Rule, Scope, TokenType};
use super::window::{Bucket, Budget, Calendar, unix_now};
use crate::identity::Identity;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// What a request asks for, as far as it is known before forwarding.
#[derive(Clone, Copy, Debug)]
pub struct Demand<'a> {
    pub provider: &'a str,
    pub model: Option<&'a str>,
    /// Estimated prompt tokens (from the body size).
    pub input_tokens: u64,
    /// `max_tokens` (or equivalent) when the request sets it.
    pub max_output_tokens: Option<u64>,
}

/// Which limit a rejection is about (response shape and headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    Requests,
    Tokens,
    Concurrency,
    TokenBudget,
    CostBudget,
    Model,
    MaxTokens,
}

impl Limited {
    pub fn name(self) -> &'static str {
        match self {
            Limited::Requests => "requests_per_minute",
            Limited::Tokens => "tokens_rate",
            Limited::Concurrency => "max_concurrent",
            Limited::TokenBudget => "tokens_per_day",
            Limited::CostBudget => "cost_budget",
            Limited::Model => "model_denied",
            Limited::MaxTokens => "max_tokens",
        }
    }
}

/// Why a request is (or would have been) rejected.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub rule: Arc<str>,
    pub mode: Mode,
    pub limited: Limited,
    pub message: String,
    /// When to retry (absent for a denied model or too large a request).
    pub retry_after: Option<Duration>,
    /// The limit, what remains and when it is whole again, for `x-ratelimit-*` headers.
    pub limit: Option<f64>,
    pub remaining: Option<f64>,
    pub reset: Option<Duration>,
}

/// The outcome of a decision.
pub enum Decision {
    /// Forward; settle the permit with the real usage when the request ends. `observed` lists the
    /// observe-mode rules that would have rejected it.
    Allow {
        permit: Permit,
        observed: Vec<Rejection>,
    },
    /// Answer with the provider's error shape; nothing was reserved.
    Reject(Rejection),
}

/// The rules in force, indexed: a rule that names one namespace exactly is only tried for pods of
/// that namespace, one that requires a pod label only for pods with that label; the others for every
/// request. Candidates come out in file order.
struct RuleSet {
    rules: Vec<Rule>,
    names: Vec<Arc<str>>,
    /// `allowed` decision counters, resolved once per rule.
    allowed: Vec<prometheus::IntCounter>,
    by_namespace: HashMap<String, Vec<usize>>,
    /// label key → label value → rules.
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
    general: Vec<usize>,
}

impl RuleSet {
    fn new(rules: Vec<Rule>, metrics: &QuotaMetrics) -> Self {
        let mut by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_label: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        let mut general = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let selector = rule.selector.as_ref();
            if let Some(namespace) = selector.and_then(|s| s.exact_namespace()) {
                by_namespace.entry(namespace.to_owned()).or_default().push(i);
            } else if let Some((key, value)) = selector.and_then(|s| s.first_label()) {
                by_label
                    .entry(key.to_owned())
                    .or_default()
                    .entry(value.to_owned())
                    .or_default()
                    .push(i);
            } else {
                general.push(i);
            }
        }
        Self {
            names: rules.iter().map(|r| Arc::from(r.name.as_str())).collect(),
            allowed: rules.iter().map(|r| metrics.allowed_counter(&r.name)).collect(),
            rules,
            by_namespace,
            by_label,
            general,
        }
    }

    /// Indices of the rules that may select a request from `pod`, in file order.
    fn candidates(&self, pod: Option<&crate::kubernetes::PodIdentity>) -> Vec<usize> {
        let mut candidates = self.general.clone();
        if let Some(pod) = pod {
            if let Some(rules) = self.by_namespace.get(&*pod.namespace) {
                candidates.extend_from_slice(rules);
            }
            if !self.by_label.is_empty() {
                for (key, value) in pod.labels.iter() {
                    if let Some(rules) = self.by_label.get(&**key).and_then(|values| values.get(&**value)) {
                        candidates.extend_from_slice(rules);
                    }
                }
            }
            candidates.sort_unstable();
        }
        candidates
    }
}

/// Counters by rule and scope (a fast hash: keys are short and come from the policy and the cluster's
/// own objects).
type StateMap = HashMap<StateKey, RuleState, rustc_hash::FxBuildHasher>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StateKey {
    rule: Arc<str>,
    scope: Option<Arc<str>>,
}

/// Counters of one rule (and scope).
#[derive(Debug, Default)]
struct RuleState {
    requests: Option<Bucket>,
    tokens_minute: Option<Bucket>,
    tokens_hour: Option<Bucket>,
    tokens_day: Option<Budget>,
    cost_day: Option<Budget>,
    cost_month: Option<Budget>,
    in_flight: u32,
}

impl RuleState {
    /// The day and month budgets, by kind.
    fn budgets(&self) -> [(BudgetKind, Option<&Budget>); 3] {
        [
            (BudgetKind::TokensDay, self.tokens_day.as_ref()),
            (BudgetKind::CostDay, self.cost_day.as_ref()),
            (BudgetKind::CostMonth, self.cost_month.as_ref()),
        ]
    }

    /// Creates, updates or drops windows to match the rule's current limits.
    fn sync(&mut self, rule: &Rule, now: Instant, unix: u64) {
        let limits = &rule.limits;
        sync_bucket(&mut self.requests, limits.requests_per_minute, MINUTE, now);
        sync_bucket(&mut self.tokens_minute, limits.tokens_per_minute, MINUTE, now);
        sync_bucket(&mut self.tokens_hour, limits.tokens_per_hour, HOUR, now);
        sync_budget(&mut self.tokens_day, limits.tokens_per_day, Calendar::Day, unix);
        sync_budget(&mut self.cost_day, limits.cost_per_day_usd, Calendar::Day, unix);
        sync_budget(
            &mut self.cost_month,
            limits.cost_per_month_usd,
            Calendar::Month,
            unix,
        );
    }
}

fn sync_bucket(slot: &mut Option<Bucket>, limit: Option<f64>, period: Duration, now: Instant) {
    match (slot.as_mut(), limit) {
        (Some(bucket), Some(limit)) => bucket.set_capacity(limit, period, now),
        (None, Some(limit)) => *slot = Some(Bucket::new(limit, period, now)),
        (_, None) => *slot = None,
    }
}

fn sync_budget(slot: &mut Option<Budget>, limit: Option<f64>, calendar: Calendar, unix: u64) {
    match (slot.as_mut(), limit) {
        (Some(budget), Some(limit)) => budget.set_limit(limit),
        (None, Some(limit)) => *slot = Some(Budget::new(calendar, limit, unix)),
        (_, None) => *slot = None,
    }
}

/// What was reserved for one rule.
#[derive(Debug)]
struct Reservation {
    key: StateKey,
    token_type: TokenType,
    tokens: f64,
    cost: f64,
    /// Input tokens of the request (what a live count adds output to).
    input: f64,
    /// The rule's budgets may end a running stream (`hardBudgets`, enforce mode).
    hard: bool,
}

/// A hard budget that a running stream's live output crossed.
#[derive(Clone, Debug, PartialEq)]
pub struct HardStop {
    pub rule: Arc<str>,
    pub limited: Limited,
    pub message: String,
}

/// The rules and their counters. Counters are keyed by rule name, so they survive a reload that
/// keeps the name.
pub struct QuotaEngine {
    rules: ArcSwap<RuleSet>,
    state: Mutex<StateMap>,
    metrics: QuotaMetrics,
    /// Bumped by every settlement: the durable store writes only when it moved.
    changes: std::sync::atomic::AtomicU64,
    /// Set while the cluster-wide budget store is unreachable and the policy says `reject`.
    cluster_unavailable: std::sync::atomic::AtomicBool,
}

/// Which budget a durable record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    TokensDay,
    CostDay,
    CostMonth,
}

/// A budget's use in its window, as the durable store keeps it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BudgetRecord {
    pub rule: String,
    pub scope: Option<String>,
    pub budget: BudgetKind,
    /// Days (or months) since the epoch, UTC.
    pub window: u64,
    pub used: f64,
}

/// A budget's use against its limit, now.
#[derive(Clone, Debug)]
pub struct BudgetUsage {
    pub rule: Arc<str>,
    pub scope: Option<Arc<str>>,
    pub budget: BudgetKind,
    pub used: f64,
    pub limit: f64,
}

impl BudgetKind {
    /// The label value (as in the durable store).
    pub fn name(self) -> &'static str {
        match self {
            BudgetKind::TokensDay => "tokens_day",
            BudgetKind::CostDay => "cost_day",
            BudgetKind::CostMonth => "cost_month",
        }
    }
}

impl QuotaEngine {
    pub fn new(rules: Vec<Rule>, metrics: QuotaMetrics) -> Self {
        Self {
            rules: ArcSwap::from_pointee(RuleSet::new(rules, &metrics)),
            state: Mutex::new(StateMap::default()),
            metrics,
            changes: std::sync::atomic::AtomicU64::new(0),
            cluster_unavailable: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes every budget's use not yet pushed to the cluster-wide store (zero deltas included: the
    /// push also reads the other nodes' use of every budget this node knows).
    pub fn take_cluster_deltas(&self) -> Vec<BudgetRecord> {
        let unix = unix_now();
        let mut state = self.state();
        let mut deltas = Vec::new();
        for (key, entry) in state.iter_mut() {
            for (kind, budget) in [
                (BudgetKind::TokensDay, entry.tokens_day.as_mut()),
                (BudgetKind::CostDay, entry.cost_day.as_mut()),
                (BudgetKind::CostMonth, entry.cost_month.as_mut()),
            ] {
                if let Some(budget) = budget {
                    let delta = budget.take_unsynced(unix);
                    deltas.push(BudgetRecord {
                        rule: key.rule.to_string(),
                        scope: key.scope.as_deref().map(str::to_owned),
                        budget: kind,
                        window: budget.window(),
                        used: delta,
                    });
                }
            }
        }
        deltas
    }

    /// Applies the cluster-wide totals read back after a push (`used` = every node's use).
    pub fn apply_cluster_totals(&self, totals: &[BudgetRecord]) {
        self.with_budgets(totals, |budget, record| {
            budget.set_cluster_used(record.window, record.used)
        });
    }

    /// Gives back deltas whose push failed (they go with the next one).
    pub fn return_cluster_deltas(&self, deltas: &[BudgetRecord]) {
        self.with_budgets(deltas, |budget, record| {
            budget.return_unsynced(record.window, record.used)
        });
    }

    fn with_budgets(&self, records: &[BudgetRecord], apply: impl Fn(&mut Budget, &BudgetRecord)) {
        let mut state = self.state();
        for record in records {
            let key = StateKey {
                rule: Arc::from(record.rule.as_str()),
                scope: record.scope.as_deref().map(Arc::from),
            };
            let Some(entry) = state.get_mut(&key) else {
                continue;
            };
            let budget = match record.budget {
                BudgetKind::TokensDay => entry.tokens_day.as_mut(),
                BudgetKind::CostDay => entry.cost_day.as_mut(),
                BudgetKind::CostMonth => entry.cost_month.as_mut(),
            };
            if let Some(budget) = budget {
                apply(budget, record);
            }
        }
    }

    /// While the cluster-wide store cannot be reached and the policy says `reject`, budgeted rules
    /// reject.
    pub fn set_cluster_unavailable(&self, unavailable: bool) {
        self.cluster_unavailable
            .store(unavailable, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many settlements so far (the durable store compares it with what it wrote).
    pub fn generation(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Each budget's use against its limit in the current window (for the usage gauge).
    pub fn budget_usage(&self) -> Vec<BudgetUsage> {
        let unix = unix_now();
        let state = self.state();
        let mut usage = Vec::new();
        for (key, entry) in state.iter() {
            for (kind, budget) in entry.budgets() {
                if let Some(budget) = budget.filter(|b| b.limit() > 0.0) {
                    usage.push(BudgetUsage {
                        rule: key.rule.clone(),
                        scope: key.scope.clone(),
                        budget: kind,
                        used: budget.used_at(unix),
                        limit: budget.limit(),
                    });
                }
            }
        }
        usage
    }

    /// The budgets' use, for the durable store.
    pub fn snapshot(&self) -> Vec<BudgetRecord> {
        let state = self.state();
        let mut records = Vec::new();
        for (key, entry) in state.iter() {
            for (kind, budget) in entry.budgets() {
                if let Some(budget) = budget.filter(|b| b.used() > 0.0) {
                    records.push(BudgetRecord {
                        rule: key.rule.to_string(),
                        scope: key.scope.as_deref().map(str::to_owned),
                        budget: kind,
                        window: budget.window(),
                        used: budget.used(),
                    });
                }
            }
        }
        records
    }

    /// Restores budgets written before a restart: records of rules that still have that budget, in
    /// the current window.
    pub fn restore(&self, records: &[BudgetRecord]) -> usize {
        let set = self.rules.load();
        let rules = &set.rules;
        let now = Instant::now();
        let unix = unix_now();
        let mut state = self.state();
        let mut restored = 0;
        for record in records {
            let Some(rule) = rules.iter().find(|r| r.name == record.rule) else {
                continue;
            };
            let key = StateKey {
                rule: Arc::from(record.rule.as_str()),
                scope: record.scope.as_deref().map(Arc::from),
            };
            let entry = state.entry(key).or_default();
            entry.sync(rule, now, unix);
            let budget = match record.budget {
                BudgetKind::TokensDay => entry.tokens_day.as_mut(),
                BudgetKind::CostDay => entry.cost_day.as_mut(),
                BudgetKind::CostMonth => entry.cost_month.as_mut(),
            };
            if let Some(budget) = budget
                && budget.window() == record.window
            {
                budget.restore(record.window, record.used);
                restored += 1;
            }
        }
        restored
    }

    /// Swaps the rules (a reload). Requests in flight settle against the counters they reserved.
    pub fn replace_rules(&self, rules: Vec<Rule>) {
        self.rules.store(Arc::new(RuleSet::new(rules, &self.metrics)));
    }

    /// The rules in force, for `interceptor status`.
    pub fn rule_views(&self) -> Vec<crate::status::RuleView> {
        self.rules
            .load()
            .rules
            .iter()
            .map(|rule| crate::status::RuleView {
                name: rule.name.clone(),
                mode: rule.mode.name().to_owned(),
                per: rule.per.name().to_owned(),
                limits: rule.summary(),
            })
            .collect()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.load().rules.len()
    }

    fn state(&self) -> MutexGuard<'_, StateMap> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides a request. `estimate_cost(input, output)` prices a token count for the request's model
    /// (0 when it has no price).
    pub fn decide(
        self: &Arc<Self>,
        identity: &Identity<'_>,
        demand: &Demand<'_>,
        estimate_cost: &dyn Fn(u64, u64) -> f64,
    ) -> Decision {
        let set = self.rules.load();
        let mut matching = set.candidates(identity.pod);
        matching.retain(|&i| {
            let rule = &set.rules[i];
            (rule.providers.is_empty() || rule.providers.iter().any(|p| p == demand.provider))
                && rule.selector.as_ref().is_none_or(|s| s.matches(identity))
        });
        if matching.is_empty() {
            return Decision::Allow {
                permit: Permit::empty(self.clone()),
                observed: Vec::new(),
            };
        }
        let now = Instant::now();
        let unix = unix_now();
        let mut planned = Vec::with_capacity(matching.len());
        let mut observed = Vec::new();
        // Models and request size first: a denied model is reported as such whatever the counters say.
        for &i in &matching {
            let rule = &set.rules[i];
            if let Some(rejection) = check_request(rule, demand) {
                match rule.mode {
                    Mode::Enforce => {
                        self.metrics.count(&rule.name, "rejected", rejection.limited);
                        return Decision::Reject(rejection);
                    }
                    Mode::Observe => observed.push(rejection),
                }
            }
        }
        let mut priced: Option<(u64, f64)> = None;
        let mut state = self.state();
        for &i in &matching {
            let rule = &set.rules[i];
            let key = StateKey {
                rule: set.names[i].clone(),
                scope: scope_key(rule.per, identity),
            };
            let limits = &rule.limits;
            let output = demand
                .max_output_tokens
                .or(limits.max_tokens_per_request)
                .or(limits.estimated_output_tokens)
                .unwrap_or(DEFAULT_ESTIMATED_OUTPUT_TOKENS);
            let tokens = match limits.token_type {
                TokenType::Total => demand.input_tokens + output,
                TokenType::Input => demand.input_tokens,
                TokenType::Output => output,
            } as f64;
            let cost = if limits.cost_per_day_usd.is_some() || limits.cost_per_month_usd.is_some() {
                match priced {
                    Some((priced_output, cost)) if priced_output == output => cost,
                    _ => {
                        let cost = estimate_cost(demand.input_tokens, output);
                        priced = Some((output, cost));
                        cost
                    }
                }
            } else {
                0.0
            };
            let entry = state.entry(key.clone()).or_default();
            entry.sync(rule, now, unix);
            if self
                .cluster_unavailable
                .load(std::sync::atomic::Ordering::Relaxed)
                && (entry.tokens_day.is_some() || entry.cost_day.is_some() || entry.cost_month.is_some())
            {
                let rejection = RejectionOf { rule }.make(
                    Limited::CostBudget,
                    format!(
                        "The cluster-wide budget of policy rule `{}` cannot be checked right now.",
                        rule.name
                    ),
                    Some(Duration::from_secs(5)),
                    None,
                    None,
                    None,
                );
                match rule.mode {
                    Mode::Enforce => {
                        self.metrics.count(&rule.name, "rejected", rejection.limited);
                        return Decision::Reject(rejection);
                    }
                    Mode::Observe => observed.push(rejection),
                }
            }
            if let Some(rejection) = check_counters(rule, entry, tokens, cost, now, unix) {
                match rule.mode {
                    Mode::Enforce => {
                        self.metrics.count(&rule.name, "rejected", rejection.limited);
                        return Decision::Reject(rejection);
                    }
                    Mode::Observe => observed.push(rejection),
                }
            }
            let hard = limits.hard_budgets && rule.mode == Mode::Enforce;
            planned.push((key, limits.token_type, tokens, cost, hard));
        }
        // Every enforcing rule allows it: reserve on all of them.
        let mut reservations = Vec::with_capacity(planned.len());
        for (key, token_type, tokens, cost, hard) in planned {
            if let Some(entry) = state.get_mut(&key) {
                reserve(entry, tokens, cost, now, unix);
            }
            reservations.push(Reservation {
                key,
                token_type,
                tokens,
                cost,
                input: demand.input_tokens as f64,
                hard,
            });
        }
        drop(state);
        for &i in &matching {
            let rule = &set.rules[i];
            match observed.iter().find(|o| *o.rule == *rule.name) {
                Some(o) => self.metrics.count(&rule.name, "observed", o.limited),
                None => set.allowed[i].inc(),
            }
        }
        Decision::Allow {
            permit: Permit {
                engine: self.clone(),
                reservations,
                done: false,
            },
            observed,
        }
    }

    /// The first hard budget that `live_output` tokens (so far, in a running stream) take over its
    /// limit, counting every other reservation. A request admitted with room for its reservation
    /// crosses only when it outgrows it; one admitted on an untouched budget whatever its estimate may
    /// cross sooner. Live cost is the reservation's cost scaled by the live tokens over the reserved
    /// ones.
    fn hard_stop(&self, reservations: &[Reservation], live_output: f64) -> Option<HardStop> {
        let state = self.state();
        for reservation in reservations.iter().filter(|r| r.hard) {
            let Some(entry) = state.get(&reservation.key) else {
                continue;
            };
            let live_tokens = match reservation.token_type {
                TokenType::Total => reservation.input + live_output,
                TokenType::Input => reservation.input,
                TokenType::Output => live_output,
            };
            let stop = |limited: Limited, what: &str| {
                self.metrics.count(&reservation.key.rule, "cut", limited);
                Some(HardStop {
                    rule: reservation.key.rule.clone(),
                    limited,
                    message: format!(
                        "The response was ended: it took the {what} of policy rule `{}` over its limit.",
                        reservation.key.rule
                    ),
                })
            };
            if entry
                .tokens_day
                .as_ref()
                .is_some_and(|b| b.crossed_by(reservation.tokens, live_tokens))
            {
                return stop(Limited::TokenBudget, "daily token budget");
            }
            let live_cost = if reservation.tokens > 0.0 {
                reservation.cost * live_tokens / reservation.tokens
            } else {
                reservation.cost
            };
            for (budget, what) in [
                (&entry.cost_day, "daily cost budget"),
                (&entry.cost_month, "monthly cost budget"),
            ] {
                if budget
                    .as_ref()
                    .is_some_and(|b| b.crossed_by(reservation.cost, live_cost))
                {
                    return stop(Limited::CostBudget, what);
                }
            }
        }
        None
    }

    fn settle(&self, reservations: &[Reservation], usage: Option<&Usage>, cost_usd: f64) {
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let unix = unix_now();
        let mut state = self.state();
        for reservation in reservations {
            let Some(entry) = state.get_mut(&reservation.key) else {
                continue;
            };
            let tokens = usage.map_or(0.0, |u| match reservation.token_type {
                TokenType::Total => (u.input_tokens + u.output_tokens) as f64,
                TokenType::Input => u.input_tokens as f64,
                TokenType::Output => u.output_tokens as f64,
            });
            for bucket in [entry.tokens_minute.as_mut(), entry.tokens_hour.as_mut()]
                .into_iter()
                .flatten()
            {
                bucket.settle(reservation.tokens, tokens, now);
            }
            if let Some(budget) = entry.tokens_day.as_mut() {
                budget.settle(reservation.tokens, tokens, unix);
            }
            for budget in [entry.cost_day.as_mut(), entry.cost_month.as_mut()]
                .into_iter()
                .flatten()
            {
                budget.settle(reservation.cost, cost_usd, unix);
            }
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

fn scope_key(per: Scope, identity: &Identity<'_>) -> Option<Arc<str>> {
    let pod = identity.pod;
    let key = match per {
        Scope::Rule => return None,
        Scope::Namespace => pod.map(|p| p.namespace.to_string()),
        Scope::Workload => pod.map(|p| format!("{}/{}", p.namespace, p.workload)),
        Scope::Pod => pod.map(|p| format!("{}/{}", p.namespace, p.name)),
    };
    // Not a (known) pod: its cgroup stands for it.
    Some(Arc::from(key.unwrap_or_else(|| {
        identity
            .details
            .cgroup
            .clone()
            .unwrap_or_else(|| format!("cgroup-id:{}", identity.facts.cgroup_id))
    })))
}

/// Makes the rejections of one rule.
struct RejectionOf<'a> {
    rule: &'a Rule,
}

impl RejectionOf<'_> {
    /// A rejection by a token bucket: retry when it refills, with its limit and state for headers.
    fn by_bucket(
        &self,
        limited: Limited,
        message: String,
        wait: Duration,
        bucket: &mut Bucket,
        now: Instant,
    ) -> Rejection {
        let (limit, remaining, reset) = (bucket.capacity(), bucket.remaining(now), bucket.reset_after(now));
        self.make(
            limited,
            message,
            Some(wait),
            Some(limit),
            Some(remaining),
            Some(reset),
        )
    }

    fn make(
        &self,
        limited: Limited,
        message: String,
        retry_after: Option<Duration>,
        limit: Option<f64>,
        remaining: Option<f64>,
        reset: Option<Duration>,
    ) -> Rejection {
        Rejection {
            rule: Arc::from(self.rule.name.as_str()),
            mode: self.rule.mode,
            limited,
            message,
            retry_after,
            limit,
            remaining,
            reset,
        }
    }
}

/// What the request itself breaks (model, size), whatever the counters.
fn check_request(rule: &Rule, demand: &Demand<'_>) -> Option<Rejection> {
    let reject = RejectionOf { rule };
    if !rule.model_allowed(demand.model) {
        let model = demand.model.unwrap_or("(unknown)");
        return Some(reject.make(
            Limited::Model,
            format!(
                "The model `{model}` is not allowed by policy rule `{}`.",
                rule.name
            ),
            None,
            None,
            None,
            None,
        ));
    }
    if let (Some(max), Some(asked)) = (rule.limits.max_tokens_per_request, demand.max_output_tokens)
        && asked > max
    {
        return Some(reject.make(
            Limited::MaxTokens,
            format!(
                "max_tokens {asked} is above the {max} allowed by policy rule `{}`.",
                rule.name
            ),
            None,
            Some(max as f64),
            None,
            None,
        ));
    }
    None
}

/// The first counter the request would overrun, if any.
fn check_counters(
    rule: &Rule,
    entry: &mut RuleState,
    tokens: f64,
    cost: f64,
    now: Instant,
    unix: u64,
) -> Option<Rejection> {
    let reject = RejectionOf { rule };
    if let Some(max) = rule.limits.max_concurrent
        && entry.in_flight >= max
    {
        return Some(reject.make(
            Limited::Concurrency,
            format!(
                "Too many concurrent requests: {max} allowed by policy rule `{}`.",
                rule.name
            ),
            Some(Duration::from_secs(1)),
            Some(f64::from(max)),
            Some(0.0),
            Some(Duration::from_secs(1)),
        ));
    }
    if let Some(bucket) = entry.requests.as_mut()
        && let Err(wait) = bucket.check(1.0, now)
    {
        let message = format!(
            "Rate limit reached: {} requests per minute allowed by policy rule `{}`. Please try again in {:.1}s.",
            bucket.capacity(),
            rule.name,
            wait.as_secs_f64()
        );
        return Some(reject.by_bucket(Limited::Requests, message, wait, bucket, now));
    }
    for (bucket, per) in [
        (entry.tokens_minute.as_mut(), "minute"),
        (entry.tokens_hour.as_mut(), "hour"),
    ] {
        if let Some(bucket) = bucket
            && let Err(wait) = bucket.check(tokens, now)
        {
            let message = format!(
                "Rate limit reached: {} tokens per {per} allowed by policy rule `{}` (this request reserves {tokens}). Please try again in {:.1}s.",
                bucket.capacity(),
                rule.name,
                wait.as_secs_f64()
            );
            return Some(reject.by_bucket(Limited::Tokens, message, wait, bucket, now));
        }
    }
    if let Some(budget) = entry.tokens_day.as_mut()
        && let Err(wait) = budget.check(tokens, unix)
    {
        return Some(reject.make(
            Limited::TokenBudget,
            format!(
                "You exceeded your daily token budget of {} set by policy rule `{}`.",
                budget.limit(),
                rule.name
            ),
            Some(wait),
            Some(budget.limit()),
            Some(budget.remaining()),
            Some(wait),
        ));
    }
    for (budget, period) in [
        (entry.cost_day.as_mut(), "daily"),
        (entry.cost_month.as_mut(), "monthly"),
    ] {
        if let Some(budget) = budget
            && let Err(wait) = budget.check(cost, unix)
        {
            return Some(reject.make(
                Limited::CostBudget,
                format!(
                    "You exceeded your {period} budget of ${:.2} set by policy rule `{}`.",
                    budget.limit(),
                    rule.name
                ),
                Some(wait),
                None,
                None,
                Some(wait),
            ));
        }
    }
    None
}

fn reserve(entry: &mut RuleState, tokens: f64, cost: f64, now: Instant, unix: u64) {
    if let Some(bucket) = entry.requests.as_mut() {
        bucket.take(1.0, now);
    }
    for bucket in [entry.tokens_minute.as_mut(), entry.tokens_hour.as_mut()]
        .into_iter()
        .flatten()
    {
        bucket.take(tokens, now);
    }
    if let Some(budget) = entry.tokens_day.as_mut() {
        budget.reserve(tokens, unix);
    }
    for budget in [entry.cost_day.as_mut(), entry.cost_month.as_mut()]
        .into_iter()
        .flatten()
    {
        budget.reserve(cost, unix);
    }
    entry.in_flight += 1;
}

/// Reservations of an admitted request. Settle it with the real usage; dropped unsettled (the
/// request failed before any usage), it gives the reservation back.
pub struct Permit {
    engine: Arc<QuotaEngine>,
    reservations: Vec<Reservation>,
    done: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("reservations", &self.reservations)
            .finish()
    }
}

impl Permit {
    fn empty(engine: Arc<QuotaEngine>) -> Self {
        Self {
            engine,
            reservations: Vec::new(),
            done: true,
        }
    }

    /// Replaces the reservations by the real usage and cost.
    pub fn settle(mut self, usage: Option<&Usage>, cost_usd: f64) {
        if !self.done {
            self.engine.settle(&self.reservations, usage, cost_usd);
            self.done = true;
        }
    }

    /// Whether any rule reserved something.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// Whether a rule with hard budgets admitted the request (its stream is watched live).
    pub fn has_hard_budgets(&self) -> bool {
        self.reservations.iter().any(|r| r.hard)
    }

    /// The hard budget the stream's live output (tokens so far) crosses, if any.
    pub fn hard_stop(&self, live_output_tokens: u64) -> Option<HardStop> {
        self.engine
            .hard_stop(&self.reservations, live_output_tokens as f64)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.engine.settle(&self.reservations, None, 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::identity::{KernelFacts, ProcessDetails};
    use crate::kubernetes::{PodIdentity, Workload, WorkloadSource};
    use crate::quota::spec::RuleSpec;

    fn rules(yaml: &str) -> Vec<Rule> {
        let specs: Vec<RuleSpec> = serde_norway::from_str(yaml).expect("rules parse");
        specs
            .iter()
            .map(|s| s.compile().expect("rule compiles"))
            .collect()
    }

    fn engine(yaml: &str) -> Arc<QuotaEngine> {
        Arc::new(QuotaEngine::new(
            rules(yaml),
            QuotaMetrics::detached().expect("metrics"),
        ))
    }

    fn facts() -> KernelFacts {
        KernelFacts {
            original_dst: "203.0.113.10:443".parse().expect("addr"),
            tgid: 7,
            pid: 7,
            uid: 1000,
            gid: 1000,
            cgroup_id: 42,
            netns_cookie: 1,
            socket_cookie: 1,
            comm: "python3".into(),
        }
    }

    fn pod(namespace: &str, name: &str) -> PodIdentity {
        PodIdentity {
            uid: format!("uid-{name}").into(),
            namespace: namespace.into(),
            name: name.into(),
            labels: Box::new([]),
            service_account: None,
            node: None,
            workload: Workload::new("Deployment", name),
            workload_source: WorkloadSource::Resolved,
        }
    }

    fn demand(model: &str, max: Option<u64>) -> Demand<'_> {
        Demand {
            provider: "openai",
            model: Some(model),
            input_tokens: 100,
            max_output_tokens: max,
        }
    }

    fn decide(engine: &Arc<QuotaEngine>, pod: Option<&PodIdentity>, demand: &Demand<'_>) -> Decision {
        let (facts, details) = (
            facts(),
            ProcessDetails {
                exe: Some(PathBuf::from("/usr/bin/python3")),
                ..ProcessDetails::default()
            },
        );
        let identity = Identity {
            facts: &facts,
            details: &details,
            pod,
        };
        engine.decide(&identity, demand, &|input, output| (input + output) as f64 * 1e-6)
    }

    fn rejected(decision: &Decision) -> Option<(&str, Limited)> {
        match decision {
            Decision::Reject(r) => Some((&*r.rule, r.limited)),
            Decision::Allow { .. } => None,
        }
    }

    #[test]
    fn every_matching_rule_must_allow() {
        let engine = engine(
            "[{name: global, limits: {requestsPerMinute: 3}},
              {name: team-a, match: {namespace: team-a}, limits: {requestsPerMinute: 1}}]",
        );
        let a = pod("team-a", "chat");
        let b = pod("team-b", "batch");
        let first = decide(&engine, Some(&a), &demand("gpt-4o", Some(10)));
        assert!(rejected(&first).is_none());
        drop(first);
        assert_eq!(
            rejected(&decide(&engine, Some(&a), &demand("gpt-4o", Some(10)))),
            Some(("team-a", Limited::Requests)),
            "the team rule applies on top of the global one"
        );
        for _ in 0..2 {
            assert!(rejected(&decide(&engine, Some(&b), &demand("gpt-4o", Some(10)))).is_none());
        }
        assert_eq!(
            rejected(&decide(&engine, Some(&b), &demand("gpt-4o", Some(10)))),
            Some(("global", Limited::Requests)),
            "the global budget is shared"
        );
    }

    #[test]
    fn models_and_max_tokens_are_checked_before_counters() {
        let engine = engine(
            "[{name: models, models: {allow: [\"gpt-4o*\"], deny: [\"gpt-4o-2024-*\"]}, limits: {maxTokensPerRequest: 500}}]",
        );
        assert!(rejected(&decide(&engine, None, &demand("gpt-4o-mini", Some(100)))).is_none());
        assert_eq!(
            rejected(&decide(&engine, None, &demand("o1", None))),
            Some(("models", Limited::Model))
        );
        assert_eq!(
            rejected(&decide(&engine, None, &demand("gpt-4o-2024-08-06", None))),
            Some(("models", Limited::Model))
        );
        assert_eq!(
            rejected(&decide(&engine, None, &demand("gpt-4o", Some(501)))),
            Some(("models", Limited::MaxTokens))
        );
    }

    #[test]
    fn a_denied_model_is_reported_as_denied_even_when_rate_limited() {
        let engine = engine(
            "[{name: rate, limits: {requestsPerMinute: 1}}, {name: models, models: {deny: [\"o1*\"]}}]",
        );
        let _first = decide(&engine, None, &demand("gpt-4o", None));
        assert_eq!(
            rejected(&decide(&engine, None, &demand("o1", None))),
            Some(("models", Limited::Model))
        );
        assert_eq!(
            rejected(&decide(&engine, None, &demand("gpt-4o", None))),
            Some(("rate", Limited::Requests))
        );
    }

    #[test]
    fn indexed_rules_apply_in_file_order() {
        let engine = engine(
            "[{name: by-label, match: {podLabels: {tier: web}}, limits: {requestsPerMinute: 1}},
              {name: by-namespace, match: {namespace: team-a}, limits: {requestsPerMinute: 1}},
              {name: everyone, limits: {requestsPerMinute: 100}}]",
        );
        let mut web = pod("team-a", "x");
        web.labels = vec![("tier".into(), "web".into())].into_boxed_slice();
        let _ = decide(&engine, Some(&web), &demand("m", None));
        assert_eq!(
            rejected(&decide(&engine, Some(&web), &demand("m", None))),
            Some(("by-label", Limited::Requests)),
            "the first rule in the file that rejects is named"
        );
        let plain = pod("team-a", "y");
        assert_eq!(
            rejected(&decide(&engine, Some(&plain), &demand("m", None))),
            Some(("by-namespace", Limited::Requests)),
            "the label rule does not select a pod without the label"
        );
        assert!(rejected(&decide(&engine, Some(&pod("team-b", "z")), &demand("m", None))).is_none());
    }

    #[test]
    fn observe_mode_counts_but_lets_traffic_pass() {
        let engine = engine("[{name: watch, mode: observe, limits: {requestsPerMinute: 1}}]");
        let _first = decide(&engine, None, &demand("gpt-4o", None));
        match decide(&engine, None, &demand("gpt-4o", None)) {
            Decision::Allow { observed, .. } => {
                assert_eq!(observed.len(), 1);
                assert_eq!(observed[0].limited, Limited::Requests);
            }
            Decision::Reject(r) => panic!("observe mode rejected: {r:?}"),
        }
    }

    #[test]
    fn counters_split_per_scope() {
        let engine = engine("[{name: per-ns, per: namespace, limits: {requestsPerMinute: 1}}]");
        let (a, b) = (pod("team-a", "x"), pod("team-b", "y"));
        let _ = decide(&engine, Some(&a), &demand("m", None));
        assert!(rejected(&decide(&engine, Some(&a), &demand("m", None))).is_some());
        assert!(rejected(&decide(&engine, Some(&b), &demand("m", None))).is_none());
    }

    #[test]
    fn reservations_are_replaced_by_usage_and_given_back_on_failure() {
        let engine = engine("[{name: tokens, limits: {tokensPerDay: 1000}}]");
        // Reserves 100 input + 400 output.
        let Decision::Allow { permit, .. } = decide(&engine, None, &demand("m", Some(400))) else {
            panic!("allowed")
        };
        let Decision::Allow { permit: second, .. } = decide(&engine, None, &demand("m", Some(400))) else {
            panic!("allowed")
        };
        assert_eq!(
            rejected(&decide(&engine, None, &demand("m", Some(400)))),
            Some(("tokens", Limited::TokenBudget)),
            "500 + 500 reserved: a third does not fit"
        );
        drop(second); // failed upstream: its reservation comes back
        let usage = Usage {
            input_tokens: 90,
            output_tokens: 10,
            ..Usage::default()
        };
        permit.settle(Some(&usage), 0.0);
        // 100 used, 900 left: a request reserving 500 fits, a second one does too (900 ≥ 1000 - 100).
        assert!(rejected(&decide(&engine, None, &demand("m", Some(400)))).is_none());
    }

    #[test]
    fn hard_budgets_stop_a_stream_that_outgrows_its_reservation() {
        let hard = engine("[{name: hard, limits: {tokensPerDay: 1000, hardBudgets: true}}]");
        // Reserves 100 input + 400 output; another request holds 400 more.
        let Decision::Allow { permit, .. } = decide(&hard, None, &demand("m", Some(400))) else {
            panic!("allowed")
        };
        let Decision::Allow { permit: other, .. } = decide(&hard, None, &demand("m", Some(300))) else {
            panic!("allowed")
        };
        assert!(permit.has_hard_budgets());
        // Within its reservation, and up to the limit with the other one's reservation counted.
        assert_eq!(permit.hard_stop(400), None);
        assert_eq!(
            permit.hard_stop(500),
            None,
            "100 + 500 + 400 = 1000: at the limit, not over"
        );
        let stop = permit.hard_stop(501).expect("crosses the daily budget");
        assert_eq!((&*stop.rule, stop.limited), ("hard", Limited::TokenBudget));
        assert!(stop.message.contains("`hard`"), "{}", stop.message);
        // The other request settled small: more room for the stream.
        other.settle(
            Some(&Usage {
                input_tokens: 100,
                output_tokens: 0,
                ..Usage::default()
            }),
            0.0,
        );
        assert_eq!(permit.hard_stop(700), None, "100 used + 100 + 700 = 900");
        assert!(permit.hard_stop(801).is_some());

        // Without `hardBudgets` (or in observe mode) a stream is never stopped.
        let soft = engine(
            "[{name: soft, limits: {tokensPerDay: 1000}}, {name: watch, mode: observe, limits: {tokensPerDay: 10, hardBudgets: true}}]",
        );
        let Decision::Allow { permit, .. } = decide(&soft, None, &demand("m", Some(400))) else {
            panic!("allowed")
        };
        assert!(!permit.has_hard_budgets());
        assert_eq!(permit.hard_stop(1_000_000), None);
    }

    #[test]
    fn hard_cost_budgets_extrapolate_the_reserved_cost() {
        // The test prices every token at 1e-6 USD: 500 reserved tokens cost 0.0005.
        let spend = engine("[{name: spend, limits: {costPerDayUsd: 0.001, hardBudgets: true}}]");
        let Decision::Allow { permit, .. } = decide(&spend, None, &demand("m", Some(400))) else {
            panic!("allowed")
        };
        assert_eq!(permit.hard_stop(890), None, "990 tokens: under 0.001");
        let stop = permit.hard_stop(1000).expect("over the daily cost budget");
        assert_eq!(stop.limited, Limited::CostBudget);
    }

    #[test]
    fn concurrency_is_released_by_settlement() {
        let engine = engine("[{name: one-at-a-time, limits: {maxConcurrent: 1}}]");
        let Decision::Allow { permit, .. } = decide(&engine, None, &demand("m", None)) else {
            panic!("allowed")
        };
        assert_eq!(
            rejected(&decide(&engine, None, &demand("m", None))),
            Some(("one-at-a-time", Limited::Concurrency))
        );
        permit.settle(None, 0.0);
        assert!(rejected(&decide(&engine, None, &demand("m", None))).is_none());
    }

    #[test]
    fn racing_threads_never_overspend_a_budget() {
        // 8 threads × 50 requests reserving 100 + 1024 tokens each against 20,000 tokens a day: at most
        // floor(20000 / 1124) = 17 are admitted, and settling with their estimates never exceeds it.
        let engine = engine("[{name: day, limits: {tokensPerDay: 20000}}]");
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        if let Decision::Allow { permit, .. } = decide(&engine, None, &demand("m", None)) {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let usage = Usage {
                                input_tokens: 100,
                                output_tokens: 1024,
                                ..Usage::default()
                            };
                            permit.settle(Some(&usage), 0.0);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 17);
    }

    #[test]
    fn budgets_survive_a_snapshot_and_restore() {
        let spec = "[{name: day, per: namespace, limits: {tokensPerDay: 1000, costPerMonthUsd: 5}}]";
        let first = engine(spec);
        let a = pod("team-a", "x");
        let Decision::Allow { permit, .. } = decide(&first, Some(&a), &demand("m", Some(100))) else {
            panic!("allowed")
        };
        let usage = Usage {
            input_tokens: 400,
            output_tokens: 500,
            ..Usage::default()
        };
        permit.settle(Some(&usage), 1.5);
        let records = first.snapshot();
        assert_eq!(records.len(), 2, "{records:?}");
        let second = engine(spec);
        assert_eq!(second.restore(&records), 2);
        assert_eq!(
            rejected(&decide(&second, Some(&a), &demand("m", Some(100)))),
            Some(("day", Limited::TokenBudget)),
            "900 of 1000 used before the restart"
        );
        let renamed = engine("[{name: other, limits: {tokensPerDay: 1000}}]");
        assert_eq!(
            renamed.restore(&records),
            0,
            "records of removed rules are dropped"
        );
    }

    #[test]
    fn a_reload_keeps_the_counters_of_a_rule_with_the_same_name() {
        let engine = engine("[{name: r, limits: {requestsPerMinute: 1}}]");
        let _ = decide(&engine, None, &demand("m", None));
        assert!(rejected(&decide(&engine, None, &demand("m", None))).is_some());
        engine.replace_rules(rules("[{name: r, limits: {requestsPerMinute: 2}}]"));
        assert!(
            rejected(&decide(&engine, None, &demand("m", None))).is_none(),
            "the raised limit applies"
        );
        assert!(
            rejected(&decide(&engine, None, &demand("m", None))).is_some(),
            "what was used still counts"
        );
    }
}
