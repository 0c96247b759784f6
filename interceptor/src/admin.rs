//! The admin endpoint: `/metrics`, `/healthz`, `/readyz`. Off the data path, on its own port.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What `/readyz` reports.
#[derive(Default)]
pub struct Readiness {
    programs_attached: AtomicBool,
    targets_installed: AtomicBool,
    ca_loaded: AtomicBool,
}

impl Readiness {
    pub fn set_programs_attached(&self, value: bool) {
        self.programs_attached.store(value, Ordering::Release);
    }
    pub fn set_targets_installed(&self, value: bool) {
        self.targets_installed.store(value, Ordering::Release);
    }
    pub fn set_ca_loaded(&self, value: bool) {
        self.ca_loaded.store(value, Ordering::Release);
    }
    /// Names of the conditions not met yet.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.programs_attached.load(Ordering::Acquire) {
            missing.push("programs_attached");
        }
        if !self.targets_installed.load(Ordering::Acquire) {
            missing.push("targets_installed");
        }
        if !self.ca_loaded.load(Ordering::Acquire) {
            missing.push("ca_loaded");
        }
        missing
    }
}

struct AdminState {
    registry: Registry,
    readiness: Arc<Readiness>,
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let state = Arc::new(AdminState { registry, readiness });
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &request)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut buffer = Vec::new();
            match TextEncoder::new().encode(&state.registry.gather(), &mut buffer) {
                Ok(()) => Response::builder()
                    .header("content-type", prometheus::TEXT_FORMAT)
                    .body(Full::new(Bytes::from(buffer)))
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n".into())),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let missing = state.readiness.missing();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", missing.join(", ")),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
