//! Identity labels on the usage metrics, and the cap that keeps their cardinality bounded.
//!
//! Which identity labels exist is the operator's choice (`--metrics-identity-labels`; namespace and
//! workload by default, pod and process opt-in). Each metric family admits at most
//! `--metrics-max-series` label sets; a new set beyond the cap is counted under the identity value
//! [`OVERFLOW`] instead, and `interceptor_metric_series_overflow_total` says it happened.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{IntCounterVec, Opts, Registry};

/// The identity value that replaces the real one once a family reached its cap.
pub const OVERFLOW: &str = "_overflow";

/// Most labels a usage metric has (fixed labels plus every identity label).
pub const MAX_LABELS: usize = 12;

/// An identity label an operator can put on the usage metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityLabel {
    /// `k8s_namespace_name`.
    Namespace,
    /// `k8s_workload_name` (`Deployment/chat`).
    Workload,
    /// `k8s_pod_name` (one series set per pod: opt-in).
    Pod,
    /// `process_executable_name` (the executable's file name).
    Process,
}

impl IdentityLabel {
    /// The Prometheus label name (OpenTelemetry resource attribute names, dots as underscores).
    pub const fn label_name(self) -> &'static str {
        match self {
            IdentityLabel::Namespace => "k8s_namespace_name",
            IdentityLabel::Workload => "k8s_workload_name",
            IdentityLabel::Pod => "k8s_pod_name",
            IdentityLabel::Process => "process_executable_name",
        }
    }
}

/// The identity of one request, as label values (empty when unknown).
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityValues<'a> {
    pub namespace: &'a str,
    pub workload: &'a str,
    pub pod: &'a str,
    pub process: &'a str,
}

impl<'a> IdentityValues<'a> {
    fn get(&self, label: IdentityLabel) -> &'a str {
        match label {
            IdentityLabel::Namespace => self.namespace,
            IdentityLabel::Workload => self.workload,
            IdentityLabel::Pod => self.pod,
            IdentityLabel::Process => self.process,
        }
    }
}

/// The identity labels in use and the per-family cap.
pub struct IdentityLabels {
    labels: Vec<IdentityLabel>,
    max_series: usize,
    overflows: IntCounterVec,
}

impl IdentityLabels {
    pub fn new(labels: &[IdentityLabel], max_series: usize, registry: &Registry) -> prometheus::Result<Self> {
        let mut unique = Vec::new();
        for label in labels {
            if !unique.contains(label) {
                unique.push(*label);
            }
        }
        let overflows = IntCounterVec::new(
            Opts::new(
                "interceptor_metric_series_overflow_total",
                "Observations counted under the `_overflow` identity because their metric reached \
                 --metrics-max-series label sets",
            ),
            &["metric"],
        )?;
        registry.register(Box::new(overflows.clone()))?;
        Ok(Self {
            labels: unique,
            max_series: max_series.max(1),
            overflows,
        })
    }

    /// Label names after `fixed`.
    pub fn names<'a>(&self, fixed: &[&'a str]) -> Vec<&'a str> {
        let mut names = fixed.to_vec();
        names.extend(self.labels.iter().map(|l| l.label_name()));
        names
    }

    /// A cap for one metric family.
    pub fn cap(&self, metric: &'static str) -> SeriesCap {
        SeriesCap {
            metric,
            max: self.max_series,
            seen: Arc::new(Mutex::new(HashSet::new())),
            overflows: self.overflows.with_label_values(&[metric]),
        }
    }

    /// Fills `buffer` with `fixed` then the identity values; returns how many values it holds.
    pub fn values<'a>(
        &self,
        buffer: &mut [&'a str; MAX_LABELS],
        fixed: &[&'a str],
        identity: &IdentityValues<'a>,
    ) -> usize {
        let mut n = 0;
        let identity_values = self.labels.iter().map(|label| identity.get(*label));
        for value in fixed.iter().copied().chain(identity_values) {
            if n < MAX_LABELS {
                buffer[n] = value;
                n += 1;
            }
        }
        n
    }

    /// How many identity labels follow the fixed ones.
    pub fn count(&self) -> usize {
        self.labels.len()
    }

    /// `vec` (registered by the caller) under this family's series cap, with a cache of its handles.
    pub fn family<V: LabeledVec>(&self, metric: &'static str, vec: V) -> CappedVec<V> {
        CappedVec(Arc::new(CappedInner {
            vec,
            cap: self.cap(metric),
            identity_count: self.count(),
            handle_key: std::hash::RandomState::new(),
            handles: RwLock::default(),
        }))
    }
}

