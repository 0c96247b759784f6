//! Wiring: builds every subsystem from the configuration and runs until a shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accounting::{AccountingMetrics, AccountingSettings};
use crate::admin::{self, Readiness};
use crate::cgroup::{self, CgroupNames};
use crate::config::Config;
use crate::ebpf::{AttachOptions, RedirectTarget, Redirector};
use crate::identity::Enricher;
use crate::kubernetes::{self, KubernetesSettings, watch::WatchSettings};
use crate::metrics::{self, EbpfCollector};
use crate::policy::{FailureMode, Policy};
use crate::proxy::{self, ProviderRoute, ProxyContext, ProxyMetrics};
use crate::quota::{QuotaEngine, QuotaMetrics};
use crate::reload::{self, ReloadMetrics, Reloadable};
use crate::targets::{TargetDiscovery, TargetMetrics};
use crate::tls::ca::{self, EnterpriseCa};
use crate::tls::leaf::{LeafCerts, LeafMetrics};
use crate::tls::upstream::Upstream;
use arc_swap::ArcSwap;

/// A running daemon.
pub struct App {
    /// Port of the proxy listeners.
    pub proxy_port: u16,
    /// Addresses the proxy listens on.
    pub proxy_addrs: Vec<SocketAddr>,
    /// Address of the admin endpoint, if enabled.
    pub admin_addr: Option<SocketAddr>,
    redirector: Redirector,
    failure_mode: FailureMode,
    drain_timeout: Duration,
    stop_accepting: CancellationToken,
    abort_connections: CancellationToken,
    stop_background: CancellationToken,
    connections: TaskTracker,
    background: TaskTracker,
    audit: Option<crate::audit::AuditWriter>,
}

