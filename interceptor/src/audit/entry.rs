//! One audit line. The entry holds what the record already has (shared identity, moved strings) and
//! is turned into JSON on the writer thread, so the data path neither formats nor copies identities.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use http::HeaderValue;
use serde::Serialize;
use serde::ser::SerializeMap as _;
use serde_json::value::RawValue;

use crate::kubernetes::{PodIdentity, PodStatus};
use crate::proxy::exchange::ConnInfo;

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct AuditTokens {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
}

/// One request, as the audit log records it. Prompt and completion text are never part of it.
pub struct AuditEntry {
    /// When the exchange ended.
    pub time: SystemTime,
    /// The interceptor's id of the request (UUID v7: ordered by time).
    pub id: uuid::Uuid,
    /// Who (kernel facts, process details) and where to (provider, host).
    pub conn: Arc<ConnInfo>,
    pub pod: Option<Arc<PodIdentity>>,
    pub pod_status: Option<PodStatus>,
    pub endpoint: &'static str,
    pub method: http::Method,
    pub path: String,
    pub model: Option<String>,
    pub requested_model: Option<String>,
    pub stream: bool,
    pub status: u16,
    /// How usage was known: reported, estimated, missing, none...
    pub usage: &'static str,
    pub tokens: Option<AuditTokens>,
    /// The token counts are a tokenizer estimate, not the provider's report.
    pub estimated: bool,
    pub cost_usd: Option<f64>,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    /// The quota decision: allowed, rejected, observed (absent when no rule applied).
    pub decision: Option<&'static str>,
    pub rule: Option<Arc<str>>,
    pub limit: Option<&'static str>,
    /// The provider's request id header, when it sent one.
    pub provider_request_id: Option<HeaderValue>,
    pub response_id: Option<String>,
    pub error: Option<String>,
    /// Request and response bodies, only for identities the policy's `audit.content` selects.
    pub content: Option<super::CapturedContent>,
}

/// RFC 3339 with milliseconds, UTC.
fn rfc3339(time: SystemTime) -> String {
    let time = time::OffsetDateTime::from(time);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time.format(&format)
        .unwrap_or_else(|_| time.unix_timestamp().to_string())
}

/// The `identity` object.
struct Identity<'a>(&'a AuditEntry);

impl Serialize for Identity<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entry = self.0;
        let facts = &entry.conn.facts;
        let details = &entry.conn.details;
        let mut map = serializer.serialize_map(None)?;
        if let Some(pod) = entry.pod.as_deref() {
            map.serialize_entry("namespace", &*pod.namespace)?;
            map.serialize_entry("pod", &*pod.name)?;
            map.serialize_entry("workload", &pod.workload.to_string())?;
            if let Some(account) = pod.service_account.as_deref() {
                map.serialize_entry("service_account", account)?;
            }
        } else if entry.pod_status == Some(PodStatus::Unknown) {
            map.serialize_entry("pod", "unknown")?;
        }
        if let Some(status) = entry.pod_status {
            map.serialize_entry("pod_status", status.name())?;
        }
        map.serialize_entry("tgid", &facts.tgid)?;
        map.serialize_entry("uid", &facts.uid)?;
        if let Some(user) = details.user.as_deref() {
            map.serialize_entry("user", user)?;
        }
        map.serialize_entry("comm", &facts.comm)?;
        if let Some(exe) = details.exe.as_deref() {
            map.serialize_entry("exe", &exe.display().to_string())?;
        }
        if let Some(hash) = details.cmdline_hash.as_deref() {
            map.serialize_entry("cmdline_hash", hash)?;
        }
        if let Some(cgroup) = details.cgroup.as_deref() {
            map.serialize_entry("cgroup", cgroup)?;
        }
        if let Some(container) = details.placement.container.as_ref() {
            map.serialize_entry("container_id", &container.id)?;
        }
        if let Some(unit) = details.placement.systemd_unit.as_deref() {
            map.serialize_entry("systemd_unit", unit)?;
        }
        map.end()
    }
}

