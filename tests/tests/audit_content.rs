//! Prompts and completions in the audit log: only for the workloads `audit.content` selects, bounded,
//! compressed responses decoded. Run with `--test-threads=1`.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::scenario::{Scenario, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_logged_only_for_selected_workloads() {
    if !tests::privileged_available("content_is_logged_only_for_selected_workloads") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ict-audit-content-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("audit.log");
    let path_arg = path.display().to_string();
    // curl's requests are logged with their bodies, Python's (the SDK) without.
    let policy = format!(
        "{}audit:\n  content:\n    - {{comm: curl}}\n  maxContentBytes: 4096\n",
        policy("open")
    );
    let s = Scenario::start(&policy, &["--audit-log", &path_arg]).expect("daemon starts");

    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"the secret prompt"}]}"#;
    // Compressed (curl asks for gzip and decodes it; the log decodes it too), then streamed.
    let curl = s.pod_post_json(CHAT, body, &["--compressed"]).expect("curl");
    assert!(curl.success(), "{}", curl.describe());
    let completion: Value = serde_json::from_str(&curl.stdout()).expect("completion JSON");
    let answer = completion["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    let stream_body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream please"}]}"#;
    let curl = s.pod_post_json(CHAT, stream_body, &[]).expect("curl");
    assert!(curl.success(), "{}", curl.describe());
    let sdk = s.pod_python_json("sdk_smoke.py").expect("SDK run");
    assert!(sdk.is_object(), "{sdk}");

    // Wait for the lines, then read them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let python = lines.iter().filter(|l| l["identity"]["comm"] != "curl").count();
        if lines.len() >= 3 && python >= 1 {
            break lines;
        }
        assert!(Instant::now() < deadline, "audit lines: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let curl_lines: Vec<&Value> = lines.iter().filter(|l| l["identity"]["comm"] == "curl").collect();
    assert_eq!(curl_lines.len(), 2, "{lines:#?}");
    let plain = curl_lines
        .iter()
        .find(|l| l["stream"] == false)
        .expect("the non-streamed line");
    assert!(
        plain["content"]["request"]
            .as_str()
            .is_some_and(|r| r.contains("the secret prompt")),
        "the prompt: {plain}"
    );
    assert!(
        plain["content"]["response"]
            .as_str()
            .is_some_and(|r| r.contains(&answer)),
        "the decoded completion: {plain}"
    );
    assert_eq!(plain["content"]["truncated"], false);
    let streamed = curl_lines
        .iter()
        .find(|l| l["stream"] == true)
        .expect("the streamed line");
    assert!(
        streamed["content"]["response"]
            .as_str()
            .is_some_and(|r| r.contains("data: ")),
        "the events as delivered: {streamed}"
    );
    for line in lines.iter().filter(|l| l["identity"]["comm"] != "curl") {
        assert!(line.get("content").is_none(), "not selected, not logged: {line}");
        assert!(!line.to_string().contains("Say hello"), "no prompt text: {line}");
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
