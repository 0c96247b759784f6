//! The DaemonSet deployment: the rendered kustomizations validate offline against the Kubernetes
//! schemas, their policies and alerting rules are valid, the DaemonSet asks for the least privilege,
//! and the real daemon works with exactly the capabilities it lists (and fails without each of them).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::manifests::{KUSTOMIZATIONS, Rendered, effective_of, repo_root, setpriv_with};
use tests::node::PROVIDER_V4;
use tests::scenario::Scenario;

/// Kubernetes versions the manifests are validated against: the oldest supported and the newest known.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30", "1.37"];

fn interceptor(args: &[&str]) -> std::process::Output {
    std::process::Command::new(tests::daemon::binary())
        .args(args)
        .output()
        .expect("running interceptor")
}

#[test]
fn every_kustomization_renders_and_validates_offline() {
    let dir = tempfile_dir("validate");
    for name in KUSTOMIZATIONS {
        let rendered = Rendered::render(name).expect("kustomization renders");
        let path = dir.join(format!("{}.yaml", name.replace('/', "-")));
        std::fs::write(&path, &rendered.yaml).expect("write rendered");
        for version in KUBERNETES_VERSIONS {
            let output = std::process::Command::new(tests::venv_python())
                .arg(tests::python_script("validate_manifests.py"))
                .arg(version)
                .arg(&path)
                .output()
                .expect("running validate_manifests.py");
            assert!(output.status.success(), "{name}: {output:?}");
            let report: Value = serde_json::from_slice(&output.stdout).expect("validator JSON");
            assert_eq!(
                report["errors"],
                serde_json::json!([]),
                "{name} against Kubernetes {version}"
            );
            assert_eq!(
                report["resources"].as_array().map(Vec::len),
                Some(rendered.documents.len()),
                "{name}: every document validated"
            );
        }

        // The policy each kustomization ships is valid.
        let policy = rendered.policy().expect("policy ConfigMap");
        let policy_path = dir.join(format!("{}-policy.yaml", name.replace('/', "-")));
        std::fs::write(&policy_path, &policy).expect("write policy");
        let check = interceptor(&["policy", "check", &policy_path.display().to_string()]);
        assert!(check.status.success(), "{name} policy: {check:?}");

        if name == "base" {
            let builtin = std::fs::read_to_string(repo_root().join("interceptor/default-policy.yaml"))
                .expect("built-in policy");
            assert_eq!(
                policy, builtin,
                "the base ConfigMap is the built-in default policy"
            );
            assert!(rendered.all("PrometheusRule").is_empty(), "base needs no CRD");
            continue;
        }
        check_monitoring(&rendered, &dir);
        let modes: Vec<&str> = serde_norway::from_str::<Value>(&policy).expect("policy YAML")["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| r["mode"].as_str().unwrap_or("enforce"))
            .map(|m| if m == "observe" { "observe" } else { "enforce" })
            .collect();
        match name {
            "overlays/observe" => assert!(modes.iter().all(|m| *m == "observe"), "{modes:?}"),
            _ => assert!(modes.iter().all(|m| *m == "enforce"), "{name}: {modes:?}"),
        }
        if name == "overlays/redis-budgets" {
            let url = serde_norway::from_str::<Value>(&policy).expect("policy YAML")["budgetStore"]["redis"]
                ["url"]
                .as_str()
                .expect("budgetStore.redis.url")
                .to_owned();
            let service = rendered
                .all("Service")
                .into_iter()
                .find(|s| s["metadata"]["name"] == "interceptor-redis")
                .expect("redis Service");
            let host = format!(
                "{}.{}.svc.cluster.local:6379",
                service["metadata"]["name"].as_str().unwrap_or_default(),
                service["metadata"]["namespace"].as_str().unwrap_or_default()
            );
            assert!(url.contains(&host), "{url} points at the bundled Redis {host}");
            let redis = rendered.one("StatefulSet").expect("redis StatefulSet");
            let args = redis["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
            assert!(args.contains("appendonly"), "Redis persists budgets: {args}");
        }
    }
}

/// The ServiceMonitor scrapes the Service's metrics port, and the alerting rules pass promtool.
fn check_monitoring(rendered: &Rendered, dir: &Path) {
    let service = rendered
        .all("Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "interceptor-metrics")
        .expect("metrics Service");
    let monitor = rendered.one("ServiceMonitor").expect("ServiceMonitor");
    let wanted = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (key, value) in wanted {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "ServiceMonitor selects the Service"
        );
    }
    let port = monitor["spec"]["endpoints"][0]["port"]
        .as_str()
        .expect("endpoint port");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .is_some_and(|ports| ports.iter().any(|p| p["name"] == port)),
        "the Service has port {port}"
    );
    let container = rendered.daemon_container().expect("container");
    assert!(
        container["ports"]
            .as_array()
            .is_some_and(|ports| ports.iter().any(|p| p["name"] == "metrics")),
        "the Service's targetPort is a container port"
    );

    let rule = rendered.one("PrometheusRule").expect("PrometheusRule");
    let rules_dir = dir.join(rendered.name.replace('/', "-"));
    std::fs::create_dir_all(&rules_dir).expect("rules dir");
    let rules_path = rules_dir.join("rules.yaml");
    let groups = serde_json::json!({ "groups": rule["spec"]["groups"] });
    std::fs::write(&rules_path, serde_norway::to_string(&groups).expect("rules YAML")).expect("write");
    let output = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
        .expect("running promtool");
    assert!(output.status.success(), "promtool check rules: {output:?}");
    // The alerts fire when they should, and only then (promtool's rule unit tests).
    let unit_tests = rules_dir.join("prometheusrule.test.yaml");
    std::fs::copy(
        repo_root().join("deploy/kubernetes/components/monitoring/prometheusrule.test.yaml"),
        &unit_tests,
    )
    .expect("copy rule tests");
    let output = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&unit_tests)
        .output()
        .expect("running promtool");
    assert!(output.status.success(), "promtool test rules: {output:?}");
    let alerts: BTreeSet<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "InterceptorBudgetAt80Percent",
        "InterceptorInterceptionDown",
        "InterceptorCAExpiringSoon",
        "InterceptorPolicyReloadFailing",
    ] {
        assert!(alerts.contains(wanted), "{wanted} in {alerts:?}");
    }
}