/// Validates everything, binds, loads and attaches; returns once the daemon serves.
pub async fn build(config: Config) -> anyhow::Result<App> {
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let (policy, policy_text) = match &config.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| crate::policy::PolicyError::Read(path.clone(), e))?;
            (Policy::parse(&text, &path.display().to_string())?, text)
        }
        None => (Policy::builtin()?, crate::policy::DEFAULT_POLICY_YAML.to_owned()),
    };
    let ca = Arc::new(load_ca(&config)?);
    let upstream = Arc::new(
        Upstream::new(
            config.upstream_ca_bundle.as_deref(),
            config.upstream_connect_timeout,
        )
        .context("upstream TLS")?,
    );
    let cgroup_root = match &config.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::discover_cgroup2_mount()?,
    };
    let attach_cgroup: PathBuf = config.cgroup.clone().unwrap_or_else(|| cgroup_root.clone());
    cgroup::check_cgroup_dir(&attach_cgroup)?;

    let (listeners, proxy_port) = proxy::bind(&config.node_addresses, config.proxy_port)?;
    let proxy_addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let host_netns_cookie = {
        use std::os::fd::AsFd as _;
        let first = listeners.first().context("no proxy listener")?;
        crate::sys::netns_cookie(first.as_fd())
            .context("reading the netns cookie (SO_NETNS_COOKIE, Linux 5.14+)")?
    };
    let admin_listener = match config.metrics_addr.0 {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin endpoint {addr}"))?,
        ),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let registry = metrics::registry()?;
    let proxy_metrics = ProxyMetrics::register(&registry)?;
    let identity_labels = Arc::new(crate::metric_labels::IdentityLabels::new(
        &config.metrics_identity_labels,
        config.metrics_max_series,
        &registry,
    )?);
    let accounting_metrics = AccountingMetrics::register(&registry, identity_labels)?;
    let target_metrics = TargetMetrics::register(&registry)?;
    let readiness = Arc::new(Readiness::default());
    let leaf_metrics = LeafMetrics::register(&registry)?;
    let quota = Arc::new(QuotaEngine::new(
        policy.compiled_rules(),
        QuotaMetrics::register(&registry)?,
    ));
    registry.register(Box::new(crate::quota::BudgetCollector::new(quota.clone())?))?;
    let bypass = Arc::new(ArcSwap::from_pointee(policy.bypass_matchers()));
    let audit_content = Arc::new(ArcSwap::from_pointee(policy.content_selection()));
    create_state_dir(&config.state_dir)?;
    let budgets_path = config.state_dir.join(crate::quota::store::FILE_NAME);
    crate::quota::store::restore(&quota, &budgets_path);
    let reload_metrics = ReloadMetrics::register(&registry)?;
    reload_metrics.in_force(&policy_text, quota.rule_count());
    readiness.set_ca_loaded(true);

    let failure_mode = policy.interception.failure_mode;
    if failure_mode == FailureMode::Open {
        // A fail-closed daemon before this one left its links pinned: this one replaces them, unpinned
        // (switching a node to fail-open, and the first step of an uninstall).
        let removed = crate::ebpf::unpin_all(&config.bpffs_dir)?;
        if removed > 0 {
            info!(removed, dir = %config.bpffs_dir.display(), "removed links pinned by a fail-closed daemon");
        }
    }
    let options = AttachOptions {
        cgroup: attach_cgroup.clone(),
        pin_dir: (failure_mode == FailureMode::Closed).then(|| config.bpffs_dir.clone()),
        log_level: config.ebpf_log_level,
    };
    let target = RedirectTarget {
        proxy_port,
        node_addresses: config.node_addresses.clone(),
        host_netns_cookie,
        learning: crate::ebpf::LearningSettings {
            learn_dns: policy.discovery.learn_from_dns,
            grace: policy.discovery.dns_grace,
            max_ttl: policy.discovery.dns_max_ttl,
            watch_hellos: policy.discovery.report_escapes,
        },
    };
    let (redirector, mut maps) = Redirector::attach(&options, &target)?;
    let watched_domains =
        crate::watched::watched_domains(&policy.provider_targets(), &policy.discovery.encrypted_dns_names);
    crate::watched::install(&mut maps.watched, &watched_domains)?;
    readiness.set_programs_attached(true);
    metrics::register_daemon_state(&registry, ca.not_after, redirector.attached().len())?;
    let attribution = Arc::new(maps.attribution);
    registry.register(Box::new(EbpfCollector::new(maps.counters, attribution.clone())?))?;

    let stop_background = CancellationToken::new();
    let background = TaskTracker::new();
    if let Some(logger) = maps.logger {
        background.spawn(crate::ebpf::forward_logs(logger, stop_background.clone()));
    }

    let mut discovery = TargetDiscovery::new(
        policy.provider_targets(),
        policy.discovery.clone(),
        maps.targets,
        maps.learned,
        target_metrics,
    );
    discovery.install_static();
    let published_targets = discovery.published();
    readiness.set_targets_installed(true);
    background.spawn(discovery.run(stop_background.clone()));

    if let Some(redis) = policy.budget_store.redis.clone() {
        background.spawn(crate::quota::cluster::run(
            quota.clone(),
            redis,
            policy.budget_store.on_unavailable,
            crate::quota::cluster::ClusterMetrics::register(&registry)?,
            stop_background.clone(),
        ));
    }
    background.spawn(crate::quota::store::run(
        quota.clone(),
        budgets_path,
        config.state_flush_interval,
        stop_background.clone(),
    ));
    if let Some(path) = &config.policy {
        background.spawn(reload::run(
            path.clone(),
            policy_text.clone(),
            Reloadable {
                quota: quota.clone(),
                bypass: bypass.clone(),
                content: audit_content.clone(),
            },
            reload_metrics.clone(),
            stop_background.clone(),
        ));
    }
    let kubernetes = KubernetesSettings {
        mode: config.kubernetes,
        kubeconfig: config.kubeconfig.clone(),
        watch: WatchSettings {
            node_name: kubernetes::node_name(config.node_name.as_deref())?,
            max_backoff: config.kubernetes_max_backoff,
            sweep_interval: Duration::from_secs(30),
        },
        departed_grace: Duration::from_secs(300),
        owner_timeout: Duration::from_secs(5),
        pod_wait: config.pod_wait,
    };
    let pods = kubernetes::start(&kubernetes, &registry, &background, stop_background.clone()).await?;
    let audit_metrics = crate::audit::AuditMetrics::register(&registry)?;
    background.spawn(crate::escapes::run(
        maps.sni_events,
        crate::escapes::EscapeReporter::new(
            watched_domains.into_iter().map(|d| d.pattern).collect(),
            CgroupNames::new(cgroup_root.clone(), config.proc_root.clone()),
            pods.clone(),
            crate::escapes::EscapeMetrics::register(&registry)?,
        ),
        stop_background.clone(),
    ));

    if let Some(listener) = admin_listener {
        background.spawn(admin::serve(
            listener,
            registry,
            readiness.clone(),
            stop_background.clone(),
        ));
    }

    let providers = policy
        .provider_targets()
        .into_iter()
        .map(|t| ProviderRoute {
            pattern: t.domain,
            adapter: t.adapter,
            name: Arc::from(t.name),
        })
        .collect();
    let mut accounting = AccountingSettings::from_policy(&policy, accounting_metrics)?;
    let audit_settings = crate::audit::AuditSettings {
        destination: config.audit_log.clone(),
        max_bytes: config.audit_max_bytes,
        keep: config.audit_keep,
        queue: config.audit_queue,
    };
    let audit_writer = match crate::audit::start(&audit_settings, audit_metrics)
        .with_context(|| format!("opening the audit log {:?}", audit_settings.destination))?
    {
        Some((log, writer)) => {
            accounting.audit = Some(log);
            Some(writer)
        }
        None => None,
    };
    let board = accounting.board.clone();
    let status_quota = quota.clone();
    let accounting = Arc::new(accounting);
    info!(
        prices_source_date = accounting.prices.source_date(),
        priced_models = accounting.prices.model_count(),
        stream_usage = ?accounting.stream_usage,
        "price table loaded"
    );
    let ctx = Arc::new(ProxyContext {
        attribution,
        enricher: Arc::new(Enricher::new(CgroupNames::new(
            cgroup_root.clone(),
            config.proc_root.clone(),
        ))),
        metrics: proxy_metrics,
        upstream_connect_timeout: config.upstream_connect_timeout,
        hello_timeout: config.handshake_timeout,
        first_byte_timeout: config.first_byte_timeout,
        providers,
        accounting,
        bypass: bypass.clone(),
        audit_content,
        pods,
        quota: quota.clone(),
        leaves: Arc::new(LeafCerts::new(
            ca.clone(),
            policy.interception.leaf_ttl,
            config.leaf_cache_size,
            leaf_metrics,
        )),
        upstream,
    });
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let stop_accepting = CancellationToken::new();
    let abort_connections = CancellationToken::new();
    let connections = TaskTracker::new();
    for listener in listeners {
        background.spawn(proxy::accept::serve(
            listener,
            ctx.clone(),
            limit.clone(),
            connections.clone(),
            stop_accepting.clone(),
            abort_connections.clone(),
        ));
    }

    info!(
        proxy_port,
        proxy_addrs = ?proxy_addrs,
        admin_addr = admin_addr.map(|a| a.to_string()),
        cgroup_root = %cgroup_root.display(),
        attach_cgroup = %attach_cgroup.display(),
        failure_mode = ?failure_mode,
        programs = ?redirector.attached(),
        ca = %ca.subject,
        "interceptor ready"
    );
    if config.admin_socket.as_os_str() != "off" {
        let listener = crate::status::bind(&config.admin_socket)?;
        let sources = Arc::new(crate::status::StatusSources {
            started: std::time::Instant::now(),
            failure_mode: match failure_mode {
                FailureMode::Open => "open",
                FailureMode::Closed => "closed",
            },
            programs: redirector.attached().iter().map(|p| (*p).to_owned()).collect(),
            targets: published_targets,
            quota: status_quota,
            board,
        });
        background.spawn(crate::status::serve(
            listener,
            config.admin_socket.clone(),
            sources,
            stop_background.clone(),
        ));
    }

    Ok(App {
        proxy_port,
        proxy_addrs,
        admin_addr,
        redirector,
        failure_mode,
        drain_timeout: config.drain_timeout,
        stop_accepting,
        abort_connections,
        stop_background,
        connections,
        background,
        audit: audit_writer,
    })
}

