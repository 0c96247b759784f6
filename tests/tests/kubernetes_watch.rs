//! The pod watch against the fake Kubernetes API server, driving the real `kube` client: owners are
//! resolved with one call per ReplicaSet, bookmarks move the resume point, a dropped watch resumes
//! without a relist, a `410 Gone` relists, deleted pods leave after their grace period, and the
//! directory keeps serving while the API is away. Unprivileged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor::kubernetes::watch::WatchSettings;
use interceptor::kubernetes::{self, KubernetesMode, KubernetesSettings, PodAttribution, WorkloadSource};
use tests::kubeapi::{FakeKubeApi, Resource, owned, pod};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const NODE: &str = "node-1";
const RS_CHAT: &str = "chat-7d9f8b6c5d";

fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .map(|m| {
            if m.get_counter().get_value() > 0.0 {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            }
        })
        .sum()
}

fn count(requests: &[String], predicate: impl Fn(&str) -> bool) -> usize {
    requests.iter().filter(|r| predicate(r)).count()
}

fn query_value<'a>(request: &'a str, key: &str) -> Option<&'a str> {
    let query = request.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

fn is_pod_list(request: &str) -> bool {
    request.starts_with("GET /api/v1/pods?") && !request.contains("watch=true")
}

fn seed(api: &FakeKubeApi) {
    api.apply(
        Resource::ReplicaSets,
        owned(Resource::ReplicaSets, "team-a", RS_CHAT, "Deployment", "chat"),
    );
    api.apply(
        Resource::Jobs,
        owned(Resource::Jobs, "team-b", "nightly-29390000", "CronJob", "nightly"),
    );
    let rs = Some(("apps/v1", "ReplicaSet", RS_CHAT));
    let hash = ("pod-template-hash", "7d9f8b6c5d");
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "chat-a",
            "uid-chat-a",
            NODE,
            "chat-sa",
            &[("app", "chat"), hash],
            rs,
        ),
    );
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "chat-b",
            "uid-chat-b",
            NODE,
            "chat-sa",
            &[("app", "chat"), hash],
            rs,
        ),
    );
    api.apply(
        Resource::Pods,
        pod(
            "team-b",
            "nightly-x",
            "uid-nightly",
            NODE,
            "batch",
            &[],
            Some(("batch/v1", "Job", "nightly-29390000")),
        ),
    );
    api.apply(
        Resource::Pods,
        pod(
            "team-b",
            "db-0",
            "uid-db",
            NODE,
            "db",
            &[],
            Some(("apps/v1", "StatefulSet", "db")),
        ),
    );
    api.apply(
        Resource::Pods,
        pod("team-c", "bare", "uid-bare", NODE, "default", &[], None),
    );
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "elsewhere",
            "uid-elsewhere",
            "node-2",
            "chat-sa",
            &[],
            rs,
        ),
    );
    // Its ReplicaSet is gone: the Deployment is inferred from the names.
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "gone-5f6d7c8b9a-q",
            "uid-orphan",
            NODE,
            "default",
            &[("pod-template-hash", "5f6d7c8b9a")],
            Some(("apps/v1", "ReplicaSet", "gone-5f6d7c8b9a")),
        ),
    );
}

struct Watch {
    runtime: tokio::runtime::Runtime,
    registry: prometheus::Registry,
    pods: Arc<PodAttribution>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Watch {
    fn start(kubeconfig: std::path::PathBuf) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let settings = KubernetesSettings {
            mode: KubernetesMode::Auto,
            kubeconfig: Some(kubeconfig),
            watch: WatchSettings {
                node_name: NODE.into(),
                max_backoff: Duration::from_secs(1),
                sweep_interval: Duration::from_millis(100),
            },
            departed_grace: Duration::from_millis(500),
            owner_timeout: Duration::from_secs(2),
            pod_wait: Duration::from_secs(1),
        };
        let registry = prometheus::Registry::new();
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let pods = runtime
            .block_on(kubernetes::start(&settings, &registry, &tasks, stop.clone()))
            .expect("the watch starts")
            .expect("a kubeconfig was given");
        Self {
            runtime,
            registry,
            pods,
            stop,
            tasks,
        }
    }

    fn has(&self, uid: &str) -> bool {
        self.pods.directory.get(uid).is_some()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tasks.close();
        let tasks = self.tasks.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        });
    }
}