/// The `identity` objects of recent connections, serialized once per connection rather than once
/// per line (a keep-alive connection's requests share their identity; its strings, such as the
/// cgroup path and executable, are most of a line's escaping work). Lives on the writer thread.
#[derive(Default)]
pub struct IdentityCache {
    entries: HashMap<usize, CachedIdentity>,
}

struct CachedIdentity {
    /// Keeps the connection's allocation (not its value) alive, so its address, the key, cannot
    /// name another connection while the entry exists.
    conn: Weak<ConnInfo>,
    pod: Option<Weak<PodIdentity>>,
    pod_status: Option<PodStatus>,
    json: Box<RawValue>,
}

/// Connections whose identity is remembered; past it, the entries of closed connections go first.
const CACHED_IDENTITIES: usize = 4096;

impl IdentityCache {
    /// The entry's `identity` object as JSON.
    fn identity(&mut self, entry: &AuditEntry) -> Result<&RawValue, serde_json::Error> {
        // The cached weak references keep both allocations, so an equal address is the same one.
        let key = Arc::as_ptr(&entry.conn) as usize;
        if self.entries.len() >= CACHED_IDENTITIES && !self.entries.contains_key(&key) {
            self.entries.retain(|_, cached| cached.conn.strong_count() > 0);
            if self.entries.len() >= CACHED_IDENTITIES {
                self.entries.clear();
            }
        }
        let cached = match self.entries.entry(key) {
            Entry::Occupied(slot) if slot.get().describes(entry) => slot.into_mut(),
            Entry::Occupied(mut slot) => {
                slot.insert(CachedIdentity::of(entry)?);
                slot.into_mut()
            }
            Entry::Vacant(slot) => slot.insert(CachedIdentity::of(entry)?),
        };
        Ok(&cached.json)
    }
}

impl CachedIdentity {
    fn of(entry: &AuditEntry) -> Result<Self, serde_json::Error> {
        Ok(Self {
            conn: Arc::downgrade(&entry.conn),
            pod: entry.pod.as_ref().map(Arc::downgrade),
            pod_status: entry.pod_status,
            json: serde_json::value::to_raw_value(&Identity(entry))?,
        })
    }

    /// Whether this is still the identity of `entry` (same pod, same pod status).
    fn describes(&self, entry: &AuditEntry) -> bool {
        self.pod_status == entry.pod_status
            && match (&self.pod, &entry.pod) {
                (Some(cached), Some(pod)) => std::ptr::eq(cached.as_ptr(), Arc::as_ptr(pod)),
                (None, None) => true,
                _ => false,
            }
    }
}

/// One audit line: the entry with its identity already serialized.
pub struct Line<'a> {
    entry: &'a AuditEntry,
    identity: &'a RawValue,
}

impl<'a> Line<'a> {
    pub fn new(entry: &'a AuditEntry, identities: &'a mut IdentityCache) -> Result<Self, serde_json::Error> {
        let identity = identities.identity(entry)?;
        Ok(Self { entry, identity })
    }
}

impl Serialize for Line<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entry = self.entry;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("time", &rfc3339(entry.time))?;
        map.serialize_entry(
            "id",
            entry
                .id
                .as_hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        )?;
        map.serialize_entry("identity", self.identity)?;
        entry.serialize_rest(&mut map)?;
        map.end()
    }
}

