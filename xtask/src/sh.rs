//! Running commands with clear errors.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs `cargo args...` with the toolchain that runs xtask.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

/// Runs `cargo args...` with extra environment variables.
pub fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    status(&mut command)
}

/// Test counts summed over `cargo test` runs.
#[derive(Default)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds the counts of a libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    fn add_summary(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test ...`, echoing its output and adding its summary lines to `totals`.
pub fn cargo_test(args: &[&str], env: &[(&str, &str)], totals: &mut TestTotals) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).stdout(std::process::Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let description = format!("{command:?}");
    println!("+ {}", description.replace('"', ""));
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {description}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add_summary(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{description} failed: {status}");
    }
    Ok(())
}

/// Runs a command, failing with its exit status.
pub fn status(command: &mut Command) -> anyhow::Result<()> {
    let description = format!("{command:?}");
    println!("+ {}", description.replace('"', ""));
    let status = command
        .status()
        .with_context(|| format!("spawning {description}"))?;
    if !status.success() {
        bail!("{description} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; `None` when it cannot run or fails.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails unless running as root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    let uid = output("id", &["-u"]).unwrap_or_default();
    if uid.trim() != "0" {
        bail!("{what} needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON); run it with sudo");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn sums_libtest_summary_lines() {
        let mut totals = TestTotals::default();
        totals.add_summary(
            "test result: ok. 14 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        );
        totals.add_summary("test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        totals.add_summary("running 7 tests");
        assert_eq!((totals.passed, totals.failed, totals.ignored), (20, 1, 2));
    }
}
