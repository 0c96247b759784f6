//! Benchmark driver (`cargo xtask bench ...`). Every figure is reported against a baseline measured in
//! the same run, with phases interleaved (A B B A) so machine noise hits both alike.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tests::daemon::Daemon;
use tests::node::{Node, PROVIDER_V4};
use tests::pki::{TestCa, server_config};
use tests::provider::Provider;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("connect") => {
            let connections = flag(&args, "--connections").unwrap_or(5000);
            connect(connections)
        }
        Some("proxy") => {
            let seconds = flag(&args, "--seconds").unwrap_or(5);
            let accounting = proxy::AccountingRuns {
                pairs: flag(&args, "--accounting-pairs").unwrap_or(6),
                seconds: flag(&args, "--accounting-seconds").unwrap_or(2),
                delayed_acks: args.iter().any(|a| a == "--provider-delayed-acks"),
            };
            let only = proxy::Only {
                paths: list(&args, "--paths"),
                workloads: list(&args, "--workloads"),
                concurrency: list(&args, "--concurrency")
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect(),
            };
            proxy::run(seconds, &accounting, &only)
        }
        Some("parse") => {
            let megabytes = flag(&args, "--megabytes").unwrap_or(64);
            parse::run(megabytes)
        }
        _ => bail!(
            "usage: interceptor-bench connect [--connections N] | proxy [--seconds N] [--accounting-pairs N] [--accounting-seconds N] [--provider-delayed-acks] | parse [--megabytes N]"
        ),
    }
}

#[path = "bench/parse.rs"]
mod parse;
#[path = "bench/proxy.rs"]
mod proxy;

/// A comma-separated list flag (empty when absent).
fn list(args: &[String], name: &str) -> Vec<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

fn flag(args: &[String], name: &str) -> Option<u32> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// connect() latency with the programs attached vs detached, to a non-target and to a target.
fn connect(connections: u32) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _guard = runtime.enter();
    let mut node = Node::new()?;
    let provider_netns = node.add_provider("bench-provider")?;
    let ca = TestCa::new("Bench CA", &node.dir, "ca.pem")?;
    let tls = server_config(ca.issue(&["api.openai.com"])?)?;
    let target = SocketAddr::new(PROVIDER_V4.into(), 8443);
    let _provider = Provider::start(&provider_netns, tls, &[], &[target])?;
    // A non-target destination: a local listener that accepts and drops.
    let local = tests::provider::listen("127.0.0.1:0".parse()?)?;
    local.set_nonblocking(false)?;
    let non_target = local.local_addr()?;
    std::thread::spawn(move || {
        for stream in local.incoming() {
            drop(stream)
        }
    });

    let policy = format!(
        "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\nbuiltinProviders: false\nproviders:\n  - domain: api.openai.com\n    addresses: [{PROVIDER_V4}]\n    ports: [8443]\n"
    );
    let mut samples = Samples::default();
    for (phase, attached) in [("A", false), ("B", true), ("B", true), ("A", false)] {
        let daemon = if attached {
            Some(Daemon::start(&node.dir, &policy, false, &[])?)
        } else {
            None
        };
        // Non-target first, while the proxy is idle (the programs' own cost), then the target.
        measure(non_target, 200)?;
        samples.push(attached, false, measure(non_target, connections)?);
        std::thread::sleep(Duration::from_millis(200));
        measure(target, 200)?;
        samples.push(attached, true, measure(target, connections)?);
        if let Some(daemon) = &daemon {
            let redirected = daemon.metric("interceptor_redirect_events_total{event=\"redirected\"}")?;
            if redirected < f64::from(connections) {
                bail!("phase {phase}: only {redirected} target connects were redirected");
            }
        }
        drop(daemon);
    }
    println!();
    println!("connect() latency, {connections} connections per destination and phase (phases A B B A)");
    println!(
        "{:<12} {:<10} {:>10} {:>10} {:>10}",
        "destination", "programs", "p50 (µs)", "p99 (µs)", "mean (µs)"
    );
    for (name, is_target) in [("non-target", false), ("target", true)] {
        for (label, attached) in [("detached", false), ("attached", true)] {
            let s = stats(samples.get(attached, is_target));
            println!(
                "{name:<12} {label:<10} {:>10.1} {:>10.1} {:>10.1}",
                s.p50, s.p99, s.mean
            );
        }
    }
    let ratio = |is_target| {
        let detached = stats(samples.get(false, is_target));
        let attached = stats(samples.get(true, is_target));
        (attached.p50 / detached.p50, attached.mean / detached.mean)
    };
    let (nt50, ntmean) = ratio(false);
    let (t50, tmean) = ratio(true);
    println!();
    println!("non-target attached/detached: p50 x{nt50:.3}, mean x{ntmean:.3} (target: <= x1.02)");
    println!("target attached/detached (redirect to the proxy vs direct): p50 x{t50:.3}, mean x{tmean:.3}");
    Ok(())
}

fn measure(addr: SocketAddr, count: u32) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        out.push(started.elapsed());
        // RST on close: no TIME_WAIT pile-up across phases.
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
    }
    Ok(out)
}

#[derive(Default)]
struct Samples {
    by_key: [Vec<Duration>; 4],
}

impl Samples {
    fn push(&mut self, attached: bool, target: bool, values: Vec<Duration>) {
        self.by_key[usize::from(attached) * 2 + usize::from(target)].extend(values);
    }
    fn get(&self, attached: bool, target: bool) -> &[Duration] {
        &self.by_key[usize::from(attached) * 2 + usize::from(target)]
    }
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

fn stats(values: &[Duration]) -> Stats {
    let mut micros: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| {
        micros
            .get(((micros.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let mean = if micros.is_empty() {
        0.0
    } else {
        micros.iter().sum::<f64>() / micros.len() as f64
    };
    Stats {
        p50: at(0.5),
        p99: at(0.99),
        mean,
    }
}
