//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `interceptor-protocols` with nightly and runs
//! each for a fixed time, two at a time, seeded with the conformance corpus. A crash fails the run
//! and names the reproducer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

use crate::sh::TestTotals;

/// Every fuzz target (`interceptor-protocols/fuzz/fuzz_targets/*.rs`).
pub const TARGETS: &[&str] = &[
    "sse",
    "eventstream",
    "json_array",
    "top_level",
    "strip_usage",
    "request_body",
    "usage_openai",
    "usage_anthropic",
    "usage_gemini",
    "usage_bedrock",
    "dns_response",
    "client_hello",
];

/// Targets run side by side (one per core of the reference machine).
const PARALLEL: usize = 2;

fn crate_dir(root: &Path) -> PathBuf {
    root.join("interceptor-protocols")
}

fn fuzz_command(root: &Path) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(crate_dir(root))
        // The outer cargo's toolchain must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    command
}

/// A corpus directory seeded with the conformance fixtures, or with the target's own seeds under
/// `fuzz/seeds/<target>` (kept between runs: it grows).
fn seed_corpus(root: &Path, target: &str) -> anyhow::Result<PathBuf> {
    let corpus = root.join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    // Targets that read packets (DNS answers, ClientHellos) have seeds of their own, used verbatim.
    let own_seeds = crate_dir(root).join("fuzz/seeds").join(target);
    if own_seeds.is_dir() {
        for file in
            std::fs::read_dir(&own_seeds).with_context(|| format!("reading {}", own_seeds.display()))?
        {
            let file = file?.path();
            if let Some(name) = file.file_name() {
                std::fs::copy(&file, corpus.join(name))
                    .with_context(|| format!("copying {}", file.display()))?;
            }
        }
        return Ok(corpus);
    }
    let fixtures = crate_dir(root).join("tests/fixtures");
    for provider in std::fs::read_dir(&fixtures).with_context(|| format!("reading {}", fixtures.display()))? {
        let provider = provider?.path();
        if !provider.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&provider)? {
            let file = file?.path();
            let Some(name) = file.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name.ends_with(".py") {
                continue;
            }
            let body = std::fs::read(&file)?;
            // Targets read a selector byte (and a split byte) first.
            let mut seed = vec![0u8, 7];
            seed.extend_from_slice(&body);
            std::fs::write(corpus.join(format!("seed-{name}")), seed)?;
        }
    }
    Ok(corpus)
}

/// Builds all targets, then runs `targets` for `seconds` each. Each target counts as a test.
pub fn run(root: &Path, targets: &[String], seconds: u64, totals: &mut TestTotals) -> anyhow::Result<()> {
    println!("+ cargo +nightly fuzz build (interceptor-protocols)");
    crate::sh::status(fuzz_command(root).arg("build"))?;
    for name in targets {
        anyhow::ensure!(
            TARGETS.contains(&name.as_str()),
            "unknown fuzz target {name:?} (targets: {TARGETS:?})"
        );
    }
    let mut failures = Vec::new();
    for batch in targets.chunks(PARALLEL) {
        let mut running: Vec<(String, PathBuf, Child)> = Vec::new();
        for target in batch {
            let corpus = seed_corpus(root, target)?;
            let log = root.join("target/fuzz-corpus").join(format!("{target}.log"));
            let log_file =
                std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            println!("fuzz {target}: {seconds} s");
            let child = fuzz_command(root)
                .args(["run", target])
                .arg(&corpus)
                .args([
                    "--",
                    &format!("-max_total_time={seconds}"),
                    "-rss_limit_mb=2048",
                    "-print_final_stats=1",
                ])
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .with_context(|| format!("starting fuzz target {target}"))?;
            running.push((target.clone(), log, child));
        }
        for (target, log, mut child) in running {
            let status = child.wait()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let runs = text
                .lines()
                .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
                .map(str::trim)
                .unwrap_or("?");
            if status.success() {
                println!("fuzz {target}: ok, {runs} inputs, no crash");
                totals.passed += 1;
            } else {
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                println!("fuzz {target}: FAILED ({status}); log {}", log.display());
                for line in tail.into_iter().rev() {
                    println!("  {line}");
                }
                totals.failed += 1;
                failures.push(target);
            }
        }
    }
    if !failures.is_empty() {
        bail!("fuzz targets crashed: {failures:?} (reproducers in interceptor-protocols/fuzz/artifacts/)");
    }
    Ok(())
}
