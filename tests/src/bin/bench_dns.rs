//! `cargo xtask bench dns`: what learning targets from DNS answers costs, with the daemon's programs
//! attached to the real kernel.
//!
//! 1. Kernel cost per packet of the `learn_dns` ingress program (`BPF_PROG_TEST_RUN` through
//!    `bpftool prog run`): a watched answer, a watched answer with a CNAME chain, an unwatched answer
//!    and a UDP packet that is not DNS, against the not-DNS packet (the cost every packet pays).
//!    Target: at most 2 µs per watched answer.
//! 2. Race: a client asks a resolver (on loopback) for a watched name answered with a fresh address
//!    and connects the moment the answer arrives. The connect is redirected only if the address was in
//!    the map by then. Reported: answers learned in time, and the answer→connected time against the
//!    same with a static target. Target: in the map within 1 ms of reaching the socket.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tests::dns::{Answer, DnsServer, response};
use tests::scenario::{POLICY_HEADER, Scenario};

const RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// A static target (from the policy) for the baseline of the race.
const STATIC_TARGET: Ipv4Addr = Ipv4Addr::new(127, 77, 1, 1);
const ROUNDS: u8 = 200;
const TEST_RUN_REPEAT: &str = "200000";

fn policy() -> String {
    format!(
        "{POLICY_HEADER}providers:
  - domain: api.openai.com
  - domain: static.openai.azure.com
    adapter: azure-openai
    addresses: [{STATIC_TARGET}]
"
    )
}

/// An Ethernet + IPv4 + UDP frame from port `src_port` carrying `payload` (what BPF_PROG_TEST_RUN
/// takes for skb programs).
fn udp_frame(src_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 53, 127, 0, 0, 1]);
    frame.extend_from_slice(&src_port.to_be_bytes());
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

fn learn_dns_program_id() -> anyhow::Result<u64> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "name", "learn_dns", "--json"])
        .output()
        .context("bpftool prog show")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // One object when one program has the name, an array when several (take the newest).
    let value: serde_json::Value = serde_json::from_str(&text).context("bpftool JSON")?;
    let ids: Vec<u64> = match value {
        serde_json::Value::Array(items) => items.iter().filter_map(|p| p["id"].as_u64()).collect(),
        item => item["id"].as_u64().into_iter().collect(),
    };
    ids.into_iter().max().context("learn_dns is not loaded")
}

/// Median of five `bpftool prog run` averages, in ns per packet.
fn test_run_ns(id: u64, frame: &[u8], dir: &std::path::Path) -> anyhow::Result<f64> {
    let path = dir.join("frame.bin");
    std::fs::write(&path, frame)?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let output = Command::new("bpftool")
            .args(["prog", "run", "id", &id.to_string(), "data_in"])
            .arg(&path)
            .args(["repeat", TEST_RUN_REPEAT])
            .output()
            .context("bpftool prog run")?;
        let text =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        let ns = text
            .split("duration (average): ")
            .nth(1)
            .and_then(|rest| rest.split("ns").next())
            .and_then(|n| n.trim().parse::<f64>().ok())
            .with_context(|| format!("no duration in bpftool output: {text}"))?;
        samples.push(ns);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[2])
}

