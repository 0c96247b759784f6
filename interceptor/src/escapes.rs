//! Reports what the ClientHello watcher (`watch_hellos` in `interceptor-ebpf`) saw: TLS connections to
//! a provider that did not go through the proxy ("escaped", what operators alert on), and connections
//! to encrypted-DNS endpoints, whose answers the node cannot see.
//!
//! Each event carries the sending socket's cgroup; it is named (cgroup path, pod, workload) off the
//! event loop, counted, and logged at most once a minute per (cgroup, domain).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use interceptor_ebpf::{SNI_EVENT_DOH, SNI_EVENT_DOT, SNI_EVENT_ESCAPED, SniEvent};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::cgroup::CgroupNames;
use crate::kubernetes::{PodAttribution, PodRef};

/// How often one (cgroup, domain) pair is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Pairs remembered for log rate limiting (cleared when full).
const MAX_REMEMBERED: usize = 4_096;
/// Events handled per batch.
const BATCH: usize = 256;

/// Metrics of escaped and encrypted-DNS connections.
#[derive(Clone)]
pub struct EscapeMetrics {
    escaped: IntCounterVec,
    encrypted_dns: IntCounterVec,
}

impl EscapeMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let escaped = IntCounterVec::new(
            Opts::new(
                "interceptor_escaped_connections_total",
                "TLS connections whose SNI is a provider domain but whose destination was not a target \
                 (not intercepted: not attributed, not accounted, not limited)",
            ),
            &["domain", "namespace", "workload"],
        )?;
        let encrypted_dns = IntCounterVec::new(
            Opts::new(
                "interceptor_encrypted_dns_connections_total",
                "TLS connections to DNS-over-HTTPS names (kind=doh) or to port 853 (kind=dot): DNS \
                 answers the node cannot see, so provider addresses learned from DNS may be missing",
            ),
            &["kind", "namespace", "workload"],
        )?;
        registry.register(Box::new(escaped.clone()))?;
        registry.register(Box::new(encrypted_dns.clone()))?;
        Ok(Self {
            escaped,
            encrypted_dns,
        })
    }
}

/// Names events and counts them.
pub struct EscapeReporter {
    /// Watched name patterns by domain index.
    domains: Vec<String>,
    cgroups: CgroupNames,
    pods: Option<Arc<PodAttribution>>,
    metrics: EscapeMetrics,
    last_logged: Mutex<HashMap<(u64, u32, u32), Instant>>,
}

/// Who sent a reported ClientHello.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sender {
    cgroup: Option<String>,
    namespace: String,
    pod: String,
    workload: String,
}

impl EscapeReporter {
    pub fn new(
        domains: Vec<String>,
        cgroups: CgroupNames,
        pods: Option<Arc<PodAttribution>>,
        metrics: EscapeMetrics,
    ) -> Self {
        Self {
            domains,
            cgroups,
            pods,
            metrics,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// Blocking (names cgroups through the filesystem): call from a blocking task.
    fn handle(&self, event: &SniEvent) {
        let sender = self.sender(event.cgroup_id);
        let destination = crate::ebpf::socket_addr_from(&event.addr, event.port);
        let domain = match event.kind {
            SNI_EVENT_DOT => "",
            _ => self
                .domains
                .get(event.domain_index as usize)
                .map(String::as_str)
                .unwrap_or("unknown"),
        };
        let kind = match event.kind {
            SNI_EVENT_ESCAPED => {
                self.metrics
                    .escaped
                    .with_label_values(&[domain, &sender.namespace, &sender.workload])
                    .inc();
                "escaped"
            }
            SNI_EVENT_DOH | SNI_EVENT_DOT => {
                let kind = if event.kind == SNI_EVENT_DOH { "doh" } else { "dot" };
                self.metrics
                    .encrypted_dns
                    .with_label_values(&[kind, &sender.namespace, &sender.workload])
                    .inc();
                kind
            }
            _ => return,
        };
        if !self.should_log(event) {
            return;
        }
        let cgroup = sender.cgroup.as_deref().unwrap_or("unknown");
        let message = if kind == "escaped" {
            "TLS connection to a provider bypassed the proxy: its address is not a target (DNS over HTTPS, \
             a hard-coded address, or an answer the node did not see)"
        } else {
            "encrypted DNS in use: provider addresses this workload resolves are not learned"
        };
        warn!(
            kind,
            domain,
            %destination,
            cgroup,
            namespace = %sender.namespace,
            pod = %sender.pod,
            workload = %sender.workload,
            uid = event.uid,
            "{message}"
        );
    }

    fn should_log(&self, event: &SniEvent) -> bool {
        let Ok(mut last) = self.last_logged.lock() else {
            return true;
        };
        let key = (event.cgroup_id, event.kind, event.domain_index);
        let now = Instant::now();
        if last
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < LOG_INTERVAL)
        {
            return false;
        }
        if last.len() >= MAX_REMEMBERED {
            last.clear();
        }
        last.insert(key, now);
        true
    }

    fn sender(&self, cgroup_id: u64) -> Sender {
        let Some(cgroup) = self.cgroups.name(cgroup_id, 0) else {
            return Sender::default();
        };
        let placement = crate::container::parse(&cgroup);
        let mut sender = Sender {
            workload: placement.systemd_unit.clone().unwrap_or_default(),
            ..Sender::default()
        };
        if let Some(pods) = &self.pods {
            match pods.lookup(placement.pod_uid.as_deref()) {
                PodRef::Known(pod) => {
                    sender.namespace = pod.namespace.to_string();
                    sender.pod = pod.name.to_string();
                    sender.workload = pod.workload.to_string();
                }
                PodRef::Pending(uid) => sender.pod = format!("uid:{uid}"),
                PodRef::NotAPod => {}
            }
        }
        sender.cgroup = Some(cgroup);
        sender
    }
}

/// Reads the event ring buffer until `shutdown`.
pub async fn run(ring: RingBuf<MapData>, reporter: EscapeReporter, shutdown: CancellationToken) {
    let reporter = Arc::new(reporter);
    let mut fd = match crate::ebpf::register_ring(ring) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the ClientHello event buffer; escaped connections are only counted");
            return;
        }
    };
    while let Some(mut guard) =
        crate::ebpf::next_readable(&mut fd, &shutdown, "the ClientHello event buffer").await
    {
        let mut batch = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while batch.len() < BATCH {
                let Some(item) = ring.next() else { break };
                if let Some(event) = SniEvent::from_bytes(&item) {
                    batch.push(event);
                }
            }
        }
        if batch.len() < BATCH {
            guard.clear_ready();
        }
        drop(guard);
        if batch.is_empty() {
            continue;
        }
        let reporter = reporter.clone();
        let handled = tokio::task::spawn_blocking(move || {
            for event in &batch {
                reporter.handle(event);
            }
        });
        if let Err(e) = handled.await {
            warn!(error = %e, "handling ClientHello events failed");
        }
    }
}
