//! Pod metadata from the Kubernetes API: a watch of this node's pods fills a directory that new
//! connections read without calling the API; owners are resolved once and cached. Without a
//! Kubernetes configuration, attribution stops at process and container.

pub mod directory;
pub mod owners;
pub mod pod;
pub mod watch;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use directory::PodDirectory;
pub use pod::{PodIdentity, Workload, WorkloadSource};

/// Whether to read pod metadata from the Kubernetes API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    /// Use the in-cluster configuration or a kubeconfig when one exists; otherwise go without.
    #[default]
    Auto,
    /// Never call the API: attribution stops at process and container.
    Off,
}

/// Metrics of the pod watch.
#[derive(Clone)]
pub struct KubernetesMetrics {
    pub pods: IntGauge,
    pub synced: IntGauge,
    pub events: IntCounterVec,
    pub watch_errors: IntCounter,
    pub owner_lookups: IntCounterVec,
    pub pod_lookups: IntCounterVec,
}

impl KubernetesMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let pods = IntGauge::new(
            "interceptor_kubernetes_pods",
            "Pods of this node known to the attribution directory (including recently deleted ones)",
        )?;
        let synced = IntGauge::new(
            "interceptor_kubernetes_synced",
            "1 once the pods of this node have been listed from the Kubernetes API",
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "interceptor_kubernetes_watch_events_total",
                "Pod watch events handled, by type (apply, delete, relist)",
            ),
            &["event"],
        )?;
        let watch_errors = IntCounter::new(
            "interceptor_kubernetes_watch_errors_total",
            "Failed pod list or watch calls (each is retried with backoff)",
        )?;
        let owner_lookups = IntCounterVec::new(
            Opts::new(
                "interceptor_kubernetes_owner_lookups_total",
                "Workload resolutions through a ReplicaSet or Job, by result (cached, fetched, failed)",
            ),
            &["result"],
        )?;
        let pod_lookups = IntCounterVec::new(
            Opts::new(
                "interceptor_pod_attributions_total",
                "Requests from pods by how their pod was found (known, late, unknown)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(synced.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(watch_errors.clone()))?;
        registry.register(Box::new(owner_lookups.clone()))?;
        registry.register(Box::new(pod_lookups.clone()))?;
        Ok(Self {
            pods,
            synced,
            events,
            watch_errors,
            owner_lookups,
            pod_lookups,
        })
    }
}

/// Settings of the Kubernetes attribution.
#[derive(Clone, Debug)]
pub struct KubernetesSettings {
    pub mode: KubernetesMode,
    /// A kubeconfig to use instead of the in-cluster configuration or `$KUBECONFIG`.
    pub kubeconfig: Option<std::path::PathBuf>,
    pub watch: watch::WatchSettings,
    /// How long a deleted pod is still attributed.
    pub departed_grace: Duration,
    /// Timeout of one owner lookup.
    pub owner_timeout: Duration,
    /// How long a request's record waits for a pod not yet listed.
    pub pod_wait: Duration,
}

/// The pod side of attribution as the proxy uses it.
pub struct PodAttribution {
    pub directory: Arc<PodDirectory>,
    pub pod_wait: Duration,
    metrics: KubernetesMetrics,
}

/// How the pod of a request was found (log field `pod_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodStatus {
    /// Known when the connection was made.
    Known,
    /// Appeared while the record waited.
    Late,
    /// Not listed within the wait: recorded as `pod=unknown`.
    Unknown,
}

impl PodStatus {
    pub fn name(self) -> &'static str {
        match self {
            PodStatus::Known => "known",
            PodStatus::Late => "late",
            PodStatus::Unknown => "unknown",
        }
    }
}

/// The pod of a connection as found when it was accepted.
#[derive(Clone, Debug, Default)]
pub enum PodRef {
    /// Not from a pod (no pod uid in its cgroup path), or no Kubernetes.
    #[default]
    NotAPod,
    Known(Arc<PodIdentity>),
    /// From a pod the directory does not know yet (uid from the cgroup path).
    Pending(Box<str>),
}

impl PodRef {
    pub fn known(&self) -> Option<&PodIdentity> {
        match self {
            PodRef::Known(pod) => Some(pod),
            _ => None,
        }
    }
}

