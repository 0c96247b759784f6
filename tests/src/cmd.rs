//! Running commands with errors that say what was run and what it printed.

use std::process::{Command, Output};

use anyhow::{Context as _, bail};

/// Runs `program args...`; fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = output(program, args)?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `program args...` and returns its output whatever the exit status.
pub fn output(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning `{program} {}`", args.join(" ")))
}

/// A command for `program`, run by `wrapper` when there is one (a command and its arguments that
/// execs the program, such as `setpriv ...` or `taskset ...`).
pub fn wrapped(wrapper: &[String], program: impl AsRef<std::ffi::OsStr>) -> Command {
    match wrapper.split_first() {
        Some((wrapping, args)) => {
            let mut command = Command::new(wrapping);
            command.args(args).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Runs a command and ignores failures (cleanup paths).
pub fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}
