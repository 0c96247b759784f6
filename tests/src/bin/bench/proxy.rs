//! `bench proxy`: wrk in a pod against a simulated provider, for a non-streaming and a streaming chat
//! completion at concurrency 1, 16 and 64, through four paths measured in the same run and
//! interleaved (A B D C C D B A): direct (interception off), intercepted (one worker thread),
//! intercepted with accounting off (its CPU is the baseline of accounting's cost), and a reference
//! TLS hop (Debian's nginx, one worker, TLS to the provider with upstream keep-alive). Accounting's
//! cost is then measured within one daemon: short runs on the chat completions path alternate with
//! runs on a path the daemon forwards unread, and the figure is the median of the adjacent pairs'
//! CPU differences. The measured proxy runs on a CPU of its own, wrk and the provider on the others
//! (on all of them in the direct phases). Each path gets an unmeasured second of each workload
//! first, and the measured runs start once the work it left behind is done, so the figures are
//! steady-state ones.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tests::daemon::Daemon;
use tests::node::{NODE_V4, Node, PROVIDER_V4, PROVIDER_V6};
use tests::pki::{TestCa, server_config};
use tests::provider::{Provider, UNACCOUNTED_CHAT_PATH};
use tests::scenario::policy;

const NGINX_PORT: u16 = 8444;
const CONCURRENCY: [u32; 3] = [1, 16, 64];
/// Seconds of unmeasured load before each path's runs of a workload.
const WARM_UP_SECONDS: u32 = 1;
/// (name, request body, a new connection per request).
const WORKLOADS: [(&str, &str, bool); 3] = [
    (
        "chat",
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#,
        false,
    ),
    (
        "chat-stream",
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#,
        false,
    ),
    (
        "chat-newconn",
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#,
        true,
    ),
];

/// Run only when named (`--workloads`): a stream whose client asks for usage itself, so the
/// daemon neither injects the option nor strips the usage chunk, and the provider sends that chunk
/// on every path. Against `chat-stream`, it separates the cost of the injection (an extra chunk
/// from the provider, the stripper) from the rest of accounting.
const EXTRA_WORKLOADS: [(&str, &str, bool); 1] = [(
    "chat-stream-usage",
    r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello"}]}"#,
    false,
)];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Path3 {
    Direct,
    Intercepted,
    /// Intercepted with `accounting.enabled: false`.
    NoAccounting,
    Nginx,
}

#[derive(Default, Clone)]
struct Sample {
    requests_per_s: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    cpu_us_per_request: Vec<f64>,
}

/// A subset of the runs (all when empty), e.g. to profile one path under one load.
#[derive(Default)]
pub struct Only {
    pub paths: Vec<String>,
    pub workloads: Vec<String>,
    pub concurrency: Vec<u32>,
}

impl Only {
    fn path(&self, path: Path3) -> bool {
        self.paths.is_empty()
            || self
                .paths
                .iter()
                .any(|p| *p == format!("{path:?}").to_lowercase())
    }

    fn workload(&self, name: &str) -> bool {
        let named = self.workloads.iter().any(|w| w == name);
        named || self.workloads.is_empty() && WORKLOADS.iter().any(|(w, _, _)| *w == name)
    }

    fn concurrency(&self, concurrency: u32) -> bool {
        self.concurrency.is_empty() || self.concurrency.contains(&concurrency)
    }

    fn is_all(&self) -> bool {
        self.paths.is_empty() && self.workloads.is_empty() && self.concurrency.is_empty()
    }
}

/// How accounting's cost is measured: pairs of runs of this many seconds each.
pub struct AccountingRuns {
    pub pairs: u32,
    pub seconds: u32,
    /// Keep the kernel's delayed ACKs on the host's route to the provider during the pairs (by
    /// default the route gets `quickack`; see [`accounting_runs`]).
    pub delayed_acks: bool,
}

