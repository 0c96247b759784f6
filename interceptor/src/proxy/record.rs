//! The record of a finished exchange: priced, counted in the metrics and logged as one structured
//! `request` line. A stream that ended without usage but with its text kept is first estimated with
//! the tokenizer, on the blocking pool (CPU work stays off the I/O threads), a bounded number at a
//! time ([`super::estimates`]).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use interceptor_protocols::estimate::{Encoding, Prompt, estimate};
use interceptor_protocols::{Accounting, Route, UsageStatus};
use tracing::info;

use super::exchange::{ConnInfo, QuotaVerdict, RequestSide, ResponseMeta, header_text};
use crate::accounting::{AccountingSettings, Measured, Priced};
use crate::audit::{AuditEntry, AuditTokens};
use crate::kubernetes::{PodIdentity, PodStatus};
use crate::metric_labels::IdentityValues;

/// Everything known about one exchange when its last body is gone.
pub struct Record {
    pub conn: Arc<ConnInfo>,
    pub settings: Arc<AccountingSettings>,
    pub route: Route,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub latency: Duration,
    pub ttfb: Option<Duration>,
    pub ttft: Option<Duration>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub error: Option<String>,
    pub request: Option<RequestSide>,
    pub response: Option<ResponseMeta>,
    pub outcome: Option<Accounting>,
    pub quota: Option<QuotaVerdict>,
    /// Request and response bodies (`audit.content` connections only).
    pub content: Option<crate::audit::CapturedContent>,
    /// Set by [`Record::finish`].
    pub pod: Option<Arc<PodIdentity>>,
    pub pod_status: Option<PodStatus>,
}

