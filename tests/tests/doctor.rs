//! `interceptor doctor` on this machine: with the DaemonSet's own arguments and capabilities every check
//! passes; simulated failures (no cgroup2 mount at the given path, an unreadable or world-readable CA
//! key, a missing capability) fail their check with a fix, and the other checks still run.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use tests::manifests::{Rendered, setpriv_with};

/// A directory with what the DaemonSet mounts: the policy ConfigMap, the CA Secret and, for its
/// `/sys/fs/bpf` hostPath, a BPF filesystem of its own (a node has one there; this machine may not,
/// and the test must not depend on what other tests left mounted).
struct Mounts {
    dir: PathBuf,
    bpffs: PathBuf,
}

impl Mounts {
    fn new(test: &str) -> Self {
        remove_stale_bpffs_mounts();
        let dir = std::env::temp_dir().join(format!("ict-doctor-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policy")).expect("policy dir");
        let rendered = Rendered::render("base").expect("base renders");
        std::fs::write(dir.join("policy/policy.yaml"), rendered.policy().expect("policy")).expect("policy");
        let init = std::process::Command::new(tests::daemon::binary())
            .args(["ca", "init", "--out"])
            .arg(dir.join("dev-ca"))
            .output()
            .expect("ca init");
        assert!(init.status.success(), "{init:?}");
        // As a kubernetes.io/tls Secret mounts them.
        std::fs::create_dir_all(dir.join("ca")).expect("ca dir");
        std::fs::copy(dir.join("dev-ca/ca.crt"), dir.join("ca/tls.crt")).expect("copy cert");
        std::fs::copy(dir.join("dev-ca/ca.key"), dir.join("ca/tls.key")).expect("copy key");
        std::fs::set_permissions(dir.join("ca/tls.key"), std::fs::Permissions::from_mode(0o400))
            .expect("chmod");
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).expect("bpffs dir");
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t bpf bpf {}: {e}", bpffs.display()));
        Self { dir, bpffs }
    }

    /// The DaemonSet's arguments (after `run`) with its mount paths mapped to this machine and the
    /// metrics port left to the kernel.
    fn daemonset_args(&self) -> Vec<String> {
        Rendered::render("base")
            .expect("base renders")
            .daemon_args_on_this_node(&[
                ("/etc/interceptor", self.dir.display().to_string()),
                (
                    "/var/lib/interceptor",
                    self.dir.join("state").display().to_string(),
                ),
                ("/sys/fs/bpf", self.bpffs.display().to_string()),
                ("$(NODE_IP):9464", "127.0.0.1:0".to_owned()),
                ("$(NODE_IP)", "127.0.0.1".to_owned()),
            ])
            .expect("args")
            .into_iter()
            .filter(|a| !a.starts_with("--log-format"))
            .collect()
    }
}

/// Unmounts the BPF filesystems a crashed run of these tests left in its directories.
fn remove_stale_bpffs_mounts() {
    let own = std::process::id().to_string();
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = std::env::temp_dir().join("ict-doctor-");
    for mount_point in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)) {
        let path = PathBuf::from(mount_point);
        let stale = mount_point.starts_with(&*prefix.to_string_lossy())
            && path.ends_with("bpffs")
            && !mount_point.contains(&format!("-{own}/"));
        if stale {
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `interceptor doctor` (through `wrapper` when not empty) and returns the output and the report.
fn doctor(wrapper: &[String], args: &[String], format: &str) -> Output {
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = std::process::Command::new(program);
            command.args(rest).arg(tests::daemon::binary());
            command
        }
        None => std::process::Command::new(tests::daemon::binary()),
    };
    command
        .args(["doctor", "--format", format])
        .args(args)
        .env_remove("INTERCEPTOR_POLICY")
        .output()
        .expect("running interceptor doctor")
}

fn report(output: &Output) -> Vec<Value> {
    let report: Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("doctor JSON ({e}): {output:?}"));
    report["checks"].as_array().cloned().expect("checks")
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

const ALL_CHECKS: [&str; 11] = [
    "kernel",
    "kernel config",
    "btf",
    "cgroup2",
    "bpffs",
    "procfs",
    "capabilities",
    "ebpf",
    "ca",
    "policy",
    "ports",
];

