//! Cluster-wide budgets in Redis: every `syncInterval` each node pushes the day and month use it
//! settled since its last push and reads back every node's total, in one atomic Lua script
//! (`INCRBYFLOAT` + `EXPIRE` per budget key). Decisions stay local (no Redis call on the request
//! path); a node learns the others' use within one interval. If Redis cannot be reached, unpushed use
//! is kept for the next push and the node either goes on with what it knows (`onUnavailable: local`)
//! or rejects requests under budgeted rules (`reject`).

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::ConnectionManager;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::engine::{BudgetKind, BudgetRecord, QuotaEngine};

/// The policy's `budgetStore` section.
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetStoreSpec {
    /// Share day and month budgets across nodes through Redis.
    #[serde(default)]
    pub redis: Option<RedisSpec>,
    /// What budgeted rules do while Redis cannot be reached.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS).
    pub url: String,
    /// Prefix of every key (default `interceptor`).
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// How often use is pushed and totals read back (default 500 ms): the most another node's use can
    /// lag behind.
    #[serde(default = "default_sync_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub sync_interval: Duration,
    /// Timeout of one push (default 1 s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_prefix() -> String {
    "interceptor".into()
}

fn default_sync_interval() -> Duration {
    Duration::from_millis(500)
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Enforce with this node's own use and the last totals read (default).
    #[default]
    Local,
    /// Reject requests under rules with day or month budgets (fail closed).
    Reject,
}

impl RedisSpec {
    /// Checks the URL without connecting.
    pub fn validate(&self) -> Result<(), (String, String)> {
        redis::Client::open(self.url.as_str())
            .map(|_| ())
            .map_err(|e| ("url".into(), format!("{:?} is not a Redis URL: {e}", self.url)))?;
        if self.sync_interval < Duration::from_millis(50) || self.timeout.is_zero() {
            return Err((
                "syncInterval".into(),
                "must be at least 50ms, and timeout positive".into(),
            ));
        }
        Ok(())
    }
}

/// Metrics of the cluster-wide store.
#[derive(Clone)]
pub struct ClusterMetrics {
    up: IntGauge,
    syncs: IntCounterVec,
}

impl ClusterMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let up = IntGauge::new(
            "interceptor_budget_store_up",
            "1 while the cluster-wide budget store (Redis) answers, 0 while budgets fall back",
        )?;
        let syncs = IntCounterVec::new(
            Opts::new(
                "interceptor_budget_store_syncs_total",
                "Pushes of budget use to the cluster-wide store, by result (success, failure)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(syncs.clone()))?;
        Ok(Self { up, syncs })
    }
}

/// Adds each delta and reads back the total, atomically for all keys; keys expire after their window.
const SYNC_SCRIPT: &str = r"
local totals = {}
for i, key in ipairs(KEYS) do
  local total = redis.call('INCRBYFLOAT', key, ARGV[2 * i - 1])
  redis.call('EXPIRE', key, ARGV[2 * i])
  totals[i] = total
end
return totals
";

fn key(prefix: &str, record: &BudgetRecord) -> String {
    let kind = match record.budget {
        BudgetKind::TokensDay => "tokens_day",
        BudgetKind::CostDay => "cost_day",
        BudgetKind::CostMonth => "cost_month",
    };
    format!(
        "{prefix}:budget:{}:{}:{kind}:{}",
        record.rule,
        record.scope.as_deref().unwrap_or("-"),
        record.window
    )
}

/// Seconds a key is kept: its window (a day, or 31 days) and one more day.
fn ttl(record: &BudgetRecord) -> u64 {
    match record.budget {
        BudgetKind::TokensDay | BudgetKind::CostDay => 2 * 86_400,
        BudgetKind::CostMonth => 32 * 86_400,
    }
}

/// Pushes deltas and returns the totals.
pub async fn push(
    connection: &mut ConnectionManager,
    prefix: &str,
    deltas: &[BudgetRecord],
) -> redis::RedisResult<Vec<BudgetRecord>> {
    let script = redis::Script::new(SYNC_SCRIPT);
    let mut invocation = script.prepare_invoke();
    for record in deltas {
        invocation.key(key(prefix, record));
        invocation.arg(record.used).arg(ttl(record));
    }
    let totals: Vec<String> = invocation.invoke_async(connection).await?;
    Ok(deltas
        .iter()
        .zip(totals)
        .map(|(record, total)| BudgetRecord {
            used: total.parse().unwrap_or(record.used),
            ..record.clone()
        })
        .collect())
}

