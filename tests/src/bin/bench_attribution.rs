//! `cargo xtask bench attribution`: identity resolution per new connection (details cache hit, and a
//! miss that reads /proc and the cgroup tree), each with the pod lookup in a directory of 10,000 pods,
//! against a loopback TCP connect + accept measured in the same run (what any new connection costs);
//! and the memory of 10,000 pods in the directory, against the same pods kept as full API objects (what
//! a plain kube reflector store would hold). Needs no privileges.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use interceptor::cgroup::{CgroupNames, discover_cgroup2_mount};
use interceptor::identity::{Enricher, KernelFacts};
use interceptor::kubernetes::pod::PodFacts;
use interceptor::kubernetes::{PodDirectory, PodIdentity, Workload, WorkloadSource};
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: usize = 10_000;

fn main() -> anyhow::Result<()> {
    let pods = api_pods(PODS);
    let directory = PodDirectory::new(Duration::from_secs(300));

    // Memory: the directory's compact identities vs the full objects.
    let before = LIVE.load(Ordering::Relaxed);
    let kept_objects: Vec<Pod> = pods.clone();
    let objects_bytes = LIVE.load(Ordering::Relaxed) - before;
    let before = LIVE.load(Ordering::Relaxed);
    let identities: Vec<PodIdentity> = pods.iter().filter_map(identity_of).collect();
    directory.replace_all(identities, Instant::now());
    let directory_bytes = LIVE.load(Ordering::Relaxed) - before;
    drop(kept_objects);
    anyhow::ensure!(
        directory.len() == PODS,
        "directory holds {} pods",
        directory.len()
    );

    // A real connection's facts: this process, its cgroup.
    let root = discover_cgroup2_mount().context("cgroup2 mount")?;
    let tgid = std::process::id();
    let own_cgroup = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .context("no cgroup2 line in /proc/self/cgroup")?;
    let cgroup_id = tests::node::cgroup_id(&root.join(own_cgroup.trim_start_matches('/')))?;
    let facts = KernelFacts {
        original_dst: "203.0.113.2:443".parse()?,
        tgid,
        pid: tgid,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        cgroup_id,
        netns_cookie: 1,
        socket_cookie: 1,
        comm: "bench".into(),
    };
    let enricher = Enricher::new(CgroupNames::new(root, "/proc".into()));
    let pod_uid = format!("{:08x}-0000-4000-8000-{:012}", PODS / 2, PODS / 2);
    anyhow::ensure!(
        directory.get(&pod_uid).is_some(),
        "the looked-up pod is in the directory"
    );

    let rounds = 5;
    let (mut connect, mut hit, mut miss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        connect.push(per_op(2_000, loopback_connection)?);
        hit.push(per_op(200_000, || {
            let details = enricher.details(black_box(&facts));
            let pod = directory.get(black_box(&pod_uid));
            black_box((details, pod));
            Ok(())
        })?);
        miss.push(per_op(2_000, || {
            let details = enricher.read(black_box(&facts));
            let pod = directory.get(black_box(&pod_uid));
            black_box((details, pod));
            Ok(())
        })?);
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (connect, hit, miss) = (median(connect), median(hit), median(miss));
    let ns = |d: Duration| d.as_secs_f64() * 1e9;
    println!("attribution per new connection ({rounds} rounds, medians; directory of {PODS} pods)");
    println!("  baseline loopback TCP connect+accept  {:>9.0} ns", ns(connect));
    println!(
        "  cache hit (details + pod)            {:>9.0} ns  ×{:.3} of baseline   target ≤ 2000 ns: {}",
        ns(hit),
        ns(hit) / ns(connect),
        verdict(ns(hit) <= 2000.0)
    );
    println!(
        "  cache miss (/proc + cgroup + pod)    {:>9.0} ns  ×{:.3} of baseline",
        ns(miss),
        ns(miss) / ns(connect)
    );
    let mb = |b: isize| b as f64 / 1e6;
    println!("memory for {PODS} pods");
    println!(
        "  baseline full Pod objects            {:>9.1} MB",
        mb(objects_bytes)
    );
    println!(
        "  pod directory                        {:>9.1} MB  ×{:.3} of baseline   {:.0} B/pod   target ≤ 50 MB: {}",
        mb(directory_bytes),
        directory_bytes as f64 / objects_bytes as f64,
        directory_bytes as f64 / PODS as f64,
        verdict(mb(directory_bytes) <= 50.0)
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn per_op(count: u32, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for _ in 0..count {
        op()?;
    }
    Ok(start.elapsed() / count)
}

thread_local! {
    static LISTENER: std::net::TcpListener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback listener");
}

fn loopback_connection() -> anyhow::Result<()> {
    LISTENER.with(|listener| {
        let addr = listener.local_addr()?;
        let client = std::net::TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        black_box((client, server));
        Ok(())
    })
}

fn identity_of(pod: &Pod) -> Option<PodIdentity> {
    let facts = PodFacts::from_pod(pod)?;
    let name = facts
        .controller
        .as_ref()
        .map(|o| o.name.clone())
        .unwrap_or_default();
    let deployment = name.rsplit_once('-').map_or(name.as_str(), |(d, _)| d).to_owned();
    Some(facts.into_identity(Workload::new("Deployment", &deployment), WorkloadSource::Resolved))
}

/// Realistic pods: six labels, two annotations, one container with env and resources, an owner.
fn api_pods(count: usize) -> Vec<Pod> {
    (0..count)
        .map(|i| {
            let deployment = format!("service-{:04}", i / 10);
            let hash = format!("{:010x}", i / 10 * 7919);
            let labels: BTreeMap<String, String> = [
                ("app", deployment.as_str()),
                ("app.kubernetes.io/name", deployment.as_str()),
                ("app.kubernetes.io/part-of", "ai-platform"),
                ("pod-template-hash", hash.as_str()),
                ("team", "inference"),
                ("version", "v1.42.0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            Pod {
                metadata: ObjectMeta {
                    name: Some(format!("{deployment}-{hash}-{:05}", i)),
                    namespace: Some(format!("team-{:02}", i % 40)),
                    uid: Some(format!("{i:08x}-0000-4000-8000-{i:012}")),
                    labels: Some(labels),
                    annotations: Some(
                        [
                            (
                                "kubectl.kubernetes.io/restartedAt".to_owned(),
                                "2026-11-01T10:00:00Z".to_owned(),
                            ),
                            ("prometheus.io/scrape".to_owned(), "true".to_owned()),
                        ]
                        .into_iter()
                        .collect(),
                    ),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "ReplicaSet".into(),
                        name: format!("{deployment}-{hash}"),
                        uid: format!("rs-{i}"),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    resource_version: Some(format!("{}", 100_000 + i)),
                    ..ObjectMeta::default()
                },
                spec: Some(PodSpec {
                    node_name: Some("node-1".into()),
                    service_account_name: Some(format!("{deployment}-sa")),
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some(format!("registry.example.com/{deployment}:v1.42.0")),
                        env: Some(
                            (0..8)
                                .map(|e| EnvVar {
                                    name: format!("SETTING_{e}"),
                                    value: Some(format!("value-{e}-{deployment}")),
                                    value_from: None,
                                })
                                .collect(),
                        ),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
                status: Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)),
                    qos_class: Some("Burstable".into()),
                    ..PodStatus::default()
                }),
            }
        })
        .collect()
}
