//! `cargo xtask setup`: everything the build and the tests need, installed idempotently.
//!
//! * the nightly toolchain with `rust-src` (the eBPF crate is built with `-Z build-std=core`);
//! * `bpf-linker`, built against the nightly's own libLLVM (no Debian LLVM is involved);
//! * `cargo-fuzz` (pinned) for the parsers' fuzz targets;
//! * Debian packages used by the tests and benchmarks;
//! * a Python venv (`.venv`) with the official client SDKs pinned in `tests/python/requirements.txt`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::sh;

/// What to set up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Rust toolchain pieces only (build and run the daemon).
    Toolchain,
    /// Everything, including test dependencies.
    All,
}

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "curl",
    "iproute2",
    "util-linux",
    "procps",
    "nginx",
    "wrk",
    "prometheus",
    "redis-server",
    "bpftool",
];

pub fn run(root: &Path, scope: Scope) -> anyhow::Result<()> {
    nightly()?;
    bpf_linker()?;
    if scope == Scope::All {
        cargo_fuzz()?;
        debian_packages()?;
        python_venv(root)?;
    }
    Ok(())
}

/// The pinned cargo-fuzz (runs the parsers' fuzz targets).
const CARGO_FUZZ_VERSION: &str = "0.13.1";

fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = sh::output(
        &cargo_home().join("bin/cargo-fuzz").display().to_string(),
        &["fuzz", "--version"],
    );
    if installed.is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    sh::status(Command::new(cargo).args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
}

fn nightly() -> anyhow::Result<()> {
    // An install must not replace the rustup binary behind our back.
    let _ = sh::output("rustup", &["set", "auto-self-update", "disable"]);
    if sh::output("rustup", &["run", "nightly", "rustc", "-V"]).is_none() {
        println!("setup: installing the nightly toolchain (for the eBPF crate)");
        sh::status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let installed = sh::output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("listing the nightly components")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly");
        sh::status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// bpf-linker must use the LLVM of the nightly that compiles the eBPF crate: link nightly's
/// libLLVM into a prefix and build bpf-linker against it. A stamp records which nightly it was.
fn bpf_linker() -> anyhow::Result<()> {
    let nightly = sh::output("rustup", &["run", "nightly", "rustc", "-vV"]).context("rustc +nightly -vV")?;
    let llvm_major = nightly
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in `rustc +nightly -vV`")?
        .to_owned();
    let prefix = cargo_home().join("interceptor-llvm");
    let stamp_path = prefix.join("bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION}\n{nightly}");
    let current = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    if current == stamp && sh::output("bpf-linker", &["--version"]).is_some() {
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major}");
    let sysroot = sh::output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
        .context("nightly sysroot")?;
    let sysroot_lib = PathBuf::from(sysroot.trim()).join("lib");
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let mut versioned = None;
    for entry in
        std::fs::read_dir(&sysroot_lib).with_context(|| format!("reading {}", sysroot_lib.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("libLLVM") {
            continue;
        }
        if name.starts_with("libLLVM.so.") {
            versioned = Some(entry.path());
        }
        symlink(&entry.path(), &lib_dir.join(&name))?;
    }
    let versioned = versioned.with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;
    symlink(&versioned, &lib_dir.join("libLLVM.so"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    sh::status(
        Command::new(cargo)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            // A Debian llvm-config on PATH must not be picked up.
            .env_remove("LLVM_SYS_PREFIX"),
    )?;
    std::fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

fn symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if std::fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            sh::output("dpkg-query", &["-W", "-f=${db:Status-Status}", p])
                .is_none_or(|s| s.trim() != "installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    sh::require_root(&format!("installing Debian packages {missing:?}"))?;
    println!("setup: installing Debian packages {missing:?}");
    // Services must not start during installation (tests start their own instances).
    let policy_rc = Path::new("/usr/sbin/policy-rc.d");
    let created_policy = !policy_rc.exists();
    if created_policy {
        std::fs::write(policy_rc, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy_rc, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = sh::status(Command::new("apt-get").args(["update", "-q"])).and_then(|()| {
        sh::status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if created_policy {
        let _ = std::fs::remove_file(policy_rc);
    }
    result
}

fn python_venv(root: &Path) -> anyhow::Result<()> {
    let requirements = root.join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let venv = root.join(".venv");
    let stamp_path = venv.join("requirements.installed");
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == wanted) && venv.join("bin/python").exists() {
        return Ok(());
    }
    println!(
        "setup: creating the Python venv {} with the client SDKs",
        venv.display()
    );
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| sh::output(p, &["--version"]).is_some())
        .context("no python3 on PATH")?;
    if !venv.join("bin/python").exists() {
        sh::status(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    }
    sh::status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
    )?;
    let check = "import openai, anthropic, google.genai; print(openai.__version__, anthropic.__version__)";
    let versions = sh::output(&venv.join("bin/python").to_string_lossy(), &["-c", check]);
    if versions.is_none() {
        bail!("the client SDKs do not import in {}", venv.display());
    }
    std::fs::write(&stamp_path, wanted)?;
    Ok(())
}