/// Label sets whose handles a [`CappedVec`] remembers; past it the cache starts again (model names
/// come from traffic).
const CACHED_HANDLES: usize = 4096;

/// A labelled metric family under a [`SeriesCap`], with a cache of its handles: a label set seen
/// before costs one keyed hash and a read lock, instead of prometheus' per-call label hashing (FNV,
/// byte by byte), lookup and the cap's lock (several families are updated per request). Clones share
/// the family.
///
/// Label sets are told apart by a 64-bit SipHash with a random per-process key: label values come
/// from traffic (model names), and a workload must not be able to craft a value whose handle is
/// another identity's. Without the key, colliding on purpose is not feasible; by accident, the chance
/// that any two of the cached sets collide is below 10⁻¹².
pub struct CappedVec<V: LabeledVec>(Arc<CappedInner<V>>);

impl<V: LabeledVec> Clone for CappedVec<V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct CappedInner<V: LabeledVec> {
    vec: V,
    cap: SeriesCap,
    identity_count: usize,
    handle_key: std::hash::RandomState,
    /// Keyed hash of the label values as asked → their handle.
    handles: RwLock<HashMap<u64, CappedHandle<V::Metric>, rustc_hash::FxBuildHasher>>,
}

/// A prometheus metric vector (`IntCounterVec`, `CounterVec`, `HistogramVec`).
pub trait LabeledVec {
    type Metric: Clone;
    fn with_label_values(&self, values: &[&str]) -> Self::Metric;
}

impl<T: MetricVecBuilder> LabeledVec for MetricVec<T> {
    type Metric = T::M;
    fn with_label_values(&self, values: &[&str]) -> T::M {
        MetricVec::with_label_values(self, values)
    }
}

/// A handle of a capped family, kept to observe the same label set again without a lookup.
#[derive(Clone)]
pub struct CappedHandle<M> {
    metric: M,
    /// The family's overflow counter, when the label set was refused by the cap (`metric` is then
    /// the overflow series): every observation through the handle counts there too.
    overflowed: Option<prometheus::IntCounter>,
}

impl<M> CappedHandle<M> {
    /// The metric to observe (counting the observation as an overflow when it is one).
    pub fn metric(&self) -> &M {
        if let Some(overflows) = &self.overflowed {
            overflows.inc();
        }
        &self.metric
    }
}

impl<V: LabeledVec> CappedVec<V> {
    /// The metric for `values` (fixed labels, then the identity labels), or the family's overflow
    /// series once the cap is reached.
    pub fn get(&self, values: &[&str]) -> V::Metric {
        self.handle(values).metric().clone()
    }

    /// The handle for `values`, to keep and observe through (see [`CappedHandle::metric`]).
    pub fn handle(&self, values: &[&str]) -> CappedHandle<V::Metric> {
        let this = &*self.0;
        let hash = this.handle_key.hash_one(values);
        if let Ok(handles) = this.handles.read()
            && let Some(found) = handles.get(&hash)
        {
            return found.clone();
        }
        let mut admitted = [""; MAX_LABELS];
        let n = values.len().min(MAX_LABELS);
        admitted[..n].copy_from_slice(&values[..n]);
        let overflowed = !this.cap.admit_uncounted(&mut admitted[..n], this.identity_count);
        let handle = CappedHandle {
            metric: this.vec.with_label_values(&admitted[..n]),
            overflowed: overflowed.then(|| this.cap.overflows.clone()),
        };
        if let Ok(mut handles) = this.handles.write() {
            if handles.len() >= CACHED_HANDLES {
                handles.clear();
            }
            handles.insert(hash, handle.clone());
        }
        handle
    }
}

fn hash_values(values: &[&str]) -> u64 {
    let mut hasher = rustc_hash::FxBuildHasher.build_hasher();
    for value in values {
        value.hash(&mut hasher);
    }
    hasher.finish()
}

