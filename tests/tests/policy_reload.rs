//! Policy hot reload as Kubernetes delivers a ConfigMap: the file is a symlink through `..data`, and an
//! update swaps `..data` to a new timestamped directory. The watcher sees the swap, validates, and
//! swaps the rules; a broken version keeps the rules in force. Unprivileged, in-process.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use interceptor::policy::Policy;
use interceptor::quota::{QuotaEngine, QuotaMetrics};
use interceptor::reload::{self, ReloadMetrics, Reloadable};
use tokio_util::sync::CancellationToken;

const HEADER: &str = "apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\n";

fn policy(rules: usize, valid: bool) -> String {
    let mut text = format!("{HEADER}rules:\n");
    for i in 0..rules {
        let limit = if valid { 10 } else { -10 };
        text.push_str(&format!(
            "  - {{name: r{i}, limits: {{requestsPerMinute: {limit}}}}}\n"
        ));
    }
    text
}

/// Publishes `text` as kubelet does: a new `..<timestamp>` directory, then an atomic rename of a new
/// `..data` symlink over the old one.
fn publish(dir: &Path, version: u32, text: &str) {
    let data = dir.join(format!("..2026_11_24_10_00_{version:02}.000000001"));
    std::fs::create_dir_all(&data).expect("version dir");
    std::fs::write(data.join("policy.yaml"), text).expect("policy");
    let temporary = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&temporary);
    symlink(data.file_name().expect("name"), &temporary).expect("symlink");
    std::fs::rename(&temporary, dir.join("..data")).expect("swap ..data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_reloads_and_a_broken_version_keeps_the_rules() {
    let dir = std::env::temp_dir().join(format!("ict-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    publish(&dir, 1, &policy(1, true));
    symlink("..data/policy.yaml", dir.join("policy.yaml")).expect("file symlink");
    let path = dir.join("policy.yaml");
    let initial = std::fs::read_to_string(&path).expect("read through the symlinks");
    let parsed = Policy::parse(&initial, "test").expect("valid");

    let registry = prometheus::Registry::new();
    let quota = Arc::new(QuotaEngine::new(
        parsed.compiled_rules(),
        QuotaMetrics::register(&registry).expect("metrics"),
    ));
    let bypass = Arc::new(ArcSwap::from_pointee(parsed.bypass_matchers()));
    let metrics = ReloadMetrics::register(&registry).expect("metrics");
    let stop = CancellationToken::new();
    let task = tokio::spawn(reload::run(
        path.clone(),
        initial,
        Reloadable {
            quota: quota.clone(),
            bypass,
            content: Arc::new(ArcSwap::from_pointee(parsed.content_selection())),
        },
        metrics,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await; // the watch is in place

    let eventually = |what: &'static str, condition: Box<dyn Fn() -> bool + Send>| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    publish(&dir, 2, &policy(3, true));
    let q = quota.clone();
    eventually(
        "the swapped ConfigMap to be loaded",
        Box::new(move || q.rule_count() == 3),
    )
    .await;

    publish(&dir, 3, &policy(5, false));
    let failing = {
        let registry = registry.clone();
        move || {
            registry
                .gather()
                .iter()
                .filter(|f| f.name() == "interceptor_policy_reload_failing")
                .flat_map(|f| f.get_metric().iter())
                .any(|m| m.get_gauge().get_value() == 1.0)
        }
    };
    eventually("the broken version to be reported", Box::new(failing)).await;
    assert_eq!(quota.rule_count(), 3, "a broken version keeps the rules in force");

    publish(&dir, 4, &policy(2, true));
    let q = quota.clone();
    eventually(
        "the fixed version to be loaded",
        Box::new(move || q.rule_count() == 2),
    )
    .await;
    stop.cancel();
    let _ = task.await;
    let _ = std::fs::remove_dir_all(&dir);
}
