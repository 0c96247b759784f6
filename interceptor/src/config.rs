//! Daemon settings from the command line (and environment), as opposed to the operator's policy file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::kubernetes::KubernetesMode;

/// Settings of `interceptor run`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Policy file (YAML). Without it the built-in default policy is used.
    #[arg(long, env = "INTERCEPTOR_POLICY")]
    pub policy: Option<PathBuf>,

    /// Port of the proxy listener that redirected connections reach (0 picks a free port).
    #[arg(long, env = "INTERCEPTOR_PROXY_PORT", default_value_t = 15001)]
    pub proxy_port: u16,

    /// Node address for callers in other network namespaces (pods): redirected connections from them go
    /// to this address, which must be routable from the pods (for instance the node IP). Repeat for IPv6.
    #[arg(
        long = "node-address",
        env = "INTERCEPTOR_NODE_ADDRESSES",
        value_delimiter = ','
    )]
    pub node_addresses: Vec<IpAddr>,

    /// Address of the admin endpoint (/metrics, /healthz, /readyz). Use `off` to disable it.
    #[arg(long, env = "INTERCEPTOR_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: AdminAddr,

    /// Cgroup v2 directory the programs attach to. Default: the cgroup2 root (`--cgroup-root`).
    #[arg(long, env = "INTERCEPTOR_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// The host's cgroup2 hierarchy, used to name cgroup ids. Default: the first cgroup2 mount in
    /// /proc/self/mountinfo. In a container, mount the host's /sys/fs/cgroup (hostPath) and point here.
    #[arg(long, env = "INTERCEPTOR_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// The host's procfs (the pids the kernel reports are the host's). In a container without hostPID,
    /// mount the host's /proc (hostPath) and point here.
    #[arg(long, env = "INTERCEPTOR_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Identity labels on the usage metrics (comma-separated): namespace, workload, pod, process.
    #[arg(
        long,
        env = "INTERCEPTOR_METRICS_IDENTITY_LABELS",
        value_delimiter = ',',
        default_value = "namespace,workload"
    )]
    pub metrics_identity_labels: Vec<crate::metric_labels::IdentityLabel>,

    /// Label sets each usage metric admits; beyond it new identities are counted as `_overflow`.
    #[arg(long, env = "INTERCEPTOR_METRICS_MAX_SERIES", default_value_t = 10_000)]
    pub metrics_max_series: usize,

    /// Unix socket of `interceptor status` / `top` (mode 0600, root only), or `off`.
    #[arg(
        long,
        env = "INTERCEPTOR_ADMIN_SOCKET",
        default_value = "/run/interceptor/admin.sock"
    )]
    pub admin_socket: PathBuf,

    /// Audit log: one JSON line per request. `-` (stdout), a file path (rotated by size), or `off`.
    #[arg(long, env = "INTERCEPTOR_AUDIT_LOG", default_value = "-")]
    pub audit_log: crate::audit::AuditDestination,

    /// An audit file is rotated before it grows past this many bytes.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    pub audit_max_bytes: u64,

    /// Rotated audit files kept (`FILE.1` is the newest).
    #[arg(long, default_value_t = 5)]
    pub audit_keep: usize,

    /// Audit lines waiting for the writer; beyond it lines are dropped (and counted), never waited for.
    #[arg(long, default_value_t = 8192)]
    pub audit_queue: usize,

    /// bpffs directory where links are pinned in fail-closed mode.
    #[arg(
        long,
        env = "INTERCEPTOR_BPFFS_DIR",
        default_value = "/sys/fs/bpf/interceptor"
    )]
    pub bpffs_dir: PathBuf,

    /// Most connections handled at once; further clients wait in the listen backlog.
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,

    /// Timeout for connecting to the original destination.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// How long open connections may finish after a shutdown signal.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Enterprise CA certificate (PEM; the issuing CA first, then its chain) that signs the leaves.
    #[arg(long, env = "INTERCEPTOR_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Private key of the enterprise CA (PKCS#8 PEM, not readable by other users).
    #[arg(long, env = "INTERCEPTOR_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// Without --ca-cert/--ca-key: create (or reuse) a development CA in this directory.
    #[arg(long, env = "INTERCEPTOR_DEV_CA_DIR", conflicts_with = "ca_cert")]
    pub dev_ca_dir: Option<PathBuf>,

    /// Extra CA bundle (PEM) trusted for upstream connections, besides webpki's and the system's roots.
    #[arg(long, env = "INTERCEPTOR_UPSTREAM_CA_BUNDLE")]
    pub upstream_ca_bundle: Option<PathBuf>,

    /// Most SNIs whose leaf certificate is kept (LRU).
    #[arg(long, default_value_t = 10_000)]
    pub leaf_cache_size: u64,

    /// How long a client may take to send its ClientHello and complete the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// A client that sends nothing for this long after connecting is relayed untouched (a protocol where
    /// the server speaks first).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub first_byte_timeout: Duration,

    /// Read pod metadata (namespace, workload, labels, service account) from the Kubernetes API:
    /// `auto` uses the in-cluster configuration or a kubeconfig when one exists, `off` never calls it.
    #[arg(long, env = "INTERCEPTOR_KUBERNETES", value_enum, default_value = "auto")]
    pub kubernetes: KubernetesMode,

    /// Kubeconfig to use instead of the in-cluster configuration or `$KUBECONFIG`.
    #[arg(long, env = "INTERCEPTOR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name (set it from the downward API's `spec.nodeName`). Default: the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// How long a request's record waits for a pod that is not listed yet before saying `pod=unknown`
    /// (the request itself never waits).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub pod_wait: Duration,

    /// Longest wait between two attempts to reach the Kubernetes API.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub kubernetes_max_backoff: Duration,

    /// Directory for state that survives restarts (day and month budget use).
    #[arg(long, env = "INTERCEPTOR_STATE_DIR", default_value = "/var/lib/interceptor")]
    pub state_dir: PathBuf,

    /// How often changed budget use is written to the state directory (what a hard crash may lose).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub state_flush_interval: Duration,

    /// Level of the eBPF programs' own log (aya-log): off, error, warn, info, debug, trace.
    #[arg(long, default_value = "warn")]
    pub ebpf_log_level: EbpfLogLevel,
}

/// Log level compiled into the eBPF programs at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EbpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl EbpfLogLevel {
    /// The value of aya-log's `AYA_LOG_LEVEL` global (0 disables everything).
    pub fn as_aya_level(self) -> u8 {
        match self {
            EbpfLogLevel::Off => 0,
            EbpfLogLevel::Error => 1,
            EbpfLogLevel::Warn => 2,
            EbpfLogLevel::Info => 3,
            EbpfLogLevel::Debug => 4,
            EbpfLogLevel::Trace => 5,
        }
    }
}

/// An optional listen address: `off` or `address:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminAddr(pub Option<SocketAddr>);

impl std::str::FromStr for AdminAddr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        value
            .parse()
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{value:?} is not `off` or address:port ({e})"))
    }
}

impl Config {
    /// Checks combinations clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        let v4 = self.node_addresses.iter().filter(|a| a.is_ipv4()).count();
        let v6 = self.node_addresses.iter().filter(|a| a.is_ipv6()).count();
        if v4 > 1 || v6 > 1 {
            return Err(format!(
                "--node-address takes at most one IPv4 and one IPv6 address, got {:?}",
                self.node_addresses
            ));
        }
        if let Some(addr) = self
            .node_addresses
            .iter()
            .find(|a| a.is_unspecified() || a.is_loopback())
        {
            return Err(format!(
                "--node-address {addr}: must be a routable address of this node"
            ));
        }
        Ok(())
    }
}
