//! Privileged end-to-end tests of the foundation: eBPF redirect, kernel attribution, relay,
//! IPv6, QUIC refusal, fail-open / fail-closed, map hygiene and start-up errors.
//! Run with `--test-threads=1` (they share kernel state); see tests/README.md.

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::node::{OTHER_V4, PROVIDER_V4, PROVIDER_V6, cgroup_id};
use tests::scenario::{RELAY_HOST, SINK_PORT, Scenario, policy};

/// A name served on the provider's target address that is not a provider domain: its TLS is relayed
/// byte for byte, so the client sees the provider's own certificate (checked by curl against the test
/// public CA) and the daemon still attributes the connection.
const RELAYED: &str = "https://relay.example.com/v1/models";

fn scenario(test: &str, failure_mode: &str) -> Option<Scenario> {
    if !tests::privileged_available(test) {
        return None;
    }
    Some(Scenario::start(&policy(failure_mode), &[]).expect("simulated node and daemon start"))
}

/// The `connection closed` log line of the connection made by process `pid`.
fn connection_of(s: &mut Scenario, pid: u32) -> Value {
    s.daemon.connection_line(pid).unwrap_or_else(|e| panic!("{e:#}"))
}

fn peer_ip(body: &Value) -> String {
    let peer: SocketAddr = body["peer"]
        .as_str()
        .expect("peer in provider answer")
        .parse()
        .expect("peer address");
    peer.ip().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_pod_connections_are_redirected_and_attributed() {
    let Some(mut s) = scenario("host_and_pod_connections_are_redirected_and_attributed", "open") else {
        return;
    };
    let skipped_before = s
        .daemon
        .metric("interceptor_redirect_events_total{event=\"skipped\"}")
        .expect("scrape");
    // No Kubernetes configuration here: one informational line, no warnings, no watch.
    let logs = s.daemon.logs();
    let mentions = |text: &str| {
        logs.iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
            .count()
    };
    assert_eq!(mentions("no Kubernetes configuration"), 1, "{logs:#?}");
    assert!(
        !logs
            .iter()
            .any(|l| l["level"] != "INFO" && l.to_string().to_lowercase().contains("kube")),
        "no Kubernetes warnings without Kubernetes: {logs:#?}"
    );
    assert!(
        !s.daemon
            .metrics()
            .expect("scrape")
            .contains("interceptor_kubernetes_"),
        "no pod watch metrics"
    );

    let resolve = format!("{RELAY_HOST}:443:{PROVIDER_V4}");
    let host = s.host_curl(RELAYED, &["--resolve", &resolve]).expect("host curl");
    assert!(host.success(), "host client failed: {}", host.describe());
    let pod = s.pod_curl(RELAYED, &[]).expect("pod curl");
    assert!(pod.success(), "pod client failed: {}", pod.describe());

    // Real TLS with the provider's own certificate (curl verified it against the test public CA),
    // and the provider saw the daemon's upstream connection, not the pod.
    for (who, curl) in [("host", &host), ("pod", &pod)] {
        let body = curl.json().expect("provider answer");
        assert_eq!(body["sni"], RELAY_HOST, "{who}: {body}");
        assert_eq!(
            peer_ip(&body),
            "203.0.113.1",
            "{who}: the provider must see the relay, got {body}"
        );
    }

    let host_line = connection_of(&mut s, host.pid);
    assert_eq!(
        host_line["original_dst"],
        format!("{PROVIDER_V4}:443"),
        "{host_line}"
    );
    assert_eq!(host_line["pid"], host.pid, "{host_line}");
    assert_eq!(host_line["uid"], 0, "{host_line}");
    assert_eq!(host_line["comm"], "curl", "{host_line}");
    assert_eq!(
        host_line["cgroup_id"],
        cgroup_id(&s.host_cgroup).expect("host cgroup id"),
        "{host_line}"
    );
    assert!(
        host_line["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("ict-client.service")),
        "{host_line}"
    );
    assert!(
        host_line["exe"].as_str().is_some_and(|e| e.ends_with("/curl")),
        "{host_line}"
    );
    assert_eq!(host_line["user"], "root", "{host_line}");
    assert_eq!(host_line["mode"], "passthrough_unlisted_sni", "{host_line}");
    // A host process is placed by its systemd unit, and is in no pod.
    assert_eq!(host_line["systemd_unit"], "ict-client.service", "{host_line}");
    assert!(
        host_line["pod_uid"].is_null() && host_line["container_id"].is_null(),
        "{host_line}"
    );

    let pod_line = connection_of(&mut s, pod.pid);
    assert_eq!(
        pod_line["original_dst"],
        format!("{PROVIDER_V4}:443"),
        "{pod_line}"
    );
    assert_eq!(pod_line["comm"], "curl", "{pod_line}");
    assert_eq!(
        pod_line["cgroup_id"],
        s.pod.cgroup_id().expect("pod cgroup id"),
        "{pod_line}"
    );
    assert_eq!(pod_line["cgroup"], s.pod.cgroup_relative(), "{pod_line}");
    // The pod and container, read from the kubelet/containerd cgroup names.
    assert_eq!(pod_line["pod_uid"], s.pod.uid.as_str(), "{pod_line}");
    assert_eq!(pod_line["qos_class"], "besteffort", "{pod_line}");
    assert_eq!(pod_line["container_runtime"], "containerd", "{pod_line}");
    assert_eq!(
        pod_line["container_id"],
        s.pod.container_id.as_str(),
        "{pod_line}"
    );
    assert!(pod_line["systemd_unit"].is_null(), "{pod_line}");
    assert_eq!(
        pod_line["client"]
            .as_str()
            .map(|c| c.starts_with(&s.pod.v4.to_string())),
        Some(true),
        "{pod_line}"
    );
    assert_ne!(
        pod_line["netns_cookie"], host_line["netns_cookie"],
        "pod and host netns must differ"
    );

    // The daemon's own upstream connections to the targets were skipped, not redirected.
    let skipped = s
        .daemon
        .metric("interceptor_redirect_events_total{event=\"skipped\"}")
        .expect("scrape");
    assert!(
        skipped >= skipped_before + 2.0,
        "skipped counter {skipped_before} -> {skipped}"
    );
    assert_eq!(
        s.daemon
            .metric("interceptor_redirect_events_total{event=\"redirected\"}")
            .expect("scrape"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_target_connections_are_not_redirected() {
    let Some(s) = scenario("non_target_connections_are_not_redirected", "open") else {
        return;
    };
    let resolve = format!("other.example.com:443:{OTHER_V4}");
    let pod = s.pod_curl("https://other.example.com/", &[]).expect("pod curl");
    assert!(pod.success(), "{}", pod.describe());
    let body = pod.json().expect("answer");
    assert_eq!(
        peer_ip(&body),
        s.pod.v4.to_string(),
        "the provider must see the pod itself: {body}"
    );
    let host = s
        .host_curl("https://other.example.com/", &["--resolve", &resolve])
        .expect("host curl");
    assert!(host.success(), "{}", host.describe());

    assert_eq!(
        s.daemon
            .metric("interceptor_redirect_events_total{event=\"redirected\"}")
            .expect("scrape"),
        0.0
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.daemon.connection_lines().is_empty(),
        "no connection may reach the proxy: {:?}",
        s.daemon.connection_lines()
    );
    let seen = s.provider.peers();
    assert!(
        seen.iter()
            .any(|p| p.peer.ip().to_string() == s.pod.v4.to_string()),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_is_redirected_like_ipv4() {
    let Some(mut s) = scenario("ipv6_is_redirected_like_ipv4", "open") else {
        return;
    };
    let resolve = format!("{RELAY_HOST}:443:[{PROVIDER_V6}]");
    let pod = s
        .pod_curl(RELAYED, &["-6", "--resolve", &resolve])
        .expect("pod curl");
    assert!(pod.success(), "{}", pod.describe());
    let host = s
        .host_curl(RELAYED, &["-6", "--resolve", &resolve])
        .expect("host curl");
    assert!(host.success(), "{}", host.describe());
    for curl in [&pod, &host] {
        let body = curl.json().expect("answer");
        assert_eq!(
            peer_ip(&body),
            "2001:db8:203:1::1",
            "the provider must see the relay: {body}"
        );
        let line = connection_of(&mut s, curl.pid);
        assert_eq!(line["original_dst"], format!("[{PROVIDER_V6}]:443"), "{line}");
        assert_eq!(line["comm"], "curl", "{line}");
    }
    let pod_line = connection_of(&mut s, pod.pid);
    assert_eq!(
        pod_line["cgroup_id"],
        s.pod.cgroup_id().expect("cgroup id"),
        "{pod_line}"
    );
    assert!(
        pod_line["client"]
            .as_str()
            .is_some_and(|c| c.contains(&s.pod.v6.to_string())),
        "{pod_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_443_to_a_target_is_refused_and_tcp_works() {
    let Some(s) = scenario("udp_443_to_a_target_is_refused_and_tcp_works", "open") else {
        return;
    };
    let script = format!(
        "import socket, sys
results = []
for family, addr in ((socket.AF_INET, '{PROVIDER_V4}'), (socket.AF_INET6, '{PROVIDER_V6}')):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.sendto(b'quic', (addr, 443)); results.append('sent')
    except PermissionError:
        results.append('refused')
    c = socket.socket(family, socket.SOCK_DGRAM)
    try:
        c.connect((addr, 443)); results.append('connected')
    except PermissionError:
        results.append('refused')
    o = socket.socket(family, socket.SOCK_DGRAM)
    o.sendto(b'other', (addr, 4433)); results.append('other-port-sent')
print(' '.join(results))
"
    );
    let output = s
        .pod
        .command("python3", &["-c", &script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim(),
        "refused refused other-port-sent refused refused other-port-sent",
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        s.daemon
            .metric("interceptor_redirect_events_total{event=\"refused\"}")
            .expect("scrape"),
        4.0
    );
    let tcp = s.pod_curl(RELAYED, &[]).expect("curl");
    assert!(
        tcp.success(),
        "TCP to the same address must work: {}",
        tcp.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_after_kill9_connects_directly_within_one_second() {
    let Some(mut s) = scenario(
        "fail_open_after_kill9_connects_directly_within_one_second",
        "open",
    ) else {
        return;
    };
    let before = s.pod_curl(RELAYED, &[]).expect("curl");
    assert_eq!(
        peer_ip(&before.json().expect("answer")),
        "203.0.113.1",
        "redirected while the daemon runs"
    );

    s.daemon.kill9().expect("kill -9");
    let killed = Instant::now();
    let mut attempts = 0;
    let direct = loop {
        attempts += 1;
        let curl = s.pod_curl(RELAYED, &["--max-time", "1"]).expect("curl");
        if curl.success() {
            break curl;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "no direct connection within 1 s: {}",
            curl.describe()
        );
    };
    let elapsed = killed.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(
        peer_ip(&direct.json().expect("answer")),
        s.pod.v4.to_string(),
        "must reach the provider directly"
    );
    eprintln!("fail-open: direct connection {elapsed:?} after kill -9 ({attempts} attempt(s))");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_after_kill9_refuses_connections() {
    let Some(mut s) = scenario("fail_closed_after_kill9_refuses_connections", "closed") else {
        return;
    };
    let before = s.pod_curl(RELAYED, &[]).expect("curl");
    assert!(before.success(), "{}", before.describe());
    assert!(
        s.daemon.bpffs_dir.join("redirect_connect4").exists(),
        "links must be pinned in fail-closed mode"
    );

    s.daemon.kill9().expect("kill -9");
    let pod = s.pod_curl(RELAYED, &["--max-time", "3"]).expect("curl");
    assert_eq!(
        pod.output.status.code(),
        Some(7),
        "pod connection must be refused: {}",
        pod.describe()
    );
    let resolve = format!("{RELAY_HOST}:443:{PROVIDER_V4}");
    let host = s
        .host_curl(RELAYED, &["--max-time", "3", "--resolve", &resolve])
        .expect("curl");
    assert_eq!(
        host.output.status.code(),
        Some(7),
        "host connection must be refused: {}",
        host.describe()
    );

    // `interceptor detach` removes the pins and connections go direct again.
    let detach = Command::new(tests::daemon::binary())
        .args(["detach", "--bpffs-dir"])
        .arg(&s.daemon.bpffs_dir)
        .output()
        .expect("detach");
    assert!(detach.status.success(), "{detach:?}");
    let after = s.pod_curl(RELAYED, &[]).expect("curl");
    assert!(after.success(), "{}", after.describe());
    assert_eq!(peer_ip(&after.json().expect("answer")), s.pod.v4.to_string());
}

/// Switching a node from fail-closed to fail-open (and the first step of uninstalling a fail-closed
/// deployment): the fail-open daemon removes the pins the fail-closed one left, and after it stops
/// nothing stays attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_daemon_removes_the_pins_of_a_fail_closed_one() {
    let Some(mut s) = scenario(
        "a_fail_open_daemon_removes_the_pins_of_a_fail_closed_one",
        "closed",
    ) else {
        return;
    };
    let pins = s.daemon.bpffs_dir.clone();
    assert!(
        pins.join("redirect_connect4").exists(),
        "fail-closed pins its links"
    );
    s.daemon.kill9().expect("kill -9");
    let refused = s.pod_curl(RELAYED, &["--max-time", "3"]).expect("curl");
    assert_eq!(refused.output.status.code(), Some(7), "{}", refused.describe());

    s.replace_daemon(&policy("open"))
        .expect("fail-open daemon starts");
    assert!(!pins.exists(), "the fail-open daemon removed {}", pins.display());
    assert!(
        s.daemon
            .logs()
            .iter()
            .any(|l| l["message"] == "removed links pinned by a fail-closed daemon" && l["removed"] == 7),
        "one line says what was removed"
    );
    let through = s.pod_curl(RELAYED, &[]).expect("curl");
    assert!(through.success(), "{}", through.describe());
    assert_ne!(
        peer_ip(&through.json().expect("answer")),
        s.pod.v4.to_string(),
        "redirected through the proxy"
    );

    s.daemon.stop().expect("graceful stop");
    let direct = s.pod_curl(RELAYED, &[]).expect("curl");
    assert!(direct.success(), "{}", direct.describe());
    assert_eq!(
        peer_ip(&direct.json().expect("answer")),
        s.pod.v4.to_string(),
        "nothing stays attached after a fail-open daemon stops"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_map_entry_is_left_after_10000_short_connections() {
    let Some(s) = scenario("no_map_entry_is_left_after_10000_short_connections", "open") else {
        return;
    };
    const CONNECTIONS: u64 = 10_000;
    let target = SocketAddr::new(PROVIDER_V4.into(), SINK_PORT);
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for i in 0..CONNECTIONS {
            let result =
                TcpStream::connect_timeout(&target, Duration::from_secs(5)).and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    // A first byte that is not TLS: the proxy relays it untouched at once.
                    std::io::Write::write_all(&mut stream, b"x")?;
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer)?;
                    Ok(answer)
                });
            match result {
                Ok(answer) if answer == "ok\n" => {}
                other => failures.push(format!("connection {i}: {other:?}")),
            }
        }
        failures
    })
    .await
    .expect("client loop");
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let relayed = s
            .daemon
            .metric("interceptor_connections_total{outcome=\"completed\"}")
            .expect("scrape");
        if relayed >= CONNECTIONS as f64 || Instant::now() > deadline {
            assert_eq!(relayed, CONNECTIONS as f64, "every connection must be relayed");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let redirected = s
        .daemon
        .metric("interceptor_redirect_events_total{event=\"redirected\"}")
        .expect("scrape");
    assert_eq!(redirected, CONNECTIONS as f64);
    assert_eq!(
        s.daemon
            .metric("interceptor_ebpf_map_entries{map=\"pending\"}")
            .expect("scrape"),
        0.0
    );
    assert_eq!(
        s.daemon
            .metric("interceptor_ebpf_map_entries{map=\"established\"}")
            .expect("scrape"),
        0.0
    );
    assert_eq!(
        s.provider
            .sink_connections
            .load(std::sync::atomic::Ordering::Relaxed),
        CONNECTIONS
    );
}
