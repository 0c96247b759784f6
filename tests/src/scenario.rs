//! The standard simulated node: one provider namespace serving `api.openai.com` and
//! `api.anthropic.com` (targets, terminated), `relay.example.com` on the same address (relayed
//! untouched: not a provider domain) and `other.example.com` on another address (not a target), a pod,
//! and the daemon with an enterprise CA made by `interceptor ca init`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::Context as _;
use serde_json::Value;

use crate::daemon::Daemon;
use crate::kubeapi::FakeKubeApi;
use crate::node::{Node, OTHER_V4, PROVIDER_V4, PROVIDER_V6, Pod, ProviderNetns};
use crate::pki::{TestCa, server_config};
use crate::provider::Provider;

/// Port of the plain TCP sink on the provider addresses (also a target port).
pub const SINK_PORT: u16 = 8443;
/// Served on the provider's target address but not a provider domain: relayed untouched.
pub const RELAY_HOST: &str = "relay.example.com";
/// Served on an address that is not a target.
pub const OTHER_HOST: &str = "other.example.com";
/// The Gemini API host (served by the simulated provider).
pub const GEMINI_HOST: &str = "generativelanguage.googleapis.com";

/// The first lines of the test policies: the format, without the built-in provider catalog.
pub const POLICY_HEADER: &str = "apiVersion: interceptor.dev/v1alpha1
kind: InterceptorPolicy
builtinProviders: false
";

