//! Target discovery: provider domains to the (address, port) pairs in the eBPF target map.
//!
//! Static addresses from the policy are installed at start. Exact domain names without static
//! addresses are resolved by the daemon and re-resolved when their records expire (bounded by
//! `discovery.minRefresh` / `maxRefresh`). An address that leaves the answers stays a target for its
//! TTL plus `discovery.staleGrace`, because clients may have cached it.
//!
//! Addresses learned by the kernel from the DNS answers workloads receive live in their own map (the
//! kernel adds them; see `interceptor-ebpf`). This task removes those whose TTL plus
//! `discovery.dnsGrace` ran out (the kernel already ignores them) and reports the rest.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use hickory_resolver::TokioResolver;
use interceptor_ebpf::{TARGET_SOURCE_RESOLVED, TARGET_SOURCE_STATIC, TargetValue};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use arc_swap::ArcSwap;

use crate::ebpf::{LearnedMap, TargetMap};
use crate::policy::{Discovery, ProviderTarget};
use crate::status::TargetView;

/// How long one resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired learned targets are removed.
const LEARNED_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Metrics of target discovery.
#[derive(Clone)]
pub struct TargetMetrics {
    targets: IntGaugeVec,
    resolutions: IntCounterVec,
}

impl TargetMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let targets = IntGaugeVec::new(
            Opts::new(
                "interceptor_targets",
                "Destinations (address, port) currently redirected, by source",
            ),
            &["source"],
        )?;
        let resolutions = IntCounterVec::new(
            Opts::new(
                "interceptor_target_resolutions_total",
                "DNS resolutions of provider domains, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(targets.clone()))?;
        registry.register(Box::new(resolutions.clone()))?;
        Ok(Self { targets, resolutions })
    }
}

struct DomainState {
    target: ProviderTarget,
    /// Resolved addresses and until when they stay targets.
    addresses: HashMap<IpAddr, Instant>,
    next_resolve: Instant,
    failing: bool,
}

/// Owns the target map and keeps it equal to what the policy and DNS say.
pub struct TargetDiscovery {
    domains: Vec<DomainState>,
    discovery: Discovery,
    map: TargetMap,
    installed: HashMap<SocketAddr, TargetValue>,
    learned: LearnedMap,
    /// Unexpired learned targets at the last sweep: (destination, domain index).
    learned_now: Vec<(SocketAddr, u32)>,
    metrics: TargetMetrics,
    /// What is installed, for `interceptor status`.
    published: Arc<ArcSwap<Vec<TargetView>>>,
}

/// One resolution's outcome.
type Resolution = (usize, Result<(Vec<IpAddr>, Duration), String>);

impl TargetDiscovery {
    pub fn new(
        targets: Vec<ProviderTarget>,
        discovery: Discovery,
        map: TargetMap,
        learned: LearnedMap,
        metrics: TargetMetrics,
    ) -> Self {
        let now = Instant::now();
        let domains = targets
            .into_iter()
            .map(|target| DomainState {
                target,
                addresses: HashMap::new(),
                next_resolve: now,
                failing: false,
            })
            .collect();
        Self {
            domains,
            discovery,
            map,
            installed: HashMap::new(),
            learned,
            learned_now: Vec::new(),
            metrics,
            published: Arc::default(),
        }
    }

    /// The installed targets, kept current (for `interceptor status`).
    pub fn published(&self) -> Arc<ArcSwap<Vec<TargetView>>> {
        self.published.clone()
    }

    /// Installs the static addresses (before the daemon reports ready).
    pub fn install_static(&mut self) {
        self.sync(Instant::now());
    }

