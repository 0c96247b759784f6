//! Privileged end-to-end tests of quota rules with the official SDKs in simulated pods: their own
//! exceptions after a limit, success after `Retry-After`, denied models, observe mode, two pods under
//! different rules, and hot reload while a stream is in flight. Run with `--test-threads=1`.

use std::time::Duration;

use serde_json::Value;
use tests::kubeapi::{FakeKubeApi, Resource, pod};
use tests::node::Pod;
use tests::scenario::{NODE_NAME, Scenario, hosts, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";

fn rules() -> &'static str {
    "rules:
  - name: team-a-openai-rpm
    match: {namespace: team-a}
    providers: [openai]
    limits: {requestsPerMinute: 6}
  - name: team-a-anthropic-rpm
    match: {namespace: team-a}
    providers: [anthropic]
    limits: {requestsPerMinute: 6}
  - name: team-a-models
    match: {namespace: team-a}
    models: {deny: [\"o1*\", \"claude-3-opus*\"]}
  - name: team-b-watch
    match: {namespace: team-b}
    mode: observe
    limits: {requestsPerMinute: 1}
"
}

/// The daemon with `rules`, pod-a in team-a and pod-b in team-b.
fn start(test: &str, api: &FakeKubeApi, rules: &str) -> Option<(Scenario, Pod)> {
    if !tests::privileged_available(test) {
        return None;
    }
    let policy = format!("{}{rules}", policy("open"));
    let mut s = Scenario::start_with_kubernetes(&policy, api, &[]).expect("simulated node and daemon start");
    let pod_b = s.node.add_pod("pod-b", &hosts()).expect("pod b");
    api.apply(
        Resource::Pods,
        pod("team-a", "chat-0", &s.pod.uid, NODE_NAME, "chat", &[], None),
    );
    api.apply(
        Resource::Pods,
        pod("team-b", "batch-0", &pod_b.uid, NODE_NAME, "batch", &[], None),
    );
    s.wait_pods(2.0).expect("pods listed");
    Some((s, pod_b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_raise_their_own_errors_and_recover_after_retry_after() {
    let api = FakeKubeApi::start().expect("fake API server");
    let Some((mut s, pod_b)) = start(
        "sdks_raise_their_own_errors_and_recover_after_retry_after",
        &api,
        rules(),
    ) else {
        return;
    };
    let seen_before = s.provider.peers().len();
    let rate = s
        .python_json_in(&s.pod, "quota_sdks.py", &["rate"])
        .expect("sdk script");
    for (sdk, class, rule) in [
        ("openai", "openai.RateLimitError", "team-a-openai-rpm"),
        ("anthropic", "anthropic.RateLimitError", "team-a-anthropic-rpm"),
    ] {
        let facts = &rate[sdk];
        assert_eq!(facts["class"], class, "{rate}");
        assert_eq!(facts["status"], 429, "{rate}");
        assert_eq!(facts["rule"], rule, "{rate}");
        assert_eq!(
            facts["successes_before"], 6,
            "six requests per minute fit the bucket: {rate}"
        );
        let retry_after: u64 = facts["retry_after"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("Retry-After");
        // One request refills in 10 s, less the time the six admitted ones took.
        assert!(
            (7..=10).contains(&retry_after),
            "one request refills in 10 s: {rate}"
        );
        assert_eq!(facts["succeeded_after_wait"], true, "{rate}");
    }
    assert_eq!(rate["openai"]["body"]["code"], "rate_limit_exceeded", "{rate}");
    assert_eq!(rate["anthropic"]["body"]["type"], "error", "{rate}");
    // Rejected requests never reached the provider: 6 + 1 per SDK did.
    assert_eq!(
        s.provider.peers().len() - seen_before,
        14,
        "only admitted requests reach the provider"
    );

    let denied = s
        .python_json_in(&s.pod, "quota_sdks.py", &["denied"])
        .expect("sdk script");
    assert_eq!(denied["openai"]["class"], "openai.NotFoundError", "{denied}");
    assert_eq!(denied["openai"]["body"]["code"], "model_not_found", "{denied}");
    assert_eq!(
        denied["anthropic"]["class"], "anthropic.NotFoundError",
        "{denied}"
    );
    assert_eq!(denied["openai"]["rule"], "team-a-models", "{denied}");
    assert!(
        denied["openai"]["retry_after"].is_null(),
        "no retry for a denied model: {denied}"
    );
    assert!(
        denied["openai_allowed"].is_string(),
        "an allowed model still works: {denied}"
    );

    // Another pod, another rule: observe mode lets everything pass and counts would-be rejections.
    let observed = s
        .python_json_in(&pod_b, "quota_sdks.py", &["observe"])
        .expect("sdk script");
    assert_eq!(observed["ids"].as_array().map(Vec::len), Some(3), "{observed}");
    let metric = |rule: &str, outcome: &str, limit: &str| {
        s.daemon
            .metric(&format!(
                "interceptor_quota_decisions_total{{limit=\"{limit}\",outcome=\"{outcome}\",rule=\"{rule}\"}}"
            ))
            .unwrap_or(0.0)
    };
    assert_eq!(metric("team-b-watch", "observed", "requests_per_minute"), 2.0);
    assert_eq!(
        metric("team-a-openai-rpm", "rejected", "requests_per_minute"),
        1.0
    );
    assert_eq!(metric("team-a-models", "rejected", "model_denied"), 2.0);
    let line = s
        .daemon
        .wait_log(Duration::from_secs(5), |l| {
            l["message"] == "request" && l["decision"] == "observed"
        })
        .expect("an observed request line");
    assert_eq!(line["rule"], "team-b-watch", "{line}");
    assert_eq!(line["namespace"], "team-b", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_raises_a_limit_while_a_stream_is_in_flight_and_a_broken_edit_keeps_it() {
    let api = FakeKubeApi::start().expect("fake API server");
    let strict =
        "rules:\n  - name: team-a-rpm\n    match: {namespace: team-a}\n    limits: {requestsPerMinute: 1}\n";
    let Some((mut s, _pod_b)) = start(
        "a_reload_raises_a_limit_while_a_stream_is_in_flight_and_a_broken_edit_keeps_it",
        &api,
        strict,
    ) else {
        return;
    };
    let policy_path = s.node.dir.join("policy.yaml");
    // A slow stream takes the one request of the minute and stays in flight.
    let stream_body = r#"{"model":"slow-stream","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let stream = {
        let pod = s.pod.command(
            "curl",
            &[
                "-sS",
                "-N",
                "--max-time",
                "30",
                "--cacert",
                s.enterprise_ca.to_str().expect("path"),
                "-H",
                "content-type: application/json",
                "--data-binary",
                stream_body,
                CHAT,
            ],
        );
        std::thread::spawn(move || tests::scenario::Curl::run(pod))
    };
    std::thread::sleep(Duration::from_millis(500));
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let limited = s.pod_post_json(CHAT, body, &["-i"]).expect("curl");
    assert!(
        limited.stdout().starts_with("HTTP/1.1 429") || limited.stdout().starts_with("HTTP/2 429"),
        "{}",
        limited.describe()
    );

    let raised = std::fs::read_to_string(&policy_path)
        .expect("policy")
        .replace("requestsPerMinute: 1", "requestsPerMinute: 100");
    std::fs::write(&policy_path, raised).expect("edit");
    s.daemon
        .wait_log(Duration::from_secs(10), |l| l["message"] == "policy reloaded")
        .expect("the edit is picked up without a restart");
    let allowed = s.pod_post_json(CHAT, body, &[]).expect("curl");
    assert!(
        allowed.success() && allowed.json().is_ok_and(|j| j["object"] == "chat.completion"),
        "{}",
        allowed.describe()
    );

    let streamed = stream.join().expect("stream thread").expect("curl ran");
    assert!(streamed.success(), "{}", streamed.describe());
    assert!(
        streamed.stdout().contains("data: [DONE]"),
        "the stream completed: {}",
        streamed.describe()
    );
    let logs = s.daemon.logs();
    let reloaded_at = logs.iter().position(|l| l["message"] == "policy reloaded");
    let stream_done_at = logs
        .iter()
        .position(|l| l["message"] == "request" && l["requested_model"] == "slow-stream");
    assert!(
        reloaded_at < stream_done_at,
        "the reload happened while the stream was in flight"
    );

    // A broken edit: the old (raised) limits stay, the error names the field.
    let broken = std::fs::read_to_string(&policy_path)
        .expect("policy")
        .replace("requestsPerMinute: 100", "requestsPerMinute: -5");
    std::fs::write(&policy_path, broken).expect("edit");
    let warning = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "invalid policy file; keeping the policy in force"
        })
        .expect("the broken edit is reported");
    let error = warning["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("rules[0] (team-a-rpm).limits.requestsPerMinute"),
        "{warning}"
    );
    assert_eq!(
        s.daemon
            .metric("interceptor_policy_reload_failing")
            .unwrap_or(0.0),
        1.0
    );
    for _ in 0..3 {
        let again = s.pod_post_json(CHAT, body, &[]).expect("curl");
        assert!(
            again.success()
                && again
                    .json()
                    .is_ok_and(|j: Value| j["object"] == "chat.completion"),
            "{}",
            again.describe()
        );
    }
}

/// A `hardBudgets` rule ends a running stream with the provider's own in-stream error event once its
/// live output takes the daily token budget over the limit: each SDK raises its own API error mid
/// stream. A pod under no such rule gets the whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_budgets_end_a_running_stream_with_the_providers_error_event() {
    let api = FakeKubeApi::start().expect("fake API server");
    let rules = "rules:
  - name: team-a-hard-openai
    match: {namespace: team-a}
    providers: [openai]
    limits: {tokensPerDay: 60, hardBudgets: true}
  - name: team-a-hard-anthropic
    match: {namespace: team-a}
    providers: [anthropic]
    limits: {tokensPerDay: 60, hardBudgets: true}
";
    let Some((s, pod_b)) = start(
        "hard_budgets_end_a_running_stream_with_the_providers_error_event",
        &api,
        rules,
    ) else {
        return;
    };
    let full = tests::provider::openai::REPLY.len() * tests::provider::openai::LONG_STREAM_REPEATS;
    let cut = s
        .python_json_in(&s.pod, "quota_sdks.py", &["stream"])
        .expect("sdk script");
    for (sdk, class_prefix, rule) in [
        ("openai", "openai.", "team-a-hard-openai"),
        ("anthropic", "anthropic.", "team-a-hard-anthropic"),
    ] {
        let result = &cut[sdk];
        assert!(
            result["class"]
                .as_str()
                .is_some_and(|c| c.starts_with(class_prefix)),
            "{sdk}: its own API error: {result}"
        );
        assert!(
            result["message"].as_str().is_some_and(|m| m.contains(rule)),
            "{sdk}: the message names the rule: {result}"
        );
        let deltas = result["deltas"].as_u64().unwrap_or(0) as usize;
        assert!(
            deltas > 0 && deltas < full,
            "{sdk}: cut mid-stream after {deltas} of {full} deltas: {result}"
        );
        let decisions = s
            .daemon
            .metric_sum(
                "interceptor_quota_decisions_total",
                &[("rule", rule), ("outcome", "cut")],
            )
            .expect("scrape");
        assert_eq!(decisions, 1.0, "{sdk}: one stream cut");
    }

    // team-b has no hard budget: the same streams run to their end.
    let whole = s
        .python_json_in(&pod_b, "quota_sdks.py", &["stream"])
        .expect("sdk script");
    for sdk in ["openai", "anthropic"] {
        assert_eq!(whole[sdk]["completed"], true, "{sdk}: {whole}");
        assert_eq!(whole[sdk]["deltas"].as_u64(), Some(full as u64), "{sdk}: {whole}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_days_token_budget() {
    if !tests::privileged_available("a_restart_keeps_the_days_token_budget") {
        return;
    }
    let rules = "rules:\n  - name: daily-tokens\n    limits: {tokensPerDay: 3000}\n";
    let mut s =
        Scenario::start(&format!("{}{rules}", policy("open")), &[]).expect("simulated node and daemon start");
    let body = r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut admitted = 0;
    let exhausted = loop {
        let curl = s.pod_post_json(CHAT, body, &[]).expect("curl");
        let answer = curl.json().expect("a JSON answer");
        if answer["error"]["code"] == "insufficient_quota" {
            break answer;
        }
        assert_eq!(answer["object"], "chat.completion", "{answer}");
        admitted += 1;
        assert!(admitted < 50, "the budget never ran out");
    };
    assert!(admitted >= 1, "{exhausted}");
    std::thread::sleep(Duration::from_secs(3)); // one flush interval (2 s) and then some

    s.restart_daemon().expect("the daemon restarts");
    let restored = s
        .daemon
        .wait_log(Duration::from_secs(5), |l| l["message"] == "budgets restored")
        .expect("the budgets are restored");
    assert_eq!(restored["restored"], 1, "{restored}");
    assert!(s.node.dir.join("state/quota-budgets.json").is_file());
    let after = s.pod_post_json(CHAT, body, &["-i"]).expect("curl");
    assert!(
        after.stdout().contains(" 429") && after.stdout().contains("insufficient_quota"),
        "the day's spend survived the restart: {}",
        after.describe()
    );
}
