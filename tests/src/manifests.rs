//! The Kubernetes manifests under `deploy/kubernetes`, rendered with `kubectl kustomize` (offline).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::Value;

/// The kustomizations a test renders: the base and every overlay.
pub const KUSTOMIZATIONS: [&str; 4] = [
    "base",
    "overlays/observe",
    "overlays/enforce",
    "overlays/redis-budgets",
];

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// One rendered kustomization: its YAML text and documents.
pub struct Rendered {
    pub name: &'static str,
    pub yaml: String,
    pub documents: Vec<Value>,
}

impl Rendered {
    /// Renders `deploy/kubernetes/<name>`.
    pub fn render(name: &'static str) -> anyhow::Result<Self> {
        let dir = repo_root().join("deploy/kubernetes").join(name);
        let output = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .context("running kubectl kustomize")?;
        anyhow::ensure!(
            output.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let yaml = String::from_utf8(output.stdout).context("kustomize output is not UTF-8")?;
        let mut documents = Vec::new();
        for document in serde_norway::Deserializer::from_str(&yaml) {
            let value: Value =
                serde::Deserialize::deserialize(document).with_context(|| format!("parsing {name}"))?;
            if !value.is_null() {
                documents.push(value);
            }
        }
        Ok(Self {
            name,
            yaml,
            documents,
        })
    }

    /// Every document of `kind`.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.documents.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// The one document of `kind`.
    pub fn one(&self, kind: &str) -> anyhow::Result<&Value> {
        let all = self.all(kind);
        anyhow::ensure!(all.len() == 1, "{}: {} {kind} documents", self.name, all.len());
        Ok(all[0])
    }

    /// The interceptor container of the DaemonSet.
    pub fn daemon_container(&self) -> anyhow::Result<&Value> {
        let daemonset = self.one("DaemonSet")?;
        daemonset["spec"]["template"]["spec"]["containers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "interceptor"))
            .context("no interceptor container")
    }

    /// The capabilities the DaemonSet adds (`CAP_` names).
    pub fn capabilities(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.daemon_container()?["securityContext"]["capabilities"]["add"]
            .as_array()
            .context("no capabilities.add")?
            .iter()
            .filter_map(Value::as_str)
            .map(|c| format!("CAP_{c}"))
            .collect())
    }

    /// The container's arguments.
    pub fn daemon_args(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.daemon_container()?["args"]
            .as_array()
            .context("no args")?
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    /// The container's arguments after `run`, with the host paths the DaemonSet mounts mapped to where
    /// this node has them (the cgroup2 hierarchy wherever mountinfo says, the host's /proc), then the
    /// `extra` (container path, local path) replacements applied.
    pub fn daemon_args_on_this_node(&self, extra: &[(&str, String)]) -> anyhow::Result<Vec<String>> {
        let cgroup_root = interceptor::cgroup::discover_cgroup2_mount()?
            .display()
            .to_string();
        let mut replacements = vec![
            ("/run/interceptor/cgroupv2", cgroup_root),
            ("/host/proc", "/proc".to_owned()),
        ];
        replacements.extend(extra.iter().map(|(from, to)| (*from, to.clone())));
        Ok(self
            .daemon_args()?
            .into_iter()
            .filter(|arg| arg != "run")
            .map(|arg| {
                replacements
                    .iter()
                    .fold(arg, |arg, (from, to)| arg.replace(from, to))
            })
            .collect())
    }

    /// The policy file of the `interceptor-policy` ConfigMap.
    pub fn policy(&self) -> anyhow::Result<String> {
        self.all("ConfigMap")
            .into_iter()
            .find(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("interceptor-policy"))
            })
            .and_then(|c| c["data"]["policy.yaml"].as_str())
            .map(str::to_owned)
            .context("no interceptor-policy ConfigMap with policy.yaml")
    }
}

/// `setpriv` arguments that run a root process with exactly `capabilities` (`CAP_` names): they become
/// its bounding set, and uid 0 gets its whole bounding set at exec.
pub fn setpriv_with(capabilities: &[String]) -> Vec<String> {
    let list: Vec<String> = capabilities
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = if list.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{}", list.join(","))
    };
    vec![
        "setpriv".to_owned(),
        format!("--bounding-set={set}"),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ]
}

/// The capability names set in a `CapEff`-style mask (as listed by `interceptor::doctor`).
pub fn effective_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?
        .trim();
    Ok(u64::from_str_radix(hex, 16)?)
}
