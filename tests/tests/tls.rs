//! Privileged end-to-end tests of TLS interception: minted leaves, HTTP/1.1 and HTTP/2, the official
//! SDKs, untrusting clients, SSE without buffering, WebSocket, and bad input.
//! Run with `--test-threads=1` (they share kernel state); see tests/README.md.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tests::node::PROVIDER_V4;
use tests::scenario::{Scenario, policy};

const MODELS: &str = "https://api.openai.com/v1/models";

fn scenario(test: &str) -> Option<Scenario> {
    scenario_with(test, &[])
}

fn scenario_with(test: &str, daemon_args: &[&str]) -> Option<Scenario> {
    if !tests::privileged_available(test) {
        return None;
    }
    Some(Scenario::start(&policy("open"), daemon_args).expect("simulated node and daemon start"))
}

/// The provider's view of each response body in curl's output (bodies back to back).
fn provider_peers(curl: &tests::scenario::Curl) -> Vec<String> {
    serde_json::Deserializer::from_str(&curl.stdout())
        .into_iter::<Value>()
        .map(|body| {
            let body = body.expect("JSON body");
            body["peer"].as_str().map(str::to_owned).unwrap_or_default()
        })
        .collect()
}

fn request_lines(s: &Scenario, path: &str) -> Vec<Value> {
    s.daemon
        .logs()
        .into_iter()
        .filter(|l| l["message"] == "request" && l["path"] == path)
        .collect()
}

fn wait_request_lines(s: &mut Scenario, path: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = request_lines(s, path);
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TLS connection (SNI api.openai.com, trusting the enterprise CA) from this process to the provider's
/// target address, hence through the interceptor.
async fn tls_to_provider(s: &Scenario) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(PROVIDER_V4.into(), 443))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("api.openai.com").expect("name");
    tokio_rustls::TlsConnector::from(client_config(s))
        .connect(name, tcp)
        .await
        .expect("TLS with the minted leaf")
}