/// The state directory, created readable by root only when missing.
fn create_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))
}

/// The configured CA, or a development CA generated (once) in `--dev-ca-dir`.
fn load_ca(config: &Config) -> anyhow::Result<EnterpriseCa> {
    let (cert, key) = match (&config.ca_cert, &config.ca_key, &config.dev_ca_dir) {
        (Some(cert), Some(key), _) => (cert.clone(), key.clone()),
        (_, _, Some(dir)) => {
            let (files, created) = ca::init(dir, "interceptor development CA")?;
            if created {
                info!(cert = %files.cert.display(), "generated a development CA; make clients trust it:\n{}", ca::trust_instructions(&files.cert));
            }
            (files.cert, files.key)
        }
        _ => anyhow::bail!("no CA configured: pass --ca-cert and --ca-key (or --dev-ca-dir DIR)"),
    };
    Ok(EnterpriseCa::load(&cert, &key)?)
}

impl App {
    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn wait_termination(self) -> anyhow::Result<()> {
        let signal = crate::signal::shutdown()
            .await
            .context("installing signal handlers")?;
        info!(signal, "shutting down");
        self.shutdown().await;
        Ok(())
    }

    /// Graceful shutdown: new connections go direct (fail-open) or stay redirected (fail-closed), open
    /// connections drain within the deadline, and the programs are detached last.
    pub async fn shutdown(mut self) {
        if self.failure_mode == FailureMode::Open
            && let Err(e) = self.redirector.set_enabled(false)
        {
            warn!(error = %e, "cannot pause redirection before draining");
        }
        self.stop_accepting.cancel();
        self.connections.close();
        if tokio::time::timeout(self.drain_timeout, self.connections.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.connections.len(),
                "drain deadline passed; closing the remaining connections"
            );
            self.abort_connections.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.connections.wait()).await;
        }
        if let Some(audit) = &self.audit {
            // Records of the drained connections (a pod wait or an estimate may still be running).
            audit.drain(Duration::from_secs(2)).await;
        }
        self.stop_background.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.background.wait()).await;
        self.redirector.detach();
        info!("shutdown complete");
    }
}