    /// Resolves domains when due and keeps the map in sync until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let resolver = match TokioResolver::builder_tokio() {
            Ok(builder) => Some(builder.build()),
            Err(e) => {
                error!(error = %e, "cannot read the system resolver configuration; only static addresses are intercepted");
                None
            }
        };
        let mut in_flight: FuturesUnordered<_> = FuturesUnordered::new();
        let mut resolving = vec![false; self.domains.len()];
        let mut sweep = tokio::time::interval(LEARNED_SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            if let Some(resolver) = &resolver {
                for (index, state) in self.domains.iter().enumerate() {
                    if state.target.resolvable() && !resolving[index] && state.next_resolve <= now {
                        resolving[index] = true;
                        in_flight.push(resolve(resolver.clone(), index, state.target.domain.clone()));
                    }
                }
            }
            let next_wake = self
                .next_wake(&resolving)
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some((index, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    resolving[index] = false;
                    self.apply(index, result, Instant::now());
                    self.sync(Instant::now());
                }
                _ = tokio::time::sleep_until(next_wake.into()) => self.sync(Instant::now()),
                _ = sweep.tick() => {
                    self.sweep_learned(crate::ebpf::monotonic_ns());
                    self.publish();
                }
            }
        }
    }

    /// The earliest of the next resolution and the next expiry.
    fn next_wake(&self, resolving: &[bool]) -> Option<Instant> {
        let resolutions = self
            .domains
            .iter()
            .enumerate()
            .filter(|(i, s)| s.target.resolvable() && !resolving[*i])
            .map(|(_, s)| s.next_resolve);
        let expiries = self.domains.iter().flat_map(|s| s.addresses.values().copied());
        resolutions.chain(expiries).min()
    }

    fn apply(&mut self, index: usize, result: Result<(Vec<IpAddr>, Duration), String>, now: Instant) {
        let discovery = &self.discovery;
        let Some(state) = self.domains.get_mut(index) else {
            return;
        };
        let domain = &state.target.domain;
        match result {
            Ok((addresses, ttl)) => {
                self.metrics.resolutions.with_label_values(&["success"]).inc();
                if state.failing {
                    info!(domain = %domain, "provider domain resolves again");
                }
                state.failing = false;
                let keep_until = now + ttl + discovery.stale_grace;
                for address in &addresses {
                    state.addresses.insert(*address, keep_until);
                }
                state.next_resolve = now + ttl.clamp(discovery.min_refresh, discovery.max_refresh);
                debug!(domain = %domain, ?addresses, ttl_s = ttl.as_secs(), "resolved provider domain");
            }
            Err(message) => {
                self.metrics.resolutions.with_label_values(&["failure"]).inc();
                if !state.failing {
                    error!(
                        domain = %domain,
                        error = %message,
                        retry_in_s = discovery.retry_interval.as_secs(),
                        "cannot resolve provider domain; connections to its unknown addresses are not intercepted"
                    );
                }
                state.failing = true;
                state.next_resolve = now + discovery.retry_interval;
            }
        }
    }

    /// Expires addresses and makes the map equal to the desired set.
    fn sync(&mut self, now: Instant) {
        let mut desired: HashMap<SocketAddr, TargetValue> = HashMap::new();
        for (index, state) in self.domains.iter_mut().enumerate() {
            state.addresses.retain(|_, keep_until| *keep_until > now);
            let value = |source| TargetValue {
                domain_index: index as u32,
                source,
            };
            for port in &state.target.ports {
                for address in &state.target.addresses {
                    desired.insert(SocketAddr::new(*address, *port), value(TARGET_SOURCE_STATIC));
                }
                for address in state.addresses.keys() {
                    desired
                        .entry(SocketAddr::new(*address, *port))
                        .or_insert(value(TARGET_SOURCE_RESOLVED));
                }
            }
        }
        let stale: Vec<SocketAddr> = self
            .installed
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied()
            .collect();
        for address in stale {
            match self.map.remove(address) {
                Ok(()) => {
                    self.installed.remove(&address);
                    debug!(%address, "target removed");
                }
                Err(e) => warn!(%address, error = %e, "cannot remove a target"),
            }
        }
        for (address, value) in desired {
            if self.installed.get(&address) == Some(&value) {
                continue;
            }
            match self.map.insert(address, value) {
                Ok(()) => {
                    self.installed.insert(address, value);
                    debug!(%address, domain = %self.domains[value.domain_index as usize].target.domain, "target added");
                }
                Err(e) => warn!(%address, error = %e, "cannot add a target (map full?)"),
            }
        }
        self.publish();
    }

    /// Removes learned targets that expired at or before `now_ns` and remembers the others.
    fn sweep_learned(&mut self, now_ns: u64) {
        let mut current = Vec::new();
        for (address, domain_index, expires_ns) in self.learned.entries() {
            if expires_ns > now_ns {
                current.push((address, domain_index));
                continue;
            }
            match self.learned.remove_expired(address, now_ns) {
                Ok(true) => debug!(%address, "learned target expired"),
                Ok(false) => current.push((address, domain_index)),
                Err(e) => warn!(%address, error = %e, "cannot remove an expired learned target"),
            }
        }
        current.sort();
        self.learned_now = current;
    }

    /// Updates the target gauges and the view `interceptor status` shows.
    fn publish(&self) {
        let statics = self
            .installed
            .values()
            .filter(|v| v.source == TARGET_SOURCE_STATIC)
            .count();
        self.metrics
            .targets
            .with_label_values(&["static"])
            .set(statics as i64);
        self.metrics
            .targets
            .with_label_values(&["resolved"])
            .set((self.installed.len() - statics) as i64);
        self.metrics
            .targets
            .with_label_values(&["learned"])
            .set(self.learned_now.len() as i64);
        // Several domains may share an address (one CDN edge): list each domain's own addresses.
        let mut views: Vec<TargetView> = Vec::new();
        for state in &self.domains {
            for port in &state.target.ports {
                let statics = state.target.addresses.iter().map(|a| (a, "static"));
                let resolved = state.addresses.keys().map(|a| (a, "resolved"));
                for (address, source) in statics.chain(resolved) {
                    let address = SocketAddr::new(*address, *port);
                    if self.installed.contains_key(&address) {
                        views.push(TargetView {
                            domain: state.target.domain.clone(),
                            address: address.to_string(),
                            source: source.to_owned(),
                        });
                    }
                }
            }
        }
        for (address, domain_index) in &self.learned_now {
            if let Some(state) = self.domains.get(*domain_index as usize) {
                views.push(TargetView {
                    domain: state.target.domain.clone(),
                    address: address.to_string(),
                    source: "learned".to_owned(),
                });
            }
        }
        views.sort_by(|a, b| (&a.domain, &a.address).cmp(&(&b.domain, &b.address)));
        views.dedup();
        self.published.store(Arc::new(views));
    }
}

async fn resolve(resolver: TokioResolver, index: usize, domain: String) -> Resolution {
    // A trailing dot makes the name absolute: no search domains.
    let fqdn = format!("{domain}.");
    let result = match tokio::time::timeout(RESOLVE_TIMEOUT, resolver.lookup_ip(fqdn)).await {
        Ok(Ok(lookup)) => {
            let addresses: Vec<IpAddr> = lookup.iter().collect();
            let ttl = lookup.valid_until().saturating_duration_since(Instant::now());
            if addresses.is_empty() {
                Err("no A or AAAA records".to_owned())
            } else {
                Ok((addresses, ttl))
            }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", RESOLVE_TIMEOUT.as_secs())),
    };
    (index, result)
}
