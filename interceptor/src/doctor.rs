//! `interceptor doctor`: checks that this node can run the daemon with the given settings, and says how
//! to fix what it cannot.
//!
//! Each check is independent (one failure does not hide the others) and never changes the node: the eBPF
//! programs are loaded into the kernel's verifier and dropped, never attached; ports are bound and
//! released at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::policy::{FailureMode, Policy};

/// Oldest kernel with everything the programs and the daemon use: cgroup bpf_link (5.7),
/// `bpf_get_netns_cookie` in sock_addr programs (5.7) and `SO_NETNS_COOKIE` (5.14).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// Kernel options the daemon needs (`y` required); `CONFIG_DEBUG_INFO_BTF` only helps diagnostics.
const KERNEL_OPTIONS: [&str; 5] = [
    "CONFIG_BPF",
    "CONFIG_BPF_SYSCALL",
    "CONFIG_CGROUPS",
    "CONFIG_CGROUP_BPF",
    "CONFIG_BPF_JIT",
];

/// The capabilities the daemon uses, and why; the DaemonSet grants exactly these.
pub const CAPABILITIES: [(&str, u32, &str); 4] = [
    ("CAP_BPF", 39, "create the maps and load the programs"),
    (
        "CAP_PERFMON",
        38,
        "let the verifier accept the programs' pointer arithmetic on the stack (refused to \
         unprivileged loaders as a Spectre v1 mitigation)",
    ),
    (
        "CAP_NET_ADMIN",
        12,
        "load and attach sock_ops and cgroup sock_addr programs (network program types)",
    ),
    (
        "CAP_SYS_PTRACE",
        19,
        "read /proc/<pid>/exe of processes of other users (the attributed process's executable)",
    ),
];

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Days before the CA's expiry when the check turns into a warning.
const CA_WARN_DAYS: i64 = 30;

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// How to fix a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::with_fix(Status::Warn, name, detail.into(), fix.into())
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::with_fix(Status::Fail, name, detail.into(), fix.into())
    }
    fn with_fix(status: Status, name: &'static str, detail: String, fix: String) -> Self {
        Self {
            name,
            status,
            detail,
            fix: Some(fix),
        }
    }
}

/// Every check's outcome.
#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no check failed (warnings allowed).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// A table with one row per check, then the fixes.
    pub fn table(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(5).max(5);
        let mut out = format!("{:<width$}  RESULT  DETAIL\n", "CHECK");
        for check in &self.checks {
            out.push_str(&format!(
                "{:<width$}  {:<6}  {}\n",
                check.name,
                check.status.label(),
                check.detail
            ));
        }
        let fixes: Vec<&Check> = self.checks.iter().filter(|c| c.fix.is_some()).collect();
        if !fixes.is_empty() {
            out.push_str("\nHow to fix:\n");
            for check in fixes {
                if let Some(fix) = &check.fix {
                    out.push_str(&format!("  {} ({}): {fix}\n", check.name, check.status.label()));
                }
            }
        }
        let failed = self.checks.iter().filter(|c| c.status == Status::Fail).count();
        let warned = self.checks.iter().filter(|c| c.status == Status::Warn).count();
        out.push_str(&format!(
            "\n{} checks: {} passed, {warned} warnings, {failed} failed\n",
            self.checks.len(),
            self.checks.len() - failed - warned
        ));
        out
    }
}