/// Admits at most `max` distinct label sets into one metric family (clones share the set).
#[derive(Clone)]
pub struct SeriesCap {
    metric: &'static str,
    max: usize,
    seen: Arc<Mutex<HashSet<u64>>>,
    overflows: prometheus::IntCounter,
}

impl SeriesCap {
    /// Whether `values` may be used as is; when not, the caller replaces the last `identity_count`
    /// values with [`OVERFLOW`] (see [`SeriesCap::admit`]).
    fn admitted(&self, values: &[&str]) -> bool {
        let key = hash_values(values);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(&key) {
            return true;
        }
        if seen.len() < self.max {
            seen.insert(key);
            return true;
        }
        false
    }

    /// `values` (fixed labels, then `identity_count` identity labels) as they may be used: unchanged
    /// (true), or with the identity replaced by [`OVERFLOW`] once the family is full (false).
    pub fn admit(&self, values: &mut [&str], identity_count: usize) -> bool {
        let admitted = self.admit_uncounted(values, identity_count);
        if !admitted {
            self.overflows.inc();
        }
        admitted
    }

    /// [`SeriesCap::admit`] without counting the overflow (the caller counts its observations).
    fn admit_uncounted(&self, values: &mut [&str], identity_count: usize) -> bool {
        if identity_count == 0 || self.admitted(values) {
            return true;
        }
        let start = values.len().saturating_sub(identity_count);
        for value in &mut values[start..] {
            *value = OVERFLOW;
        }
        false
    }

    pub fn metric(&self) -> &'static str {
        self.metric
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_admits_at_most_max_label_sets_then_overflows() {
        let registry = Registry::new();
        let labels = IdentityLabels::new(&[IdentityLabel::Namespace, IdentityLabel::Workload], 3, &registry)
            .expect("labels");
        assert_eq!(
            labels.names(&["provider"]),
            ["provider", "k8s_namespace_name", "k8s_workload_name"]
        );
        let cap = labels.cap("requests");
        let mut used = Vec::new();
        for namespace in ["a", "b", "c", "d", "e", "a"] {
            let identity = IdentityValues {
                namespace,
                workload: "Deployment/x",
                ..IdentityValues::default()
            };
            let mut buffer = [""; MAX_LABELS];
            let n = labels.values(&mut buffer, &["openai"], &identity);
            let values = &mut buffer[..n];
            cap.admit(values, labels.count());
            used.push(values.join(","));
        }
        assert_eq!(
            used,
            [
                "openai,a,Deployment/x",
                "openai,b,Deployment/x",
                "openai,c,Deployment/x",
                "openai,_overflow,_overflow",
                "openai,_overflow,_overflow",
                "openai,a,Deployment/x",
            ]
        );
        assert_eq!(cap.overflows.get(), 2);
        assert_eq!(cap.metric(), "requests");
    }

    #[test]
    fn duplicate_and_absent_identity_labels() {
        let registry = Registry::new();
        let labels =
            IdentityLabels::new(&[IdentityLabel::Pod, IdentityLabel::Pod], 10, &registry).expect("labels");
        assert_eq!(labels.count(), 1);
        let none = IdentityLabels::new(&[], 10, &Registry::new()).expect("labels");
        let cap = none.cap("tokens");
        let mut values = ["openai", "input"];
        cap.admit(&mut values, none.count());
        assert_eq!(values, ["openai", "input"]);
    }

    #[test]
    fn a_label_set_seen_before_is_served_from_the_cache_and_overflows_still_count() {
        let registry = Registry::new();
        let labels = IdentityLabels::new(&[IdentityLabel::Namespace], 1, &registry).expect("labels");
        let vec = IntCounterVec::new(Opts::new("t_total", "t"), &labels.names(&["provider"])).expect("vec");
        let family = labels.family("t_total", vec.clone());
        for _ in 0..3 {
            family.get(&["openai", "a"]).inc();
            family.get(&["openai", "b"]).inc();
        }
        let cached = family.0.handles.read().expect("lock").len();
        assert_eq!(cached, 2, "one cached handle per label set asked for");
        assert_eq!(vec.with_label_values(&["openai", "a"]).get(), 3);
        assert_eq!(vec.with_label_values(&["openai", OVERFLOW]).get(), 3);
        assert_eq!(
            family.0.cap.overflows.get(),
            3,
            "every overflowed observation is counted"
        );
    }
}
