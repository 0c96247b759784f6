//! Hot reload of the policy file: watched with inotify (the directory, so the symlink swap Kubernetes
//! does for ConfigMaps is seen) and on SIGHUP. A new file is validated completely before anything
//! changes; then the rules and the bypass selectors are swapped atomically, and requests in flight
//! keep the reservations they hold. A broken file keeps the old policy and says what and where is
//! wrong. Other sections (providers, discovery, accounting, pricing, interception settings) need a
//! restart: a changed one is reported and not applied.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher as _};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::policy::Policy;
use crate::quota::QuotaEngine;
use crate::selector::SelectorMatcher;

/// What a reload swaps.
pub struct Reloadable {
    pub quota: Arc<QuotaEngine>,
    pub bypass: Arc<ArcSwap<Vec<SelectorMatcher>>>,
    pub content: Arc<ArcSwap<crate::policy::ContentSelection>>,
}

/// Reload metrics.
#[derive(Clone)]
pub struct ReloadMetrics {
    reloads: IntCounterVec,
    failing: IntGauge,
    info: IntGaugeVec,
}

impl ReloadMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "interceptor_policy_reloads_total",
                "Policy reloads by result (success, failure)",
            ),
            &["result"],
        )?;
        let failing = IntGauge::new(
            "interceptor_policy_reload_failing",
            "1 while the policy file on disk is invalid (the previous policy stays in force)",
        )?;
        let info = IntGaugeVec::new(
            Opts::new(
                "interceptor_policy_info",
                "The policy in force: 1 for its SHA-256 (first 16 hex digits) and rule count",
            ),
            &["sha256", "rules"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(failing.clone()))?;
        registry.register(Box::new(info.clone()))?;
        Ok(Self {
            reloads,
            failing,
            info,
        })
    }

    /// Records the policy in force.
    pub fn in_force(&self, text: &str, rules: usize) {
        self.info.reset();
        self.info
            .with_label_values(&[&short_hash(text), &rules.to_string()])
            .set(1);
    }
}

/// First 16 hex digits of the SHA-256 of a policy text.
pub fn short_hash(text: &str) -> String {
    crate::digest::short_sha256(text.as_bytes())
}

/// Watches `path` until `stop`.
pub async fn run(
    path: PathBuf,
    initial_text: String,
    target: Reloadable,
    metrics: ReloadMetrics,
    stop: CancellationToken,
) {
    let (events, mut changed) = mpsc::channel::<()>(1);
    let watcher = watch(&path, events.clone());
    if let Err(e) = &watcher {
        warn!(error = %e, path = %path.display(), "cannot watch the policy file; it reloads on SIGHUP only");
    }
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            warn!(error = %e, "cannot handle SIGHUP");
            None
        }
    };
    let mut current = initial_text;
    loop {
        let forced = tokio::select! {
            () = stop.cancelled() => break,
            Some(()) = changed.recv() => false,
            Some(()) = async { match hangup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => true,
        };
        // Editors and ConfigMap updates write in several steps: let them settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while changed.try_recv().is_ok() {}
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                metrics.failing.set(1);
                warn!(error = %e, path = %path.display(), "cannot read the policy file; keeping the policy in force");
                continue;
            }
        };
        if text == current && !forced {
            debug!("policy file event without a content change");
            continue;
        }
        match apply(&path, &current, &text, &target) {
            Ok(rules) => {
                metrics.reloads.with_label_values(&["success"]).inc();
                metrics.failing.set(0);
                metrics.in_force(&text, rules);
                info!(path = %path.display(), rules, sha256 = %short_hash(&text), "policy reloaded");
                current = text;
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["failure"]).inc();
                metrics.failing.set(1);
                warn!(error = %e, path = %path.display(), "invalid policy file; keeping the policy in force");
            }
        }
    }
    drop(watcher);
}

/// Validates the new text completely, then swaps. Returns the number of rules in force.
fn apply(
    path: &Path,
    old: &str,
    new: &str,
    target: &Reloadable,
) -> Result<usize, crate::policy::PolicyError> {
    let policy = Policy::parse(new, &path.display().to_string())?;
    for section in restart_sections(old, new) {
        warn!(
            section,
            "this policy section changed; it takes effect at the next restart"
        );
    }
    let rules = policy.compiled_rules();
    let count = rules.len();
    target.quota.replace_rules(rules);
    target.bypass.store(Arc::new(policy.bypass_matchers()));
    target.content.store(Arc::new(policy.content_selection()));
    Ok(count)
}

/// Top-level sections (and `interception` settings) that differ and are not reloaded.
fn restart_sections(old: &str, new: &str) -> Vec<String> {
    let parse = |text: &str| serde_norway::from_str::<serde_norway::Value>(text).unwrap_or_default();
    let (mut old, mut new) = (parse(old), parse(new));
    for value in [&mut old, &mut new] {
        if let serde_norway::Value::Mapping(map) = value {
            map.remove("rules");
            map.remove("audit");
            if let Some(serde_norway::Value::Mapping(interception)) = map.get_mut("interception") {
                interception.remove("bypass");
            }
        }
    }
    let keys = |value: &serde_norway::Value| -> Vec<String> {
        match value {
            serde_norway::Value::Mapping(map) => {
                map.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect()
            }
            _ => Vec::new(),
        }
    };
    let mut sections: Vec<String> = keys(&old).into_iter().chain(keys(&new)).collect();
    sections.sort();
    sections.dedup();
    sections.retain(|key| old.get(key.as_str()) != new.get(key.as_str()));
    sections
}

/// Watches the directory holding `path` (a ConfigMap mount swaps a `..data` symlink there).
fn watch(path: &Path, events: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = event.paths.iter().any(|p| {
            p.file_name() == name.as_deref()
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        });
        if relevant && !matches!(event.kind, notify::EventKind::Access(_)) {
            // A full channel already holds a pending reload.
            let _ = events.try_send(());
        }
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_reloadable_sections_are_reported() {
        let old = "apiVersion: v\nkind: K\nrules: []\ninterception:\n  bypass: []\n  leafTtl: 24h\n";
        let new = "apiVersion: v\nkind: K\nrules: [{name: a}]\ninterception:\n  bypass: [{comm: x}]\n  leafTtl: 24h\n";
        assert!(restart_sections(old, new).is_empty());
        let new = "apiVersion: v\nkind: K\ninterception:\n  leafTtl: 12h\naccounting: {enabled: false}\n";
        assert_eq!(
            restart_sections(old, new),
            vec!["accounting".to_owned(), "interception".to_owned()]
        );
    }

    #[test]
    fn hashes_are_short_and_stable() {
        assert_eq!(short_hash("a").len(), 16);
        assert_eq!(short_hash("a"), short_hash("a"));
        assert_ne!(short_hash("a"), short_hash("b"));
    }
}