pub fn run(seconds: u32, accounting: &AccountingRuns, only: &Only) -> anyhow::Result<()> {
    let cpus = Cpus::split()?;
    let pinned = cpus.as_ref().map(Cpus::proxy_wrapper).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = runtime.enter();
    let mut node = Node::new()?;
    let hosts = [
        ("api.openai.com", PROVIDER_V4.into()),
        ("nginx.local", NODE_V4.into()),
    ];
    let pod = node.add_pod("bench-pod", &hosts)?;
    let provider_netns = node.add_provider("bench-provider")?;
    let ca = TestCa::new("Bench Public CA", &node.dir, "public-ca.pem")?;
    let tls = server_config(ca.issue(&["api.openai.com", "nginx.local"])?)?;
    let _provider = Provider::start(
        &provider_netns,
        tls,
        &[
            SocketAddr::new(PROVIDER_V4.into(), 443),
            SocketAddr::new(PROVIDER_V6.into(), 443),
        ],
        &[],
    )?;
    let nginx_cert = ca.issue(&["nginx.local"])?;
    let mut nginx = Nginx::start(&node.dir, &nginx_cert, &ca.pem_path, &pinned)?;

    let enterprise = node.dir.join("enterprise-ca");
    let status = Command::new(tests::daemon::binary())
        .args(["ca", "init", "--out"])
        .arg(&enterprise)
        .output()?;
    anyhow::ensure!(status.status.success(), "ca init: {status:?}");
    let daemon_args = [
        "--worker-threads".to_owned(),
        "1".to_owned(),
        "--ca-cert".to_owned(),
        enterprise.join("ca.crt").display().to_string(),
        "--ca-key".to_owned(),
        enterprise.join("ca.key").display().to_string(),
        "--upstream-ca-bundle".to_owned(),
        ca.pem_path.display().to_string(),
        // To a file, as a node would keep it: on stdout, every line would be parsed by this
        // process's log reader, on the cores the measured paths share.
        "--audit-log".to_owned(),
        node.dir.join("audit.log").display().to_string(),
        "--audit-max-bytes".to_owned(),
        (64u64 << 20).to_string(),
        "--audit-keep".to_owned(),
        "1".to_owned(),
    ];
    let daemon_args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();

    let mut results: BTreeMap<(&str, u32, Path3), Sample> = BTreeMap::new();
    let mut idle_rss_kb = 0;
    let mut loaded_rss_kb = 0;
    for path in MAIN_PHASES {
        if !only.path(path) {
            continue;
        }
        if let Some(cpus) = &cpus {
            cpus.place_load_generators(path == Path3::Direct)?;
        }
        let daemon = match path {
            Path3::Intercepted | Path3::NoAccounting => {
                let mut policy = policy("open");
                if path == Path3::NoAccounting {
                    policy.push_str("accounting:\n  enabled: false\n");
                }
                let daemon = Daemon::start_wrapped(&node.dir, &policy, true, &daemon_args, &pinned)?;
                std::thread::sleep(Duration::from_millis(300));
                idle_rss_kb = idle_rss_kb.max(rss_kb(daemon.pid)?);
                Some(daemon)
            }
            _ => None,
        };
        let cpu_pid = match path {
            Path3::Direct => None,
            Path3::Intercepted | Path3::NoAccounting => daemon.as_ref().map(|d| d.pid),
            Path3::Nginx => Some(nginx.worker_pid()?),
        };
        for (name, body, close) in WORKLOADS.into_iter().chain(EXTRA_WORKLOADS) {
            if !only.workload(name) {
                continue;
            }
            let script = node.dir.join(format!("{name}.lua"));
            std::fs::write(&script, wrk_script(body, close))?;
            let url = match path {
                Path3::Nginx => format!("https://nginx.local:{NGINX_PORT}/v1/chat/completions"),
                _ => "https://api.openai.com/v1/chat/completions".to_owned(),
            };
            // Warm-up, not measured: one-off work (a leaf certificate minted, upstream connections
            // made, a tokenizer's tables loaded for the first stream wrk cuts short) stays out of
            // the steady-state figures.
            wrk(&pod, &script, &url, 16, WARM_UP_SECONDS)?;
            if let Some(pid) = cpu_pid {
                settle(pid)?;
            }
            for concurrency in CONCURRENCY {
                if !only.concurrency(concurrency) {
                    continue;
                }
                let (result, cpu_us_per_request) = match cpu_pid {
                    Some(pid) => {
                        let (result, cpu) = wrk_with_cpu(pid, &pod, &script, &url, concurrency, seconds)?;
                        (result, Some(cpu))
                    }
                    None => (wrk(&pod, &script, &url, concurrency, seconds)?, None),
                };
                let sample = results.entry((name, concurrency, path)).or_default();
                sample.requests_per_s.push(result.requests_per_s);
                sample.p50_ms.push(result.p50_ms);
                sample.p99_ms.push(result.p99_ms);
                sample.cpu_us_per_request.extend(cpu_us_per_request);
            }
        }
        if let Some(daemon) = &daemon {
            loaded_rss_kb = loaded_rss_kb.max(rss_kb(daemon.pid)?);
        }
        drop(daemon);
    }
    nginx.stop();
    let accounting_pairs = if only.path(Path3::Intercepted) && only.path(Path3::NoAccounting) {
        if let Some(cpus) = &cpus {
            cpus.place_load_generators(false)?;
        }
        let _quickack = (!accounting.delayed_acks)
            .then(|| ProviderQuickAck::set(&node))
            .transpose()?;
        let daemon = Daemon::start_wrapped(&node.dir, &policy("open"), true, &daemon_args, &pinned)?;
        accounting_runs(&pod, &node.dir, daemon.pid, accounting, only)?
    } else {
        BTreeMap::new()
    };
    if !only.is_all() {
        println!("\nbench proxy (subset): {seconds}s per run");
        for (name, concurrency, path) in results.keys() {
            let (rps, p50, p99, cpu) = mean_of(&results, name, *concurrency, *path);
            println!(
                "{name:<12} {concurrency:>4} {:<12} {rps:>10.0} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms  cpu {cpu:.0} µs/req",
                format!("{path:?}").to_lowercase()
            );
        }
        for ((name, concurrency), pairs) in &accounting_pairs {
            if let Some(cost) = accounting_cost(pairs) {
                println!("{name:<12} {concurrency:>4} {cost}");
            }
        }
        return Ok(());
    }

    println!();
    println!(
        "bench proxy: wrk in a pod, {seconds}s per run, phases A B D C C D B A (A direct, B intercepted, D intercepted without accounting, C nginx); accounting's cost from {} pairs of {}s runs in one daemon",
        accounting.pairs, accounting.seconds,
    );
    println!(
        "{:<12} {:>4} {:<12} {:>10} {:>9} {:>9} {:>11} {:>11} {:>12}",
        "workload", "conc", "path", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "cpu µs/req"
    );
    for (name, _, _) in WORKLOADS {
        for concurrency in CONCURRENCY {
            let direct = mean_of(&results, name, concurrency, Path3::Direct);
            for path in [
                Path3::Direct,
                Path3::Intercepted,
                Path3::NoAccounting,
                Path3::Nginx,
            ] {
                let s = mean_of(&results, name, concurrency, path);
                println!(
                    "{name:<12} {concurrency:>4} {:<12} {:>10.0} {:>9.2} {:>9.2} {:>11.2} {:>11.2} {:>12}",
                    format!("{path:?}").to_lowercase(),
                    s.0,
                    s.1,
                    s.2,
                    s.1 - direct.1,
                    s.2 - direct.2,
                    if s.3 > 0.0 {
                        format!("{:.0}", s.3)
                    } else {
                        "-".into()
                    }
                );
            }
            let intercepted = mean_of(&results, name, concurrency, Path3::Intercepted);
            let nginx = mean_of(&results, name, concurrency, Path3::Nginx);
            if let Some(cost) = accounting_pairs
                .get(&(name, concurrency))
                .and_then(|pairs| accounting_cost(pairs))
            {
                println!("{:<12} {:>4} {cost}", "", "");
            }
            println!(
                "{:<12} {:>4} ratios: intercepted/nginx throughput x{:.2}, added p50 intercepted {:.2} ms vs nginx {:.2} ms, added p99 {:.2} vs {:.2} ms",
                "",
                "",
                intercepted.0 / nginx.0.max(f64::MIN_POSITIVE),
                intercepted.1 - direct.1,
                nginx.1 - direct.1,
                intercepted.2 - direct.2,
                nginx.2 - direct.2,
            );
        }
    }
    // A new TLS connection to a cached SNI: the client's handshake with the proxy (leaf cached) while
    // the upstream connection comes from the pool. wrk's latency excludes connect and handshake, so
    // time per request is taken from throughput (Little's law: concurrency / requests per second).
    for concurrency in CONCURRENCY {
        let per_request_ms = |name, path| {
            f64::from(concurrency) * 1000.0
                / mean_of(&results, name, concurrency, path)
                    .0
                    .max(f64::MIN_POSITIVE)
        };
        let direct_handshake =
            per_request_ms("chat-newconn", Path3::Direct) - per_request_ms("chat", Path3::Direct);
        let extra = per_request_ms("chat-newconn", Path3::Intercepted)
            - per_request_ms("chat-newconn", Path3::Direct);
        println!(
            "new connection to a cached SNI, c={concurrency}: {extra:.3} ms more than a direct new connection = {:.2} direct handshakes ({direct_handshake:.3} ms each; target <= 1)",
            extra / direct_handshake.max(f64::MIN_POSITIVE),
        );
    }
    println!(
        "interceptor RSS: idle {:.1} MB, after load {:.1} MB (target idle <= 30 MB)",
        idle_rss_kb as f64 / 1024.0,
        loaded_rss_kb as f64 / 1024.0
    );
    Ok(())
}

