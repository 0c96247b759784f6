//! Cluster-wide budgets through a real `redis-server`: two nodes' quota engines (each with its own
//! sync task, as two daemons have) enforce one daily budget together; Redis going away falls back as
//! the policy says and loses no use; and the real daemon rejects once another node spent the budget.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interceptor::identity::{Identity, ProcessDetails};
use interceptor::quota::cluster::{self, ClusterMetrics, OnUnavailable, RedisSpec};
use interceptor::quota::{Decision, Demand, Limited, QuotaEngine, QuotaMetrics, RuleSpec};
use interceptor_protocols::Usage;
use tests::redis::RedisServer;
use tests::scenario::{Scenario, policy};
use tokio_util::sync::CancellationToken;

const RULES: &str = "[{name: shared-day, limits: {tokensPerDay: 1000}}]";

struct Node {
    engine: Arc<QuotaEngine>,
    registry: prometheus::Registry,
    stop: CancellationToken,
}

impl Node {
    fn start(redis: &RedisServer, on_unavailable: OnUnavailable) -> Self {
        let specs: Vec<RuleSpec> = serde_norway::from_str(RULES).expect("rules");
        let rules = specs.iter().map(|s| s.compile().expect("rule")).collect();
        let registry = prometheus::Registry::new();
        let engine = Arc::new(QuotaEngine::new(
            rules,
            QuotaMetrics::register(&registry).expect("metrics"),
        ));
        let spec = RedisSpec {
            url: redis.url(),
            key_prefix: format!("test-{}", std::process::id()),
            sync_interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
        };
        let stop = CancellationToken::new();
        tokio::spawn(cluster::run(
            engine.clone(),
            spec,
            on_unavailable,
            ClusterMetrics::register(&registry).expect("metrics"),
            stop.clone(),
        ));
        Self {
            engine,
            registry,
            stop,
        }
    }

    /// A request reserving 100 input + `output` tokens; settled with `used` tokens when admitted.
    fn request(&self, output: u64, used: u64) -> Option<Limited> {
        let facts = tests::sample_facts();
        let details = ProcessDetails {
            exe: Some(PathBuf::from("/usr/bin/python3")),
            ..ProcessDetails::default()
        };
        let identity = Identity {
            facts: &facts,
            details: &details,
            pod: None,
        };
        let demand = Demand {
            provider: "openai",
            model: Some("gpt-4o-mini"),
            input_tokens: 100,
            max_output_tokens: Some(output),
        };
        match self.engine.decide(&identity, &demand, &|_, _| 0.0) {
            Decision::Allow { permit, .. } => {
                let usage = Usage {
                    input_tokens: used,
                    ..Usage::default()
                };
                permit.settle(Some(&usage), 0.0);
                None
            }
            Decision::Reject(rejection) => Some(rejection.limited),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .map(|m| m.get_gauge().get_value() + m.get_counter().get_value())
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_enforce_one_budget_and_survive_redis_going_away() {
    let mut redis = RedisServer::start().expect("redis-server");
    let a = Node::start(&redis, OnUnavailable::Local);
    let b = Node::start(&redis, OnUnavailable::Reject);
    // Node b learns of the budget (its rule state) with a first small request.
    assert_eq!(b.request(10, 10), None);
    // Node a spends 700 of the shared 1000 tokens.
    assert_eq!(a.request(10, 700), None);
    // Within a sync interval, node b sees 710 used: a request reserving 400 no longer fits there.
    // (Probes admitted before that use nothing, so they do not change the totals.)
    eventually("node b to see node a's use", || {
        b.request(300, 0) == Some(Limited::TokenBudget)
    })
    .await;
    assert_eq!(a.metric("interceptor_budget_store_up"), 1.0);

    // Redis goes away: node a (local fallback) keeps deciding, node b (reject) rejects.
    redis.stop();
    eventually("both nodes to notice", || {
        a.metric("interceptor_budget_store_up") == 0.0 && b.metric("interceptor_budget_store_up") == 0.0
    })
    .await;
    assert_eq!(a.request(10, 50), None, "local fallback keeps serving");
    assert_eq!(
        b.request(10, 10),
        Some(Limited::CostBudget),
        "reject fallback fails closed"
    );

    // Redis comes back empty: the use settled meanwhile is pushed, not lost.
    redis.restart().expect("redis-server restarts");
    eventually("the stores to recover", || {
        a.metric("interceptor_budget_store_up") == 1.0 && b.metric("interceptor_budget_store_up") == 1.0
    })
    .await;
    assert_eq!(b.request(10, 10), None, "node b serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_rejects_once_another_node_spent_the_shared_budget() {
    if !tests::privileged_available("the_daemon_rejects_once_another_node_spent_the_shared_budget") {
        return;
    }
    let redis = RedisServer::start().expect("redis-server");
    let rules = format!(
        "rules:\n  - name: shared-day\n    limits: {{tokensPerDay: 1000}}\nbudgetStore:\n  redis:\n    url: {}\n    keyPrefix: test-{}\n    syncInterval: 100ms\n",
        redis.url(),
        std::process::id()
    );
    let s =
        Scenario::start(&format!("{}{rules}", policy("open")), &[]).expect("simulated node and daemon start");
    let chat = "https://api.openai.com/v1/chat/completions";
    let body = r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let first = s.pod_post_json(chat, body, &[]).expect("curl");
    assert_eq!(
        first.json().expect("json")["object"],
        "chat.completion",
        "{}",
        first.describe()
    );

    // Another node (same Redis, same key prefix) spends the rest of the day's budget.
    let other = Node::start(&redis, OnUnavailable::Local);
    assert_eq!(other.request(10, 990), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let next = s.pod_post_json(chat, body, &["-i"]).expect("curl");
        if next.stdout().contains(" 429") {
            assert!(
                next.stdout().contains("insufficient_quota"),
                "{}",
                next.describe()
            );
            assert!(
                next.stdout()
                    .to_lowercase()
                    .contains("x-interceptor-rule: shared-day"),
                "{}",
                next.describe()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never saw the other node's use: {}",
            next.describe()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.daemon.metric("interceptor_budget_store_up").unwrap_or(0.0), 1.0);
}
