//! Runs the real `interceptor` binary and reads its JSON log.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::node::{NODE_V4, NODE_V6, PREFIX};

/// Path of the `interceptor` binary: `$INTERCEPTOR_BIN`, else the one next to this test's target dir.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("INTERCEPTOR_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/interceptor
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join("interceptor")
}

/// A running daemon; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    logs: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    pub proxy_port: u16,
    pub admin: SocketAddr,
    pub bpffs_dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `policy` (written to `dir`) and waits until it logs `interceptor ready`.
    /// With `node`, pods are redirected to the simulated node addresses (which must exist).
    pub fn start(dir: &Path, policy: &str, node: bool, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_wrapped(dir, policy, node, extra_args, &[])
    }

    /// [`Daemon::start`] with the daemon run by `wrapper` (a command and its arguments, for instance
    /// `setpriv` restricting its capabilities), which must exec it.
    pub fn start_wrapped(
        dir: &Path,
        policy: &str,
        node: bool,
        extra_args: &[&str],
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let policy_path = dir.join("policy.yaml");
        std::fs::write(&policy_path, policy)?;
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{PREFIX}-{}", std::process::id()));
        // `INTERCEPTOR_TEST_LOG` overrides the filter (benchmarks keep only the ready line).
        let log_level = std::env::var("INTERCEPTOR_TEST_LOG")
            .unwrap_or_else(|_| "info,interceptor=debug,interceptor::request=info".into());
        let mut command = crate::cmd::wrapped(wrapper, binary());
        command
            .args(["--log-format", "json", "--log-level", log_level.as_str(), "run"])
            .arg("--policy")
            .arg(&policy_path)
            .args(["--proxy-port", "0", "--metrics-addr", "127.0.0.1:0"])
            .args(if node {
                vec![
                    "--node-address".to_owned(),
                    NODE_V4.to_string(),
                    "--node-address".to_owned(),
                    NODE_V6.to_string(),
                ]
            } else {
                Vec::new()
            })
            .arg("--bpffs-dir")
            .arg(&bpffs_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--admin-socket")
            .arg(dir.join("run/admin.sock"))
            .args(extra_args)
            .args(if extra_args.contains(&"--ca-cert") {
                Vec::new()
            } else {
                vec![
                    "--dev-ca-dir".to_owned(),
                    dir.join("dev-ca").display().to_string(),
                ]
            })
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {}", binary().display()))?;
        let pid = child.id();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("daemon stdout")?;
        let err = child.stderr.take().context("daemon stderr")?;
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if let Ok(mut logs) = sink.lock() {
                    logs.push(value);
                }
            }
        });
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        let mut daemon = Self {
            child: Some(child),
            pid,
            logs,
            stderr,
            proxy_port: 0,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            bpffs_dir,
        };
        let ready = daemon.wait_log(Duration::from_secs(30), |l| l["message"] == "interceptor ready")?;
        daemon.proxy_port = ready["proxy_port"].as_u64().context("proxy_port in ready line")? as u16;
        daemon.admin = ready["admin_addr"]
            .as_str()
            .context("admin_addr in ready line")?
            .parse()?;
        Ok(daemon)
    }

    /// Waits for a log line matching `pred`.
    pub fn wait_log(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| pred(l)) {
                return Ok(line);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "daemon exited ({status}) before the expected log line; stderr: {:?}",
                    self.stderr_lines()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching daemon log line within {timeout:?}; last lines: {:#?}",
                    last(&self.logs(), 10)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for the `connection closed` line of the connection made by process `pid`.
    pub fn connection_line(&mut self, pid: u32) -> anyhow::Result<Value> {
        self.wait_log(Duration::from_secs(10), |l| {
            l["message"] == "connection closed" && l["tgid"] == pid
        })
        .with_context(|| format!("no connection line for pid {pid}"))
    }

    /// The `connection closed` lines.
    pub fn connection_lines(&self) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"] == "connection closed")
            .collect()
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.admin, "/metrics")
    }

    /// The value of the sample `series` (name with labels exactly as exposed), 0 when absent.
    pub fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// The sum of every series of `name` whose labels include `labels` (other labels may vary).
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let text = self.metrics()?;
        let mut sum = 0.0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let (series_labels, value) = match rest.strip_prefix('{') {
                Some(rest) => match rest.split_once("} ") {
                    Some(split) => split,
                    None => continue,
                },
                None => match rest.strip_prefix(' ') {
                    Some(value) => ("", value),
                    None => continue,
                },
            };
            if labels
                .iter()
                .all(|(key, wanted)| series_labels.contains(&format!("{key}=\"{wanted}\"")))
            {
                sum += value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok(sum)
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("daemon already stopped")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill()?;
                bail!("daemon did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        let _ = interceptor::ebpf::unpin_all(&self.bpffs_dir);
    }
}

fn last(values: &[Value], n: usize) -> Vec<Value> {
    values[values.len().saturating_sub(n)..].to_vec()
}

/// A minimal HTTP/1.1 GET (the admin endpoint is plain HTTP on loopback).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP response without a header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_owned())
}