/// Asks the resolver for `name`, then connects to `addr`:443 as soon as the answer is read.
/// Returns (answer→connected time, whether the connect was redirected to the proxy).
fn resolve_then_connect(client: &UdpSocket, name: &str, addr: Ipv4Addr) -> anyhow::Result<(Duration, bool)> {
    let mut query = response(name, &[], 0)?;
    query[2] = 0x01;
    query[3] = 0x00;
    client.send_to(&query, (RESOLVER, 53))?;
    let mut buffer = [0u8; 1500];
    client
        .recv_from(&mut buffer)
        .context("no answer from the resolver")?;
    let answered = Instant::now();
    // Nothing listens on port 443 of the 127/8 address: a connect that was not redirected is
    // refused at once; a redirected one reaches the proxy.
    let redirected =
        TcpStream::connect_timeout(&SocketAddr::new(addr.into(), 443), Duration::from_secs(1)).is_ok();
    Ok((answered.elapsed(), redirected))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the DNS benchmark attaches eBPF programs: run as root");
    }
    let scenario = Scenario::start(&policy(), &[])?;
    let dns = DnsServer::start_here(RESOLVER.into())?;

    println!("== learn_dns: kernel cost per packet (BPF_PROG_TEST_RUN, median of 5 x {TEST_RUN_REPEAT}) ==");
    let id = learn_dns_program_id()?;
    let watched = response(
        "api.openai.com",
        &[
            (
                "api.openai.com",
                Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 1))),
            ),
            (
                "api.openai.com",
                Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 2))),
            ),
        ],
        60,
    )?;
    let chain = response(
        "api.openai.com",
        &[
            (
                "api.openai.com",
                Answer::Cname("api.openai.com.cdn.cloudflare.net".into()),
            ),
            (
                "api.openai.com.cdn.cloudflare.net",
                Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 3))),
            ),
            (
                "api.openai.com.cdn.cloudflare.net",
                Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 4))),
            ),
            (
                "api.openai.com.cdn.cloudflare.net",
                Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 5))),
            ),
            (
                "api.openai.com.cdn.cloudflare.net",
                Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 6))),
            ),
        ],
        60,
    )?;
    let unwatched = response(
        "www.example.com",
        &[(
            "www.example.com",
            Answer::Address(IpAddr::V4(Ipv4Addr::new(127, 66, 0, 9))),
        )],
        60,
    )?;
    let cases = [
        ("UDP, not DNS (baseline)", udp_frame(40001, &watched)),
        ("DNS answer, unwatched name", udp_frame(53, &unwatched)),
        ("DNS answer, watched, 2 A", udp_frame(53, &watched)),
        ("DNS answer, watched, CNAME + 4 A", udp_frame(53, &chain)),
    ];
    let mut results = Vec::new();
    for (what, frame) in &cases {
        results.push((*what, test_run_ns(id, frame, &scenario.node.dir)?));
    }
    let baseline = results[0].1;
    println!("{:<36} {:>10} {:>10}", "packet", "ns/packet", "ratio");
    for (what, ns) in &results {
        println!("{what:<36} {ns:>10.0} {:>10.2}", ns / baseline);
    }
    let worst_watched = results[2].1.max(results[3].1);
    println!(
        "target: <= 2000 ns per watched answer: {} ({worst_watched:.0} ns)",
        if worst_watched <= 2000.0 { "met" } else { "NOT met" }
    );

    println!("\n== answer -> connect race ({ROUNDS} fresh addresses) ==");
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut learned_times = Vec::new();
    let mut in_time = 0;
    for i in 0..ROUNDS {
        let addr = Ipv4Addr::new(127, 77, 0, i.wrapping_add(1));
        dns.set("api.openai.com", vec![Answer::Address(addr.into())], 30);
        let (elapsed, redirected) = resolve_then_connect(&client, "api.openai.com", addr)?;
        if redirected {
            in_time += 1;
        }
        learned_times.push(elapsed);
    }
    dns.set(
        "static.openai.azure.com",
        vec![Answer::Address(STATIC_TARGET.into())],
        30,
    );
    let mut static_times = Vec::new();
    for _ in 0..ROUNDS {
        let (elapsed, redirected) = resolve_then_connect(&client, "static.openai.azure.com", STATIC_TARGET)?;
        anyhow::ensure!(redirected, "the static target must be redirected");
        static_times.push(elapsed);
    }
    learned_times.sort();
    static_times.sort();
    let (learned_p50, static_p50) = (percentile(&learned_times, 0.5), percentile(&static_times, 0.5));
    println!("answers whose address was a target when the application connected: {in_time}/{ROUNDS}");
    println!(
        "answer -> connected, learned target: p50 {:?} p99 {:?}; static target: p50 {:?} p99 {:?}; ratio p50 {:.2}",
        learned_p50,
        percentile(&learned_times, 0.99),
        static_p50,
        percentile(&static_times, 0.99),
        learned_p50.as_secs_f64() / static_p50.as_secs_f64()
    );
    println!(
        "target: in the map within 1 ms of reaching the socket: {} (inserted before delivery: {in_time}/{ROUNDS} in time)",
        if in_time == u32::from(ROUNDS) {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(dns);
    drop(scenario);
    Ok(())
}