/// Runs every check for the daemon settings `config`.
pub fn run(config: &Config) -> Report {
    let policy = load_policy(config);
    let failure_mode = policy.as_ref().ok().map(|p| p.interception.failure_mode);
    let mut checks = vec![kernel_version(), kernel_options(), btf()];
    checks.push(cgroup2(config));
    checks.push(bpffs(&config.bpffs_dir, failure_mode));
    checks.push(procfs(&config.proc_root));
    let capabilities = capabilities();
    let capable = capabilities.status == Status::Pass;
    checks.push(capabilities);
    checks.push(ebpf_programs(capable));
    checks.push(ca(config));
    checks.push(match policy {
        Ok(policy) => Check::pass(
            "policy",
            format!(
                "{}: valid ({} provider domains, {} rules, failure mode {})",
                policy_name(config),
                policy.provider_targets().len(),
                policy.rules.len(),
                match policy.interception.failure_mode {
                    FailureMode::Open => "open",
                    FailureMode::Closed => "closed",
                }
            ),
        ),
        Err(e) => Check::fail(
            "policy",
            e,
            "fix the file (`interceptor policy check FILE` shows the same message)",
        ),
    });
    checks.push(ports(config));
    Report { checks }
}

fn policy_name(config: &Config) -> String {
    config
        .policy
        .as_ref()
        .map_or_else(|| "built-in policy".to_owned(), |p| p.display().to_string())
}

fn load_policy(config: &Config) -> Result<Policy, String> {
    match &config.policy {
        Some(path) => Policy::load(path).map_err(|e| e.to_string()),
        None => Policy::builtin().map_err(|e| e.to_string()),
    }
}

/// `(major, minor)` of a kernel release such as `6.18.44-fc-v595`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel_version() -> Check {
    let release = match nix::sys::utsname::uname() {
        Ok(uts) => uts.release().to_string_lossy().into_owned(),
        Err(e) => return Check::fail("kernel", format!("uname: {e}"), "run on Linux"),
    };
    match parse_kernel_release(&release) {
        Some(version) if version >= MIN_KERNEL => Check::pass("kernel", format!("Linux {release}")),
        Some(_) => Check::fail(
            "kernel",
            format!("Linux {release} is older than {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
            format!(
                "run nodes with Linux ≥ {}.{} (SO_NETNS_COOKIE, cgroup bpf_link)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => Check::warn(
            "kernel",
            format!("cannot read the version in {release:?}"),
            format!("make sure the kernel is ≥ {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
        ),
    }
}

/// The kernel's build configuration: /proc/config.gz, else /boot/config-<release>.
fn kernel_config() -> Result<(String, String), String> {
    use std::io::Read as _;
    let gz = Path::new("/proc/config.gz");
    if let Ok(file) = std::fs::File::open(gz) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", gz.display()))?;
        return Ok((gz.display().to_string(), text));
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|e| e.to_string())?;
    let boot = PathBuf::from(format!("/boot/config-{release}"));
    std::fs::read_to_string(&boot)
        .map(|text| (boot.display().to_string(), text))
        .map_err(|e| format!("neither /proc/config.gz nor {}: {e}", boot.display()))
}

fn kernel_options() -> Check {
    let (source, text) = match kernel_config() {
        Ok(found) => found,
        Err(e) => {
            return Check::warn(
                "kernel config",
                format!("not readable ({e}); the eBPF check below still proves what matters"),
                "mount /boot or enable CONFIG_IKCONFIG_PROC to let this check read the options",
            );
        }
    };
    let missing: Vec<&str> = KERNEL_OPTIONS
        .iter()
        .copied()
        .filter(|option| !text.lines().any(|l| l == format!("{option}=y")))
        .collect();
    if missing.is_empty() {
        Check::pass(
            "kernel config",
            format!("{} set in {source}", KERNEL_OPTIONS.join(", ")),
        )
    } else {
        Check::fail(
            "kernel config",
            format!("{} not set in {source}", missing.join(", ")),
            "use a kernel built with these options (every major distribution's is)",
        )
    }
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        Check::pass("btf", format!("{} present", path.display()))
    } else {
        Check::warn(
            "btf",
            format!("{} missing", path.display()),
            "not needed by the programs; a kernel with CONFIG_DEBUG_INFO_BTF=y helps bpftool diagnostics",
        )
    }
}

fn fs_magic(path: &Path) -> Result<i64, nix::Error> {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0)
}

