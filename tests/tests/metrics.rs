//! The metrics endpoint with real Prometheus tools: `promtool check metrics` on a scrape after traffic
//! through every provider adapter; a real Prometheus server scraping the daemon answers the token sums
//! per namespace after SDK traffic from two namespaces; the per-metric series cap. Run with
//! `--test-threads=1`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::kubeapi::{FakeKubeApi, Resource, pod};
use tests::scenario::{GEMINI_HOST, Scenario, hosts, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";

/// A policy intercepting every simulated provider domain used below.
fn all_providers_policy() -> String {
    policy("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_traffic_through_every_adapter_passes_promtool() {
    if !tests::privileged_available("a_scrape_after_traffic_through_every_adapter_passes_promtool") {
        return;
    }
    let s = Scenario::start(
        &all_providers_policy(),
        &["--metrics-identity-labels", "namespace,workload,pod,process"],
    )
    .expect("simulated node and daemon start");
    let calls: [(&str, &str, &[&str]); 4] = [
        (
            CHAT,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            &[],
        ),
        (
            CHAT,
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            &[],
        ),
        (
            "https://api.anthropic.com/v1/messages",
            r#"{"model":"claude-sonnet-4-5","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#,
            &["-H", "anthropic-version: 2023-06-01"],
        ),
        (
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
            r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#,
            &[],
        ),
    ];
    assert!(hosts().iter().any(|(h, _)| *h == GEMINI_HOST));
    for (url, body, extra) in calls {
        let curl = s.pod_post_json(url, body, extra).expect("curl");
        assert!(curl.success(), "{url}: {}", curl.describe());
    }
    // The unknown-path kind, and a request the provider refuses.
    let curl = s
        .pod_curl_trusting("https://api.openai.com/v1/models", &[])
        .expect("curl");
    assert!(curl.success(), "{}", curl.describe());
    wait_requests(&s, 5.0);

    let scrape = s.daemon.metrics().expect("scrape");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write scrape");
    let output = promtool.wait_with_output().expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // Every adapter's traffic is in the GenAI histograms, with the process identity.
    for (provider, operation) in [
        ("openai", "chat"),
        ("anthropic", "chat"),
        ("gcp.gemini", "generate_content"),
    ] {
        let input = s
            .daemon
            .metric_sum(
                "gen_ai_client_token_usage_sum",
                &[
                    ("gen_ai_provider_name", provider),
                    ("gen_ai_operation_name", operation),
                    ("gen_ai_token_type", "input"),
                    ("process_executable_name", "curl"),
                ],
            )
            .expect("scrape");
        assert!(input > 0.0, "{provider} {operation} input tokens: {scrape}");
    }
    let streamed = s
        .daemon
        .metric_sum("gen_ai_client_operation_time_to_first_chunk_seconds_count", &[])
        .expect("scrape");
    assert_eq!(streamed, 1.0, "a first chunk only for the one streamed call");
    let durations = s
        .daemon
        .metric_sum("gen_ai_client_operation_duration_seconds_count", &[])
        .expect("scrape");
    assert_eq!(durations, 5.0, "one duration per operation");
}

/// Waits until the daemon counted `count` provider requests.
fn wait_requests(s: &Scenario, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s
        .daemon
        .metric_sum("interceptor_provider_requests_total", &[])
        .unwrap_or(0.0)
        < count
    {
        assert!(Instant::now() < deadline, "{count} requests recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Prometheus server scraping one target every second, stopped on drop.
struct PrometheusServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl PrometheusServer {
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("ict-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: interceptor\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        Self { child, addr, dir }
    }

    /// The result vector of an instant query (waits for the server to answer).
    fn query(&self, promql: &str) -> Vec<Value> {
        let output = Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(format!("http://{}/api/v1/query", self.addr))
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()
            .expect("curl");
        serde_json::from_slice::<Value>(&output.stdout)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sums_sdk_tokens_per_namespace() {
    if !tests::privileged_available("a_real_prometheus_sums_sdk_tokens_per_namespace") {
        return;
    }
    let api = FakeKubeApi::start().expect("fake API server");
    let budgeted = format!(
        "{}rules:\n  - name: daily\n    per: namespace\n    limits:\n      costPerDayUsd: 100\n",
        policy("open")
    );
    let mut s = Scenario::start_with_kubernetes(&budgeted, &api, &[]).expect("node and daemon start");
    let pod_b = s.node.add_pod("pod-b", &hosts()).expect("pod b");
    let node = tests::scenario::NODE_NAME;
    api.apply(
        Resource::Pods,
        pod("team-a", "chat-a", &s.pod.uid, node, "chat", &[], None),
    );
    api.apply(
        Resource::Pods,
        pod("team-b", "writer-b", &pod_b.uid, node, "writer", &[], None),
    );
    s.wait_pods(2.0).expect("pods listed");

    let prometheus = PrometheusServer::start(s.daemon.admin);
    let a = s
        .python_json_in(&s.pod, "usage_by_sdk.py", &["openai"])
        .expect("openai SDK in team-a");
    let b = s
        .python_json_in(&pod_b, "usage_by_sdk.py", &["anthropic"])
        .expect("anthropic SDK in team-b");
    let sdk_tokens: BTreeMap<&str, u64> = BTreeMap::from([
        ("team-a", a["tokens"].as_u64().expect("tokens")),
        ("team-b", b["tokens"].as_u64().expect("tokens")),
    ]);
    // What the providers sent, by the namespace whose SDK asked for that model family.
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    for entry in s.provider.ledger.all() {
        let namespace = if entry.model.starts_with("claude") {
            "team-b"
        } else {
            "team-a"
        };
        *sent.entry(namespace).or_default() += entry.input + entry.output;
    }
    assert_eq!(sent, sdk_tokens, "the SDKs were told what the providers sent");

    let promql = r#"sum by (k8s_namespace_name) (interceptor_tokens_total{type=~"input|output"})"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    let by_namespace: BTreeMap<String, u64> = loop {
        let result = prometheus.query(promql);
        let sums: BTreeMap<String, u64> = result
            .iter()
            .filter_map(|sample| {
                let namespace = sample["metric"]["k8s_namespace_name"].as_str()?.to_owned();
                let value = sample["value"][1].as_str()?.parse::<f64>().ok()?;
                Some((namespace, value as u64))
            })
            .collect();
        let expected: BTreeMap<String, u64> = sdk_tokens.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        if sums == expected {
            break sums;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus answers the token sums per namespace: got {sums:?}, want {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(by_namespace.len(), 2);
    // The GenAI histogram agrees.
    let genai = prometheus.query(r#"sum(gen_ai_client_token_usage_sum{k8s_namespace_name="team-b"})"#);
    let value = genai
        .first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert_eq!(
        value as u64, sdk_tokens["team-b"],
        "gen_ai_client_token_usage per namespace"
    );

    // The Grafana dashboard: every query parses on the real server, every metric it reads exists.
    let curl = s
        .pod_post_json(
            CHAT,
            r#"{"model":"rate-limited","messages":[{"role":"user","content":"hi"}]}"#,
            &[],
        )
        .expect("curl");
    assert!(curl.success(), "a provider error to chart: {}", curl.describe());
    let scrape = s.daemon.metrics().expect("scrape");
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for query in &queries {
        for metric in metric_names(query) {
            assert!(
                exported.contains(metric.as_str()),
                "{metric} (in {query}) is exported"
            );
        }
        let promql = query
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$namespace", ".*")
            .replace("$workload", ".*");
        let output = Command::new("curl")
            .args(["-s", "--max-time", "5"])
            .arg(format!("http://{}/api/v1/query", prometheus.addr))
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()
            .expect("curl");
        let answer: Value = serde_json::from_slice(&output.stdout).expect("Prometheus JSON");
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
    }
}

/// Every PromQL expression of the Grafana dashboard (panels and variables).
fn dashboard_queries() -> Vec<String> {
    let path =
        tests::manifests::repo_root().join("deploy/kubernetes/components/monitoring/grafana-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("variables") {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(METRIC{...}, label) reads METRIC: query the metric itself.
            let inner = query.trim_start_matches("label_values(");
            queries.push(inner.rsplit_once(',').map_or(inner, |(m, _)| m).to_owned());
        }
    }
    queries
}

/// The metric families an expression reads (`_bucket`/`_sum`/`_count` stripped).
fn metric_names(query: &str) -> Vec<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("interceptor_") || w.starts_with("gen_ai_client_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| w.strip_suffix(suffix))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_cap_folds_new_identities_into_overflow() {
    if !tests::privileged_available("the_series_cap_folds_new_identities_into_overflow") {
        return;
    }
    let api = FakeKubeApi::start().expect("fake API server");
    let mut s = Scenario::start_with_kubernetes(
        &policy("open"),
        &api,
        &[
            "--metrics-identity-labels",
            "namespace,pod",
            "--metrics-max-series",
            "2",
        ],
    )
    .expect("node and daemon start");
    let node = tests::scenario::NODE_NAME;
    let mut pods = vec![];
    for i in 0..4 {
        let p = s.node.add_pod(&format!("pod-c{i}"), &hosts()).expect("pod");
        api.apply(
            Resource::Pods,
            pod(
                &format!("ns-{i}"),
                &format!("worker-{i}"),
                &p.uid,
                node,
                "default",
                &[],
                None,
            ),
        );
        pods.push(p);
    }
    s.wait_pods(4.0).expect("pods listed");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    for p in &pods {
        let curl = s
            .curl_in(
                p,
                true,
                CHAT,
                &["-H", "content-type: application/json", "--data-binary", body],
            )
            .expect("curl");
        assert!(curl.success(), "{}", curl.describe());
    }
    wait_requests(&s, 4.0);
    let scrape = s.daemon.metrics().expect("scrape");
    let series: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("interceptor_provider_requests_total{"))
        .collect();
    assert_eq!(series.len(), 3, "two identities and the overflow: {series:#?}");
    let overflow = s
        .daemon
        .metric_sum(
            "interceptor_provider_requests_total",
            &[("k8s_namespace_name", "_overflow"), ("k8s_pod_name", "_overflow")],
        )
        .expect("scrape");
    assert_eq!(overflow, 2.0, "the third and fourth identities overflow");
    assert_eq!(
        s.daemon
            .metric(
                r#"interceptor_metric_series_overflow_total{metric="interceptor_provider_requests_total"}"#
            )
            .expect("scrape"),
        2.0
    );
    assert_eq!(
        s.daemon
            .metric_sum("interceptor_provider_requests_total", &[])
            .expect("scrape"),
        4.0
    );
}
