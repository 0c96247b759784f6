//! Privileged end-to-end tests of target discovery from the DNS answers workloads receive: a pod whose
//! own resolver (a test DNS server, like CoreDNS in a cluster) answers `api.openai.com` with an address
//! the daemon's own resolution does not know, CNAME chains and AAAA answers, DNS over TCP, answers
//! that rotate every few seconds, expiry after TTL plus grace, malformed answers, and the "escaped"
//! and encrypted-DNS reports. Run with `--test-threads=1` (they share kernel state).
//!
//! The pods trust only the enterprise CA: a connection that escaped the proxy would meet the
//! provider's own certificate and fail, so every successful request proves it was intercepted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::dns::{Answer, DnsServer, malformed_responses};
use tests::node::{OTHER_V4, PROVIDER_V4, PROVIDER_V6, Pod};
use tests::scenario::{POLICY_HEADER, Scenario};

const URL: &str = "https://api.openai.com/v1/models";
/// The test resolver: the provider namespace's own interface address (routed from the pods).
const RESOLVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Seconds a learned address outlives its answer's TTL in these tests.
const GRACE_S: u64 = 2;

/// No static addresses and no resolvable host DNS: every target comes from the pods' answers.
fn learning_policy() -> String {
    format!(
        "{POLICY_HEADER}providers:
  - domain: api.openai.com
  - domain: \"*.openai.azure.com\"
discovery:
  dnsGrace: {GRACE_S}s
"
    )
}

fn start(test: &str) -> Option<(Scenario, DnsServer)> {
    if !tests::privileged_available(test) {
        return None;
    }
    let s = Scenario::start(&learning_policy(), &[]).expect("simulated node and daemon start");
    let dns = DnsServer::start(&s.provider_netns, RESOLVER.into()).expect("test DNS server starts");
    Some((s, dns))
}

/// A pod without a hosts entry for the provider, resolving through the test resolver (`options`
/// lines of resolv.conf, e.g. `use-vc` for DNS over TCP).
fn resolving_pod(s: &mut Scenario, name: &str, options: &str) -> Pod {
    resolving_pod_via(s, name, RESOLVER.into(), options)
}

/// [`resolving_pod`] with the resolver at `resolver`.
fn resolving_pod_via(s: &mut Scenario, name: &str, resolver: IpAddr, options: &str) -> Pod {
    let pod = s.node.add_pod(name, &[]).expect("pod");
    let conf = format!("nameserver {resolver}\noptions timeout:2 attempts:2 {options}\n");
    std::fs::write(format!("/etc/netns/{}/resolv.conf", pod.netns), conf).expect("resolv.conf");
    pod
}

fn status(s: &Scenario) -> Value {
    let socket = s.node.dir.join("run/admin.sock");
    let output = Command::new(tests::daemon::binary())
        .args(["status", "--format", "json", "--socket"])
        .arg(&socket)
        .output()
        .expect("interceptor status");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("status JSON")
}

