//! `cargo xtask bench policy`: quota decision cost per request (decide + settle) with 1, 100 and 1,000
//! rules and 10,000 identities, against the 1-rule case measured in the same run; and the reload time of
//! a 1,000-rule file (parse, validate, compile), against parsing the same text as plain YAML. Needs no
//! privileges.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor::identity::{Identity, ProcessDetails};
use interceptor::kubernetes::{PodIdentity, Workload, WorkloadSource};
use interceptor::policy::Policy;
use interceptor::quota::{Decision, Demand, QuotaEngine, QuotaMetrics};

const IDENTITIES: usize = 10_000;
const NAMESPACES: usize = 1_000;

fn policy_text(rules: usize) -> String {
    let mut text = String::from("apiVersion: interceptor.dev/v1alpha1\nkind: InterceptorPolicy\nrules:\n");
    for i in 0..rules {
        // A realistic mix: most rules select a namespace, some a workload glob or labels, a few all.
        let selector = match i % 10 {
            0 => format!("{{workload: \"Deployment/service-{:03}*\"}}", i % NAMESPACES),
            1 => format!("{{podLabels: {{team: t{}}}}}", i % 50),
            2 if i % 100 == 2 => "{}".to_owned(),
            _ => format!("{{namespace: team-{:03}}}", i % NAMESPACES),
        };
        text.push_str(&format!(
            "  - name: rule-{i}\n    match: {selector}\n    limits: {{requestsPerMinute: 1000000, tokensPerDay: 1000000000000, costPerDayUsd: 1000000}}\n"
        ));
    }
    text
}

fn identities() -> Vec<PodIdentity> {
    (0..IDENTITIES)
        .map(|i| PodIdentity {
            uid: format!("uid-{i}").into(),
            namespace: format!("team-{:03}", i % NAMESPACES).into(),
            name: format!("service-{:03}-abc-{i}", i % NAMESPACES).into(),
            labels: vec![
                ("app".into(), format!("service-{i}").into()),
                ("team".into(), format!("t{}", i % 50).into()),
            ]
            .into_boxed_slice(),
            service_account: Some("default".into()),
            node: Some("node-1".into()),
            workload: Workload::new("Deployment", &format!("service-{:03}", i % NAMESPACES)),
            workload_source: WorkloadSource::Resolved,
        })
        .collect()
}