#[test]
fn daemonset_asks_for_the_least_privilege() {
    let rendered = Rendered::render("base").expect("base renders");
    let daemonset = rendered.one("DaemonSet").expect("DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = rendered.daemon_container().expect("container");
    let security = &container["securityContext"];

    let listed: BTreeSet<String> = rendered
        .capabilities()
        .expect("capabilities")
        .into_iter()
        .collect();
    let used: BTreeSet<String> = interceptor::doctor::CAPABILITIES
        .iter()
        .map(|(name, _, _)| (*name).to_owned())
        .collect();
    assert_eq!(
        listed, used,
        "the DaemonSet grants what `interceptor doctor` checks"
    );
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_ne!(security["privileged"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(
        pod["hostNetwork"], true,
        "the proxy listens in the node's network namespace"
    );
    assert_ne!(pod["hostPID"], true, "the host's /proc is mounted instead");
    assert_eq!(
        daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"].is_object() && container["resources"]["limits"].is_object());
    let env = container["env"].as_array().expect("env");
    assert!(
        env.iter()
            .any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from the downward API"
    );
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for wanted in ["/sys/fs/cgroup", "/sys/fs/bpf", "/proc", "/var/lib/interceptor"] {
        assert!(host_paths.contains(wanted), "{wanted} mounted from the host");
    }
    let ca = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "ca"))
        .expect("ca volume");
    assert_eq!(
        ca["secret"]["defaultMode"], 0o400,
        "the CA key is not world-readable"
    );

    // RBAC: read-only, pods (get/list/watch), replicasets and jobs (get), nothing else.
    let role = rendered.one("ClusterRole").expect("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for resource in rule["resources"].as_array().expect("resources") {
            for verb in rule["verbs"].as_array().expect("verbs") {
                granted.insert(format!(
                    "{}:{}",
                    resource.as_str().unwrap_or("?"),
                    verb.as_str().unwrap_or("?")
                ));
            }
        }
    }
    let allowed: BTreeSet<String> = [
        "pods:get",
        "pods:list",
        "pods:watch",
        "replicasets:get",
        "jobs:get",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(granted, allowed);
}

#[test]
fn dockerfile_builds_what_xtask_build_release_builds() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let build_stage = dockerfile
        .split("\nFROM ")
        .find(|stage| stage.contains("AS build"))
        .expect("a build stage");
    assert!(
        build_stage.contains("cargo xtask build --release"),
        "the image builds with the command the test suite runs"
    );
    assert!(build_stage.contains("target/release/interceptor"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/interceptor"]"#));
    assert!(dockerfile.matches("\nFROM ").count() >= 1, "multi-stage");

    // The build context keeps every tracked source file.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let tracked =
        tests::cmd::run("git", &["-C", &root.display().to_string(), "ls-files"]).expect("git ls-files");
    for file in tracked.lines() {
        for pattern in &patterns {
            let dir = pattern.trim_start_matches("**/").trim_end_matches('/');
            let excluded = file.starts_with(&format!("{dir}/")) || file.contains(&format!("/{dir}/"));
            assert!(
                !excluded,
                "{file} is tracked but .dockerignore's {pattern} drops it"
            );
        }
    }

    // The release binary that `cargo xtask build --release` made (xtask test builds it first).
    let Some(binary) = std::env::var_os("INTERCEPTOR_RELEASE_BIN") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this through `cargo xtask test`, which sets INTERCEPTOR_RELEASE_BIN"
        );
        eprintln!(
            "INTERCEPTOR_RELEASE_BIN not set: run through `cargo xtask test` to check the release binary"
        );
        return;
    };
    let version = tests::cmd::run(&binary.to_string_lossy(), &["--version"]).expect("--version");
    assert!(version.starts_with("interceptor "), "{version}");
    // The runtime image (distroless cc) has glibc and libgcc, nothing more.
    let libraries = tests::cmd::run("ldd", &[&binary.to_string_lossy()]).expect("ldd");
    for line in libraries.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        assert!(
            [
                "linux-vdso",
                "libc.so",
                "libm.so",
                "libgcc_s.so",
                "ld-linux",
                "/lib64/ld-linux"
            ]
            .iter()
            .any(|allowed| name.contains(allowed)),
            "{name} is not in the runtime image: {libraries}"
        );
    }
}