/// Where the bench's processes run: the measured proxy (daemon or nginx, every thread) on a CPU of its
/// own, the last one this process may use; this process, and so the provider it serves and the wrk
/// it starts, on the others, except in the direct phases, which have no proxy and get every CPU. On
/// a small machine the scheduler otherwise moves wrk, the provider and the proxy onto one CPU and
/// apart again from run to run, which changes the proxy's CPU time per request by tens of percent.
struct Cpus {
    all: nix::sched::CpuSet,
    load: nix::sched::CpuSet,
    proxy: usize,
}

impl Cpus {
    /// `None` (nothing pinned) with one CPU.
    fn split() -> anyhow::Result<Option<Self>> {
        use nix::sched::{CpuSet, sched_getaffinity};
        let all =
            sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("reading this process's CPU set")?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&cpu| all.is_set(cpu).unwrap_or(false))
            .collect();
        let Some((&proxy, others)) = cpus.split_last().filter(|(_, others)| !others.is_empty()) else {
            return Ok(None);
        };
        let mut load = CpuSet::new();
        for &cpu in others {
            load.set(cpu).context("building the load generators' CPU set")?;
        }
        Ok(Some(Self { all, load, proxy }))
    }

    /// The command prefix that runs a proxy on its CPU.
    fn proxy_wrapper(&self) -> Vec<String> {
        vec!["taskset".into(), "--cpu-list".into(), self.proxy.to_string()]
    }

    /// Moves every thread of this process (the provider's among them) to the load generators' CPUs,
    /// or to all of them for a phase without a proxy; wrk, started later, inherits the main thread's.
    fn place_load_generators(&self, whole_machine: bool) -> anyhow::Result<()> {
        let set = if whole_machine { &self.all } else { &self.load };
        for task in std::fs::read_dir("/proc/self/task").context("listing this process's threads")? {
            let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), set) {
                // A thread that ended meanwhile.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e).with_context(|| format!("setting the CPUs of thread {tid}")),
            }
        }
        Ok(())
    }
}