#[test]
fn doctor_passes_with_the_daemonset_settings_and_capabilities() {
    if !tests::privileged_available("doctor_passes_with_the_daemonset_settings_and_capabilities") {
        return;
    }
    let mounts = Mounts::new("pass");
    let capabilities = Rendered::render("base")
        .expect("base")
        .capabilities()
        .expect("caps");
    let args = mounts.daemonset_args();
    let output = doctor(&setpriv_with(&capabilities), &args, "json");
    let checks = report(&output);
    assert!(output.status.success(), "{checks:#?}");
    for name in ALL_CHECKS {
        let found = check(&checks, name);
        assert_eq!(found["status"], "pass", "{found}");
    }
    assert!(
        check(&checks, "ebpf")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("verified 7 programs"))
    );
    assert!(
        check(&checks, "ca")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expires in"))
    );

    // The table operators read.
    let table = doctor(&setpriv_with(&capabilities), &args, "table");
    let text = String::from_utf8_lossy(&table.stdout);
    println!("{text}");
    assert!(table.status.success(), "{text}");
    assert!(text.starts_with("CHECK"), "{text}");
    assert!(text.contains("checks: ") && text.contains(" 0 failed"), "{text}");
    assert!(!text.contains("How to fix"), "{text}");
}

#[test]
fn doctor_reports_simulated_failures_with_fixes() {
    if !tests::privileged_available("doctor_reports_simulated_failures_with_fixes") {
        return;
    }
    let mounts = Mounts::new("fail");
    let args: Vec<String> = mounts
        .daemonset_args()
        .into_iter()
        .map(|a| {
            if a.starts_with("--cgroup-root=") {
                "--cgroup-root=/nonexistent/cgroup2".to_owned()
            } else {
                a
            }
        })
        .collect();
    // A CA key that others can read.
    let key = mounts.dir.join("ca/tls.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = doctor(&[], &args, "json");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let checks = report(&output);
    let cgroup = check(&checks, "cgroup2");
    assert_eq!(cgroup["status"], "fail", "{cgroup}");
    assert!(
        cgroup["detail"]
            .as_str()
            .is_some_and(|d| d.contains("/nonexistent/cgroup2")),
        "{cgroup}"
    );
    assert!(
        cgroup["fix"]
            .as_str()
            .is_some_and(|f| f.contains("--cgroup-root")),
        "{cgroup}"
    );
    let ca = check(&checks, "ca");
    assert_eq!(ca["status"], "fail", "{ca}");
    assert!(
        ca["detail"]
            .as_str()
            .is_some_and(|d| d.contains("readable by other users")),
        "{ca}"
    );
    assert!(
        ca["fix"].as_str().is_some_and(|f| f.contains("defaultMode 0400")),
        "{ca}"
    );
    // The other checks still ran and passed.
    for name in ["kernel", "procfs", "capabilities", "ebpf", "policy", "ports"] {
        assert_eq!(check(&checks, name)["status"], "pass", "{name}: {checks:?}");
    }

    // An unreadable CA (the Secret is not mounted) and a missing capability.
    std::fs::remove_file(&key).expect("remove key");
    let capabilities: Vec<String> = Rendered::render("base")
        .expect("base")
        .capabilities()
        .expect("caps")
        .into_iter()
        .filter(|c| c != "CAP_NET_ADMIN")
        .collect();
    let output = doctor(&setpriv_with(&capabilities), &mounts.daemonset_args(), "table");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout);
    println!("{table}");
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row: {table}"))
            .to_owned()
    };
    assert!(
        row("ca").contains("FAIL") && row("ca").contains("tls.key"),
        "{table}"
    );
    assert!(
        row("capabilities").contains("FAIL") && row("capabilities").contains("CAP_NET_ADMIN"),
        "{table}"
    );
    assert!(row("ebpf").contains("FAIL"), "{table}");
    assert!(row("cgroup2").contains("PASS"), "{table}");
    assert!(table.contains("How to fix:"), "{table}");
    assert!(
        table.contains("capabilities (FAIL): run as root with CAP_NET_ADMIN"),
        "{table}"
    );
}

#[test]
fn doctor_rejects_a_broken_policy_without_hiding_other_checks() {
    let dir = std::env::temp_dir().join(format!("ict-doctor-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = dir.join("broken.yaml");
    std::fs::write(
        &policy,
        "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\nrules: 7\n",
    )
    .expect("write");
    let args = vec![
        "--policy".to_owned(),
        policy.display().to_string(),
        "--dev-ca-dir".to_owned(),
        dir.join("dev-ca").display().to_string(),
        "--metrics-addr".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--proxy-port".to_owned(),
        "0".to_owned(),
    ];
    let output = doctor(&[], &args, "json");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let checks = report(&output);
    let found = check(&checks, "policy");
    assert_eq!(found["status"], "fail", "{found}");
    assert!(
        found["detail"]
            .as_str()
            .is_some_and(|d| d.contains("broken.yaml")),
        "{found}"
    );
    assert_eq!(check(&checks, "kernel")["status"], "pass");
    assert_eq!(
        check(&checks, "ca")["status"],
        "pass",
        "a development CA is created on first run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