impl AuditEntry {
    /// Every member after `identity`.
    fn serialize_rest<M: serde::ser::SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_entry("provider", &*self.conn.provider)?;
        map.serialize_entry("host", &self.conn.sni)?;
        map.serialize_entry("endpoint", self.endpoint)?;
        map.serialize_entry("method", self.method.as_str())?;
        map.serialize_entry("path", &self.path)?;
        if let Some(model) = &self.model {
            map.serialize_entry("model", model)?;
        }
        if let Some(model) = &self.requested_model {
            map.serialize_entry("requested_model", model)?;
        }
        map.serialize_entry("stream", &self.stream)?;
        map.serialize_entry("status", &self.status)?;
        map.serialize_entry("usage", self.usage)?;
        if let Some(tokens) = &self.tokens {
            map.serialize_entry("tokens", tokens)?;
        }
        map.serialize_entry("estimated", &self.estimated)?;
        if let Some(cost) = self.cost_usd {
            map.serialize_entry("cost_usd", &cost)?;
        }
        map.serialize_entry("latency_ms", &self.latency_ms)?;
        if let Some(ttfb) = self.ttfb_ms {
            map.serialize_entry("ttfb_ms", &ttfb)?;
        }
        if let Some(ttft) = self.ttft_ms {
            map.serialize_entry("ttft_ms", &ttft)?;
        }
        if let Some(decision) = self.decision {
            map.serialize_entry("decision", decision)?;
        }
        if let Some(rule) = self.rule.as_deref() {
            map.serialize_entry("rule", rule)?;
        }
        if let Some(limit) = self.limit {
            map.serialize_entry("limit", limit)?;
        }
        if let Some(id) = self.provider_request_id.as_ref().and_then(|v| v.to_str().ok()) {
            map.serialize_entry("provider_request_id", id)?;
        }
        if let Some(id) = &self.response_id {
            map.serialize_entry("response_id", id)?;
        }
        if let Some(error) = &self.error {
            map.serialize_entry("error", error)?;
        }
        if let Some(content) = &self.content {
            map.serialize_entry("content", content)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::{Workload, WorkloadSource};

    fn conn(comm: &str) -> Arc<ConnInfo> {
        crate::proxy::exchange::test_conn(comm, "/kubepods.slice/x \"quoted\"")
    }

    fn entry(conn: &Arc<ConnInfo>, pod: Option<Arc<PodIdentity>>, path: &str) -> AuditEntry {
        AuditEntry {
            time: SystemTime::UNIX_EPOCH,
            id: uuid::Uuid::nil(),
            conn: conn.clone(),
            pod_status: pod.as_ref().map(|_| PodStatus::Known),
            pod,
            endpoint: "chat",
            method: http::Method::POST,
            path: path.into(),
            model: None,
            requested_model: None,
            stream: false,
            status: 200,
            usage: "reported",
            tokens: None,
            estimated: false,
            cost_usd: None,
            latency_ms: 1.0,
            ttfb_ms: None,
            ttft_ms: None,
            decision: None,
            rule: None,
            limit: None,
            provider_request_id: None,
            response_id: None,
            error: None,
            content: None,
        }
    }

    fn line(entry: &AuditEntry, cache: &mut IdentityCache) -> serde_json::Value {
        let text = serde_json::to_string(&Line::new(entry, cache).expect("line")).expect("json");
        serde_json::from_str(&text).expect("one JSON object")
    }

    #[test]
    fn a_connection_identity_is_serialized_once_and_follows_its_pod() {
        let mut cache = IdentityCache::default();
        let first = conn("python3");
        let a = line(&entry(&first, None, "/v1/a"), &mut cache);
        let b = line(&entry(&first, None, "/v1/b"), &mut cache);
        assert_eq!(a["identity"], b["identity"]);
        assert_eq!(a["identity"]["comm"], "python3");
        assert_eq!(a["identity"]["cgroup"], "/kubepods.slice/x \"quoted\"");
        assert_eq!(
            (a["path"].as_str(), b["path"].as_str()),
            (Some("/v1/a"), Some("/v1/b"))
        );
        assert_eq!(a["id"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(cache.entries.len(), 1);
        // The pod was listed after the connection's first request: its next lines name it.
        let pod = Arc::new(PodIdentity {
            uid: "uid-1".into(),
            namespace: "team-a".into(),
            name: "chat-1".into(),
            labels: Box::new([]),
            service_account: None,
            node: None,
            workload: Workload::new("Deployment", "chat"),
            workload_source: WorkloadSource::Resolved,
        });
        let c = line(&entry(&first, Some(pod.clone()), "/v1/c"), &mut cache);
        assert_eq!(c["identity"]["namespace"], "team-a");
        assert_eq!(c["identity"]["workload"], "Deployment/chat");
        // Another connection never gets the first one's identity.
        let second = conn("node");
        let d = line(&entry(&second, None, "/v1/d"), &mut cache);
        assert_eq!(d["identity"]["comm"], "node");
        assert_eq!(cache.entries.len(), 2);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(time), "2026-11-18T11:06:40.123Z");
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        assert!(a < b, "time-ordered ids");
    }
}
