//! `cargo xtask`: setup, build, run, test and bench for the interceptor workspace.

mod bench;
mod fuzz;
mod setup;
mod sh;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the build and the tests need (idempotent): nightly rust-src, bpf-linker
    /// built against nightly's LLVM, Debian packages, the Python venv with the client SDKs.
    Setup {
        /// Only the Rust toolchain pieces (enough to build and run the daemon).
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the daemon (embeds the eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the interceptor with the built-in default policy and metrics on 127.0.0.1:9464.
    Run {
        /// Extra arguments for `interceptor run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite: formatting, lints, unit tests and the privileged end-to-end tests.
    Test,
    /// A simulated node with two pods in two namespaces calling simulated providers through the
    /// interceptor with the official SDKs; shows the audit lines, metrics and `interceptor status`.
    Demo,
    /// Run the cargo-fuzz targets of the protocol parsers (nightly), each for a fixed time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Benchmarks (ratios against a baseline measured in the same run).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match cli.command {
        Command::Setup { toolchain_only } => setup::run(
            &root,
            if toolchain_only {
                setup::Scope::Toolchain
            } else {
                setup::Scope::All
            },
        ),
        Command::Build { release } => {
            setup::run(&root, setup::Scope::Toolchain)?;
            build(release)
        }
        Command::Run { args } => run(&root, &args),
        Command::Test => test(&root),
        Command::Demo => {
            setup::run(&root, setup::Scope::All)?;
            demo(&root)
        }
        Command::Fuzz { seconds, targets } => {
            setup::run(&root, setup::Scope::All)?;
            let targets = if targets.is_empty() {
                fuzz::TARGETS.iter().map(|t| (*t).to_owned()).collect()
            } else {
                targets
            };
            let mut totals = sh::TestTotals::default();
            let result = fuzz::run(&root, &targets, seconds, &mut totals);
            println!("\n{} passed, {} failed", totals.passed, totals.failed);
            result
        }
        Command::Bench { which } => {
            setup::run(&root, setup::Scope::All)?;
            bench::run(&root, which)
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--package", "interceptor", "--bins"];
    if release {
        args.push("--release");
    }
    sh::cargo(&args)
}

fn run(root: &std::path::Path, extra: &[String]) -> anyhow::Result<()> {
    setup::run(root, setup::Scope::Toolchain)?;
    build(true)?;
    sh::require_root("running the interceptor (it loads eBPF programs)")?;
    let binary = root.join("target/release/interceptor");
    let dev_ca = root.join(".state/dev-ca");
    println!("\nStarting the interceptor (built-in default policy). Metrics: http://127.0.0.1:9464/metrics");
    println!(
        "Development CA: {}/ca.crt (generated on first run; clients must trust it)",
        dev_ca.display()
    );
    println!("Stop it with Ctrl-C.\n");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--metrics-addr".into(),
        "127.0.0.1:9464".into(),
        "--dev-ca-dir".into(),
        dev_ca.display().to_string(),
        "--state-dir".into(),
        root.join(".state").display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    let status = std::process::Command::new(&binary)
        .args(&args)
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    anyhow::ensure!(status.success(), "interceptor exited with {status}");
    Ok(())
}

/// Builds and runs the demo (root: it loads eBPF programs and creates network namespaces).
fn demo(root: &std::path::Path) -> anyhow::Result<()> {
    sh::require_root("the demo (it loads eBPF programs and creates network namespaces)")?;
    sh::cargo(&[
        "build",
        "--package",
        "interceptor",
        "--package",
        "tests",
        "--bin",
        "interceptor",
        "--bin",
        "interceptor-demo",
    ])?;
    let status = std::process::Command::new(root.join("target/debug/interceptor-demo"))
        .env("INTERCEPTOR_BIN", root.join("target/debug/interceptor"))
        .status()
        .context("running interceptor-demo")?;
    anyhow::ensure!(status.success(), "the demo failed ({status})");
    Ok(())
}

fn test(root: &std::path::Path) -> anyhow::Result<()> {
    setup::run(root, setup::Scope::All)?;
    sh::cargo(&["fmt", "--all", "--", "--check"]).context("formatting (run `cargo fmt --all`)")?;
    sh::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    build(false)?;
    // The image's build step (Dockerfile): the deploy tests check its artifact.
    build(true)?;
    let binary = root.join("target/debug/interceptor");
    let release_binary = root.join("target/release/interceptor");
    let mut totals = sh::TestTotals::default();
    // Unit and in-process tests.
    let unit = sh::cargo_test(
        &[
            "test",
            "--no-fail-fast",
            "--package",
            "interceptor",
            "--package",
            "interceptor-protocols",
            "--package",
            "xtask",
        ],
        &[],
        &mut totals,
    );
    // Integration and privileged end-to-end tests share kernel state: one at a time.
    let e2e = sh::cargo_test(
        // Every test binary runs even when one fails, so the totals tell the whole story.
        &[
            "test",
            "--no-fail-fast",
            "--package",
            "tests",
            "--",
            "--test-threads=1",
        ],
        &[
            ("INTERCEPTOR_BIN", binary.to_string_lossy().as_ref()),
            (
                "INTERCEPTOR_RELEASE_BIN",
                release_binary.to_string_lossy().as_ref(),
            ),
        ],
        &mut totals,
    );
    // The README's demo must keep working.
    println!("\n+ cargo xtask demo");
    let demo_result = demo(root);
    match &demo_result {
        Ok(()) => totals.passed += 1,
        Err(e) => {
            eprintln!("demo: {e:#}");
            totals.failed += 1;
        }
    }
    // Every network-facing parser runs under the fuzzer for a minute.
    let all: Vec<String> = fuzz::TARGETS.iter().map(|t| (*t).to_owned()).collect();
    let fuzzing = fuzz::run(root, &all, 60, &mut totals);
    println!(
        "\n{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    unit.and(e2e).and(demo_result).and(fuzzing)
}