/// A policy intercepting `api.openai.com` and `api.anthropic.com` on the simulated provider addresses.
pub fn policy(failure_mode: &str) -> String {
    format!(
        "{POLICY_HEADER}providers:
  - domain: api.openai.com
    addresses: [{PROVIDER_V4}, \"{PROVIDER_V6}\"]
    ports: [443, {SINK_PORT}]
  - domain: api.anthropic.com
    addresses: [{PROVIDER_V4}]
  - domain: {GEMINI_HOST}
    addresses: [{PROVIDER_V4}]
interception:
  failureMode: {failure_mode}
"
    )
}

/// The node name the daemon watches pods for in [`Scenario::start_with_kubernetes`].
pub const NODE_NAME: &str = "node-1";

/// The names a pod resolves (its `/etc/netns/<netns>/hosts`).
pub fn hosts() -> Vec<(&'static str, IpAddr)> {
    vec![
        ("api.openai.com", PROVIDER_V4.into()),
        ("api.anthropic.com", PROVIDER_V4.into()),
        (GEMINI_HOST, PROVIDER_V4.into()),
        (RELAY_HOST, PROVIDER_V4.into()),
        (OTHER_HOST, OTHER_V4.into()),
    ]
}

/// Everything a test needs. Fields drop in declaration order: the daemon first, the node last.
pub struct Scenario {
    pub daemon: Daemon,
    pub provider: Provider,
    pub pod: Pod,
    pub provider_netns: ProviderNetns,
    /// The test public CA that signs the simulated providers' own certificates.
    pub ca_path: PathBuf,
    /// The enterprise CA (made by `interceptor ca init`) that signs the minted leaves.
    pub enterprise_ca: PathBuf,
    pub host_cgroup: PathBuf,
    policy: String,
    daemon_args: Vec<String>,
    /// What runs the daemon (empty: nothing), kept for restarts.
    wrapper: Vec<String>,
    pub node: Node,
}

impl Scenario {
    /// Builds the node, starts the provider and the daemon with `policy`.
    pub fn start(policy: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_wrapped(policy, extra_args, &[])
    }

    /// [`Scenario::start`] with the daemon run by `wrapper` (see [`Daemon::start_wrapped`]).
    pub fn start_wrapped(policy: &str, extra_args: &[&str], wrapper: &[String]) -> anyhow::Result<Self> {
        let mut node = Node::new()?;
        let pod = node.add_pod("pod-a", &hosts())?;
        let provider_netns = node.add_provider("provider")?;
        let ca = TestCa::new("Test Public Root CA", &node.dir, "public-ca.pem")?;
        let tls = server_config(ca.issue(&[
            "api.openai.com",
            "api.anthropic.com",
            GEMINI_HOST,
            RELAY_HOST,
            OTHER_HOST,
        ])?)?;
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

        let enterprise_dir = node.dir.join("enterprise-ca");
        let init = Command::new(crate::daemon::binary())
            .args(["ca", "init", "--name", "Interceptor Test Enterprise CA", "--out"])
            .arg(&enterprise_dir)
            .output()
            .context("interceptor ca init")?;
        anyhow::ensure!(init.status.success(), "interceptor ca init failed: {init:?}");
        let enterprise_ca = enterprise_dir.join("ca.crt");
        let mut args: Vec<String> = vec![
            "--ca-cert".into(),
            enterprise_ca.display().to_string(),
            "--ca-key".into(),
            enterprise_dir.join("ca.key").display().to_string(),
            "--upstream-ca-bundle".into(),
            ca.pem_path.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let daemon_args = args;
        let args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_wrapped(&node.dir, policy, true, &args, wrapper)?;
        Ok(Self {
            daemon,
            provider,
            pod,
            provider_netns,
            ca_path: ca.pem_path,
            enterprise_ca,
            host_cgroup,
            policy: policy.to_owned(),
            daemon_args,
            wrapper: wrapper.to_vec(),
            node,
        })
    }

    /// Stops the daemon gracefully and starts a new one with the same policy, arguments and state
    /// directory (an upgrade or a restart of the DaemonSet pod).
    pub fn restart_daemon(&mut self) -> anyhow::Result<()> {
        self.daemon.stop()?;
        let args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        self.daemon = Daemon::start_wrapped(&self.node.dir, &self.policy, true, &args, &self.wrapper)?;
        Ok(())
    }

    /// Starts a daemon with `policy` (same arguments and state) in place of the current one, which must be
    /// stopped already: the pins a killed fail-closed daemon left are still there when the new one starts.
    pub fn replace_daemon(&mut self, policy: &str) -> anyhow::Result<()> {
        let args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        let new = Daemon::start_wrapped(&self.node.dir, policy, true, &args, &self.wrapper)?;
        drop(std::mem::replace(&mut self.daemon, new));
        self.policy = policy.to_owned();
        Ok(())
    }

    /// Starts with the daemon watching the fake Kubernetes API `api` as node [`NODE_NAME`] (records wait
    /// up to 8 s for a pod not listed yet; the watch retries within 2 s).
    pub fn start_with_kubernetes(
        policy: &str,
        api: &FakeKubeApi,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("ict-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = api.write_kubeconfig(&dir)?;
        let kubeconfig = kubeconfig.to_str().context("kubeconfig path is not UTF-8")?;
        let mut args = vec![
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            NODE_NAME,
            "--pod-wait",
            "8s",
            "--kubernetes-max-backoff",
            "2s",
        ];
        args.extend_from_slice(extra_args);
        Self::start(policy, &args)
    }

    /// Waits until the daemon's pod directory holds at least `count` pods.
    pub fn wait_pods(&self, count: f64) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let known = self.daemon.metric("interceptor_kubernetes_pods").unwrap_or(0.0);
            if known >= count {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the daemon knows {known} pods, expected {count}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn curl_args(ca: &std::path::Path, url: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec!["-sS".into(), "--max-time".into(), "15".into(), "--cacert".into()];
        args.push(ca.display().to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(url.to_owned());
        args
    }

    /// Runs curl in the pod, trusting only the test public CA (a client that does not trust the
    /// enterprise CA).
    pub fn pod_curl(&self, url: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        self.curl_in(&self.pod, false, url, extra)
    }

    /// Runs curl in the pod, trusting the enterprise CA (a pod with the trust bundle mounted).
    pub fn pod_curl_trusting(&self, url: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        self.curl_in(&self.pod, true, url, extra)
    }

    /// Runs curl in `pod`, trusting the enterprise CA or only the test public CA.
    pub fn curl_in(
        &self,
        pod: &Pod,
        trust_enterprise: bool,
        url: &str,
        extra: &[&str],
    ) -> anyhow::Result<Curl> {
        let ca = if trust_enterprise {
            &self.enterprise_ca
        } else {
            &self.ca_path
        };
        let args = Self::curl_args(ca, url, extra);
        Curl::run(pod.command("curl", &args.iter().map(String::as_str).collect::<Vec<_>>()))
    }

    /// Runs curl in the host namespace and test host cgroup, trusting the enterprise CA.
    pub fn host_curl_trusting(&self, url: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        let args = Self::curl_args(&self.enterprise_ca, url, extra);
        Curl::run(self.node.host_command(
            &self.host_cgroup,
            "curl",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    }

    /// Runs a script of `tests/python/` with the venv's Python in the pod, trusting the enterprise CA
    /// (`SSL_CERT_FILE`), and parses the one JSON object it prints.
    pub fn pod_python_json(&self, script: &str) -> anyhow::Result<Value> {
        self.python_json_in(&self.pod, script, &[])
    }

    /// Runs a script of `tests/python/` with arguments in `pod`, trusting the enterprise CA, and parses
    /// the one JSON object it prints.
    pub fn python_json_in(&self, pod: &Pod, script: &str, args: &[&str]) -> anyhow::Result<Value> {
        let python = crate::venv_python();
        let script = crate::python_script(script);
        let script_path = script.display().to_string();
        let mut all_args = vec![script_path.as_str()];
        all_args.extend_from_slice(args);
        let mut command = pod.command(&python.display().to_string(), &all_args);
        command.env("SSL_CERT_FILE", &self.enterprise_ca);
        let output = command.output().context("running python in the pod")?;
        anyhow::ensure!(
            output.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).context("the script's JSON results")
    }

    /// POSTs a JSON body with curl in the pod, trusting the enterprise CA; `extra` go before it.
    pub fn pod_post_json(&self, url: &str, body: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["-H", "content-type: application/json", "--data-binary", body]);
        self.pod_curl_trusting(url, &args)
    }

    /// Runs curl in the host namespace, in the test host cgroup, trusting the test public CA.
    pub fn host_curl(&self, url: &str, extra: &[&str]) -> anyhow::Result<Curl> {
        let args = Self::curl_args(&self.ca_path, url, extra);
        Curl::run(self.node.host_command(
            &self.host_cgroup,
            "curl",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    }
}

/// The result of a curl run.
pub struct Curl {
    pub pid: u32,
    pub output: Output,
}

impl Curl {
    pub fn run(mut command: Command) -> anyhow::Result<Self> {
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

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// The JSON body (the simulated provider reports the peer and SNI it saw).
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.output.stdout).with_context(|| self.describe())
    }

    pub fn describe(&self) -> String {
        format!(
            "curl pid {} exited {}: stdout {:?} stderr {:?}",
            self.pid,
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }
}
