//! `cargo xtask bench ...`: builds release binaries and runs the benchmark driver
//! (`tests/src/bin/bench.rs`), which prints ratios against a baseline measured in the same run.

use std::path::Path;
use std::process::Command;

use crate::sh;

#[derive(Clone, clap::Subcommand)]
pub enum Which {
    /// connect() latency to a non-target and a target address, programs attached vs detached.
    Connect {
        /// Connections per phase and destination.
        #[arg(long, default_value_t = 5000)]
        connections: u32,
    },
    /// wrk in a pod: direct vs intercepted vs an nginx TLS hop, chat and streaming chat, c = 1, 16, 64.
    Proxy {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Pairs of runs in one daemon, on the chat completions path and on a path it forwards
        /// unread, alternated; the median of their CPU differences is accounting's cost.
        #[arg(long, default_value_t = 6)]
        accounting_pairs: u32,
        /// Seconds per run of those pairs.
        #[arg(long, default_value_t = 2)]
        accounting_seconds: u32,
        /// Run those pairs with the kernel's delayed ACKs on the route to the provider (by default
        /// it gets `quickack`, so the ACKs of both paths leave alike; see the README).
        #[arg(long)]
        provider_delayed_acks: bool,
        /// Only these paths (direct, intercepted, noaccounting, nginx), e.g. to profile one of them;
        /// the accounting pairs run when intercepted and noaccounting are both among them.
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// Only these workloads (chat, chat-stream, chat-newconn; chat-stream-usage runs only when named).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Only these concurrencies (1, 16, 64).
        #[arg(long, value_delimiter = ',')]
        concurrency: Vec<u32>,
    },
    /// Usage-extraction throughput per provider stream and added latency per event, against a
    /// memchr line scan of the same bytes (no privileges needed).
    Parse {
        /// Megabytes of stream per provider.
        #[arg(long, default_value_t = 64)]
        megabytes: u32,
    },
    /// Identity resolution per new connection (details cache hit and miss, pod lookup among 10,000
    /// pods) against a loopback connect+accept, and the memory of 10,000 pods against full API
    /// objects (no privileges needed).
    Attribution,
    /// Quota decision cost with 1, 100 and 1,000 rules and 10,000 identities, and the reload time of a
    /// 1,000-rule file (no privileges needed).
    Policy,
    /// Kernel cost per DNS answer of the learning program (watched, unwatched, not DNS) and whether a
    /// watched answer's address is a target before the application can connect to it.
    Dns,
}

pub fn run(root: &Path, which: Which) -> anyhow::Result<()> {
    sh::cargo(&[
        "build",
        "--release",
        "--package",
        "interceptor",
        "--package",
        "tests",
        "--bins",
    ])?;
    if matches!(which, Which::Connect { .. } | Which::Proxy { .. } | Which::Dns) {
        sh::require_root("the benchmarks (they attach eBPF programs and create network namespaces)")?;
    }
    let binary = root.join("target/release/interceptor");
    let driver = match which {
        Which::Attribution => "target/release/interceptor-bench-attribution",
        Which::Policy => "target/release/interceptor-bench-policy",
        Which::Dns => "target/release/interceptor-bench-dns",
        _ => "target/release/interceptor-bench",
    };
    let mut command = Command::new(root.join(driver));
    command.env("INTERCEPTOR_BIN", &binary);
    // Only the daemon's ready line: per-request logging is not what is measured.
    command.env("INTERCEPTOR_TEST_LOG", "warn,interceptor::app=info");
    match which {
        Which::Connect { connections } => {
            command.args(["connect", "--connections", &connections.to_string()])
        }
        Which::Proxy {
            seconds,
            accounting_pairs,
            accounting_seconds,
            provider_delayed_acks,
            paths,
            workloads,
            concurrency,
        } => {
            command.args([
                "proxy",
                "--seconds",
                &seconds.to_string(),
                "--accounting-pairs",
                &accounting_pairs.to_string(),
                "--accounting-seconds",
                &accounting_seconds.to_string(),
            ]);
            if provider_delayed_acks {
                command.arg("--provider-delayed-acks");
            }
            if !paths.is_empty() {
                command.args(["--paths", &paths.join(",")]);
            }
            if !workloads.is_empty() {
                command.args(["--workloads", &workloads.join(",")]);
            }
            if !concurrency.is_empty() {
                let list: Vec<String> = concurrency.iter().map(u32::to_string).collect();
                command.args(["--concurrency", &list.join(",")]);
            }
            &mut command
        }
        Which::Parse { megabytes } => command.args(["parse", "--megabytes", &megabytes.to_string()]),
        Which::Attribution | Which::Policy | Which::Dns => &mut command,
    };
    sh::status(&mut command)
}
