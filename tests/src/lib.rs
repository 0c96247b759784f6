//! Test harness of the interceptor: a simulated node on one machine.
//!
//! * the daemon runs in the host namespace ([`daemon::Daemon`], the real `interceptor` binary);
//! * each "pod" is a network namespace with a veth pair and its own cgroup ([`node::Pod`]);
//! * each "provider" is a network namespace serving TLS with a certificate from a test public CA
//!   ([`provider::Provider`], [`pki::TestCa`]).
//!
//! Every namespace, link, cgroup and pinned BPF link is removed when its guard drops, including
//! during a panic, and [`node::cleanup_stale`] removes what a crashed run left behind.
//! Only 198.51.100.0/24 (pods), 203.0.113.0/24 (providers) and 2001:db8::/32 are used.

pub mod cmd;
pub mod daemon;
pub mod dns;
pub mod kubeapi;
pub mod manifests;
pub mod node;
pub mod pki;
pub mod provider;
pub mod redis;
pub mod scenario;

/// Whether privileged tests can run here (root, cgroup2, bpffs). When `CI` is set and they cannot,
/// this panics: a privileged test that cannot run is a failure there.
pub fn privileged_available(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if interceptor::cgroup::discover_cgroup2_mount().is_err() {
        Some("no cgroup2 mount")
    } else if !std::path::Path::new("/sys/fs/bpf").is_dir() {
        Some("no bpffs at /sys/fs/bpf")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var_os("CI").is_some() => {
            panic!("privileged test {test} cannot run in CI: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason} (privileged end-to-end tests need root)");
            false
        }
    }
}

/// The Python interpreter of the venv `cargo xtask setup` creates (`$INTERCEPTOR_VENV/bin/python`, default
/// `<workspace>/.venv`).
pub fn venv_python() -> std::path::PathBuf {
    let venv = std::env::var_os("INTERCEPTOR_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    venv.join("bin/python")
}

/// A script of `tests/python/`.
pub fn python_script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Kernel facts of a made-up `python3` caller, for in-process quota tests and benchmarks.
pub fn sample_facts() -> interceptor::identity::KernelFacts {
    interceptor::identity::KernelFacts {
        original_dst: std::net::SocketAddr::from(([203, 0, 113, 10], 443)),
        tgid: 1,
        pid: 1,
        uid: 1000,
        gid: 1000,
        cgroup_id: 1,
        netns_cookie: 1,
        socket_cookie: 1,
        comm: "python3".into(),
    }
}
