//! Bad input at start-up gives one clear error line, never a panic (privileged: the daemon must get as
//! far as loading eBPF programs).

use std::process::{Command, Output};
use std::time::Duration;

use tests::daemon::{Daemon, binary};

const HEADER: &str =
    "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\nbuiltinProviders: false\n";

fn write_policy(name: &str, body: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ict-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, format!("{HEADER}{body}")).expect("write policy");
    path
}

fn run_args(policy: &std::path::Path) -> Vec<String> {
    vec![
        "run".into(),
        "--policy".into(),
        policy.display().to_string(),
        "--proxy-port".into(),
        "0".into(),
        "--metrics-addr".into(),
        "off".into(),
        "--bpffs-dir".into(),
        format!("/sys/fs/bpf/ict-startup-{}", std::process::id()),
        "--state-dir".into(),
        policy
            .parent()
            .map(|d| d.join("state"))
            .unwrap_or_default()
            .display()
            .to_string(),
        "--dev-ca-dir".into(),
        policy
            .parent()
            .map(|d| d.join("dev-ca"))
            .unwrap_or_default()
            .display()
            .to_string(),
    ]
}

/// Asserts the command failed with exactly one stderr line containing `expected`, and no panic.
fn assert_one_error_line(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(output.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert_eq!(lines.len(), 1, "exactly one error line expected, got: {lines:#?}");
    assert!(lines[0].starts_with("interceptor: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expected),
        "expected {expected:?} in {:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_domain_in_the_policy_is_one_error_line() {
    let policy = write_policy("unknown.yaml", "providers:\n  - domain: llm.example.com\n");
    let output = Command::new(binary())
        .args(run_args(&policy))
        .output()
        .expect("run");
    assert_one_error_line(
        &output,
        "providers[0].domain: unknown provider domain \"llm.example.com\"",
    );
}

#[test]
fn missing_cgroup_mount_is_one_error_line() {
    if !tests::privileged_available("missing_cgroup_mount_is_one_error_line") {
        return;
    }
    let policy = write_policy("ok.yaml", "providers: []\n");
    let args = run_args(&policy).join(" ");
    // A private mount namespace without any cgroup2 mount.
    let script = format!(
        "for m in $(findmnt -rn -t cgroup2 -o TARGET); do umount -l \"$m\"; done; exec {} {args}",
        binary().display()
    );
    let output = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert_one_error_line(&output, "no cgroup2 filesystem is mounted");
}

#[test]
fn unusable_cgroup_path_is_one_error_line() {
    let policy = write_policy("ok2.yaml", "providers: []\n");
    let mut args = run_args(&policy);
    args.extend(["--cgroup".into(), "/nonexistent/cgroup".into()]);
    let output = Command::new(binary()).args(args).output().expect("run");
    assert_one_error_line(&output, "cgroup path /nonexistent/cgroup is not usable");
}

#[test]
fn missing_privileges_is_one_error_line() {
    if !tests::privileged_available("missing_privileges_is_one_error_line") {
        return;
    }
    let policy = write_policy("ok3.yaml", "providers: []\n");
    let _ = std::fs::set_permissions(
        policy.parent().expect("dir"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    let _ = std::fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    // The CA belongs to the unprivileged user, so the first thing that fails is loading eBPF.
    let ca_dir = policy.parent().expect("dir").join("nobody-ca");
    let init = Command::new(binary())
        .args(["ca", "init", "--out"])
        .arg(&ca_dir)
        .output()
        .expect("ca init");
    assert!(init.status.success(), "{init:?}");
    // So is the state directory.
    let state_dir = policy.parent().expect("dir").join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&ca_dir)
        .arg(&state_dir)
        .status()
        .expect("chown");
    assert!(chown.success());
    let mut args = run_args(&policy);
    let dev_ca = args
        .iter()
        .position(|a| a == "--dev-ca-dir")
        .expect("--dev-ca-dir")
        + 1;
    args[dev_ca] = ca_dir.display().to_string();
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(binary())
        .args(args)
        .output()
        .expect("setpriv");
    assert_one_error_line(&output, "loading the eBPF programs was not permitted");
}

#[test]
fn unresolvable_domain_is_one_error_line_and_the_daemon_keeps_serving() {
    if !tests::privileged_available("unresolvable_domain_is_one_error_line_and_the_daemon_keeps_serving") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ict-unresolvable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = format!(
        "{HEADER}providers:\n  - domain: does-not-exist.invalid\n    adapter: openai-compatible\n\
discovery:\n  retryInterval: 1s\n  minRefresh: 1s\n"
    );
    let mut daemon =
        Daemon::start(&dir, &policy, false, &[]).expect("daemon starts despite the unresolvable domain");
    let line = daemon
        .wait_log(Duration::from_secs(30), |l| {
            l["level"] == "ERROR" && l["domain"] == "does-not-exist.invalid"
        })
        .expect("an error line naming the domain");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot resolve provider domain")),
        "{line}"
    );
    // Retries (every second here) do not repeat the line.
    std::thread::sleep(Duration::from_secs(3));
    let errors = daemon
        .logs()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .count();
    assert_eq!(
        errors,
        1,
        "one error line, not one per retry: {:#?}",
        daemon.logs()
    );
    assert!(
        daemon
            .metric("interceptor_target_resolutions_total{result=\"failure\"}")
            .expect("scrape")
            >= 2.0
    );
    let status = daemon.stop().expect("clean stop");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