/// A rustls client trusting the enterprise CA.
fn client_config(s: &Scenario) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&s.enterprise_ca).expect("enterprise CA");
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.expect("certificate")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_http2_get_a_minted_leaf_and_reach_the_provider() {
    let Some(mut s) = scenario("curl_http1_and_http2_get_a_minted_leaf_and_reach_the_provider") else {
        return;
    };
    let h1 = s.pod_curl_trusting(MODELS, &["--http1.1", "-v"]).expect("curl");
    assert!(h1.success(), "{}", h1.describe());
    let body = h1.json().expect("json");
    assert_eq!(body["sni"], "api.openai.com", "{body}");
    assert_eq!(body["http_version"], "HTTP/1.1", "{body}");
    assert!(
        body["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("203.0.113.1:")),
        "the provider must see the daemon: {body}"
    );
    let issuer = h1
        .stderr()
        .lines()
        .find(|l| l.contains("issuer:"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        issuer.contains("Interceptor Test Enterprise CA"),
        "client-side certificate must be the minted leaf: {issuer:?}"
    );

    let h2 = s.pod_curl_trusting(MODELS, &["--http2", "-v"]).expect("curl");
    assert!(h2.success(), "{}", h2.describe());
    assert!(
        h2.stderr().contains("ALPN: server accepted h2"),
        "{}",
        h2.stderr()
    );
    assert_eq!(
        h2.json().expect("json")["http_version"],
        "HTTP/2.0",
        "upstream uses HTTP/2 when the client offered it"
    );

    let lines = wait_request_lines(&mut s, "/v1/models", 2);
    assert_eq!(lines.len(), 2, "one request record per request: {lines:#?}");
    for (line, curl) in lines.iter().zip([&h1, &h2]) {
        assert_eq!(line["host"], "api.openai.com", "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["tgid"], curl.pid, "{line}");
        assert_eq!(line["comm"], "curl", "{line}");
        assert!(line["bytes_down"].as_u64().is_some_and(|b| b > 0), "{line}");
        assert!(line["ttfb_ms"].as_f64().is_some(), "{line}");
    }
    assert!(
        s.daemon
            .metric("interceptor_tls_connections_total{outcome=\"terminated\"}")
            .expect("scrape")
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_and_anthropic_sdks_work_through_the_interceptor() {
    let Some(mut s) = scenario("official_openai_and_anthropic_sdks_work_through_the_interceptor") else {
        return;
    };
    let results = s.pod_python_json("sdk_smoke.py").expect("SDK script");
    let reply = "Hello from the simulated provider.";
    assert_eq!(results["openai_chat"], reply, "{results}");
    assert!(
        results["openai_chat_usage"].as_u64().is_some_and(|n| n > 0),
        "{results}"
    );
    assert_eq!(results["openai_stream"], reply, "{results}");
    assert!(
        results["openai_stream_usage"].as_u64().is_some_and(|n| n > 0),
        "{results}"
    );
    assert_eq!(results["anthropic_message"], reply, "{results}");
    assert_eq!(results["anthropic_stream"], reply, "{results}");
    assert!(
        results["anthropic_stream_usage"][1]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{results}"
    );
    assert_eq!(wait_request_lines(&mut s, "/v1/chat/completions", 2).len(), 2);
    let messages = wait_request_lines(&mut s, "/v1/messages", 2);
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(
        messages
            .iter()
            .all(|l| l["status"] == 200 && l["method"] == "POST" && l["host"] == "api.anthropic.com"),
        "{messages:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_ca_fails_cleanly() {
    let Some(mut s) = scenario("a_client_that_does_not_trust_the_ca_fails_cleanly") else {
        return;
    };
    let untrusting = s.pod_curl(MODELS, &[]).expect("curl");
    assert_eq!(
        untrusting.output.status.code(),
        Some(60),
        "certificate verification must fail: {}",
        untrusting.describe()
    );
    let line = s
        .daemon
        .connection_line(untrusting.pid)
        .expect("one line with the attribution");
    assert_eq!(line["mode"], "client_rejected_certificate", "{line}");
    assert_eq!(line["comm"], "curl", "{line}");
    assert_eq!(
        s.daemon
            .metric("interceptor_tls_connections_total{outcome=\"client_rejected_certificate\"}")
            .expect("scrape"),
        1.0
    );
    let trusting = s.pod_curl_trusting(MODELS, &[]).expect("curl");
    assert!(
        trusting.success(),
        "the daemon keeps serving others: {}",
        trusting.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_chunks_arrive_one_by_one_without_buffering() {
    let Some(s) = scenario("sse_chunks_arrive_one_by_one_without_buffering") else {
        return;
    };
    let python = tests::venv_python();
    let script = tests::python_script("sse_timing.py");
    let url = "https://api.openai.com/sse?chunks=200&interval_ms=50";
    let mut command = s.pod.command(
        &python.display().to_string(),
        &[&script.display().to_string(), url],
    );
    command.env("SSL_CERT_FILE", &s.enterprise_ca);
    let output = command.output().expect("python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("json");
    let arrivals: Vec<f64> = result["arrivals"]
        .as_array()
        .expect("arrivals")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(arrivals.len(), 200);
    let mut gaps: Vec<f64> = arrivals.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    let bunched = gaps.iter().filter(|g| **g < 10.0).count();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    assert!(
        (40.0..=60.0).contains(&median),
        "median gap {median:.1} ms, expected about 50"
    );
    assert!(
        bunched <= 5,
        "{bunched} of 199 events arrived bunched (< 10 ms apart): the stream was buffered"
    );
    assert!(
        arrivals[199] >= 9.0,
        "the last event came after {:.2} s",
        arrivals[199]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_works_through_the_interceptor() {
    let Some(mut s) = scenario("websocket_echo_works_through_the_interceptor") else {
        return;
    };
    let tls = tls_to_provider(&s).await;
    let (mut ws, response) = tokio_tungstenite::client_async("wss://api.openai.com/ws", tls)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    for text in ["hello", "realtime"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("message")
            .expect("ok");
        assert_eq!(echo.into_text().expect("text").as_str(), text);
    }
    ws.close(None).await.expect("close");
    let lines = wait_request_lines(&mut s, "/ws", 1);
    assert_eq!(
        lines.first().map(|l| l["status"].clone()),
        Some(Value::from(101)),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_keep_one_upstream_connection_and_hand_it_to_the_next_client() {
    let Some(mut s) = scenario("http1_clients_keep_one_upstream_connection_and_hand_it_to_the_next_client")
    else {
        return;
    };
    // Three requests on one client connection: one upstream connection (the provider sees one peer).
    let first = s
        .pod_curl_trusting(MODELS, &["--http1.1", MODELS, MODELS])
        .expect("curl");
    assert!(first.success(), "{}", first.describe());
    let peers = provider_peers(&first);
    assert_eq!(peers.len(), 3, "{}", first.stdout());
    assert!(
        peers
            .iter()
            .all(|p| p == &peers[0] && p.starts_with("203.0.113.1:")),
        "{peers:?}"
    );
    // The client went; the next client of the same provider gets the parked connection.
    let next = s.pod_curl_trusting(MODELS, &["--http1.1"]).expect("curl");
    assert!(next.success(), "{}", next.describe());
    assert_eq!(provider_peers(&next), vec![peers[0].clone()]);
    // Another server name on the same address does not get it.
    let other = s
        .pod_curl_trusting("https://api.anthropic.com/v1/models", &["--http1.1"])
        .expect("curl");
    assert!(other.success(), "{}", other.describe());
    assert_ne!(provider_peers(&other), vec![peers[0].clone()]);
    let lines = wait_request_lines(&mut s, "/v1/models", 5);
    assert_eq!(lines.len(), 5, "one record per request: {lines:#?}");
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:#?}");
}

/// Also runs the daemon on one worker thread (the single-threaded scheduler), as the benchmark does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_handled_and_the_daemon_keeps_serving() {
    let Some(mut s) = scenario_with(
        "bad_input_is_handled_and_the_daemon_keeps_serving",
        &["--worker-threads", "1"],
    ) else {
        return;
    };
    let target = SocketAddr::new(PROVIDER_V4.into(), 443);

    // Garbage instead of a ClientHello: relayed untouched, counted.
    let mut garbage = TcpStream::connect(target).expect("connect");
    garbage.write_all(b"GARBAGE\r\n\r\n").expect("write");
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = garbage.read(&mut [0u8; 64]);
    drop(garbage);

    // A truncated HTTP request on a terminated connection.
    let mut tls = tls_to_provider(&s).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut tls,
        b"POST /echo-size HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 100\r\n\r\n{\"partial",
    )
    .await
    .expect("write");
    drop(tls);

    // A 10 MB request body.
    let big = s.node.dir.join("big.bin");
    std::fs::write(&big, vec![b'a'; 10 * 1024 * 1024]).expect("write body");
    let upload = s
        .pod_curl_trusting(
            "https://api.openai.com/echo-size",
            &["--data-binary", &format!("@{}", big.display())],
        )
        .expect("curl");
    assert!(upload.success(), "{}", upload.describe());
    assert_eq!(upload.json().expect("json")["received"], 10 * 1024 * 1024);

    // 1,000 idle connections.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(target).expect("idle connection"))
        .collect();
    let during = s.pod_curl_trusting(MODELS, &[]).expect("curl");
    assert!(
        during.success(),
        "served while 1,000 connections idle: {}",
        during.describe()
    );
    drop(idle);

    // An upstream that resets mid-stream.
    let reset = s
        .pod_curl_trusting("https://api.openai.com/reset", &["--http1.1"])
        .expect("curl");
    assert!(
        !reset.success(),
        "the client must see the reset: {}",
        reset.describe()
    );
    let lines = wait_request_lines(&mut s, "/reset", 1);
    assert!(
        lines.first().is_some_and(|l| l["error"].as_str().is_some()),
        "the reset is recorded: {lines:#?}"
    );

    let after = s.pod_curl_trusting(MODELS, &[]).expect("curl");
    assert!(after.success(), "the daemon keeps serving: {}", after.describe());
    assert!(
        s.daemon
            .metric("interceptor_tls_connections_total{outcome=\"passthrough_not_tls\"}")
            .expect("scrape")
            >= 1.0
    );
    let truncated = wait_request_lines(&mut s, "/echo-size", 2);
    assert!(
        truncated.iter().any(|l| l["error"].as_str().is_some()),
        "the truncated request is recorded: {truncated:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassed_processes_are_relayed_untouched() {
    if !tests::privileged_available("bypassed_processes_are_relayed_untouched") {
        return;
    }
    // Pinned clients in the pods' cgroups keep their end-to-end TLS with the provider.
    let policy = format!(
        "{}  bypass:\n    - {{comm: curl, cgroup: \"/ict.slice/kubepods.slice/**\"}}\n",
        policy("open")
    );
    let mut s = Scenario::start(&policy, &[]).expect("simulated node and daemon start");
    let pinned = s.pod_curl(MODELS, &[]).expect("curl");
    assert!(
        pinned.success(),
        "a bypassed client sees the provider's own certificate: {}",
        pinned.describe()
    );
    let line = s.daemon.connection_line(pinned.pid).expect("connection line");
    assert_eq!(line["mode"], "passthrough_bypassed", "{line}");
    // The selector is specific: the same client in the host cgroup is intercepted.
    let resolve = format!("api.openai.com:443:{PROVIDER_V4}");
    let host = s.host_curl(MODELS, &["--resolve", &resolve]).expect("curl");
    assert_eq!(
        host.output.status.code(),
        Some(60),
        "not bypassed, so it gets the minted leaf: {}",
        host.describe()
    );
}