/// The interleaved phases: direct, intercepted, no accounting and nginx.
const MAIN_PHASES: [Path3; 8] = [
    Path3::Direct,
    Path3::Intercepted,
    Path3::NoAccounting,
    Path3::Nginx,
    Path3::Nginx,
    Path3::NoAccounting,
    Path3::Intercepted,
    Path3::Direct,
];

/// The daemon's CPU per request with accounting and without: one pair of adjacent runs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct AccountingPair {
    accounted_us: f64,
    unaccounted_us: f64,
}

/// `quickack` on the host's route to the provider while it lives (the accounting pairs).
///
/// The daemon's connections to the provider receive each stream event as a small segment and
/// acknowledge every second one. The kernel sends that ACK either as the segment arrives (in the
/// provider's transmit path, which over a veth is the provider process's CPU time) or from the
/// daemon's next read (the daemon's CPU time, including the provider side's processing of the ACK),
/// depending on the receive MSS it has learnt from the segment sizes. The accounted stream's tail
/// (with the injected usage chunk) most likely teaches it a larger one: the same number of ACKs
/// then leave from the daemon's reads on one path and not on the other (about 3 per stream; in one
/// experiment at c = 16 the pairs' median went from +23% to +5% with `quickack`). With `quickack`,
/// every ACK leaves as its segment arrives, on both paths alike.
struct ProviderQuickAck<'a> {
    node: &'a Node,
}