/// The learned targets the daemon reports: (domain, address).
fn learned(s: &Scenario) -> Vec<(String, String)> {
    status(s)["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| t["source"] == "learned")
        .map(|t| {
            (
                t["domain"].as_str().unwrap_or_default().to_owned(),
                t["address"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Waits until the daemon reports `address` as learned for `domain` (it sweeps and publishes the
/// learned map every second).
fn wait_learned(s: &Scenario, domain: &str, address: SocketAddr) {
    let wanted = (domain.to_owned(), address.to_string());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let learned = learned(s);
        if learned.contains(&wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "{wanted:?} not learned: {learned:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn events(s: &Scenario, event: &str) -> f64 {
    s.daemon
        .metric(&format!("interceptor_redirect_events_total{{event=\"{event}\"}}"))
        .expect("scrape")
}

/// Runs curl in `pod` trusting only the enterprise CA, and checks the daemon terminated it and
/// attributed it to the pod, with `original` as the destination the application chose.
fn intercepted_request(s: &mut Scenario, pod: &Pod, original: SocketAddr, extra: &[&str]) {
    let curl = s.curl_in(pod, true, URL, extra).expect("curl");
    assert!(
        curl.success(),
        "intercepted through a learned target: {}",
        curl.describe()
    );
    let line = s.daemon.connection_line(curl.pid).expect("connection line");
    assert_eq!(line["original_dst"], original.to_string(), "{line}");
    assert_eq!(line["mode"], "terminated", "{line}");
    assert_eq!(line["cgroup_id"], pod.cgroup_id().expect("cgroup id"), "{line}");
    assert_eq!(line["pod_uid"], pod.uid, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_first_connection_through_its_own_resolver_is_intercepted() {
    let Some((mut s, dns)) = start("a_pods_first_connection_through_its_own_resolver_is_intercepted") else {
        return;
    };
    dns.set("api.openai.com", vec![Answer::Address(PROVIDER_V4.into())], 30);
    let pod = resolving_pod(&mut s, "pod-dns", "");
    assert!(learned(&s).is_empty(), "nothing learned before the pod resolves");
    let watched = events(&s, "dns_watched");

    intercepted_request(&mut s, &pod, SocketAddr::new(PROVIDER_V4.into(), 443), &["-4"]);
    assert!(
        dns.queries.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the pod asked its resolver"
    );
    assert!(events(&s, "dns_watched") > watched);
    wait_learned(&s, "api.openai.com", SocketAddr::new(PROVIDER_V4.into(), 443));
    assert!(
        s.daemon
            .metric("interceptor_targets{source=\"learned\"}")
            .expect("scrape")
            >= 1.0,
        "learned targets are counted"
    );
    assert_eq!(events(&s, "hello_escaped"), 0.0, "nothing escaped");

    // A wildcard domain's answers are learned too (ports default to 443).
    dns.set(
        "myres.openai.azure.com",
        vec![Answer::Address(OTHER_V4.into())],
        30,
    );
    let lookup = pod
        .command("getent", &["ahostsv4", "myres.openai.azure.com"])
        .output()
        .expect("getent");
    assert!(lookup.status.success(), "{lookup:?}");
    wait_learned(&s, "*.openai.azure.com", SocketAddr::new(OTHER_V4.into(), 443));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_chains_aaaa_answers_and_dns_over_tcp_are_followed() {
    let Some((mut s, dns)) = start("cname_chains_aaaa_answers_and_dns_over_tcp_are_followed") else {
        return;
    };
    dns.set(
        "api.openai.com",
        vec![Answer::Cname("edge.cdn.example.net".into())],
        30,
    );
    dns.set(
        "edge.cdn.example.net",
        vec![
            Answer::Address(OTHER_V4.into()),
            Answer::Address(PROVIDER_V6.into()),
        ],
        30,
    );
    let pod = resolving_pod(&mut s, "pod-dns", "");
    intercepted_request(&mut s, &pod, SocketAddr::new(OTHER_V4.into(), 443), &["-4"]);
    intercepted_request(&mut s, &pod, SocketAddr::new(PROVIDER_V6.into(), 443), &["-6"]);
    // The CDN name itself is not a provider: its answers are learned only as part of the chain.
    wait_learned(&s, "api.openai.com", SocketAddr::new(OTHER_V4.into(), 443));
    wait_learned(&s, "api.openai.com", SocketAddr::new(PROVIDER_V6.into(), 443));
    let learned = learned(&s);
    assert!(
        learned.iter().all(|(domain, _)| domain == "api.openai.com"),
        "{learned:?}"
    );

    // glibc's `use-vc` resolves over TCP: the answer arrives in a TCP segment from port 53.
    dns.set("api.openai.com", vec![Answer::Address(PROVIDER_V4.into())], 30);
    let tcp_pod = resolving_pod(&mut s, "pod-tcp", "use-vc");
    intercepted_request(
        &mut s,
        &tcp_pod,
        SocketAddr::new(PROVIDER_V4.into(), 443),
        &["-4"],
    );
}

/// A resolver reached over IPv6 (a node-local cache or a sidecar on the pod's own `::1`): answers in
/// IPv6 packets, over UDP and over TCP, are learned too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_arriving_over_ipv6_are_learned() {
    let Some((mut s, _dns)) = start("answers_arriving_over_ipv6_are_learned") else {
        return;
    };
    let resolver6: IpAddr = "::1".parse().expect("address");
    let v6_pod = resolving_pod_via(&mut s, "pod-v6", resolver6, "");
    let pod_netns = tests::node::ProviderNetns {
        netns: v6_pod.netns.clone(),
    };
    let dns6 = DnsServer::start(&pod_netns, resolver6).expect("IPv6 resolver in the pod");
    dns6.set("api.openai.com", vec![Answer::Address(PROVIDER_V6.into())], 30);
    intercepted_request(&mut s, &v6_pod, SocketAddr::new(PROVIDER_V6.into(), 443), &["-6"]);
    dns6.set("api.openai.com", vec![Answer::Address(PROVIDER_V4.into())], 30);
    std::fs::write(
        format!("/etc/netns/{}/resolv.conf", v6_pod.netns),
        format!("nameserver {resolver6}\noptions timeout:2 attempts:2 use-vc\n"),
    )
    .expect("resolv.conf");
    intercepted_request(&mut s, &v6_pod, SocketAddr::new(PROVIDER_V4.into(), 443), &["-4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_answers_never_let_a_connection_escape_and_expire_after_ttl_plus_grace() {
    let Some((mut s, dns)) =
        start("rotating_answers_never_let_a_connection_escape_and_expire_after_ttl_plus_grace")
    else {
        return;
    };
    let pod = resolving_pod(&mut s, "pod-dns", "");
    let addresses: [IpAddr; 2] = [PROVIDER_V4.into(), OTHER_V4.into()];
    let ttl = 1;
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(8) {
        // The answer changes every 2 seconds, with a 1 s TTL: each request resolves afresh.
        let current = addresses[(started.elapsed().as_secs() / 2 % 2) as usize];
        dns.set("api.openai.com", vec![Answer::Address(current)], ttl);
        intercepted_request(&mut s, &pod, SocketAddr::new(current, 443), &["-4"]);
        seen.insert(current);
        requests += 1;
    }
    assert_eq!(seen.len(), 2, "the answer rotated");
    assert!(requests >= 6, "{requests} requests");
    assert_eq!(events(&s, "hello_escaped"), 0.0, "no connection escaped");

    // The last answer named `current`; the other address left the answers earlier. Both leave the
    // map once TTL plus grace has passed since the last answer that carried them.
    let last_answer = Instant::now();
    assert!(!learned(&s).is_empty(), "the last answers are still targets");
    let deadline = last_answer + Duration::from_secs(ttl as u64 + GRACE_S + 3);
    loop {
        let learned = learned(&s);
        if learned.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still learned after TTL plus grace: {learned:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        last_answer.elapsed() >= Duration::from_secs(ttl as u64 + GRACE_S - 1),
        "expired too early ({:?} after the last answer)",
        last_answer.elapsed()
    );
    assert_eq!(
        s.daemon
            .metric("interceptor_targets{source=\"learned\"}")
            .expect("scrape"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_ignored_and_counted() {
    let Some((s, dns)) = start("malformed_answers_are_ignored_and_counted") else {
        return;
    };
    let broken = malformed_responses("api.openai.com");
    let malformed_before = events(&s, "dns_malformed");
    // The test process asks the resolver directly: its socket receives each broken answer, which the
    // ingress program parses before the socket does.
    let client = UdpSocket::bind("0.0.0.0:0").expect("client socket");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    for (index, (what, reply)) in broken.iter().enumerate() {
        let name = format!("broken{index}.example.net");
        dns.set_raw(&name, reply.clone());
        let query = tests::dns::response(&name, &[], 0).expect("query bytes");
        let mut query = query;
        query[2] = 0x01; // a query (QR = 0), recursion desired
        query[3] = 0x00;
        client.send_to(&query, (RESOLVER, 53)).expect("send");
        let mut buffer = [0u8; 4096];
        let (len, _) = client
            .recv_from(&mut buffer)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            &buffer[2..len],
            &reply[2..],
            "{what}: the application still gets the answer"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while events(&s, "dns_malformed") - malformed_before < broken.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "each broken answer counted: {} of {}",
            events(&s, "dns_malformed") - malformed_before,
            broken.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        learned(&s).is_empty(),
        "nothing learned from broken answers: {:?}",
        learned(&s)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_connections_and_encrypted_dns_are_reported_with_the_pod() {
    let Some((mut s, _dns)) = start("escaped_connections_and_encrypted_dns_are_reported_with_the_pod") else {
        return;
    };
    // The scenario's pod has `api.openai.com` hard-coded in its hosts file: no DNS answer, no target.
    let escaped = s.pod_curl(URL, &[]).expect("curl");
    assert!(
        escaped.success(),
        "reaches the provider directly: {}",
        escaped.describe()
    );
    let counter = |s: &Scenario| {
        s.daemon
            .metric_sum(
                "interceptor_escaped_connections_total",
                &[("domain", "api.openai.com")],
            )
            .expect("scrape")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter(&s) < 1.0 {
        assert!(Instant::now() < deadline, "the escape is counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(events(&s, "hello_escaped") >= 1.0);
    let cgroup = s.pod.cgroup_relative();
    let line = s
        .daemon
        .wait_log(Duration::from_secs(5), |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("bypassed the proxy"))
        })
        .expect("escape log line");
    assert_eq!(line["cgroup"], cgroup, "{line}");
    assert_eq!(line["destination"], format!("{PROVIDER_V4}:443"), "{line}");

    // DNS over HTTPS (a well-known name) and DNS over TLS (port 853) are reported as hints.
    let dot_listener = s
        .provider_netns
        .enter(|| Ok(TcpListener::bind(SocketAddr::new(OTHER_V4.into(), 853))?))
        .expect("port 853 listener");
    let doh = s
        .curl_in(
            &s.pod,
            false,
            "https://dns.google/dns-query",
            &["-k", "--resolve", &format!("dns.google:443:{OTHER_V4}")],
        )
        .expect("curl");
    let dot = s
        .curl_in(
            &s.pod,
            false,
            &format!("https://{OTHER_V4}:853/"),
            &["-k", "--max-time", "2"],
        )
        .expect("curl");
    let hints = |s: &Scenario, kind: &str| {
        s.daemon
            .metric_sum("interceptor_encrypted_dns_connections_total", &[("kind", kind)])
            .expect("scrape")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while hints(&s, "doh") < 1.0 || hints(&s, "dot") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "doh {} dot {}: {} / {}",
            hints(&s, "doh"),
            hints(&s, "dot"),
            doh.describe(),
            dot.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(dot_listener);
}
