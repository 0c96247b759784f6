//! Privileged end-to-end tests of Kubernetes attribution: simulated pods (netns + a cgroup named as
//! kubelet's systemd driver and containerd name it) call a provider through the interceptor, which
//! watches the fake Kubernetes API server; each request's record carries namespace, pod, workload,
//! service account and exe. Run with `--test-threads=1` (they share kernel state).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::kubeapi::{FakeKubeApi, Resource, owned, pod};
use tests::node::{PROVIDER_V4, Pod};
use tests::scenario::{Curl, Scenario, hosts, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"who am I?"}]}"#;
const NODE: &str = tests::scenario::NODE_NAME;
const RS_CHAT: &str = "chat-7d9f8b6c5d";

fn start(test: &str, api: &FakeKubeApi, policy: &str) -> Option<Scenario> {
    if !tests::privileged_available(test) {
        return None;
    }
    api.apply(
        Resource::ReplicaSets,
        owned(Resource::ReplicaSets, "team-a", RS_CHAT, "Deployment", "chat"),
    );
    api.apply(
        Resource::Jobs,
        owned(Resource::Jobs, "team-b", "nightly-29390000", "CronJob", "nightly"),
    );
    Some(Scenario::start_with_kubernetes(policy, api, &[]).expect("simulated node and daemon start"))
}

/// The chat pod: Deployment `chat` via its ReplicaSet, namespace team-a.
fn chat_pod(uid: &str, name: &str) -> Value {
    pod(
        "team-a",
        name,
        uid,
        NODE,
        "chat-sa",
        &[("app", "chat"), ("pod-template-hash", "7d9f8b6c5d")],
        Some(("apps/v1", "ReplicaSet", RS_CHAT)),
    )
}

fn wait_pods(s: &Scenario, count: f64) {
    s.wait_pods(count).expect("the daemon lists the pods");
}

fn post_chat(s: &Scenario, pod: &Pod) -> Curl {
    let curl = s
        .curl_in(
            pod,
            true,
            CHAT,
            &["-H", "content-type: application/json", "--data-binary", BODY],
        )
        .expect("curl runs");
    assert!(curl.success(), "{}", curl.describe());
    curl
}

/// The `request` line of the request made by process `pid`.
fn request_of(s: &mut Scenario, pid: u32, timeout: Duration) -> Value {
    s.daemon
        .wait_log(timeout, |l| l["message"] == "request" && l["tgid"] == pid)
        .unwrap_or_else(|e| panic!("no request line for pid {pid}: {e:#}"))
}

/// The chat pod of team-a, known to the directory.
fn assert_chat_pod(line: &Value) {
    assert_pod(
        line,
        "team-a",
        "chat-7d9f8b6c5d-a1b2c",
        "Deployment/chat",
        "chat-sa",
        "known",
    );
}