impl<'a> ProviderQuickAck<'a> {
    fn set(node: &'a Node) -> anyhow::Result<Self> {
        node.set_provider_quickack(true)?;
        Ok(Self { node })
    }
}

impl Drop for ProviderQuickAck<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.node.set_provider_quickack(false) {
            eprintln!("restoring the provider route's delayed ACKs: {e:#}");
        }
    }
}

/// Accounting's cost within one daemon (accounting on), per workload and concurrency: runs on the
/// chat completions path alternate with runs on a path the daemon forwards unread
/// ([`UNACCOUNTED_CHAT_PATH`]: same request, same response, no body read, no usage, no price),
/// seconds apart, in the order of [`pair_orders`]. Unlike the daemon phases (about a minute apart,
/// each a process of its own), a pair shares the process and the minute. The provider route has
/// `quickack` meanwhile unless `--provider-delayed-acks` (see [`ProviderQuickAck`]).
fn accounting_runs(
    pod: &tests::node::Pod,
    dir: &Path,
    pid: u32,
    runs: &AccountingRuns,
    only: &Only,
) -> anyhow::Result<BTreeMap<(&'static str, u32), Vec<AccountingPair>>> {
    let accounted = "https://api.openai.com/v1/chat/completions".to_owned();
    let unaccounted = format!("https://api.openai.com{UNACCOUNTED_CHAT_PATH}");
    let mut measured = BTreeMap::new();
    for (name, body, close) in WORKLOADS.into_iter().chain(EXTRA_WORKLOADS) {
        if !only.workload(name) {
            continue;
        }
        let script = dir.join(format!("{name}.lua"));
        std::fs::write(&script, wrk_script(body, close))?;
        for url in [&accounted, &unaccounted] {
            wrk(pod, &script, url, 16, WARM_UP_SECONDS)?;
        }
        settle(pid)?;
        for concurrency in CONCURRENCY {
            if !only.concurrency(concurrency) {
                continue;
            }
            let run = |url: &str| -> anyhow::Result<f64> {
                let (_, cpu) = wrk_with_cpu(pid, pod, &script, url, concurrency, runs.seconds)?;
                // What the run left behind (connections closed, streams wrk cut estimated) stays
                // out of the next one.
                settle(pid)?;
                Ok(cpu)
            };
            let mut pairs = Vec::new();
            for accounted_first in pair_orders(runs.pairs) {
                pairs.push(if accounted_first {
                    let accounted_us = run(&accounted)?;
                    AccountingPair {
                        accounted_us,
                        unaccounted_us: run(&unaccounted)?,
                    }
                } else {
                    let unaccounted_us = run(&unaccounted)?;
                    AccountingPair {
                        accounted_us: run(&accounted)?,
                        unaccounted_us,
                    }
                });
            }
            measured.insert((name, concurrency), pairs);
        }
    }
    Ok(measured)
}

/// Whether each pair runs with accounting first: alternated (A B, B A, A B, ...), so a drift over
/// the runs weighs on both sides alike.
fn pair_orders(pairs: u32) -> impl Iterator<Item = bool> {
    (0..pairs).map(|pair| pair.is_multiple_of(2))
}

