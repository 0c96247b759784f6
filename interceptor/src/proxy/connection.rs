//! One accepted connection: who made it (kernel record), what it is (ClientHello), and whether it is
//! terminated (provider SNI) or relayed untouched (other SNI, no SNI, bypassed process).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::classify::{self, Hello};
use super::exchange::ConnInfo;
use super::http::{self, HttpContext};
use super::passthrough;
use super::replayed::Replayed;
use super::{ProxyContext, ProxyError};
use crate::identity::{Identity, KernelFacts, ProcessDetails};
use crate::kubernetes::PodIdentity;

/// How a connection was handled (log field `mode`, metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Terminated,
    UnlistedSni,
    NoSni,
    Bypassed,
    NotTls,
    ServerFirst,
    ClientRejectedCertificate,
    HandshakeFailed,
    ClosedEarly,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Terminated => "terminated",
            Mode::UnlistedSni => "passthrough_unlisted_sni",
            Mode::NoSni => "passthrough_no_sni",
            Mode::Bypassed => "passthrough_bypassed",
            Mode::NotTls => "passthrough_not_tls",
            Mode::ServerFirst => "passthrough_server_first",
            Mode::ClientRejectedCertificate => "client_rejected_certificate",
            Mode::HandshakeFailed => "handshake_failed",
            Mode::ClosedEarly => "closed_before_hello",
        }
    }
}

/// Handles one accepted connection and logs one line when it ends.
pub async fn handle(
    ctx: &Arc<ProxyContext>,
    mut client: TcpStream,
    peer: SocketAddr,
    abort: CancellationToken,
) {
    let started = Instant::now();
    let metrics = &ctx.metrics;
    let Some(record) = ctx.attribution.take(peer) else {
        let error = ProxyError::NoRecord(peer);
        metrics.connections.with_label_values(&["no_record"]).inc();
        metrics.errors.with_label_values(&[error.origin()]).inc();
        warn!(error = %error, "connection refused");
        return;
    };
    metrics.active.inc();
    let facts = KernelFacts::from(&record);
    let mut buffer = Vec::with_capacity(2048);
    let hello = classify::read_client_hello(
        &mut client,
        &mut buffer,
        ctx.first_byte_timeout,
        ctx.hello_timeout,
    );
    let (details, hello) = match ctx.enricher.cached(&facts) {
        Some(details) => (details, hello.await),
        None => {
            let enricher = ctx.enricher.clone();
            let facts_for_details = facts.clone();
            let details = tokio::task::spawn_blocking(move || enricher.details(&facts_for_details));
            let (details, hello) = tokio::join!(details, hello);
            (details.unwrap_or_default(), hello)
        }
    };
    let pod = ctx
        .pods
        .as_ref()
        .map(|pods| pods.lookup(details.placement.pod_uid.as_deref()))
        .unwrap_or_default();

    let (mode, sni, outcome) = match hello {
        Hello::Closed => (Mode::ClosedEarly, None, Ok((0, 0))),
        // Not TLS (or a server-speaks-first protocol): nothing to terminate, relay it untouched.
        Hello::NotTls(reason) => {
            warn!(client = %peer, reason = %reason, tgid = facts.tgid, comm = %facts.comm, "not a TLS ClientHello; relaying untouched");
            (
                Mode::NotTls,
                None,
                relay(ctx, &mut client, &buffer, facts.original_dst, &abort).await,
            )
        }
        Hello::Silent => (
            Mode::ServerFirst,
            None,
            relay(ctx, &mut client, &buffer, facts.original_dst, &abort).await,
        ),
        Hello::Tls { sni, alpn } => {
            let identity = Identity {
                facts: &facts,
                details: &details,
                pod: pod.known(),
            };
            let bypassed = ctx.bypass.load().iter().any(|m| m.matches(&identity));
            let content = ctx.audit_content.load();
            let content_limit = content
                .matchers
                .iter()
                .any(|m| m.matches(&identity))
                .then_some(content.max_bytes);
            let provider = sni.as_deref().and_then(|name| ctx.provider(name)).cloned();
            let mode = match (&sni, &provider) {
                _ if bypassed => Mode::Bypassed,
                (None, _) => Mode::NoSni,
                (Some(_), None) => Mode::UnlistedSni,
                (Some(_), Some(_)) => Mode::Terminated,
            };
            match (mode, provider) {
                (Mode::Terminated, Some(provider)) => {
                    let offered_h2 = alpn.iter().any(|p| p == b"h2");
                    let conn = Arc::new(ConnInfo {
                        facts: facts.clone(),
                        details: details.clone(),
                        pod: pod.clone(),
                        pods: ctx.pods.clone(),
                        sni: sni.clone().unwrap_or_default().to_ascii_lowercase(),
                        provider: provider.name,
                        adapter: provider.adapter,
                        content_limit,
                        metric_handles: Default::default(),
                    });
                    let (mode, outcome) = terminate(ctx, client, buffer, conn, offered_h2, &abort).await;
                    (mode, sni, outcome)
                }
                (mode, _) => (
                    mode,
                    sni,
                    relay(ctx, &mut client, &buffer, facts.original_dst, &abort).await,
                ),
            }
        }
    };
    metrics.active.dec();
    metrics.tls_handshakes.with_label_values(&[mode.name()]).inc();
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed.as_secs_f64());
    match &outcome {
        Ok((up, down)) => {
            metrics.connections.with_label_values(&["completed"]).inc();
            metrics.bytes.with_label_values(&["upstream"]).inc_by(*up);
            metrics.bytes.with_label_values(&["downstream"]).inc_by(*down);
        }
        Err(_) => metrics.connections.with_label_values(&["failed"]).inc(),
    }
    log_connection(
        peer,
        &facts,
        &details,
        pod.known(),
        mode,
        sni.as_deref(),
        &outcome,
        elapsed.as_secs_f64() * 1000.0,
    );
}