/// `Err(detail)` unless `path` is on a filesystem of type `magic` (`what` names it).
fn expect_fs(path: &Path, magic: i64, what: &str) -> Result<(), String> {
    match fs_magic(path) {
        Ok(found) if found == magic => Ok(()),
        Ok(_) => Err(format!("{} is not a {what}", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn cgroup2(config: &Config) -> Check {
    let root = match &config.cgroup_root {
        Some(root) => root.clone(),
        None => match crate::cgroup::discover_cgroup2_mount() {
            Ok(root) => root,
            Err(e) => {
                return Check::fail(
                    "cgroup2",
                    e.to_string(),
                    "mount cgroup v2 (systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none DIR) and \
                     pass --cgroup-root DIR",
                );
            }
        },
    };
    if let Err(detail) = expect_fs(&root, CGROUP2_SUPER_MAGIC, "cgroup2 filesystem") {
        return Check::fail(
            "cgroup2",
            detail,
            "pass --cgroup-root with the cgroup2 mount (in a container: the host's /sys/fs/cgroup, \
             mounted with hostPath)",
        );
    }
    let attach = config.cgroup.clone().unwrap_or_else(|| root.clone());
    match crate::cgroup::check_cgroup_dir(&attach) {
        Ok(()) => Check::pass(
            "cgroup2",
            format!(
                "hierarchy at {}, programs attach to {}",
                root.display(),
                attach.display()
            ),
        ),
        Err(e) => Check::fail("cgroup2", e.to_string(), "pass --cgroup with a cgroup2 directory"),
    }
}

fn bpffs(pin_dir: &Path, failure_mode: Option<FailureMode>) -> Check {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    let needed = failure_mode == Some(FailureMode::Closed);
    match fs_magic(parent) {
        Ok(BPF_FS_MAGIC) => Check::pass("bpffs", format!("{} is a BPF filesystem", parent.display())),
        found => {
            let detail = match found {
                Ok(_) => format!("{} is not a BPF filesystem", parent.display()),
                Err(e) => format!("{}: {e}", parent.display()),
            };
            let fix = "mount -t bpf bpf /sys/fs/bpf (in a container: hostPath /sys/fs/bpf)";
            if needed {
                Check::fail(
                    "bpffs",
                    format!("{detail}; fail-closed mode pins links there"),
                    fix,
                )
            } else {
                Check::warn("bpffs", format!("{detail}; only fail-closed mode needs it"), fix)
            }
        }
    }
}

fn procfs(proc_root: &Path) -> Check {
    match expect_fs(proc_root, PROC_SUPER_MAGIC, "procfs") {
        Ok(()) => Check::pass("procfs", format!("{} is a procfs", proc_root.display())),
        Err(detail) => Check::fail(
            "procfs",
            detail,
            "pass --proc-root with the host's /proc (in a container: hostPath /proc)",
        ),
    }
}

/// The effective capability mask of this process (`CapEff` in /proc/self/status).
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

fn capabilities() -> Check {
    let Some(effective) = effective_capabilities() else {
        return Check::fail(
            "capabilities",
            "cannot read CapEff in /proc/self/status",
            "run on Linux",
        );
    };
    let missing: Vec<&str> = CAPABILITIES
        .iter()
        .filter(|(_, bit, _)| effective & (1u64 << bit) == 0)
        .map(|(name, _, _)| *name)
        .collect();
    let names: Vec<&str> = CAPABILITIES.iter().map(|(name, _, _)| *name).collect();
    if missing.is_empty() {
        Check::pass("capabilities", format!("{} effective", names.join(", ")))
    } else {
        let why: Vec<String> = CAPABILITIES
            .iter()
            .filter(|(name, _, _)| missing.contains(name))
            .map(|(name, _, why)| format!("{name} to {why}"))
            .collect();
        Check::fail(
            "capabilities",
            format!("missing {}", missing.join(", ")),
            format!("run as root with {}", why.join("; ")),
        )
    }
}

fn ebpf_programs(capable: bool) -> Check {
    match crate::ebpf::verify_programs() {
        Ok(programs) => Check::pass(
            "ebpf",
            format!(
                "the kernel verified {} programs ({})",
                programs.len(),
                programs.join(", ")
            ),
        ),
        Err(e) => Check::fail(
            "ebpf",
            // The first line; the verifier's log follows on the next ones.
            e.to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim_end()
                .trim_end_matches("Verifier output:")
                .trim_end()
                .to_owned(),
            if capable {
                "the kernel refused the programs: check the kernel version and options above"
            } else {
                "grant the capabilities above"
            },
        ),
    }
}

fn ca(config: &Config) -> Check {
    let (cert, key) = match (&config.ca_cert, &config.ca_key, &config.dev_ca_dir) {
        (Some(cert), Some(key), _) => (cert.clone(), key.clone()),
        (_, _, Some(dir)) => {
            let files = crate::tls::ca::files_in(dir);
            if !files.cert.exists() && !files.key.exists() {
                return Check::pass(
                    "ca",
                    format!(
                        "no development CA in {} yet: the daemon creates one",
                        dir.display()
                    ),
                );
            }
            (files.cert, files.key)
        }
        _ => {
            return Check::fail(
                "ca",
                "no CA configured",
                "pass --ca-cert and --ca-key (the enterprise CA Secret), or --dev-ca-dir DIR",
            );
        }
    };
    let ca = match crate::tls::ca::EnterpriseCa::load(&cert, &key) {
        Ok(ca) => ca,
        Err(e) => {
            return Check::fail(
                "ca",
                e.to_string(),
                "mount the CA Secret with defaultMode 0400 and pass its tls.crt and tls.key",
            );
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let days_left = (ca.not_after - now) / 86_400;
    let detail = format!("{} ({}), expires in {days_left} days", ca.subject, cert.display());
    if ca.not_after <= now {
        Check::fail(
            "ca",
            format!("{} ({}) has expired", ca.subject, cert.display()),
            "renew the CA",
        )
    } else if days_left < CA_WARN_DAYS {
        Check::warn(
            "ca",
            detail,
            "renew the CA and roll it out to the workloads' trust bundles before it expires",
        )
    } else {
        Check::pass("ca", detail)
    }
}

fn ports(config: &Config) -> Check {
    let mut addresses: Vec<SocketAddr> = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        .into_iter()
        .chain(config.node_addresses.iter().copied())
        .map(|ip| SocketAddr::new(ip, config.proxy_port))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses.extend(config.metrics_addr.0);
    let busy: Vec<String> = addresses
        .iter()
        .filter_map(|addr| {
            std::net::TcpListener::bind(addr)
                .err()
                .map(|e| format!("{addr}: {e}"))
        })
        .collect();
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    if busy.is_empty() {
        Check::pass("ports", format!("{} free", list.join(", ")))
    } else {
        Check::fail(
            "ports",
            busy.join("; "),
            "stop what holds the port (a daemon already running?) or choose --proxy-port / --metrics-addr",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.14.0-362.el9.x86_64"), Some((5, 14)));
        assert_eq!(parse_kernel_release("4.19"), Some((4, 19)));
        assert_eq!(parse_kernel_release("garbage"), None);
        assert!(parse_kernel_release("5.10.0").is_some_and(|v| v < MIN_KERNEL));
    }

    #[test]
    fn table_lists_fixes_and_totals() {
        let report = Report {
            checks: vec![
                Check::pass("kernel", "Linux 6.18"),
                Check::warn("btf", "missing", "enable BTF"),
                Check::fail("ca", "no CA configured", "pass --ca-cert"),
            ],
        };
        assert!(!report.passed());
        let table = report.table();
        assert!(table.contains("kernel  PASS    Linux 6.18"), "{table}");
        assert!(table.contains("ca (FAIL): pass --ca-cert"), "{table}");
        assert!(
            table.contains("3 checks: 1 passed, 1 warnings, 1 failed"),
            "{table}"
        );
    }
}