#[test]
fn the_pod_watch_follows_the_api_through_bookmarks_drops_gone_and_outages() {
    let dir = std::env::temp_dir().join(format!("ict-kube-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut api = FakeKubeApi::start().expect("fake API server");
    seed(&api);
    let watch = Watch::start(api.write_kubeconfig(&dir).expect("kubeconfig"));
    let directory = watch.pods.directory.clone();
    wait_until("the first list", Duration::from_secs(10), || {
        directory.is_synced()
    });

    // Only this node's pods, with their workloads.
    assert!(!watch.has("uid-elsewhere"), "a pod of another node");
    let chat = directory.get("uid-chat-a").expect("chat-a listed");
    assert_eq!((&*chat.namespace, &*chat.name), ("team-a", "chat-a"));
    assert_eq!(chat.workload.to_string(), "Deployment/chat");
    assert_eq!(chat.workload_source, WorkloadSource::Resolved);
    assert_eq!(chat.service_account.as_deref(), Some("chat-sa"));
    assert_eq!(chat.label("app"), Some("chat"));
    assert_eq!(chat.node.as_deref(), Some(NODE));
    let workload = |uid: &str| {
        directory
            .get(uid)
            .map(|p| (p.workload.to_string(), p.workload_source))
    };
    for (uid, expected, source) in [
        ("uid-chat-b", "Deployment/chat", WorkloadSource::Resolved),
        ("uid-nightly", "CronJob/nightly", WorkloadSource::Resolved),
        ("uid-db", "StatefulSet/db", WorkloadSource::Direct),
        ("uid-bare", "Pod/bare", WorkloadSource::Direct),
        ("uid-orphan", "Deployment/gone", WorkloadSource::Inferred),
    ] {
        assert_eq!(workload(uid), Some((expected.into(), source)), "{uid}");
    }

    let requests = api.requests();
    assert_eq!(
        count(&requests, |r| r.starts_with(&format!(
            "GET /apis/apps/v1/namespaces/team-a/replicasets/{RS_CHAT}"
        ))),
        1,
        "two pods of one ReplicaSet cost one owner lookup: {requests:#?}"
    );
    assert_eq!(count(&requests, is_pod_list), 1, "{requests:#?}");
    assert!(
        requests.iter().any(|r| is_pod_list(r)
            && query_value(r, "fieldSelector") == Some("spec.nodeName%3Dnode-1")
            && query_value(r, "resourceVersion") == Some("0")),
        "the list is limited to this node and served from the API server's cache: {requests:#?}"
    );
    assert_eq!(
        count(&requests, |r| r.starts_with("GET /api/v1/pods?")
            && r.contains("watch=true")),
        1
    );

    // A write elsewhere moves the resource version; a bookmark tells the watch, which then resumes
    // from it after a dropped connection, without a relist.
    let job = api.apply(
        Resource::Jobs,
        owned(Resource::Jobs, "team-b", "other-job", "CronJob", "other"),
    );
    let bookmark_rv = job["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    api.bookmark();
    std::thread::sleep(Duration::from_millis(300));
    api.drop_watches();
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "after-drop",
            "uid-after-drop",
            NODE,
            "chat-sa",
            &[],
            None,
        ),
    );
    wait_until("the pod added after the drop", Duration::from_secs(10), || {
        watch.has("uid-after-drop")
    });
    let requests = api.requests();
    assert_eq!(
        count(&requests, is_pod_list),
        1,
        "a dropped watch resumes without a relist: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("watch=true")
                && query_value(r, "resourceVersion") == Some(bookmark_rv.as_str())),
        "the watch resumed from the bookmark's version {bookmark_rv}: {requests:#?}"
    );

    // History compacted: resuming gets 410 Gone, the watch relists.
    api.compact();
    api.drop_watches();
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "after-gone",
            "uid-after-gone",
            NODE,
            "chat-sa",
            &[],
            None,
        ),
    );
    wait_until("the pod added after the 410", Duration::from_secs(10), || {
        watch.has("uid-after-gone")
    });
    assert_eq!(count(&api.requests(), is_pod_list), 2, "a 410 forces one relist");
    assert!(watch.has("uid-chat-a"), "the relist keeps the pods");
    assert!(metric(&watch.registry, "interceptor_kubernetes_watch_events_total") >= 2.0);

    // A deleted pod is still attributed during its grace period, then forgotten.
    api.delete(Resource::Pods, "team-b", "db-0");
    std::thread::sleep(Duration::from_millis(150));
    assert!(watch.has("uid-db"), "still found during the grace period");
    wait_until("the deleted pod to leave", Duration::from_secs(5), || {
        !watch.has("uid-db")
    });

    // The API goes away: what is known stays, errors are counted, the watch comes back by itself.
    api.stop();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        watch.has("uid-chat-a") && watch.has("uid-nightly"),
        "known pods stay while the API is away"
    );
    assert!(metric(&watch.registry, "interceptor_kubernetes_watch_errors_total") >= 1.0);
    api.restart().expect("the API comes back");
    api.apply(
        Resource::Pods,
        pod(
            "team-a",
            "after-outage",
            "uid-after-outage",
            NODE,
            "chat-sa",
            &[],
            None,
        ),
    );
    wait_until("the pod added after the outage", Duration::from_secs(15), || {
        watch.has("uid-after-outage")
    });
    assert_eq!(metric(&watch.registry, "interceptor_kubernetes_synced"), 1.0);
    drop(watch);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_token_is_an_error_the_watch_retries_and_counts() {
    let dir = std::env::temp_dir().join(format!("ict-kube-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let api = FakeKubeApi::start().expect("fake API server");
    seed(&api);
    let path = api.write_kubeconfig(&dir).expect("kubeconfig");
    let watch = Watch::start(path.clone());
    wait_until("the first list", Duration::from_secs(10), || {
        watch.pods.directory.is_synced()
    });
    // Same server, wrong token: every call is refused with 401, counted, retried.
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace(tests::kubeapi::TOKEN, "wrong");
    let bad_path = dir.join("bad-kubeconfig");
    std::fs::write(&bad_path, text).expect("write");
    let bad = Watch::start(bad_path);
    wait_until("refused calls to be counted", Duration::from_secs(10), || {
        metric(&bad.registry, "interceptor_kubernetes_watch_errors_total") >= 1.0
    });
    assert!(!bad.pods.directory.is_synced());
    assert!(bad.pods.directory.is_empty());
    assert_eq!(metric(&bad.registry, "interceptor_kubernetes_synced"), 0.0);
    drop(bad);
    drop(watch);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fake answers the real `kube` client as an API server would for ReplicaSets and Jobs too: paged
/// lists with `continue`, watches with ADDED/MODIFIED/DELETED, 404 and 410 Status errors.
#[test]
fn the_fake_api_serves_replicasets_and_jobs_to_the_real_client() {
    use futures::StreamExt as _;
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::api::batch::v1::Job;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};

    let dir = std::env::temp_dir().join(format!("ict-kube-fake-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let api = FakeKubeApi::start().expect("fake API server");
    for i in 0..5 {
        api.apply(
            Resource::ReplicaSets,
            owned(
                Resource::ReplicaSets,
                "team-a",
                &format!("web-{i}"),
                "Deployment",
                "web",
            ),
        );
    }
    api.apply(
        Resource::Jobs,
        owned(Resource::Jobs, "team-b", "nightly-1", "CronJob", "nightly"),
    );
    let path = api.write_kubeconfig(&dir).expect("kubeconfig");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig reads");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        interceptor::tls::install_default_provider();
        let client = kube::Client::try_from(config).expect("client");
        let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), "team-a");

        // Pages of two, chained by `continue`.
        let mut names = Vec::new();
        let mut params = ListParams::default().limit(2);
        loop {
            let page = replicasets.list(&params).await.expect("list page");
            names.extend(page.items.iter().filter_map(|rs| rs.metadata.name.clone()));
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
        assert_eq!(names, ["web-0", "web-1", "web-2", "web-3", "web-4"]);
        let owner = replicasets
            .get("web-3")
            .await
            .expect("get")
            .metadata
            .owner_references;
        assert_eq!(
            owner.and_then(|o| o.first().map(|o| o.name.clone())).as_deref(),
            Some("web")
        );
        match replicasets.get("missing").await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
            other => panic!("a missing object is a 404 Status: {other:?}"),
        }

        // A watch from the list's version sees later changes, in order.
        let jobs: Api<Job> = Api::all(client.clone());
        let version = jobs
            .list(&ListParams::default())
            .await
            .expect("list")
            .metadata
            .resource_version
            .expect("rv");
        let mut stream = jobs
            .watch(&WatchParams::default(), &version)
            .await
            .expect("watch")
            .boxed();
        api.apply(
            Resource::Jobs,
            owned(Resource::Jobs, "team-b", "nightly-2", "CronJob", "nightly"),
        );
        api.apply(
            Resource::Jobs,
            owned(Resource::Jobs, "team-b", "nightly-2", "CronJob", "nightly"),
        );
        api.delete(Resource::Jobs, "team-b", "nightly-1");
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match stream.next().await.expect("an event").expect("decodes") {
                WatchEvent::Added(job) => {
                    seen.push(format!("added {}", job.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Modified(job) => {
                    seen.push(format!("modified {}", job.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Deleted(job) => {
                    seen.push(format!("deleted {}", job.metadata.name.unwrap_or_default()))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            seen,
            ["added nightly-2", "modified nightly-2", "deleted nightly-1"]
        );

        // After compaction the old version is gone: an ERROR event carrying a 410 Status.
        api.compact();
        let mut stream = jobs
            .watch(&WatchParams::default(), &version)
            .await
            .expect("watch")
            .boxed();
        match stream.next().await.expect("an event").expect("decodes") {
            WatchEvent::Error(status) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
            other => panic!("expected 410 Gone, got {other:?}"),
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
