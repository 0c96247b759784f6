//! `cargo xtask demo`: the interceptor on a simulated node, for a newcomer with no provider account and
//! no internet. Two pods in two namespaces call simulated providers with the official `openai` and
//! `anthropic` SDKs; a small policy refuses team-b's second request. Prints the SDKs' view, the audit
//! lines, the relevant metric lines and `interceptor status`, then removes everything it created.
//! Exits 1 when what it shows is not what it should (CI runs it).

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value;
use tests::kubeapi::{FakeKubeApi, Resource, owned, pod};
use tests::scenario::{NODE_NAME, Scenario, hosts, policy};

/// Team-b's pods may make one request per minute.
fn demo_policy() -> String {
    format!(
        "{}rules:\n  - name: team-b-one-per-minute\n    match: {{namespace: team-b}}\n    per: pod\n    limits:\n      requestsPerMinute: 1\n",
        policy("open")
    )
}

fn section(title: &str) {
    println!(
        "\n=== {title} {}",
        "=".repeat(70usize.saturating_sub(title.len()))
    );
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("\ndemo: ok (everything it created is removed)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo: failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo loads eBPF programs and creates network namespaces: run it as root"
    );
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    let _guard = runtime.enter();
    tests::node::cleanup_stale();

    section("simulated node");
    let api = FakeKubeApi::start().context("fake Kubernetes API")?;
    api.apply(
        Resource::ReplicaSets,
        owned(
            Resource::ReplicaSets,
            "team-a",
            "chat-5c9d7f6b8d",
            "Deployment",
            "chat",
        ),
    );
    api.apply(
        Resource::ReplicaSets,
        owned(
            Resource::ReplicaSets,
            "team-b",
            "writer-6f8b9c7d5e",
            "Deployment",
            "writer",
        ),
    );
    let mut s = Scenario::start_with_kubernetes(&demo_policy(), &api, &[])
        .context("starting the simulated node and the daemon")?;
    let pod_b = s.node.add_pod("pod-b", &hosts()).context("second pod")?;
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "chat-5c9d7f6b8d-q2x7w",
            &s.pod.uid,
            NODE_NAME,
            "chat",
            &[("app", "chat"), ("pod-template-hash", "5c9d7f6b8d")],
            Some(("apps/v1", "ReplicaSet", "chat-5c9d7f6b8d")),
        ),
    );
    api.apply(
        Resource::Pods,
        pod(
            "team-b",
            "writer-6f8b9c7d5e-k4m9p",
            &pod_b.uid,
            NODE_NAME,
            "writer",
            &[("app", "writer"), ("pod-template-hash", "6f8b9c7d5e")],
            Some(("apps/v1", "ReplicaSet", "writer-6f8b9c7d5e")),
        ),
    );
    s.wait_pods(2.0).context("the daemon lists the pods")?;
    println!(
        "pods: team-a/chat-5c9d7f6b8d-q2x7w (openai SDK), team-b/writer-6f8b9c7d5e-k4m9p (anthropic SDK)"
    );
    println!(
        "providers: api.openai.com and api.anthropic.com, simulated in a network namespace at 203.0.113.10"
    );
    println!("policy rule: team-b-one-per-minute (namespace team-b, per pod, requestsPerMinute: 1)");

    section("what the SDKs saw");
    let a = s
        .python_json_in(&s.pod, "demo_sdk.py", &["openai"])
        .context("openai SDK in team-a")?;
    let b = s
        .python_json_in(&pod_b, "demo_sdk.py", &["anthropic"])
        .context("anthropic SDK in team-b")?;
    for result in [&a, &b] {
        println!("{}", serde_json::to_string(result)?);
    }
    let calls = |v: &Value| v["calls"].as_array().cloned().unwrap_or_default();
    let (a_calls, b_calls) = (calls(&a), calls(&b));
    anyhow::ensure!(
        a_calls.len() == 2 && a_calls.iter().all(|c| c["ok"] == true),
        "team-a's two calls succeed: {a}"
    );
    anyhow::ensure!(
        b_calls.first().is_some_and(|c| c["ok"] == true)
            && b_calls
                .get(1)
                .is_some_and(|c| c["ok"] == false && c["status"] == 429),
        "team-b's second call is refused with 429: {b}"
    );

    section("audit log (one JSON line per request)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let audit = loop {
        let lines: Vec<Value> = s
            .daemon
            .logs()
            .into_iter()
            .filter(|l| l.get("identity").is_some() && l.get("endpoint").is_some())
            .collect();
        if lines.len() >= 4 || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for line in &audit {
        println!("{line}");
    }
    let namespaces: Vec<&str> = audit
        .iter()
        .filter_map(|l| l["identity"]["namespace"].as_str())
        .collect();
    anyhow::ensure!(audit.len() == 4, "four audit lines, got {}", audit.len());
    anyhow::ensure!(
        namespaces.iter().filter(|n| **n == "team-a").count() == 2
            && namespaces.iter().filter(|n| **n == "team-b").count() == 2,
        "both pods' requests are attributed: {namespaces:?}"
    );
    anyhow::ensure!(
        audit
            .iter()
            .any(|l| l["decision"] == "rejected" && l["rule"] == "team-b-one-per-minute"),
        "the rejection is audited"
    );

    section("metrics (excerpt of /metrics)");
    let metrics = s.daemon.metrics()?;
    let wanted = [
        "interceptor_tokens_total{",
        "interceptor_cost_usd_total{",
        "interceptor_quota_decisions_total{",
        "gen_ai_client_token_usage_sum{",
    ];
    let excerpt: Vec<&str> = metrics
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
        .collect();
    for line in &excerpt {
        println!("{line}");
    }
    for namespace in ["team-a", "team-b"] {
        anyhow::ensure!(
            excerpt.iter().any(|l| l.starts_with("interceptor_tokens_total{")
                && l.contains(&format!("k8s_namespace_name=\"{namespace}\""))),
            "tokens of {namespace} in the metrics"
        );
    }
    anyhow::ensure!(
        excerpt
            .iter()
            .any(|l| l.contains("outcome=\"rejected\"") && l.contains("team-b-one-per-minute")),
        "the rejection in the metrics"
    );

    section("interceptor status");
    let socket = s.node.dir.join("run/admin.sock");
    let output = std::process::Command::new(tests::daemon::binary())
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()
        .context("interceptor status")?;
    let text = String::from_utf8_lossy(&output.stdout);
    print!("{text}");
    anyhow::ensure!(output.status.success(), "interceptor status: {output:?}");
    anyhow::ensure!(
        text.contains("team-a/Deployment/chat") && text.contains("team-b/Deployment/writer"),
        "both pods' usage in the status view"
    );
    anyhow::ensure!(
        text.contains("rule=team-b-one-per-minute"),
        "the rejection in the status view"
    );

    section("cleaning up");
    s.daemon.stop().context("stopping the daemon")?;
    drop(s);
    drop(api);
    Ok(())
}