impl PodAttribution {
    /// The pod with this uid (from the cgroup path), without waiting.
    pub fn lookup(&self, pod_uid: Option<&str>) -> PodRef {
        match pod_uid {
            None => PodRef::NotAPod,
            Some(uid) => match self.directory.get(uid) {
                Some(pod) => PodRef::Known(pod),
                None => PodRef::Pending(uid.into()),
            },
        }
    }

    /// The pod of a finished request: known, or waited for (bounded) when it was not listed yet.
    pub async fn settle(&self, pod: &PodRef) -> (Option<Arc<PodIdentity>>, Option<PodStatus>) {
        let settled = match pod {
            PodRef::NotAPod => return (None, None),
            PodRef::Known(pod) => (Some(pod.clone()), PodStatus::Known),
            PodRef::Pending(uid) => match self.directory.wait_for(uid, self.pod_wait).await {
                Some(pod) => (Some(pod), PodStatus::Late),
                None => (None, PodStatus::Unknown),
            },
        };
        self.count(settled.1);
        (settled.0, Some(settled.1))
    }

    /// The pod of a finished request if that needs no wait (`None`: it must be waited for).
    pub fn settle_now(&self, pod: &PodRef) -> Option<(Option<Arc<PodIdentity>>, Option<PodStatus>)> {
        let settled = match pod {
            PodRef::NotAPod => return Some((None, None)),
            PodRef::Known(pod) => (pod.clone(), PodStatus::Known),
            PodRef::Pending(uid) => (self.directory.get(uid)?, PodStatus::Late),
        };
        self.count(settled.1);
        Some((Some(settled.0), Some(settled.1)))
    }

    fn count(&self, status: PodStatus) {
        self.metrics.pod_lookups.with_label_values(&[status.name()]).inc();
    }
}

/// Connects to the API (when configured) and starts the watch. `Ok(None)`: no Kubernetes here.
pub async fn start(
    settings: &KubernetesSettings,
    registry: &Registry,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> anyhow::Result<Option<Arc<PodAttribution>>> {
    let Some(client) = connect(settings).await? else {
        return Ok(None);
    };
    let metrics = KubernetesMetrics::register(registry)?;
    let directory = Arc::new(PodDirectory::new(settings.departed_grace));
    let owners = owners::OwnerResolver::new(
        client.clone(),
        settings.owner_timeout,
        metrics.owner_lookups.clone(),
    );
    tasks.spawn(watch::run(
        client,
        settings.watch.clone(),
        directory.clone(),
        owners,
        metrics.clone(),
        stop,
    ));
    Ok(Some(Arc::new(PodAttribution {
        directory,
        pod_wait: settings.pod_wait,
        metrics,
    })))
}

/// A client from the explicit kubeconfig, else the in-cluster configuration or `$KUBECONFIG`/`~/.kube/config`.
async fn connect(settings: &KubernetesSettings) -> anyhow::Result<Option<Client>> {
    if settings.mode == KubernetesMode::Off {
        info!("Kubernetes attribution off: attribution stops at process and container");
        return Ok(None);
    }
    let config = match &settings.kubeconfig {
        Some(path) => Some(from_kubeconfig(path).await?),
        None => match kube::Config::infer().await {
            Ok(config) => Some(config),
            Err(reason) => {
                info!(reason = %reason, "no Kubernetes configuration (in-cluster or kubeconfig): attribution stops at process and container");
                None
            }
        },
    };
    let Some(config) = config else { return Ok(None) };
    info!(api = %config.cluster_url, node = %settings.watch.node_name, "watching this node's pods");
    // The client builds its TLS configuration with the process-wide crypto provider.
    crate::tls::install_default_provider();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    Ok(Some(client))
}

async fn from_kubeconfig(path: &Path) -> anyhow::Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| format!("using the kubeconfig {}", path.display()))
}

/// This node's name: `--node-name`/`NODE_NAME` (from the downward API), else the host name.
pub fn node_name(configured: Option<&str>) -> anyhow::Result<String> {
    if let Some(name) = configured.filter(|n| !n.is_empty()) {
        return Ok(name.to_owned());
    }
    let host = nix::unistd::gethostname().context("reading the host name for the node name")?;
    host.into_string()
        .map_err(|raw| anyhow::anyhow!("the host name {raw:?} is not UTF-8; pass --node-name"))
}
