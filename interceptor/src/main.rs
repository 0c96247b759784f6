//! `interceptor`: the daemon and its command-line tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use interceptor::config::Config;
use interceptor::logging::{self, LogFormat};
use interceptor::policy::Policy;

#[derive(Parser)]
#[command(name = "interceptor", version, about = "Transparent AI-traffic interceptor")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "INTERCEPTOR_LOG_FORMAT", default_value = "plain")]
    log_format: LogFormat,
    /// Log filter (RUST_LOG syntax); RUST_LOG overrides it.
    #[arg(long, global = true, env = "INTERCEPTOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach the eBPF programs and serve the proxy.
    Run {
        #[command(flatten)]
        config: Box<Config>,
        /// Tokio worker threads (default: one per CPU).
        #[arg(long, env = "INTERCEPTOR_WORKER_THREADS")]
        worker_threads: Option<usize>,
    },
    /// Policy file tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Enterprise CA tools.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check that this node can run the daemon with these settings (the same flags as `run`): kernel,
    /// cgroup v2, bpffs, procfs, capabilities, eBPF verifier, CA, policy, ports. Exit 1 when a check fails.
    Doctor {
        #[command(flatten)]
        config: Box<Config>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Show the running daemon: programs, targets, top identities by cost and tokens over the last
    /// minute, hour and day, rules, recent rejections (through its admin socket; root only).
    Status {
        #[arg(
            long,
            env = "INTERCEPTOR_ADMIN_SOCKET",
            default_value = "/run/interceptor/admin.sock"
        )]
        socket: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// `status`, refreshed like `top` until Ctrl-C.
    Top {
        #[arg(
            long,
            env = "INTERCEPTOR_ADMIN_SOCKET",
            default_value = "/run/interceptor/admin.sock"
        )]
        socket: PathBuf,
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Remove links pinned in fail-closed mode (detaches the programs a stopped daemon left attached).
    Detach {
        /// bpffs directory of the pinned links.
        #[arg(
            long,
            env = "INTERCEPTOR_BPFFS_DIR",
            default_value = "/sys/fs/bpf/interceptor"
        )]
        bpffs_dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a development CA (ca.crt, ca.key) in DIR, or keep the one already there.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "interceptor development CA")]
        name: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file: exit 0 when valid, 1 with a precise message when not.
    Check { file: PathBuf },
    /// Print the JSON Schema of the policy file (for editors; shipped as deploy/policy.schema.json).
    Schema,
}

/// A single-threaded runtime for the commands that talk to a running daemon.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("interceptor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            worker_threads,
        } => {
            let audit_on = config.audit_log != interceptor::audit::AuditDestination::Off;
            logging::init(cli.log_format, &cli.log_level, audit_on)?;
            // One worker thread: the single-threaded scheduler (no work stealing, no cross-thread
            // wake-ups), with the blocking pool beside it as usual.
            let mut builder = match worker_threads {
                Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
                _ => tokio::runtime::Builder::new_multi_thread(),
            };
            builder.enable_all().thread_name("interceptor");
            if let Some(threads) = worker_threads.filter(|&t| t > 1) {
                builder.worker_threads(threads);
            }
            let runtime = builder.build().context("building the tokio runtime")?;
            runtime.block_on(async move {
                let app = interceptor::app::build(*config).await?;
                app.wait_termination().await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => match Policy::load(&file) {
            Ok(policy) => {
                println!(
                    "{}: valid ({} provider domains intercepted, {} rules)",
                    file.display(),
                    policy.provider_targets().len(),
                    policy.rules.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Policy {
            command: PolicyCommand::Schema,
        } => {
            println!("{}", interceptor::policy::json_schema()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Init { out, name },
        } => {
            let (files, created) = interceptor::tls::ca::init(&out, &name)?;
            let verb = if created { "created" } else { "kept the existing" };
            println!("{verb} CA {} (key {})", files.cert.display(), files.key.display());
            println!(
                "Start the daemon with --ca-cert {} --ca-key {}",
                files.cert.display(),
                files.key.display()
            );
            print!("{}", interceptor::tls::ca::trust_instructions(&files.cert));
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { config, format } => {
            let report = interceptor::doctor::run(&config);
            match format {
                OutputFormat::Table => print!("{}", report.table()),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { socket, format } => {
            let status = client_runtime()?.block_on(interceptor::status::fetch(&socket))?;
            match format {
                OutputFormat::Table => print!("{}", interceptor::status::render(&status)),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Top {
            socket,
            interval,
            iterations,
        } => {
            client_runtime()?.block_on(async move {
                let mut done = 0u64;
                loop {
                    let status = interceptor::status::fetch(&socket).await?;
                    // Clear the screen and go home, then draw.
                    print!("\x1b[2J\x1b[H{}", interceptor::status::render(&status));
                    use std::io::Write as _;
                    let _ = std::io::stdout().flush();
                    done += 1;
                    if iterations.is_some_and(|n| done >= n) {
                        return Ok::<_, anyhow::Error>(());
                    }
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { bpffs_dir } => {
            let removed = interceptor::ebpf::unpin_all(&bpffs_dir)?;
            println!("removed {removed} pinned links from {}", bpffs_dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