/// Accounting's CPU cost per request, as the median of the pairs' differences. A run disturbed by
/// something outside the daemon moves one pair, not the median.
fn accounting_cost(pairs: &[AccountingPair]) -> Option<String> {
    let measured: Vec<&AccountingPair> = pairs.iter().filter(|pair| pair.unaccounted_us > 0.0).collect();
    let mut differences: Vec<f64> = measured
        .iter()
        .map(|pair| (pair.accounted_us / pair.unaccounted_us - 1.0) * 100.0)
        .collect();
    if differences.is_empty() {
        return None;
    }
    differences.sort_by(f64::total_cmp);
    let middle = differences.len() / 2;
    let median = if differences.len().is_multiple_of(2) {
        (differences[middle - 1] + differences[middle]) / 2.0
    } else {
        differences[middle]
    };
    let mean = |side: fn(&AccountingPair) -> f64| {
        measured.iter().map(|pair| side(pair)).sum::<f64>() / measured.len() as f64
    };
    let each: Vec<String> = differences.iter().map(|p| format!("{p:+.1}")).collect();
    Some(format!(
        "accounting CPU: {median:+.1}% per request, median of {} pairs in one daemon ({}%; means {:.1} / {:.1} µs) (target <= +5%)",
        differences.len(),
        each.join(", "),
        mean(|p| p.accounted_us),
        mean(|p| p.unaccounted_us),
    ))
}

fn mean_of(
    results: &BTreeMap<(&str, u32, Path3), Sample>,
    name: &str,
    concurrency: u32,
    path: Path3,
) -> (f64, f64, f64, f64) {
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    match results.get(&(name, concurrency, path)) {
        Some(s) => (
            mean(&s.requests_per_s),
            mean(&s.p50_ms),
            mean(&s.p99_ms),
            mean(&s.cpu_us_per_request),
        ),
        None => (0.0, 0.0, 0.0, 0.0),
    }
}

fn wrk_script(body: &str, close: bool) -> String {
    let close = if close {
        "wrk.headers[\"Connection\"] = \"close\"\n"
    } else {
        ""
    };
    format!(
        "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer sk-test\"\nwrk.headers[\"Host\"] = \"api.openai.com\"\n{close}"
    )
}

struct WrkResult {
    requests: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn wrk(
    pod: &tests::node::Pod,
    script: &Path,
    url: &str,
    concurrency: u32,
    seconds: u32,
) -> anyhow::Result<WrkResult> {
    let args = [
        "-t1".to_owned(),
        format!("-c{concurrency}"),
        format!("-d{seconds}s"),
        "--latency".to_owned(),
        "-s".to_owned(),
        script.display().to_string(),
        url.to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = pod.command("wrk", &args).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success()
        || text.contains("Non-2xx")
        || text.contains("Socket errors") && !text.contains("connect 0, read 0, write 0, timeout 0")
    {
        bail!(
            "wrk against {url} (c={concurrency}) failed or saw errors:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no request count in wrk output")?;
    let requests_per_s = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec in wrk output")?;
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim).map(str::to_owned))
            .and_then(|v| parse_duration_ms(&v))
            .with_context(|| format!("no {p} latency in wrk output"))
    };
    Ok(WrkResult {
        requests,
        requests_per_s,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
    })
}

/// A wrk run, and the CPU time `pid` used per request during it.
fn wrk_with_cpu(
    pid: u32,
    pod: &tests::node::Pod,
    script: &Path,
    url: &str,
    concurrency: u32,
    seconds: u32,
) -> anyhow::Result<(WrkResult, f64)> {
    let before = CpuSnapshot::take(pid)?;
    let result = wrk(pod, script, url, concurrency, seconds)?;
    let cpu_us = CpuSnapshot::take(pid)?.us_since(&before);
    let per_request = cpu_us as f64 / result.requests.max(1) as f64;
    Ok((result, per_request))
}

