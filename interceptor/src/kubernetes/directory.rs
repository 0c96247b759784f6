//! The pods of this node, by uid: filled by the watch, read on every new connection without ever
//! calling the API. A pod deleted (or missing from a relist) stays for a grace period, so requests of
//! a pod that is shutting down are still attributed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::pod::PodIdentity;

struct Entry {
    pod: Arc<PodIdentity>,
    departed: Option<Instant>,
}

/// Pods of this node by uid.
pub struct PodDirectory {
    pods: RwLock<HashMap<Box<str>, Entry>>,
    /// Bumped on every change; late lookups wait on it.
    changes: watch::Sender<u64>,
    synced: AtomicBool,
    grace: Duration,
}

impl PodDirectory {
    /// `grace`: how long a deleted pod is still found.
    pub fn new(grace: Duration) -> Self {
        Self {
            pods: RwLock::new(HashMap::new()),
            changes: watch::Sender::new(0),
            synced: AtomicBool::new(false),
            grace,
        }
    }

    /// The pod with this uid (dashed, lowercase), if known.
    pub fn get(&self, uid: &str) -> Option<Arc<PodIdentity>> {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(uid).map(|e| e.pod.clone())
    }

    /// Waits up to `timeout` for a pod that is not known yet (it just started and the watch has not
    /// delivered it). Never calls the API.
    pub async fn wait_for(&self, uid: &str, timeout: Duration) -> Option<Arc<PodIdentity>> {
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pod) = self.get(uid) {
                return Some(pod);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return self.get(uid),
            }
        }
    }

    /// Number of pods found (including departed ones still in their grace period).
    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a complete list has been received at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// A pod added or changed.
    pub fn upsert(&self, pod: PodIdentity) {
        {
            let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
            pods.insert(
                pod.uid.clone(),
                Entry {
                    pod: Arc::new(pod),
                    departed: None,
                },
            );
        }
        self.notify();
    }

    /// A pod deleted: still found during the grace period.
    pub fn remove(&self, uid: &str, now: Instant) {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = pods.get_mut(uid) {
            entry.departed.get_or_insert(now);
        }
    }

    /// A complete list (after a start or a relist): its pods replace the known ones; known pods
    /// missing from it are departed.
    pub fn replace_all(&self, listed: Vec<PodIdentity>, now: Instant) {
        {
            let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
            for entry in pods.values_mut() {
                entry.departed.get_or_insert(now);
            }
            for pod in listed {
                pods.insert(
                    pod.uid.clone(),
                    Entry {
                        pod: Arc::new(pod),
                        departed: None,
                    },
                );
            }
        }
        self.synced.store(true, Ordering::Relaxed);
        self.notify();
    }

    /// Forgets pods departed longer than the grace period ago; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        let before = pods.len();
        pods.retain(|_, e| {
            e.departed
                .is_none_or(|at| now.saturating_duration_since(at) < self.grace)
        });
        before - pods.len()
    }

    fn notify(&self) {
        self.changes
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::pod::{Workload, WorkloadSource};

    fn pod(uid: &str, name: &str) -> PodIdentity {
        PodIdentity {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
            labels: Box::new([]),
            service_account: None,
            node: None,
            workload: Workload::new("Pod", name),
            workload_source: WorkloadSource::Direct,
        }
    }

    #[test]
    fn deleted_pods_stay_for_the_grace_period() {
        let directory = PodDirectory::new(Duration::from_secs(60));
        let start = Instant::now();
        directory.upsert(pod("a", "one"));
        directory.remove("a", start);
        assert!(directory.get("a").is_some());
        assert_eq!(directory.sweep(start + Duration::from_secs(59)), 0);
        assert_eq!(directory.sweep(start + Duration::from_secs(61)), 1);
        assert!(directory.get("a").is_none());
    }

    #[test]
    fn a_relist_replaces_and_departs_the_missing() {
        let directory = PodDirectory::new(Duration::from_secs(10));
        let start = Instant::now();
        directory.upsert(pod("a", "one"));
        directory.upsert(pod("b", "two"));
        assert!(!directory.is_synced());
        directory.replace_all(vec![pod("b", "two-renamed"), pod("c", "three")], start);
        assert!(directory.is_synced());
        assert_eq!(
            directory.get("b").map(|p| p.name.to_string()),
            Some("two-renamed".into())
        );
        assert_eq!(directory.len(), 3);
        assert_eq!(directory.sweep(start + Duration::from_secs(11)), 1);
        assert!(directory.get("a").is_none());
        assert!(directory.get("c").is_some());
    }

    #[tokio::test]
    async fn a_late_pod_is_found_when_it_arrives() {
        let directory = Arc::new(PodDirectory::new(Duration::from_secs(10)));
        let waiter = {
            let directory = directory.clone();
            tokio::spawn(async move { directory.wait_for("late", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        directory.upsert(pod("other", "x"));
        directory.upsert(pod("late", "y"));
        let found = waiter.await.expect("join");
        assert_eq!(found.map(|p| p.name.to_string()), Some("y".into()));
        let missing = directory.wait_for("never", Duration::from_millis(50)).await;
        assert!(missing.is_none());
    }
}
