//! The audit log end to end: one JSON line per request, matching what the simulated providers sent one
//! to one across size-based rotations; a read-only or full file drops (and counts) lines without
//! slowing or failing traffic, and never leaves a partial line. Run with `--test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::scenario::{Scenario, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";
const MESSAGES: &str = "https://api.anthropic.com/v1/messages";

fn chat_body(i: usize, stream: bool) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"request {i}"}}]}}"#
    )
}

const MESSAGES_BODY: &str =
    r#"{"model":"claude-3-5-haiku-latest","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;

/// Sends request `i` (chat, streamed chat or Anthropic messages, in turn) and checks it succeeded.
fn send(s: &Scenario, i: usize) {
    let curl = match i % 3 {
        0 => s.pod_post_json(CHAT, &chat_body(i, false), &[]),
        1 => s.pod_post_json(CHAT, &chat_body(i, true), &[]),
        _ => s.pod_post_json(MESSAGES, MESSAGES_BODY, &["-H", "anthropic-version: 2023-06-01"]),
    }
    .expect("curl");
    assert!(curl.success(), "request {i}: {}", curl.describe());
    assert!(!curl.stdout().is_empty(), "request {i} got a body");
}

/// Waits until written + dropped audit lines reach `total`.
fn wait_handled(s: &Scenario, total: f64) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let written = s.daemon.metric("interceptor_audit_records_total").unwrap_or(0.0);
        let dropped = s
            .daemon
            .metric(r#"interceptor_audit_dropped_total{reason="write_error"}"#)
            .unwrap_or(0.0)
            + s.daemon
                .metric(r#"interceptor_audit_dropped_total{reason="queue_full"}"#)
                .unwrap_or(0.0);
        if written + dropped >= total || Instant::now() > deadline {
            return (written, dropped);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every line of the audit files (oldest first), parsed; panics on a partial or invalid line.
fn read_lines(path: &Path, keep: usize) -> (Vec<Value>, Vec<PathBuf>) {
    let files = interceptor::audit::RotatingFile::files(path, keep);
    let mut lines = Vec::new();
    for file in files.iter().rev() {
        let text = std::fs::read_to_string(file).expect("read audit file");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{file:?} ends with a whole line"
        );
        for line in text.lines() {
            lines.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("{file:?}: {e}: {line}")));
        }
    }
    (lines, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_match_requests_one_to_one_across_rotation() {
    if !tests::privileged_available("audit_lines_match_requests_one_to_one_across_rotation") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ict-audit-rotation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("audit.log");
    let path_arg = path.display().to_string();
    let policy = format!(
        "{}rules:\n  - name: generous\n    limits:\n      requestsPerMinute: 1000\n",
        policy("open")
    );
    let mut s = Scenario::start(
        &policy,
        &[
            "--audit-log",
            &path_arg,
            "--audit-max-bytes",
            "4096",
            "--audit-keep",
            "100",
            // The default filter: with the audit log on, no second (log) line per request.
            "--log-level",
            "info",
        ],
    )
    .expect("simulated node and daemon start");

    const REQUESTS: usize = 30;
    for i in 0..REQUESTS {
        send(&s, i);
    }
    let (written, dropped) = wait_handled(&s, REQUESTS as f64);
    assert_eq!((written, dropped), (REQUESTS as f64, 0.0));
    s.daemon.stop().expect("graceful stop");
    let logged_requests = s
        .daemon
        .logs()
        .iter()
        .filter(|l| l["message"] == "request")
        .count();
    assert_eq!(
        logged_requests, 0,
        "the audit log has the request lines; the log must not repeat them"
    );

    let (lines, files) = read_lines(&path, 100);
    assert!(files.len() >= 3, "rotated by size: {files:?}");
    for file in &files {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        assert!(size <= 4096, "{file:?} is {size} bytes");
    }
    assert_eq!(lines.len(), REQUESTS, "one line per request");

    // One to one with what the providers sent: same ids, same token counts.
    let sent: BTreeMap<String, tests::provider::Sent> = s
        .provider
        .ledger
        .all()
        .into_iter()
        .map(|sent| (sent.id.clone(), sent))
        .collect();
    assert_eq!(sent.len(), REQUESTS, "the providers answered each request once");
    let mut ids = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut previous_time = String::new();
    for line in &lines {
        assert!(
            ids.insert(line["id"].as_str().expect("id").to_owned()),
            "unique ids: {line}"
        );
        let time = line["time"].as_str().expect("time").to_owned();
        assert!(
            time >= previous_time,
            "lines in time order: {time} after {previous_time}"
        );
        previous_time = time;
        let provider_id = line["provider_request_id"].as_str().expect("provider_request_id");
        let expected = sent
            .get(provider_id)
            .unwrap_or_else(|| panic!("{provider_id} was sent: {line}"));
        assert!(seen.insert(provider_id.to_owned()), "{provider_id} audited twice");
        assert_eq!(line["tokens"]["input"], expected.input, "{line}");
        assert_eq!(line["tokens"]["output"], expected.output, "{line}");
        assert_eq!(line["estimated"], false, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["usage"], "reported", "{line}");
        assert_eq!(line["decision"], "allowed", "{line}");
        assert!(
            line["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
            "priced: {line}"
        );
        assert!(line["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{line}");
        assert!(
            line["identity"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/curl")),
            "attributed: {line}"
        );
        assert_eq!(line["identity"]["comm"], "curl", "{line}");
        assert!(line["identity"]["cgroup"].is_string(), "{line}");
        // Never the prompt or the completion.
        let text = line.to_string();
        assert!(
            !text.contains("request ") && !text.contains("\"hi\""),
            "no prompt text: {text}"
        );
    }
    let providers: BTreeSet<&str> = lines.iter().filter_map(|l| l["provider"].as_str()).collect();
    assert_eq!(providers, BTreeSet::from(["anthropic", "openai"]));
    let streams = lines.iter().filter(|l| l["stream"] == true).count();
    assert_eq!(streams, REQUESTS / 3, "streamed chats are marked");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small tmpfs, unmounted (lazily) on drop; a crashed run's mounts are removed first.
struct SmallFs {
    dir: PathBuf,
}

const SMALL_FS_PREFIX: &str = "ict-audit-smallfs-";

impl SmallFs {
    fn mount(kib: u32) -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mountinfo.lines() {
            if let Some(point) = line.split(' ').nth(4).filter(|p| p.contains(SMALL_FS_PREFIX)) {
                tests::cmd::quiet("umount", &["-l", point]);
            }
        }
        let dir = std::env::temp_dir().join(format!("{SMALL_FS_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mount point");
        tests::cmd::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        )
        .expect("mount tmpfs");
        Self { dir }
    }

    fn remount(&self, mode: &str) {
        tests::cmd::run(
            "mount",
            &["-o", &format!("remount,{mode}"), &self.dir.display().to_string()],
        )
        .expect("remount");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        tests::cmd::quiet("umount", &["-l", &self.dir.display().to_string()]);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_or_full_audit_file_drops_lines_and_never_blocks_traffic() {
    if !tests::privileged_available("an_unwritable_or_full_audit_file_drops_lines_and_never_blocks_traffic") {
        return;
    }
    let fs = SmallFs::mount(16);
    let path = fs.dir.join("audit.log");
    // Read-only before the daemon starts: it starts anyway and retries the file.
    fs.remount("ro");
    let path_arg = path.display().to_string();
    let s = Scenario::start(&policy("open"), &["--audit-log", &path_arg]).expect("daemon starts");
    for i in 0..3 {
        send(&s, i);
    }
    let (written, dropped) = wait_handled(&s, 3.0);
    assert_eq!(
        (written, dropped),
        (0.0, 3.0),
        "a read-only file drops and counts"
    );
    assert!(
        s.daemon
            .logs()
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains("audit log")) && l["level"] == "WARN")
            .count()
            <= 2,
        "one warning per outage, not one per line"
    );

    // Writable again: lines flow after the retry interval.
    fs.remount("rw");
    std::thread::sleep(Duration::from_millis(1100));
    send(&s, 3);
    let (written, _) = wait_handled(&s, 4.0);
    assert_eq!(written, 1.0, "written again once the file can be opened");

    // Fill the 16 KiB: the lines that do not fit are dropped, every request still succeeds.
    const MORE: usize = 40;
    for i in 4..4 + MORE {
        send(&s, i);
    }
    let (written, dropped) = wait_handled(&s, (4 + MORE) as f64);
    assert_eq!(
        written + dropped,
        (4 + MORE) as f64,
        "every line written or counted"
    );
    assert!(dropped > 3.0, "a full disk drops lines: {dropped}");
    let (lines, _) = read_lines(&path, 5);
    assert_eq!(
        lines.len() as f64,
        written,
        "no partial line: every written line parses"
    );
    drop(s);
}