/// wrk prints durations as `512.00us`, `1.23ms`, `2.00s`.
fn parse_duration_ms(value: &str) -> Option<f64> {
    let (number, factor) = if let Some(v) = value.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('m') {
        (v, 60_000.0)
    } else {
        (value.strip_suffix('s')?, 1000.0)
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// Waits (at most 20 s) until `pid` is idle: work the warm-up left behind (estimates of the streams
/// wrk cut, run off the I/O thread) is done before the measured runs.
fn settle(pid: u32) -> anyhow::Result<()> {
    const PERIOD: Duration = Duration::from_millis(500);
    let mut before = CpuSnapshot::take(pid)?;
    for _ in 0..40 {
        std::thread::sleep(PERIOD);
        let now = CpuSnapshot::take(pid)?;
        // At most 10 ms in half a second: idle but for timers.
        if now.us_since(&before) <= 10_000 {
            return Ok(());
        }
        before = now;
    }
    bail!("process {pid} still busy 20 s after the warm-up")
}

/// The CPU time of each thread of a process, from the scheduler's nanosecond counts
/// (`/proc/PID/task/*/schedstat`): `/proc/PID/stat` counts clock ticks of 10 ms, too coarse for a
/// run of a few seconds of streams at concurrency 1.
struct CpuSnapshot(BTreeMap<u32, u64>);

impl CpuSnapshot {
    fn take(pid: u32) -> anyhow::Result<Self> {
        let tasks = format!("/proc/{pid}/task");
        let mut threads = BTreeMap::new();
        for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
            let task = task?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = task.path().join("schedstat");
            let stat = match std::fs::read_to_string(&path) {
                Ok(stat) => stat,
                // A thread that ended meanwhile.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let run_ns = stat
                .split_whitespace()
                .next()
                .and_then(|run| run.parse().ok())
                .with_context(|| format!("{}: no run time in {stat:?}", path.display()))?;
            threads.insert(tid, run_ns);
        }
        Ok(Self(threads))
    }

    /// The CPU time, in µs, the process's threads used since `earlier`: threads started meanwhile
    /// count whole; a thread that ended meanwhile loses what it ran since `earlier` (the runtime's
    /// blocking threads end after seconds of idleness, so that is nothing in practice), never more.
    fn us_since(&self, earlier: &Self) -> u64 {
        let nanoseconds: u64 = self
            .0
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum();
        nanoseconds / 1000
    }
}

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Debian's nginx as a reference TLS hop: one worker, TLS to the provider with keep-alive.
struct Nginx {
    child: Child,
    dir: std::path::PathBuf,
}

impl Nginx {
    /// Starts nginx, run by `wrapper` (a command that execs it, or none).
    fn start(
        dir: &Path,
        cert: &tests::pki::ServerCert,
        public_ca: &Path,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        std::fs::write(dir.join("cert.pem"), &cert.cert_pem)?;
        std::fs::write(dir.join("key.pem"), &cert.key_pem)?;
        let conf = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {dir}/tmp/body;\n proxy_temp_path {dir}/tmp/proxy;\n\
             fastcgi_temp_path {dir}/tmp/fastcgi;\n uwsgi_temp_path {dir}/tmp/uwsgi;\n scgi_temp_path {dir}/tmp/scgi;\n\
             upstream provider {{ server {PROVIDER_V4}:443; keepalive 64; }}\n\
             server {{\n  listen {NODE_V4}:{NGINX_PORT} ssl;\n  ssl_certificate {dir}/cert.pem;\n  ssl_certificate_key {dir}/key.pem;\n\
             location / {{\n   proxy_pass https://provider;\n   proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n\
             proxy_set_header Host api.openai.com;\n   proxy_ssl_server_name on;\n   proxy_ssl_name api.openai.com;\n\
             proxy_ssl_verify on;\n   proxy_ssl_trusted_certificate {ca};\n   proxy_ssl_session_reuse on;\n   proxy_buffering off;\n  }}\n }}\n}}\n",
            dir = dir.display(),
            ca = public_ca.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = tests::cmd::wrapped(wrapper, "nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Self { child, dir };
        for _ in 0..100 {
            // A listener of another nginx (a crashed run's) must not pass for this one.
            if let Some(status) = nginx.child.try_wait()? {
                bail!("nginx exited at start ({status}); is {NODE_V4}:{NGINX_PORT} taken?");
            }
            if std::net::TcpStream::connect((NODE_V4, NGINX_PORT)).is_ok() {
                return Ok(nginx);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nginx did not start listening on {NODE_V4}:{NGINX_PORT}")
    }

    fn worker_pid(&self) -> anyhow::Result<u32> {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))?;
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .context("no nginx worker")
    }

    /// Stops the master and its worker (a killed master leaves its worker running).
    fn stop(&mut self) {
        let worker = self.worker_pid().ok();
        let master = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..40 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(worker) = worker {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(worker as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod phase_tests {
    use super::*;

    #[test]
    fn cpu_time_counts_new_threads_whole_and_never_goes_back() {
        let snapshot = |threads: &[(u32, u64)]| CpuSnapshot(threads.iter().copied().collect());
        let earlier = snapshot(&[(1, 5_000_000), (2, 7_000_000), (3, 1_000_000)]);
        // Thread 3 ended, thread 4 started, thread 1 ran 2 ms more, thread 2 did not run.
        let later = snapshot(&[(1, 7_000_000), (2, 7_000_000), (4, 500_000)]);
        assert_eq!(later.us_since(&earlier), 2_500);
        assert_eq!(
            earlier.us_since(&later),
            1_000,
            "counts going back add nothing; a thread only in the later snapshot counts whole"
        );
        // A thread that ran 20 ms and now sleeps (a running thread's count lags until it is
        // switched out; the bench samples the daemon idle).
        let (ran, done) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(20) {
                std::hint::black_box(start.elapsed());
            }
            ran.send(nix::unistd::gettid().as_raw()).expect("main waits");
            let _ = wait.recv();
        });
        let tid = u32::try_from(done.recv().expect("worker ran")).expect("tid");
        std::thread::sleep(Duration::from_millis(20));
        let own = CpuSnapshot::take(std::process::id()).expect("own threads");
        drop(release);
        worker.join().expect("worker");
        assert!(own.0.get(&tid).is_some_and(|ns| *ns >= 15_000_000), "{:?}", own.0);
    }

    #[test]
    fn accounting_pairs_alternate_their_order() {
        assert_eq!(pair_orders(0).count(), 0);
        assert_eq!(
            pair_orders(5).collect::<Vec<_>>(),
            [true, false, true, false, true]
        );
    }

    #[test]
    fn the_unaccounted_path_is_forwarded_unread() {
        use interceptor_protocols::{Adapter, Dialect, EndpointKind, classify};
        let route = classify(Adapter::Openai, "POST", UNACCOUNTED_CHAT_PATH, "");
        assert_eq!(
            (route.kind, route.dialect),
            (EndpointKind::Other, Dialect::Opaque)
        );
        let chat = classify(Adapter::Openai, "POST", "/v1/chat/completions", "");
        assert_eq!(chat.dialect, Dialect::OpenaiChat);
    }

    #[test]
    fn accounting_cost_is_the_median_of_the_pairs() {
        let pair = |accounted_us, unaccounted_us| AccountingPair {
            accounted_us,
            unaccounted_us,
        };
        // Pairs +10%, +50% (a disturbed run), +0%, skipped (no baseline), -10%.
        let pairs = [
            pair(110.0, 100.0),
            pair(150.0, 100.0),
            pair(100.0, 100.0),
            pair(90.0, 0.0),
            pair(90.0, 100.0),
        ];
        let cost = accounting_cost(&pairs).expect("pairs");
        assert!(
            cost.starts_with(
                "accounting CPU: +5.0% per request, median of 4 pairs in one daemon (-10.0, +0.0, +10.0, +50.0%; means 112.5 / 100.0 µs)"
            ),
            "{cost}"
        );
        let cost =
            accounting_cost(&[pair(103.0, 100.0), pair(120.0, 100.0), pair(101.0, 100.0)]).expect("pairs");
        assert!(
            cost.starts_with("accounting CPU: +3.0% per request, median of 3"),
            "{cost}"
        );
        assert_eq!(accounting_cost(&[]), None);
        assert_eq!(accounting_cost(&[pair(100.0, 0.0)]), None, "no baseline");
    }
}