/// Syncs until `stop` (one last push then).
pub async fn run(
    engine: Arc<QuotaEngine>,
    spec: RedisSpec,
    on_unavailable: OnUnavailable,
    metrics: ClusterMetrics,
    stop: CancellationToken,
) {
    let client = match redis::Client::open(spec.url.as_str()) {
        Ok(client) => client,
        Err(e) => {
            warn!(error = %e, "cluster-wide budgets disabled: bad Redis URL");
            return;
        }
    };
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(spec.timeout))
        .set_response_timeout(Some(spec.timeout))
        .set_number_of_retries(1);
    let mut connection: Option<ConnectionManager> = None;
    let mut healthy = None;
    let mut tick = tokio::time::interval(spec.sync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let result = async {
            if connection.is_none() {
                connection = Some(
                    tokio::time::timeout(
                        spec.timeout,
                        client.get_connection_manager_with_config(config.clone()),
                    )
                    .await
                    .map_err(|_| "connecting timed out".to_owned())?
                    .map_err(|e| e.to_string())?,
                );
            }
            let Some(connection) = connection.as_mut() else {
                return Err("no connection".to_owned());
            };
            let deltas = engine.take_cluster_deltas();
            if deltas.is_empty() {
                return Ok(());
            }
            match tokio::time::timeout(spec.timeout, push(connection, &spec.key_prefix, &deltas)).await {
                Ok(Ok(totals)) => {
                    engine.apply_cluster_totals(&totals);
                    Ok(())
                }
                Ok(Err(e)) => {
                    engine.return_cluster_deltas(&deltas);
                    Err(e.to_string())
                }
                Err(_) => {
                    engine.return_cluster_deltas(&deltas);
                    Err("push timed out".to_owned())
                }
            }
        }
        .await;
        match result {
            Ok(()) => {
                metrics.syncs.with_label_values(&["success"]).inc();
                metrics.up.set(1);
                engine.set_cluster_unavailable(false);
                if healthy != Some(true) {
                    info!(url = %redacted(&spec.url), "cluster-wide budgets in sync");
                }
                healthy = Some(true);
            }
            Err(error) => {
                metrics.syncs.with_label_values(&["failure"]).inc();
                metrics.up.set(0);
                engine.set_cluster_unavailable(on_unavailable == OnUnavailable::Reject);
                if healthy != Some(false) {
                    warn!(error = %error, url = %redacted(&spec.url), fallback = ?on_unavailable, "cluster-wide budget store unreachable; retrying every sync interval");
                }
                healthy = Some(false);
            }
        }
        if stopping {
            break;
        }
    }
}

/// The URL without its password.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_rule_scope_budget_and_window() {
        let record = BudgetRecord {
            rule: "team-a".into(),
            scope: None,
            budget: BudgetKind::CostDay,
            window: 20_781,
            used: 1.0,
        };
        assert_eq!(
            key("interceptor", &record),
            "interceptor:budget:team-a:-:cost_day:20781"
        );
        assert_eq!(ttl(&record), 172_800);
        assert_eq!(
            redacted("redis://user:secret@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(redacted("redis://redis:6379"), "redis://redis:6379");
    }

    #[test]
    fn bad_urls_and_intervals_are_explained() {
        let spec = |url: &str, ms: u64| RedisSpec {
            url: url.into(),
            key_prefix: default_prefix(),
            sync_interval: Duration::from_millis(ms),
            timeout: default_timeout(),
        };
        assert!(spec("redis://127.0.0.1:6379", 500).validate().is_ok());
        assert_eq!(
            spec("http://x", 500).validate().map_err(|e| e.0),
            Err("url".into())
        );
        assert_eq!(
            spec("redis://x", 10).validate().map_err(|e| e.0),
            Err("syncInterval".into())
        );
    }
}
