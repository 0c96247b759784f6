//! `interceptor status` and `interceptor top` against a running daemon, through its root-only admin
//! socket: programs, targets, top identities, rules and a recent rejection. Run with `--test-threads=1`.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::node::PROVIDER_V4;
use tests::scenario::{Scenario, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"status?"}]}"#;

fn interceptor(args: &[&str]) -> std::process::Output {
    Command::new(tests::daemon::binary())
        .args(args)
        .output()
        .expect("running interceptor")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_programs_targets_top_identities_rules_and_rejections() {
    if !tests::privileged_available("status_shows_programs_targets_top_identities_rules_and_rejections") {
        return;
    }
    let policy = format!(
        "{}rules:\n  - name: one-per-minute\n    per: pod\n    limits:\n      requestsPerMinute: 1\n      costPerDayUsd: 5\n",
        policy("open")
    );
    let s = Scenario::start(&policy, &[]).expect("simulated node and daemon start");
    let socket = s.node.dir.join("run/admin.sock");
    let mode = std::fs::metadata(&socket).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "root only");

    for expected in [200, 429] {
        let curl = s
            .pod_post_json(CHAT, BODY, &["-w", "\n%{http_code}"])
            .expect("curl");
        assert!(
            curl.stdout().ends_with(&format!("\n{expected}")),
            "{}",
            curl.describe()
        );
    }
    let socket_arg = socket.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status: Value = loop {
        let output = interceptor(&["status", "--socket", &socket_arg, "--format", "json"]);
        assert!(output.status.success(), "{output:?}");
        let status: Value = serde_json::from_slice(&output.stdout).expect("status JSON");
        if status["rejections"].as_array().is_some_and(|r| !r.is_empty()) {
            break status;
        }
        assert!(Instant::now() < deadline, "the rejection shows: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["programs"].as_array().map(Vec::len), Some(7), "{status}");
    assert!(
        status["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .any(|t| t["domain"] == "api.openai.com"
                && t["address"] == format!("{PROVIDER_V4}:443")
                && t["source"] == "static"),
        "{status}"
    );
    let minute = status["top"]["minute"].as_array().expect("minute");
    assert_eq!(minute.len(), 1, "one identity: {status}");
    assert_eq!(minute[0]["requests"], 2, "{status}");
    assert!(minute[0]["tokens"].as_u64().is_some_and(|t| t > 0), "{status}");
    assert!(
        minute[0]["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
        "{status}"
    );
    assert_eq!(status["top"]["day"][0]["identity"], minute[0]["identity"]);
    let rule = &status["rules"][0];
    assert_eq!(rule["name"], "one-per-minute");
    assert_eq!(rule["per"], "pod");
    assert_eq!(rule["limits"], "requestsPerMinute=1, costPerDayUsd=5");
    let rejection = &status["rejections"][0];
    assert_eq!(rejection["rule"], "one-per-minute", "{status}");
    assert_eq!(rejection["limit"], "requests_per_minute", "{status}");
    assert_eq!(rejection["status"], 429, "{status}");
    assert_eq!(rejection["provider"], "openai", "{status}");

    // The table operators read.
    let output = interceptor(&["status", "--socket", &socket_arg]);
    let text = String::from_utf8_lossy(&output.stdout);
    println!("{text}");
    assert!(output.status.success(), "{output:?}");
    assert!(
        text.contains("Programs attached (7): redirect_connect4"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("api.openai.com ")
                && l.contains(&format!(" {PROVIDER_V4}:443 "))),
        "{text}"
    );
    assert!(text.contains("Top identities, last minute:"), "{text}");
    assert!(
        text.contains("one-per-minute [enforce, per pod] requestsPerMinute=1, costPerDayUsd=5"),
        "{text}"
    );
    assert!(
        text.contains("429 rule=one-per-minute limit=requests_per_minute"),
        "{text}"
    );

    // `top` redraws; with --iterations it stops by itself.
    let output = interceptor(&[
        "top",
        "--socket",
        &socket_arg,
        "--interval",
        "100ms",
        "--iterations",
        "2",
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text.matches("\x1b[2J\x1b[H").count(), 2, "two screens");

    // Root only: another user cannot read it.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(tests::daemon::binary())
        .args(["status", "--socket", &socket_arg])
        .output()
        .expect("setpriv");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Permission denied"),
        "{output:?}"
    );

    // No daemon: a clear error.
    let output = interceptor(&["status", "--socket", "/nonexistent/admin.sock"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is the daemon running"),
        "{output:?}"
    );
}