/// A policy with a budget (so the usage gauge the "budget at 80%" alert watches has a series).
fn budgeted_policy() -> String {
    format!(
        "{}rules:\n  - name: daily-spend\n    limits:\n      costPerDayUsd: 100\n",
        tests::scenario::policy("open")
    )
}

/// The manifest's arguments the harness does not set itself, with the container's paths mapped to
/// this machine (the hostPath volumes' sources; cgroup2 where this node mounts it).
fn manifest_args(rendered: &Rendered) -> Vec<String> {
    let harness_sets = [
        "--log-format",
        "--policy",
        "--ca-cert",
        "--ca-key",
        "--node-address",
        "--metrics-addr",
        "--state-dir",
        "--bpffs-dir",
    ];
    rendered
        .daemon_args_on_this_node(&[])
        .expect("args")
        .into_iter()
        .filter(|arg| {
            !harness_sets
                .iter()
                .any(|flag| arg.starts_with(&format!("{flag}=")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_with_exactly_the_listed_capabilities() {
    if !tests::privileged_available("the_daemon_runs_with_exactly_the_listed_capabilities") {
        return;
    }
    let rendered = Rendered::render("base").expect("base renders");
    let capabilities = rendered.capabilities().expect("capabilities");
    let args = manifest_args(&rendered);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(
        args.iter().any(|a| a.starts_with("--cgroup-root="))
            && args.iter().any(|a| a.starts_with("--proc-root=")),
        "{args:?}"
    );

    let mut scenario = Scenario::start_wrapped(&budgeted_policy(), &arg_refs, &setpriv_with(&capabilities))
        .expect("daemon starts with the DaemonSet's capabilities");
    let wanted_mask = interceptor::doctor::CAPABILITIES
        .iter()
        .fold(0u64, |mask, (_, bit, _)| mask | 1 << bit);
    assert_eq!(
        effective_of(scenario.daemon.pid).expect("CapEff"),
        wanted_mask,
        "the daemon holds exactly {capabilities:?}"
    );
    let curl = scenario
        .pod_curl_trusting("https://api.openai.com/v1/models", &[])
        .expect("curl");
    assert!(
        curl.success(),
        "intercepted with a minted leaf: {}",
        curl.describe()
    );
    let line = scenario
        .daemon
        .connection_line(curl.pid)
        .expect("connection line");
    assert_eq!(line["original_dst"], format!("{PROVIDER_V4}:443"), "{line}");
    assert_eq!(line["mode"], "terminated", "{line}");
    assert!(
        line["exe"].as_str().is_some_and(|e| e.ends_with("/curl")),
        "the exe is read with CAP_SYS_PTRACE: {line}"
    );

    // Every metric an alert of the PrometheusRule watches exists.
    let metrics = scenario.daemon.metrics().expect("metrics");
    let overlay = Rendered::render("overlays/enforce").expect("overlay renders");
    let rule = overlay.one("PrometheusRule").expect("rule");
    let mut watched: BTreeSet<String> = BTreeSet::new();
    // Only the alert expressions: descriptions may name metrics that exist once something happened.
    let groups = rule["spec"]["groups"].as_array().cloned().unwrap_or_default();
    for expr in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned))
    {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("interceptor_") {
                watched.insert(word.to_owned());
            }
        }
    }
    assert!(watched.len() >= 4, "{watched:?}");
    for metric in &watched {
        assert!(
            metrics.lines().any(|l| l.starts_with(metric.as_str())),
            "{metric} (alerted on) is exported"
        );
    }
    drop(scenario);

    // Each capability is needed: without it the daemon cannot start, or loses the executable.
    for missing in &capabilities {
        let fewer: Vec<String> = capabilities.iter().filter(|c| *c != missing).cloned().collect();
        match Scenario::start_wrapped(&budgeted_policy(), &arg_refs, &setpriv_with(&fewer)) {
            Err(e) => {
                let message = format!("{e:#}");
                assert!(
                    missing != "CAP_SYS_PTRACE",
                    "the daemon starts without CAP_SYS_PTRACE: {message}"
                );
                assert!(
                    message.contains("ermission")
                        || message.contains("EPERM")
                        || message.contains("not permitted"),
                    "without {missing} the daemon fails on permissions: {message}"
                );
            }
            Ok(mut scenario) => {
                assert_eq!(missing, "CAP_SYS_PTRACE", "the daemon started without {missing}");
                let curl = scenario
                    .pod_curl_trusting("https://api.openai.com/v1/models", &[])
                    .expect("curl");
                assert!(curl.success(), "{}", curl.describe());
                let line = scenario
                    .daemon
                    .connection_line(curl.pid)
                    .expect("connection line");
                assert!(line["exe"].is_null(), "no exe without CAP_SYS_PTRACE: {line}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ict-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
