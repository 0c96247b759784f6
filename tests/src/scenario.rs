//! The standard simulated node: one provider namespace serving `api.openai.com` (a target) and
//! `other.example.com` (not a target), a pod, and the daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::Context as _;
use serde_json::Value;

use crate::daemon::Daemon;
use crate::node::{Node, OTHER_V4, PROVIDER_V4, PROVIDER_V6, Pod, ProviderNetns};
use crate::pki::{TestCa, server_config};
use crate::provider::Provider;

/// Port of the plain TCP sink on the provider addresses (also a target port).
pub const SINK_PORT: u16 = 8443;

/// A policy intercepting `api.openai.com` on the simulated provider addresses.
pub fn policy(failure_mode: &str) -> String {
    format!(
        "apiVersion: interceptor.dev/v1alpha1
kind: InterceptorPolicy
builtinProviders: false
providers:
  - domain: api.openai.com
    addresses: [{PROVIDER_V4}, \"{PROVIDER_V6}\"]
    ports: [443, {SINK_PORT}]
interception:
  failureMode: {failure_mode}
"
    )
}

/// Everything a test needs. Fields drop in declaration order: the daemon first, the node last.
pub struct Scenario {
    pub daemon: Daemon,
    pub provider: Provider,
    pub pod: Pod,
    pub provider_netns: ProviderNetns,
    pub ca_path: PathBuf,
    pub host_cgroup: PathBuf,
    pub node: Node,
}

impl Scenario {
    /// Builds the node, starts the provider and the daemon with `policy`.
    pub fn start(policy: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut node = Node::new()?;
        let hosts: Vec<(&str, IpAddr)> = vec![
            ("api.openai.com", PROVIDER_V4.into()),
            ("other.example.com", OTHER_V4.into()),
        ];
        let pod = node.add_pod("pod-a", &hosts)?;
        let provider_netns = node.add_provider("provider")?;
        let ca = TestCa::new("Test Public Root CA", &node.dir, "public-ca.pem")?;
        let tls = server_config(ca.issue(&["api.openai.com", "other.example.com"])?)?;
        let tls_addrs = [
            SocketAddr::new(PROVIDER_V4.into(), 443),
            SocketAddr::new(PROVIDER_V6.into(), 443),
            SocketAddr::new(OTHER_V4.into(), 443),
        ];
        let sink_addrs = [
            SocketAddr::new(PROVIDER_V4.into(), SINK_PORT),
            SocketAddr::new(PROVIDER_V6.into(), SINK_PORT),
        ];
        let provider = Provider::start(&provider_netns, tls, &tls_addrs, &sink_addrs)?;
        let host_cgroup = node.host_cgroup("ict-client")?;
        let daemon = Daemon::start(&node.dir, policy, true, extra_args)?;
        Ok(Self {
            daemon,
            provider,
            pod,
            provider_netns,
            ca_path: ca.pem_path,
            host_cgroup,
            node,
        })
    }

    /// curl arguments for an HTTPS GET that trusts the test public CA.
    pub fn curl_args(&self, url: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["-sS", "--max-time", "10", "--cacert"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(self.ca_path.display().to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(url.to_owned());
        args
    }

    /// Runs curl in the pod.
    pub fn pod_curl(&self, url: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        let args = self.curl_args(url, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Curl::run(self.pod.command("curl", &args))
    }

    /// Runs curl in the host namespace, in the test host cgroup.
    pub fn host_curl(&self, url: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        let args = self.curl_args(url, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Curl::run(self.node.host_command(&self.host_cgroup, "curl", &args))
    }
}

/// The result of a curl run.
pub struct Curl {
    pub pid: u32,
    pub output: Output,
}

impl Curl {
    fn run(mut command: Command) -> anyhow::Result<Self> {
        let child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("spawning curl")?;
        let pid = child.id();
        let output = child.wait_with_output()?;
        Ok(Self { pid, output })
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// The JSON body (the simulated provider reports the peer and SNI it saw).
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.output.stdout).with_context(|| {
            format!(
                "curl did not return JSON (status {}): stdout {:?} stderr {:?}",
                self.output.status,
                String::from_utf8_lossy(&self.output.stdout),
                String::from_utf8_lossy(&self.output.stderr)
            )
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "curl pid {} exited {}: stdout {:?} stderr {:?}",
            self.pid,
            self.output.status,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}
