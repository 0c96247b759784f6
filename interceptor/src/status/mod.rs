//! The live view of a running daemon: `interceptor status` and `interceptor top` read it through a
//! Unix socket only root can open (mode 0600 in a 0700 directory), never over the network.

mod board;
mod render;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use board::{RecentRejection, StatusBoard, TopLists, TopRow, Totals};
pub use render::render;

use crate::quota::QuotaEngine;

/// Rows per top list.
const TOP_ROWS: usize = 10;

/// A redirected destination and where it comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetView {
    pub domain: String,
    pub address: String,
    /// static (policy), resolved (the daemon's DNS) or learned (DNS answers workloads received).
    pub source: String,
}

/// An active rule and its limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleView {
    pub name: String,
    pub mode: String,
    pub per: String,
    /// `requestsPerMinute=60, costPerDayUsd=50, ...` and model lists.
    pub limits: String,
}

/// What `interceptor status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub failure_mode: String,
    pub programs: Vec<String>,
    pub targets: Vec<TargetView>,
    pub top: TopLists,
    pub rules: Vec<RuleView>,
    pub rejections: Vec<RecentRejection>,
}

/// Where the status comes from.
pub struct StatusSources {
    pub started: Instant,
    pub failure_mode: &'static str,
    pub programs: Vec<String>,
    pub targets: Arc<ArcSwap<Vec<TargetView>>>,
    pub quota: Arc<QuotaEngine>,
    pub board: Arc<StatusBoard>,
}

impl StatusSources {
    pub fn snapshot(&self) -> Status {
        let now = crate::quota::window::unix_now();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            failure_mode: self.failure_mode.to_owned(),
            programs: self.programs.clone(),
            targets: self.targets.load().as_ref().clone(),
            top: self.board.top(now, TOP_ROWS),
            rules: self.quota.rule_views(),
            rejections: self.board.rejections(),
        }
    }
}

/// Errors of the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("admin socket {0}: {1}")]
    Socket(PathBuf, std::io::Error),
    #[error("admin socket {0}: {1} (is the daemon running, and are you root?)")]
    Connect(PathBuf, std::io::Error),
    #[error("admin socket {0}: {1}")]
    Http(PathBuf, String),
}

/// Binds the admin socket (0600); a directory it needs is created 0700, an existing one is left as
/// it is (it may be shared, like `/tmp`); a stale socket is replaced.
pub fn bind(path: &Path) -> Result<UnixListener, StatusError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let socket_error = |e| StatusError::Socket(path.to_owned(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(socket_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale admin socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
    Ok(listener)
}

/// Serves `GET /status` on the admin socket until `shutdown`, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    sources: Arc<StatusSources>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let sources = sources.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&sources, &request)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin socket connection failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn route(sources: &StatusSources, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/status") => match serde_json::to_vec(&sources.snapshot()) {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string().into_bytes()),
        },
        _ => (StatusCode::NOT_FOUND, b"not found\n".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Reads the status of the daemon listening on `path`.
pub async fn fetch(path: &Path) -> Result<Status, StatusError> {
    let http = |e: String| StatusError::Http(path.to_owned(), e);
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| StatusError::Connect(path.to_owned(), e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    tokio::spawn(connection);
    let request = Request::get("/status")
        .header(hyper::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(http(format!("{status}: {}", String::from_utf8_lossy(&body))));
    }
    serde_json::from_slice(&body).map_err(|e| http(format!("unreadable status: {e}")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    }

    /// An existing directory keeps its mode (the daemon once made a shared `/tmp` 0700); a missing
    /// one is created 0700; the socket is 0600.
    #[tokio::test]
    async fn bind_leaves_an_existing_directory_alone() {
        let shared = std::env::temp_dir().join(format!("ict-admin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&shared);
        std::fs::create_dir_all(&shared).expect("dir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let socket = shared.join("admin.sock");
        let listener = bind(&socket).expect("bind");
        assert_eq!(mode(&shared), 0o1777, "an existing directory is not changed");
        assert_eq!(mode(&socket), 0o600);
        drop(listener);

        let private = shared.join("run/interceptor");
        let listener = bind(&private.join("admin.sock")).expect("bind");
        assert_eq!(mode(&private), 0o700, "a created directory is private");
        drop(listener);
        let _ = std::fs::remove_dir_all(&shared);
    }
}
