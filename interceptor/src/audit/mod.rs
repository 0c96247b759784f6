//! The audit log: one JSON line per request, written by a thread of its own.
//!
//! The data path only hands a finished [`AuditEntry`] to a bounded queue (`try_send`, never waiting):
//! when the queue is full, or the writer cannot write (full disk, read-only or removed file), the line
//! is dropped and counted, and traffic goes on. Lines are never split: a failed write is cut back to
//! the last complete line. Under load the writer takes what is queued in batches, one write call each,
//! at most about every [`LINGER`].

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
    /// Writes `lines` (one or more complete lines, each ending in `\n`) whole, or not at all.
    /// Returns whether a rotation happened.
    fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<bool>;

    /// Bytes that fit before the sink rotates: a batch never crosses a rotation.
    fn room(&self) -> u64 {
        u64::MAX
    }
}

struct StdoutSink;

impl LineSink for StdoutSink {
    fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<bool> {
        // One write under the lock: lines never interleave with the daemon's log lines.
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(lines)?;
        stdout.flush()?;
        Ok(false)
    }
}

/// After writing what was queued, the writer waits this long before it looks again. Under load this
/// bounds its wake-ups and write calls to about 50 a second, whatever the request rate (one per
/// request would cost a thread wake-up and a write call each); an audit line is written at most this
/// much later. An idle writer wakes as soon as a line comes.
const LINGER: Duration = Duration::from_millis(20);

/// Largest batch of lines handed to one write.
const MAX_BATCH_BYTES: usize = 256 << 10;

fn write_lines(
    receiver: Receiver<AuditEntry>,
    mut sink: Box<dyn LineSink>,
    metrics: AuditMetrics,
    pending: Arc<AtomicUsize>,
) {
    let mut batch = Batch::default();
    while let Ok(first) = receiver.recv() {
        let mut taken = 1;
        batch.add(&first, sink.as_mut(), &metrics);
        while let Ok(entry) = receiver.try_recv() {
            taken += 1;
            batch.add(&entry, sink.as_mut(), &metrics);
        }
        batch.flush(sink.as_mut(), &metrics);
        pending.fetch_sub(taken, Ordering::AcqRel);
        std::thread::sleep(LINGER);
    }
}

/// Serialized lines waiting for one write.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
    line: Vec<u8>,
    identities: entry::IdentityCache,
    /// The last write failed (one warning per outage, not one per line).
    failing: bool,
}

impl Batch {
    fn add(&mut self, entry: &AuditEntry, sink: &mut dyn LineSink, metrics: &AuditMetrics) {
        self.line.clear();
        let written = entry::Line::new(entry, &mut self.identities)
            .and_then(|line| serde_json::to_writer(&mut self.line, &line));
        if let Err(e) = written {
            warn!(error = %e, "cannot serialize an audit line");
            metrics.dropped.with_label_values(&["write_error"]).inc();
            return;
        }
        self.line.push(b'\n');
        let line = std::mem::take(&mut self.line);
        self.add_line(&line, sink, metrics);
        self.line = line;
    }

    /// Adds one complete line; the batch is written first when the line would take it past the
    /// batch size or the sink's next rotation.
    fn add_line(&mut self, line: &[u8], sink: &mut dyn LineSink, metrics: &AuditMetrics) {
        let grown = self.bytes.len() + line.len();
        if self.lines > 0 && (grown > MAX_BATCH_BYTES || grown as u64 > sink.room()) {
            self.flush(sink, metrics);
        }
        self.bytes.extend_from_slice(line);
        self.lines += 1;
    }