fn assert_pod(
    line: &Value,
    namespace: &str,
    name: &str,
    workload: &str,
    service_account: &str,
    status: &str,
) {
    assert_eq!(line["namespace"], namespace, "{line}");
    assert_eq!(line["pod"], name, "{line}");
    assert_eq!(line["workload"], workload, "{line}");
    assert_eq!(line["service_account"], service_account, "{line}");
    assert_eq!(line["pod_status"], status, "{line}");
    assert!(
        line["exe"].as_str().is_some_and(|e| e.ends_with("/curl")),
        "the exe comes from the kernel's pid: {line}"
    );
    assert_eq!(line["container_runtime"], "containerd", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_namespace_workload_service_account_and_exe() {
    let api = FakeKubeApi::start().expect("fake API server");
    let mut policy = policy("open");
    policy.push_str("  bypass:\n    - {namespace: legacy}\n");
    let Some(mut s) = start(
        "requests_carry_namespace_workload_service_account_and_exe",
        &api,
        &policy,
    ) else {
        return;
    };
    let hosts = hosts();
    let pod_b = s.node.add_pod("pod-b", &hosts).expect("pod b");
    let pod_legacy = s.node.add_pod("pod-legacy", &hosts).expect("legacy pod");
    let pod_late = s.node.add_pod("pod-late", &hosts).expect("late pod");
    let pod_ghost = s.node.add_pod("pod-ghost", &hosts).expect("ghost pod");
    api.apply(Resource::Pods, chat_pod(&s.pod.uid, "chat-7d9f8b6c5d-a1b2c"));
    api.apply(
        Resource::Pods,
        pod(
            "team-b",
            "nightly-29390000-q8x7z",
            &pod_b.uid,
            NODE,
            "batch",
            &[],
            Some(("batch/v1", "Job", "nightly-29390000")),
        ),
    );
    api.apply(
        Resource::Pods,
        pod(
            "legacy",
            "pinned-0",
            &pod_legacy.uid,
            NODE,
            "default",
            &[],
            Some(("apps/v1", "StatefulSet", "pinned")),
        ),
    );
    wait_pods(&s, 3.0);

    // Two pods in two namespaces, told apart.
    let a = post_chat(&s, &s.pod);
    let line = request_of(&mut s, a.pid, Duration::from_secs(10));
    assert_chat_pod(&line);
    assert_eq!(line["pod_uid"], s.pod.uid.as_str(), "{line}");
    let b = post_chat(&s, &pod_b);
    let line = request_of(&mut s, b.pid, Duration::from_secs(10));
    assert_pod(
        &line,
        "team-b",
        "nightly-29390000-q8x7z",
        "CronJob/nightly",
        "batch",
        "known",
    );

    // A host process: its exe and systemd unit, no pod.
    let resolve = format!("api.openai.com:443:{PROVIDER_V4}");
    let host = s
        .host_curl_trusting(
            CHAT,
            &[
                "--resolve",
                &resolve,
                "-H",
                "content-type: application/json",
                "--data-binary",
                BODY,
            ],
        )
        .expect("curl");
    assert!(host.success(), "{}", host.describe());
    let line = request_of(&mut s, host.pid, Duration::from_secs(10));
    assert_eq!(line["systemd_unit"], "ict-client.service", "{line}");
    assert!(
        line["exe"].as_str().is_some_and(|e| e.ends_with("/curl")),
        "{line}"
    );
    assert!(
        line["namespace"].is_null() && line["pod"].is_null() && line["pod_status"].is_null(),
        "{line}"
    );

    // A bypass selector by namespace: the pinned client (trusting only the provider's real CA)
    // is relayed untouched.
    let pinned = s
        .curl_in(&pod_legacy, false, "https://api.openai.com/v1/models", &[])
        .expect("curl");
    assert!(
        pinned.success(),
        "a bypassed client reaches the provider itself: {}",
        pinned.describe()
    );
    let line = s.daemon.connection_line(pinned.pid).expect("connection line");
    assert_eq!(line["mode"], "passthrough_bypassed", "{line}");
    assert_eq!(line["namespace"], "legacy", "{line}");
    assert_eq!(line["workload"], "StatefulSet/pinned", "{line}");
    assert_eq!(line["node"], NODE, "{line}");
    let a_connection = s.daemon.connection_line(a.pid).expect("connection line of pod a");
    assert_eq!(
        a_connection["pod_labels"], "app=chat,pod-template-hash=7d9f8b6c5d",
        "{a_connection}"
    );
    assert_eq!(a_connection["workload"], "Deployment/chat", "{a_connection}");

    // A pod that never appears in the API: recorded as pod=unknown after the bounded wait.
    let ghost = post_chat(&s, &pod_ghost);
    // A pod that appears in the API only after its request completed: the request is not delayed,
    // its record is completed when the pod is listed.
    let listed = Arc::new(AtomicBool::new(false));
    let late_object = chat_pod(&pod_late.uid, "chat-7d9f8b6c5d-late1");
    let announcer = {
        let listed = listed.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            listed.store(true, Ordering::SeqCst);
        })
    };
    let late = post_chat(&s, &pod_late);
    assert!(
        !listed.load(Ordering::SeqCst),
        "the request finished before its pod was listed"
    );
    let _ = announcer.join();
    api.apply(Resource::Pods, late_object);
    let line = request_of(&mut s, late.pid, Duration::from_secs(10));
    assert_pod(
        &line,
        "team-a",
        "chat-7d9f8b6c5d-late1",
        "Deployment/chat",
        "chat-sa",
        "late",
    );
    let line = request_of(&mut s, ghost.pid, Duration::from_secs(15));
    assert_eq!(line["pod"], "unknown", "{line}");
    assert_eq!(line["pod_status"], "unknown", "{line}");
    assert!(line["namespace"].is_null(), "{line}");
    assert_eq!(
        line["pod_uid"],
        pod_ghost.uid.as_str(),
        "the cgroup still names the pod uid: {line}"
    );

    let attributions = |result: &str| {
        s.daemon
            .metric(&format!(
                "interceptor_pod_attributions_total{{result=\"{result}\"}}"
            ))
            .unwrap_or(0.0)
    };
    assert!(attributions("known") >= 2.0);
    assert_eq!(attributions("late"), 1.0);
    assert_eq!(attributions("unknown"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_and_attribution_survive_the_api_going_away_for_30_seconds() {
    let mut api = FakeKubeApi::start().expect("fake API server");
    let Some(mut s) = start(
        "traffic_and_attribution_survive_the_api_going_away_for_30_seconds",
        &api,
        &policy("open"),
    ) else {
        return;
    };
    api.apply(Resource::Pods, chat_pod(&s.pod.uid, "chat-7d9f8b6c5d-a1b2c"));
    wait_pods(&s, 1.0);

    api.stop();
    let away = Instant::now();
    let mut requests = 0;
    while away.elapsed() < Duration::from_secs(30) {
        let curl = post_chat(&s, &s.pod);
        let line = request_of(&mut s, curl.pid, Duration::from_secs(10));
        assert_chat_pod(&line);
        requests += 1;
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(requests >= 8, "{requests} requests while the API was away");
    let failures: Vec<Value> = s
        .daemon
        .logs()
        .into_iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("pod watch failed"))
        })
        .collect();
    assert_eq!(
        failures.len(),
        1,
        "one warning for the outage, not one per retry: {failures:#?}"
    );
    assert!(
        s.daemon
            .metric("interceptor_kubernetes_watch_errors_total")
            .unwrap_or(0.0)
            >= 2.0
    );

    api.restart().expect("the API comes back");
    let hosts = hosts();
    let pod_b = s.node.add_pod("pod-b", &hosts).expect("pod b");
    api.apply(
        Resource::Pods,
        pod("team-b", "batch-0", &pod_b.uid, NODE, "batch", &[], None),
    );
    wait_pods(&s, 2.0);
    s.daemon
        .wait_log(Duration::from_secs(5), |l| l["message"] == "pod watch recovered")
        .expect("the watch recovers by itself");
    let b = post_chat(&s, &pod_b);
    let line = request_of(&mut s, b.pid, Duration::from_secs(10));
    assert_pod(&line, "team-b", "batch-0", "Pod/batch-0", "batch", "known");
}
