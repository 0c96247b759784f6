//! The watch of this node's pods: list, then watch from the list's resource version, with bookmarks;
//! a dropped connection resumes from the last version seen, a `410 Gone` relists, errors back off. The
//! directory keeps serving what it knows while the API is away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::KubernetesMetrics;
use super::directory::PodDirectory;
use super::owners::OwnerResolver;
use super::pod::{PodFacts, PodIdentity};

/// Settings of the watch.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// This node's name: only pods with `spec.nodeName` equal to it are watched.
    pub node_name: String,
    /// Longest wait between two attempts while the API cannot be reached.
    pub max_backoff: Duration,
    /// How often departed pods past their grace period are forgotten.
    pub sweep_interval: Duration,
}

/// Runs until `stop`.
pub async fn run(
    client: Client,
    settings: WatchSettings,
    directory: Arc<PodDirectory>,
    owners: OwnerResolver,
    metrics: KubernetesMetrics,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let mut config = watcher::Config::default()
        .fields(&format!("spec.nodeName={}", settings.node_name))
        // Served from the API server's watch cache (resourceVersion=0), as kubelet and client-go's
        // informers do, instead of a quorum read from etcd: kind to large clusters.
        .any_semantic();
    // kube drops resourceVersion=0 from paged lists; one node's pods fit in one answer.
    config.page_size = None;
    let stream = watcher(api, config).backoff(WatchBackoff::new(settings.max_backoff));
    let mut stream = std::pin::pin!(stream);
    let mut sweep = tokio::time::interval(settings.sweep_interval);
    let mut listing: Vec<PodIdentity> = Vec::new();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            _ = sweep.tick() => {
                let forgotten = directory.sweep(Instant::now());
                if forgotten > 0 {
                    debug!(forgotten, "forgot departed pods");
                    metrics.pods.set(gauge_value(directory.len()));
                }
                continue;
            }
            event = stream.next() => event,
        };
        let Some(event) = event else { break };
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                metrics.watch_errors.inc();
                if failing {
                    debug!(error = %error, "pod watch still failing");
                } else {
                    warn!(error = %error, pods_known = directory.len(), "pod watch failed; known pods stay attributed, retrying with backoff");
                    failing = true;
                }
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            info!("pod watch recovered");
        }
        match event {
            watcher::Event::Init => {
                metrics.events.with_label_values(&["relist"]).inc();
                listing.clear();
            }
            watcher::Event::InitApply(pod) => {
                if let Some(identity) = identify(&owners, &pod).await {
                    listing.push(identity);
                }
            }
            watcher::Event::InitDone => {
                let first = !directory.is_synced();
                let count = listing.len();
                directory.replace_all(std::mem::take(&mut listing), Instant::now());
                metrics.synced.set(1);
                if first {
                    info!(pods = count, node = %settings.node_name, "pods of this node listed");
                } else {
                    debug!(pods = count, "pods of this node relisted");
                }
            }
            watcher::Event::Apply(pod) => {
                metrics.events.with_label_values(&["apply"]).inc();
                if let Some(identity) = identify(&owners, &pod).await {
                    directory.upsert(identity);
                }
            }
            watcher::Event::Delete(pod) => {
                metrics.events.with_label_values(&["delete"]).inc();
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    directory.remove(uid, Instant::now());
                }
            }
        }
        metrics.pods.set(gauge_value(directory.len()));
    }
    debug!("pod watch stopped");
}

async fn identify(owners: &OwnerResolver, pod: &Pod) -> Option<PodIdentity> {
    let facts = PodFacts::from_pod(pod)?;
    let (workload, source) = owners.workload(&facts).await;
    Some(facts.into_identity(workload, source))
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Exponential backoff from 800 ms up to a maximum with ±25 % jitter (client-go's reflector starts at
/// 800 ms too), reset by the watcher once it succeeds.
pub struct WatchBackoff {
    next: Duration,
    max: Duration,
    seed: u64,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(800);

impl WatchBackoff {
    pub fn new(max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Self {
            next: FIRST_BACKOFF.min(max),
            max,
            seed: u64::from(seed) | 1,
        }
    }

    /// A number in [0.75, 1.25) from a xorshift generator.
    fn jitter(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        0.75 + (self.seed % 1000) as f64 / 2000.0
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(base.mul_f64(self.jitter()).min(self.max))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST_BACKOFF.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_maximum_and_resets() {
        let mut backoff = WatchBackoff::new(Duration::from_secs(5));
        let first = backoff.next().expect("some");
        assert!(
            first >= Duration::from_millis(600) && first < Duration::from_millis(1000),
            "{first:?}"
        );
        let later: Vec<Duration> = (&mut backoff).take(10).collect();
        assert!(later.iter().all(|d| *d <= Duration::from_secs(5)));
        assert!(later.last().is_some_and(|d| *d >= Duration::from_millis(3750)));
        backoff.reset();
        assert!(backoff.next().is_some_and(|d| d < Duration::from_secs(1)));
    }
}
