//! The Prometheus registry and the metrics read from the eBPF maps at scrape time.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::ebpf::{AttributionMap, Counters};

/// Creates the registry with the build-info metric.
pub fn registry() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new("interceptor_build_info", "Build information (always 1)"),
        &["version", "ebpf_object"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), "embedded"])
        .set(1);
    registry.register(Box::new(build_info))?;
    Ok(registry)
}

/// Facts about the running daemon that alerts watch: the CA's expiry and the attached programs.
pub fn register_daemon_state(
    registry: &Registry,
    ca_not_after: i64,
    programs_attached: usize,
) -> prometheus::Result<()> {
    let expiry = prometheus::IntGauge::new(
        "interceptor_ca_expiry_timestamp_seconds",
        "Earliest notAfter of the enterprise CA and its chain (Unix seconds)",
    )?;
    expiry.set(ca_not_after);
    registry.register(Box::new(expiry))?;
    let attached = prometheus::IntGauge::new(
        "interceptor_ebpf_programs_attached",
        "eBPF programs attached to the cgroup (0 when interception is down)",
    )?;
    attached.set(i64::try_from(programs_attached).unwrap_or(i64::MAX));
    registry.register(Box::new(attached))?;
    Ok(())
}

/// Reads the programs' per-CPU counters and the attribution map sizes at each scrape.
pub struct EbpfCollector {
    counters: Counters,
    attribution: Arc<AttributionMap>,
    events: IntCounterVec,
    entries: IntGaugeVec,
}

impl EbpfCollector {
    pub fn new(counters: Counters, attribution: Arc<AttributionMap>) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "interceptor_redirect_events_total",
                "Decisions of the eBPF connect programs (redirected, skipped, refused, no_route, record_failed)",
            ),
            &["event"],
        )?;
        let entries = IntGaugeVec::new(
            Opts::new(
                "interceptor_ebpf_map_entries",
                "Entries in the eBPF attribution maps",
            ),
            &["map"],
        )?;
        Ok(Self {
            counters,
            attribution,
            events,
            entries,
        })
    }
}

impl Collector for EbpfCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.events
            .desc()
            .into_iter()
            .chain(self.entries.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for (name, value) in self.counters.read() {
            let counter = self.events.with_label_values(&[name]);
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        let (pending, established) = self.attribution.entry_counts();
        self.entries.with_label_values(&["pending"]).set(pending as i64);
        self.entries
            .with_label_values(&["established"])
            .set(established as i64);
        self.events
            .collect()
            .into_iter()
            .chain(self.entries.collect())
            .collect()
    }
}