fn decision_ns(rules: usize, pods: &[PodIdentity], rounds: usize) -> anyhow::Result<f64> {
    let policy = Policy::parse(&policy_text(rules), "bench")?;
    let engine = Arc::new(QuotaEngine::new(
        policy.compiled_rules(),
        QuotaMetrics::detached()?,
    ));
    let facts = tests::sample_facts();
    let details = ProcessDetails {
        exe: Some(PathBuf::from("/usr/bin/python3")),
        ..ProcessDetails::default()
    };
    let demand = Demand {
        provider: "openai",
        model: Some("gpt-4o-mini"),
        input_tokens: 200,
        max_output_tokens: Some(256),
    };
    let cost = |input: u64, output: u64| (input + output) as f64 * 1e-7;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for pod in pods {
            let identity = Identity {
                facts: &facts,
                details: &details,
                pod: Some(pod),
            };
            match engine.decide(&identity, &demand, &cost) {
                Decision::Allow { permit, .. } => permit.settle(None, 0.0),
                Decision::Reject(r) => anyhow::bail!("unexpected rejection by {}", r.rule),
            }
        }
        samples.push(start.elapsed().as_secs_f64() * 1e9 / pods.len() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// p99 of single decisions (1,000 rules) over `duration`, with the cluster-wide budget sync to a real
/// redis-server running alongside when `redis` is given.
fn decision_p99(
    pods: &[PodIdentity],
    redis: Option<&tests::redis::RedisServer>,
    duration: Duration,
) -> anyhow::Result<(Duration, usize)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let policy = Policy::parse(&policy_text(1000), "bench")?;
    let engine = Arc::new(QuotaEngine::new(
        policy.compiled_rules(),
        QuotaMetrics::detached()?,
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some(redis) = redis {
        let spec = interceptor::quota::cluster::RedisSpec {
            url: redis.url(),
            key_prefix: format!("bench-{}", std::process::id()),
            sync_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
        };
        runtime.spawn(interceptor::quota::cluster::run(
            engine.clone(),
            spec,
            interceptor::quota::cluster::OnUnavailable::Local,
            interceptor::quota::cluster::ClusterMetrics::register(&prometheus::Registry::new())?,
            stop.clone(),
        ));
    }
    let facts = tests::sample_facts();
    let details = ProcessDetails::default();
    let demand = Demand {
        provider: "openai",
        model: Some("gpt-4o-mini"),
        input_tokens: 200,
        max_output_tokens: Some(256),
    };
    let usage = interceptor_protocols::Usage {
        input_tokens: 200,
        output_tokens: 100,
        ..Default::default()
    };
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        for pod in pods.iter().step_by(7) {
            let identity = Identity {
                facts: &facts,
                details: &details,
                pod: Some(pod),
            };
            let begin = Instant::now();
            match engine.decide(&identity, &demand, &|_, _| 0.001) {
                Decision::Allow { permit, .. } => permit.settle(Some(&usage), 0.001),
                Decision::Reject(r) => anyhow::bail!("unexpected rejection by {}", r.rule),
            }
            samples.push(begin.elapsed());
        }
    }
    stop.cancel();
    runtime.shutdown_timeout(Duration::from_secs(1));
    samples.sort();
    Ok((samples[samples.len() * 99 / 100], samples.len()))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let pods = identities();
    let rounds = 5;
    let mut results = Vec::new();
    for rules in [1, 100, 1000] {
        results.push((rules, decision_ns(rules, &pods, rounds)?));
    }
    let baseline = results[0].1;
    println!(
        "quota decision per request (decide + settle), {IDENTITIES} identities, median of {rounds} rounds"
    );
    for (rules, ns) in &results {
        let verdict = if *rules == 1000 {
            format!(
                "   target ≤ 5000 ns: {}",
                if *ns <= 5000.0 { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        };
        println!(
            "  {rules:>5} rules  {ns:>9.0} ns  ×{:.1} of 1 rule{verdict}",
            ns / baseline
        );
    }
    let redis = tests::redis::RedisServer::start()?;
    let (local, count) = decision_p99(&pods, None, Duration::from_secs(3))?;
    let (shared, _) = decision_p99(&pods, Some(&redis), Duration::from_secs(3))?;
    println!("decision p99, 1,000 rules, {count} decisions in 3 s, day and cost budgets on every rule");
    println!(
        "  baseline: budgets local            {:>8.1} µs",
        local.as_secs_f64() * 1e6
    );
    println!(
        "  budgets shared through Redis       {:>8.1} µs  +{:.3} ms   target ≤ +1 ms: {}",
        shared.as_secs_f64() * 1e6,
        (shared.as_secs_f64() - local.as_secs_f64()) * 1000.0,
        if shared.saturating_sub(local) <= Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
    let text = policy_text(1000);
    let (mut plain, mut reload) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        black_box(serde_norway::from_str::<serde_norway::Value>(&text)?);
        plain.push(start.elapsed());
        let start = Instant::now();
        let policy = Policy::parse(&text, "bench")?;
        black_box(policy.compiled_rules());
        black_box(policy.bypass_matchers());
        reload.push(start.elapsed());
    }
    let (plain, reload) = (median(plain), median(reload));
    println!(
        "reload of a 1,000-rule file ({} KB), median of {rounds}",
        text.len() / 1024
    );
    println!(
        "  baseline: parse as plain YAML   {:>8.2} ms",
        plain.as_secs_f64() * 1000.0
    );
    println!(
        "  parse + validate + compile      {:>8.2} ms  ×{:.1} of baseline   target ≤ 50 ms: {}",
        reload.as_secs_f64() * 1000.0,
        reload.as_secs_f64() / plain.as_secs_f64(),
        if reload <= Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
