//! The audit log: one JSON line per request, written by a thread of its own.
//!
//! The data path only hands a finished [`AuditEntry`] to a bounded queue (`try_send`, never waiting):
//! when the queue is full, or the writer cannot write (full disk, read-only or removed file), the line
//! is dropped and counted, and traffic goes on. Lines are never split: a failed write is cut back to
//! the last complete line.

mod content;
mod entry;
mod rotate;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tracing::{info, warn};

pub use rotate::RotatingFile;

/// Where the audit lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditDestination {
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AuditDestination {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" | "" => AuditDestination::Off,
            "-" | "stdout" => AuditDestination::Stdout,
            path => AuditDestination::File(PathBuf::from(path)),
        })
    }
}

/// How the audit log is written.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    pub destination: AuditDestination,
    /// A file is rotated before it would grow past this size.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` the newest).
    pub keep: usize,
    /// Lines waiting for the writer; more are dropped.
    pub queue: usize,
}

pub use content::{CapturedContent, ContentCapture};
pub use entry::{AuditEntry, AuditTokens};

/// Audit counters.
#[derive(Clone)]
pub struct AuditMetrics {
    written: IntCounter,
    dropped: IntCounterVec,
    rotations: IntCounter,
}

impl AuditMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let written = IntCounter::new("interceptor_audit_records_total", "Audit lines written")?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "interceptor_audit_dropped_total",
                "Audit lines dropped: reason = queue_full (the writer is behind), write_error (full disk, \
                 unwritable file)",
            ),
            &["reason"],
        )?;
        let rotations = IntCounter::new("interceptor_audit_rotations_total", "Audit files rotated")?;
        registry.register(Box::new(written.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(rotations.clone()))?;
        for reason in ["queue_full", "write_error"] {
            dropped.with_label_values(&[reason]);
        }
        Ok(Self {
            written,
            dropped,
            rotations,
        })
    }
}

/// The data path's handle on the audit log.
#[derive(Clone)]
pub struct AuditLog {
    sender: SyncSender<AuditEntry>,
    /// Lines queued and not yet handled by the writer.
    pending: Arc<AtomicUsize>,
    metrics: AuditMetrics,
}

impl AuditLog {
    /// Queues `entry`; drops (and counts) it when the writer is behind.
    pub fn record(&self, entry: AuditEntry) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.sender.try_send(entry).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.dropped.with_label_values(&["queue_full"]).inc();
        }
    }
}

/// The writer thread, for a graceful shutdown.
pub struct AuditWriter {
    pending: Arc<AtomicUsize>,
    _thread: JoinHandle<()>,
}

impl AuditWriter {
    /// Waits (at most `timeout`) until every queued line is written.
    pub async fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.pending.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                warn!(
                    lines = self.pending.load(Ordering::Acquire),
                    "the audit writer did not finish in time; queued lines are lost"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Starts the writer. `None` when the audit log is off.
pub fn start(
    settings: &AuditSettings,
    metrics: AuditMetrics,
) -> std::io::Result<Option<(AuditLog, AuditWriter)>> {
    // A file that cannot be opened yet is retried on each line: only the thread can fail here.
    let sink: Box<dyn LineSink> = match &settings.destination {
        AuditDestination::Off => return Ok(None),
        AuditDestination::Stdout => Box::new(StdoutSink),
        AuditDestination::File(path) => {
            let (file, error) = RotatingFile::open_or_retry(path.clone(), settings.max_bytes, settings.keep);
            if let Some(e) = error {
                warn!(path = %path.display(), error = %e, "cannot open the audit log yet; lines are dropped and counted until it can be written");
            }
            Box::new(file)
        }
    };
    let (sender, receiver) = std::sync::mpsc::sync_channel(settings.queue.max(1));
    let pending = Arc::new(AtomicUsize::new(0));
    let writer_metrics = metrics.clone();
    let writer_pending = pending.clone();
    let thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || write_lines(receiver, sink, writer_metrics, writer_pending))?;
    info!(destination = ?settings.destination, "audit log on");
    Ok(Some((
        AuditLog {
            sender,
            pending: pending.clone(),
            metrics,
        },
        AuditWriter {
            pending,
            _thread: thread,
        },
    )))
}

/// Where the writer puts complete lines.
pub trait LineSink: Send {
    /// Writes one line (ending in `\n`) whole, or not at all. Returns whether a rotation happened.
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<bool>;
}

struct StdoutSink;

impl LineSink for StdoutSink {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<bool> {
        // One write under the lock: lines never interleave with the daemon's log lines.
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(line)?;
        stdout.flush()?;
        Ok(false)
    }
}

fn write_lines(
    receiver: Receiver<AuditEntry>,
    mut sink: Box<dyn LineSink>,
    metrics: AuditMetrics,
    pending: Arc<AtomicUsize>,
) {
    let mut line = Vec::with_capacity(1024);
    let mut failing = false;
    while let Ok(entry) = receiver.recv() {
        write_one(&entry, &mut line, sink.as_mut(), &metrics, &mut failing);
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

fn write_one(
    entry: &AuditEntry,
    line: &mut Vec<u8>,
    sink: &mut dyn LineSink,
    metrics: &AuditMetrics,
    failing: &mut bool,
) {
    line.clear();
    if let Err(e) = serde_json::to_writer(&mut *line, entry) {
        warn!(error = %e, "cannot serialize an audit line");
        metrics.dropped.with_label_values(&["write_error"]).inc();
        return;
    }
    line.push(b'\n');
    match sink.write_line(line) {
        Ok(rotated) => {
            metrics.written.inc();
            if rotated {
                metrics.rotations.inc();
            }
            if *failing {
                info!("audit log writable again");
                *failing = false;
            }
        }
        Err(e) => {
            metrics.dropped.with_label_values(&["write_error"]).inc();
            // One line per outage, not one per request.
            if !*failing {
                warn!(error = %e, "cannot write the audit log; lines are dropped and counted until it works again");
                *failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse() {
        assert_eq!(
            "off".parse::<AuditDestination>().ok(),
            Some(AuditDestination::Off)
        );
        assert_eq!(
            "-".parse::<AuditDestination>().ok(),
            Some(AuditDestination::Stdout)
        );
        assert_eq!(
            "/var/log/a.log".parse::<AuditDestination>().ok(),
            Some(AuditDestination::File("/var/log/a.log".into()))
        );
    }
}