impl Record {
    /// Completes the pod (waiting, off the request path, for one not listed yet), estimates (off the
    /// I/O threads) if needed, then records.
    pub fn finish(mut self) {
        let Some(pods) = self.conn.pods.clone() else {
            self.account();
            return;
        };
        if let Some((pod, status)) = pods.settle_now(&self.conn.pod) {
            (self.pod, self.pod_status) = (pod, status);
            self.account();
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    (self.pod, self.pod_status) = pods.settle(&self.conn.pod).await;
                    self.account();
                });
            }
            Err(_) => {
                self.pod_status = Some(PodStatus::Unknown);
                self.account();
            }
        }
    }

    fn account(mut self) {
        if !self.needs_estimate() {
            self.emit(None);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let encoding = self.estimate();
            self.emit(Some(encoding));
            return;
        };
        match self.settings.estimates.admit() {
            Some(admission) => {
                runtime.spawn(admission.run(move || {
                    let encoding = self.estimate();
                    self.emit(Some(encoding));
                }));
            }
            // Too many cut streams already waiting: recorded as they are, usage missing (counted).
            None => self.emit(None),
        }
    }

    /// A stream that ended without usage, whose delivered text was kept.
    fn needs_estimate(&self) -> bool {
        self.outcome
            .as_ref()
            .is_some_and(|o| o.usage.is_none() && o.kept_events.is_some() && o.status == UsageStatus::Missing)
    }

    /// The model the provider says it ran, else the one asked for, else the one in the path.
    fn model(&self) -> Option<&str> {
        model_of(&self.route, self.request.as_ref(), self.outcome.as_ref())
    }

    /// Counts the prompt and the delivered output with the model's tokenizer.
    fn estimate(&mut self) -> Encoding {
        let model = self.model().unwrap_or_default().to_owned();
        let encoding = Encoding::for_model(&model);
        let prompt = self
            .request
            .as_ref()
            .and_then(|r| r.prompt_source.as_ref())
            .and_then(|kept| Prompt::from_request(&kept.body).ok());
        if let Some(outcome) = self.outcome.as_mut() {
            let output = outcome
                .kept_events
                .as_ref()
                .map(|kept| kept.output_text())
                .unwrap_or_default();
            outcome.usage = Some(estimate(&model, prompt.as_ref(), &output));
            outcome.status = UsageStatus::Estimated;
        }
        encoding
    }

    fn emit(mut self, estimated_with: Option<Encoding>) {
        let permit = self.quota.as_mut().and_then(|q| q.permit.take());
        let facts = &self.conn.facts;
        let details = &self.conn.details;
        let pod = self.pod.as_deref();
        let pod_name = match (pod, self.pod_status) {
            (Some(pod), _) => Some(&*pod.name),
            (None, Some(PodStatus::Unknown)) => Some("unknown"),
            _ => None,
        };
        let outcome = self.outcome.as_ref();
        let request = self.request.as_ref();
        let response = self.response.as_ref();
        // Borrows only the fields it reads, so the path and error can be moved into the audit entry.
        let model = model_of(&self.route, self.request.as_ref(), self.outcome.as_ref());
        let usage = outcome.and_then(|o| o.usage);
        let settings = &self.settings;
        let provider = &*self.conn.provider;
        let status = self.status;
        let priced = settings.price(provider, self.conn.adapter, model, usage.as_ref());
        let cost_for_quota = match &priced {
            Priced::Priced { cost, .. } => cost.usd(),
            _ => 0.0,
        };
        if let Some(permit) = permit {
            permit.settle(usage.as_ref(), cost_for_quota);
        }
        let quota = self.quota.as_ref();
        let workload = pod.map(|p| p.workload.to_string());
        settings.metrics.record(
            &Measured {
                provider,
                adapter: self.conn.adapter,
                kind: self.route.kind,
                status,
                host: &self.conn.sni,
                requested_model: request.and_then(|r| r.model.as_deref()),
                response_model: outcome.and_then(|o| o.observation.model.as_deref()),
                accounting: outcome,
                priced: &priced,
                identity: IdentityValues {
                    namespace: pod.map_or("", |p| &*p.namespace),
                    workload: workload.as_deref().unwrap_or(""),
                    pod: pod_name.unwrap_or(""),
                    process: details
                        .exe
                        .as_deref()
                        .and_then(|e| e.file_name())
                        .and_then(|n| n.to_str())
                        .unwrap_or(facts.comm.as_str()),
                },
                duration: self.latency,
                // The conventions define the first chunk for streamed responses only.
                first_chunk: self.ttfb.filter(|_| outcome.is_some_and(|o| o.stream)),
            },
            Some(&self.conn.metric_handles),
        );
        if let Some(ttft) = self.ttft {
            settings
                .metrics
                .time_to_first_token
                .with_label_values(&[provider])
                .observe(ttft.as_secs_f64());
        }
        let (priced_as, cost_usd, cost_picodollars) = match &priced {
            Priced::Priced { priced_as, cost } => (
                Some(&**priced_as),
                Some(cost.usd()),
                u64::try_from(cost.picodollars).ok(),
            ),
            _ => (None, None, None),
        };
        let error_info = outcome.and_then(|o| o.observation.error.as_ref());
        info!(
            target: crate::logging::REQUEST_TARGET,
            host = %self.conn.sni,
            provider,
            kind = self.route.kind.name(),
            model,
            requested_model = request.and_then(|r| r.model.as_deref()),
            deployment = self.route.path_model.as_deref().filter(|_| self.route.path_model_is_deployment),
            stream = outcome.map(|o| o.stream),
            usage_status = outcome.map_or("none", |o| o.status.name()),
            estimated_with = estimated_with.map(Encoding::name),
            input_tokens = usage.map(|u| u.input_tokens),
            cached_input_tokens = usage.map(|u| u.cached_input_tokens),
            cache_write_tokens = usage.map(|u| u.cache_write_tokens),
            output_tokens = usage.map(|u| u.output_tokens),
            reasoning_tokens = usage.map(|u| u.reasoning_tokens),
            cost_status = priced.status(),
            decision = quota.map(|q| q.decision),
            rule = quota.and_then(|q| q.rule.as_deref()),
            limit = quota.and_then(|q| q.limit),
            priced_as,
            cost_usd,
            cost_picodollars,
            ttft_ms = self.ttft.map(|d| d.as_secs_f64() * 1000.0),
            usage_injected = request.map(|r| r.usage_injected),
            request_body_unread = request.and_then(|r| r.unread),
            request_id = header_text(response.and_then(|r| r.request_id.as_ref())),
            response_id = outcome.and_then(|o| o.observation.response_id.as_deref()),
            provider_error = error_info.map(|e| e.kind.as_str()),
            provider_error_code = error_info.and_then(|e| e.code.as_deref()),
            retry_after = header_text(response.and_then(|r| r.retry_after.as_ref())),
            ratelimit_remaining_requests = header_text(response.and_then(|r| r.remaining_requests.as_ref())),
            ratelimit_remaining_tokens = header_text(response.and_then(|r| r.remaining_tokens.as_ref())),
            accounting_problem = outcome.and_then(|o| o.problem.as_deref()),
            method = %self.method,
            path = %self.path,
            status,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            latency_ms = self.latency.as_secs_f64() * 1000.0,
            ttfb_ms = self.ttfb.map(|d| d.as_secs_f64() * 1000.0),
            error = self.error.as_deref(),
            original_dst = %facts.original_dst,
            tgid = facts.tgid,
            uid = facts.uid,
            comm = %facts.comm,
            exe = details.exe.as_ref().map(|p| p.display().to_string()),
            namespace = pod.map(|p| &*p.namespace),
            pod = pod_name,
            workload = workload.as_deref(),
            service_account = pod.and_then(|p| p.service_account.as_deref()),
            pod_status = self.pod_status.map(PodStatus::name),
            cgroup = details.cgroup.as_deref(),
            pod_uid = details.placement.pod_uid.as_deref(),
            qos_class = details.placement.qos.map(|q| q.name()),
            container_runtime = details.placement.container.as_ref().map(|c| c.runtime.name()),
            container_id = details.placement.container.as_ref().map(|c| c.id.as_str()),
            systemd_unit = details.placement.systemd_unit.as_deref(),
            cgroup_id = facts.cgroup_id,
            "request"
        );
        let identity_key: Cow<'_, str> = match (pod, &workload) {
            (Some(pod), Some(workload)) => Cow::Owned(format!("{}/{workload}", pod.namespace)),
            _ => details
                .placement
                .systemd_unit
                .as_deref()
                .map(Cow::Borrowed)
                .or_else(|| details.exe.as_deref().map(Path::to_string_lossy))
                .unwrap_or(Cow::Borrowed(&facts.comm)),
        };
        let now = crate::quota::window::unix_now();
        settings.board.record(
            &identity_key,
            usage.map_or(0, |u| u.input_tokens + u.output_tokens),
            cost_usd.unwrap_or(0.0),
            now,
        );
        if quota.is_some_and(|q| q.decision == "rejected") {
            settings.board.rejected(crate::status::RecentRejection {
                at: now,
                identity: identity_key.into_owned(),
                provider: provider.to_owned(),
                model: model.map(str::to_owned),
                rule: quota.and_then(|q| q.rule.as_deref()).map(str::to_owned),
                limit: quota.and_then(|q| q.limit).map(str::to_owned),
                status,
            });
        }
        if let Some(audit) = &settings.audit {
            let entry = AuditEntry {
                time: std::time::SystemTime::now(),
                id: uuid::Uuid::now_v7(),
                conn: self.conn.clone(),
                pod: self.pod.clone(),
                pod_status: self.pod_status,
                endpoint: self.route.kind.name(),
                method: self.method.clone(),
                path: std::mem::take(&mut self.path),
                model: model.map(str::to_owned),
                requested_model: request.and_then(|r| r.model.clone()),
                stream: outcome.map_or_else(|| request.is_some_and(|r| r.stream), |o| o.stream),
                status,
                usage: outcome.map_or("none", |o| o.status.name()),
                tokens: usage.map(|u| AuditTokens {
                    input: u.input_tokens,
                    cached_input: u.cached_input_tokens,
                    cache_write: u.cache_write_tokens,
                    output: u.output_tokens,
                    reasoning: u.reasoning_tokens,
                }),
                estimated: outcome.is_some_and(|o| o.status == UsageStatus::Estimated),
                cost_usd,
                latency_ms: self.latency.as_secs_f64() * 1000.0,
                ttfb_ms: self.ttfb.map(|d| d.as_secs_f64() * 1000.0),
                ttft_ms: self.ttft.map(|d| d.as_secs_f64() * 1000.0),
                decision: quota.map(|q| q.decision),
                rule: quota.and_then(|q| q.rule.clone()),
                limit: quota.and_then(|q| q.limit),
                provider_request_id: response.and_then(|r| r.request_id.clone()),
                response_id: outcome.and_then(|o| o.observation.response_id.clone()),
                error: self.error.take(),
                content: self.content.take(),
            };
            audit.record(entry);
        }
    }
}

/// The model the provider says it ran, else the one asked for, else the one in the path.
fn model_of<'a>(
    route: &'a Route,
    request: Option<&'a RequestSide>,
    outcome: Option<&'a Accounting>,
) -> Option<&'a str> {
    let requested = request.and_then(|r| r.model.as_deref());
    let path_model = route
        .path_model
        .as_deref()
        .filter(|_| !route.path_model_is_deployment);
    outcome
        .and_then(|o| o.observation.model.as_deref())
        .or(requested)
        .or(path_model)
}