    fn flush(&mut self, sink: &mut dyn LineSink, metrics: &AuditMetrics) {
        if self.lines == 0 {
            return;
        }
        match sink.write_lines(&self.bytes) {
            Ok(rotated) => self.written(self.lines, rotated, metrics),
            Err(_) if self.lines > 1 => {
                // Line by line, so that every line that still fits is kept (a nearly full disk).
                let bytes = std::mem::take(&mut self.bytes);
                for line in bytes.split_inclusive(|&b| b == b'\n') {
                    match sink.write_lines(line) {
                        Ok(rotated) => self.written(1, rotated, metrics),
                        Err(e) => self.dropped(1, &e, metrics),
                    }
                }
                self.bytes = bytes;
            }
            Err(e) => self.dropped(self.lines, &e, metrics),
        }
        self.bytes.clear();
        self.lines = 0;
    }

    fn written(&mut self, lines: u64, rotated: bool, metrics: &AuditMetrics) {
        metrics.written.inc_by(lines);
        if rotated {
            metrics.rotations.inc();
        }
        if self.failing {
            info!("audit log writable again");
            self.failing = false;
        }
    }

    fn dropped(&mut self, lines: u64, error: &std::io::Error, metrics: &AuditMetrics) {
        metrics.dropped.with_label_values(&["write_error"]).inc_by(lines);
        if !self.failing {
            warn!(error = %error, "cannot write the audit log; lines are dropped and counted until it works again");
            self.failing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes whole writes while they fit in `capacity` bytes, and rotates every `rotate_at` bytes.
    struct SmallDisk {
        written: Vec<u8>,
        capacity: usize,
        file_size: u64,
        rotate_at: u64,
        writes: usize,
    }

    impl LineSink for SmallDisk {
        fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<bool> {
            if self.written.len() + lines.len() > self.capacity {
                return Err(std::io::Error::other("no space left on device"));
            }
            let rotated = self.file_size > 0 && self.file_size + lines.len() as u64 > self.rotate_at;
            if rotated {
                self.file_size = 0;
            }
            assert!(
                self.file_size + lines.len() as u64 <= self.rotate_at,
                "a batch crossed a rotation"
            );
            self.file_size += lines.len() as u64;
            self.written.extend_from_slice(lines);
            self.writes += 1;
            Ok(rotated)
        }

        fn room(&self) -> u64 {
            self.rotate_at - self.file_size
        }
    }

    fn disk(capacity: usize, rotate_at: u64) -> SmallDisk {
        SmallDisk {
            written: Vec::new(),
            capacity,
            file_size: 0,
            rotate_at,
            writes: 0,
        }
    }

    #[test]
    fn lines_go_out_in_one_write_per_batch_and_batches_never_cross_a_rotation() {
        let metrics = AuditMetrics::register(&Registry::new()).expect("metrics");
        let mut sink = disk(usize::MAX, 25);
        let mut batch = Batch::default();
        for line in ["{\"n\":1}\n", "{\"n\":2}\n", "{\"n\":3}\n", "{\"n\":4}\n"] {
            batch.add_line(line.as_bytes(), &mut sink, &metrics);
        }
        batch.flush(&mut sink, &metrics);
        // 8 bytes a line, 25 a file: three lines, then a rotation before the fourth.
        assert_eq!(sink.writes, 2);
        assert_eq!(metrics.written.get(), 4);
        assert_eq!(metrics.rotations.get(), 1);
    }

    #[test]
    fn a_batch_that_does_not_fit_keeps_every_line_that_does() {
        let metrics = AuditMetrics::register(&Registry::new()).expect("metrics");
        let mut sink = disk(20, u64::MAX);
        let mut batch = Batch::default();
        for line in ["{\"n\":1}\n", "{\"n\":2}\n", "{\"n\":3}\n"] {
            batch.add_line(line.as_bytes(), &mut sink, &metrics);
        }
        batch.flush(&mut sink, &metrics);
        assert_eq!(sink.written, b"{\"n\":1}\n{\"n\":2}\n", "whole lines only");
        assert_eq!(metrics.written.get(), 2);
        assert_eq!(metrics.dropped.with_label_values(&["write_error"]).get(), 1);
    }

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