/// Relays the connection untouched, replaying the bytes already read.
async fn relay(
    ctx: &ProxyContext,
    client: &mut TcpStream,
    buffer: &[u8],
    original_dst: SocketAddr,
    abort: &CancellationToken,
) -> Result<(u64, u64), String> {
    passthrough::relay(client, buffer, original_dst, ctx.upstream_connect_timeout, abort)
        .await
        .map_err(|e| e.to_string())
}

/// TLS with a minted leaf, then HTTP. Returns the mode (the handshake may fail) and the byte counts
/// (counted per request; 0 here).
async fn terminate(
    ctx: &Arc<ProxyContext>,
    client: TcpStream,
    buffer: Vec<u8>,
    conn: Arc<ConnInfo>,
    offered_h2: bool,
    abort: &CancellationToken,
) -> (Mode, Result<(u64, u64), String>) {
    let config = match ctx.leaves.server_config(&conn.sni).await {
        Ok(config) => config,
        Err(e) => return (Mode::HandshakeFailed, Err(e.to_string())),
    };
    // Replay the ClientHello bytes already read, then the rest of the stream.
    let io = Replayed::new(buffer, client);
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        start.into_stream(config).await
    };
    let tls = match tokio::time::timeout(ctx.hello_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return (
                classify_handshake_error(&e),
                Err(format!("TLS handshake with the client: {e}")),
            );
        }
        Err(_) => {
            return (
                Mode::HandshakeFailed,
                Err("TLS handshake with the client timed out".into()),
            );
        }
    };
    let original_dst = conn.facts.original_dst;
    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let forward = if http2 {
        http::Forward::Pooled(ctx.upstream.client(original_dst, offered_h2))
    } else {
        match ctx.upstream.lease(original_dst, &conn.sni) {
            Ok(lease) => http::Forward::Http1(lease),
            Err(e) => return (Mode::Terminated, Err(e.to_string())),
        }
    };
    let http_ctx = Arc::new(HttpContext {
        original_dst,
        forward,
        upstream: ctx.upstream.clone(),
        conn,
        metrics: ctx.metrics.clone(),
        accounting: ctx.accounting.clone(),
        quota: ctx.quota.clone(),
    });
    tokio::select! {
        result = http::serve(tls, http_ctx, http2) => (Mode::Terminated, result.map(|()| (0, 0))),
        _ = abort.cancelled() => (Mode::Terminated, Err("aborted at shutdown".into())),
    }
}

/// A client that does not trust the CA aborts the handshake with an alert.
fn classify_handshake_error(error: &std::io::Error) -> Mode {
    let rustls_error = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::AlertReceived(alert)) => {
            use rustls::AlertDescription::*;
            match alert {
                UnknownCA
                | BadCertificate
                | CertificateUnknown
                | UnsupportedCertificate
                | AccessDenied
                | DecryptError => Mode::ClientRejectedCertificate,
                _ => Mode::HandshakeFailed,
            }
        }
        _ => Mode::HandshakeFailed,
    }
}

#[allow(clippy::too_many_arguments)]
fn log_connection(
    peer: SocketAddr,
    facts: &KernelFacts,
    details: &ProcessDetails,
    pod: Option<&PodIdentity>,
    mode: Mode,
    sni: Option<&str>,
    outcome: &Result<(u64, u64), String>,
    duration_ms: f64,
) {
    let exe = details.exe.as_ref().map(|p| p.display().to_string());
    let (bytes_up, bytes_down, error) = match outcome {
        Ok((up, down)) => (*up, *down, None),
        Err(e) => (0, 0, Some(e.as_str())),
    };
    info!(
        client = %peer,
        original_dst = %facts.original_dst,
        mode = mode.name(),
        sni,
        tgid = facts.tgid,
        pid = facts.pid,
        uid = facts.uid,
        gid = facts.gid,
        user = details.user.as_deref(),
        comm = %facts.comm,
        exe = exe.as_deref(),
        cmdline = details.cmdline.as_deref(),
        cmdline_hash = details.cmdline_hash.as_deref(),
        cgroup_id = facts.cgroup_id,
        cgroup = details.cgroup.as_deref(),
        namespace = pod.map(|p| &*p.namespace),
        pod = pod.map(|p| &*p.name),
        workload = pod.map(|p| p.workload.to_string()),
        service_account = pod.and_then(|p| p.service_account.as_deref()),
        pod_labels = pod.map(|p| p.labels_text()),
        node = pod.and_then(|p| p.node.as_deref()),
        pod_uid = details.placement.pod_uid.as_deref(),
        qos_class = details.placement.qos.map(|q| q.name()),
        container_runtime = details.placement.container.as_ref().map(|c| c.runtime.name()),
        container_id = details.placement.container.as_ref().map(|c| c.id.as_str()),
        systemd_unit = details.placement.systemd_unit.as_deref(),
        netns_cookie = facts.netns_cookie,
        bytes_up,
        bytes_down,
        duration_ms,
        error,
        "connection closed"
    );
}
