//! A fake Kubernetes API server, faithful to the API conventions the watch relies on
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//!
//! * `GET` of one object, and list (with `limit`/`continue` pages, `fieldSelector` on
//!   `spec.nodeName`, `metadata.name`, `metadata.namespace`, and equality `labelSelector`) of Pods
//!   (`/api/v1`), ReplicaSets (`/apis/apps/v1`) and Jobs (`/apis/batch/v1`), cluster-wide or in one
//!   namespace; lists carry the collection's `resourceVersion` and omit the items' kind;
//! * `?watch=true&resourceVersion=N`: newline-delimited `ADDED`/`MODIFIED`/`DELETED` events after N,
//!   `BOOKMARK` events when `allowWatchBookmarks=true`, the stream ends after `timeoutSeconds`;
//!   a version older than the compaction point gets an `ERROR` event with a `410 Expired` Status;
//! * bearer-token authentication (401 Status without it), 404 Status for missing objects, 400 for
//!   unsupported field selectors.
//!
//! Test controls: create/update/delete objects, send a bookmark, drop every open watch (a dropped
//! connection), compact history (a 410 on the next resume), stop and restart the server (the API
//! going away), and the log of requests received.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

/// The bearer token the fake accepts.
pub const TOKEN: &str = "fake-kube-token";

/// The resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Pods,
    ReplicaSets,
    Jobs,
}

impl Resource {
    fn from_path(group_version: &str, plural: &str) -> Option<Self> {
        match (group_version, plural) {
            ("api/v1", "pods") => Some(Self::Pods),
            ("apis/apps/v1", "replicasets") => Some(Self::ReplicaSets),
            ("apis/batch/v1", "jobs") => Some(Self::Jobs),
            _ => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::ReplicaSets => "ReplicaSet",
            Self::Jobs => "Job",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Self::Pods => "v1",
            Self::ReplicaSets => "apps/v1",
            Self::Jobs => "batch/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::ReplicaSets => "replicasets",
            Self::Jobs => "jobs",
        }
    }
}

#[derive(Clone, Debug)]
struct Change {
    resource_version: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Cluster {
    resource_version: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version older than this get 410 Gone.
    compacted: u64,
    requests: Vec<String>,
    next_uid: u64,
}

struct Shared {
    cluster: Mutex<Cluster>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch abruptly.
    drops: watch::Sender<u64>,
    /// Bumped to send a bookmark on every open watch that asked for them.
    bookmarks: watch::Sender<u64>,
}

impl Shared {
    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake API server.
pub struct FakeKubeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl FakeKubeApi {
    /// Starts on a free port of 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-kube-api")
            .enable_all()
            .build()
            .context("fake API runtime")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cluster: Mutex::new(Cluster::default()),
            changes: broadcast::channel(1024).0,
            drops: watch::Sender::new(0),
            bookmarks: watch::Sender::new(0),
        });
        let server = runtime.spawn(serve(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            runtime: Some(runtime),
            server: Some(server),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    /// The API goes away: the listener closes and every connection is cut. Returns once connecting
    /// is refused. (Callable from any thread, including inside another runtime.)
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(self.addr).is_ok() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The API comes back on the same address, with the same objects and history.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("rebinding the fake API server on {}", self.addr))?;
        self.server = Some(self.runtime().spawn(serve(listener, self.shared.clone())));
        Ok(())
    }

    /// Creates or replaces an object (`metadata.namespace` and `metadata.name` required); sets its
    /// resourceVersion (and a uid when it has none) and notifies watches. Returns the stored object.
    pub fn apply(&self, resource: Resource, mut object: Value) -> Value {
        let mut cluster = self.shared.cluster();
        cluster.resource_version += 1;
        let rv = cluster.resource_version;
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        if object["metadata"]["uid"].is_null() {
            cluster.next_uid += 1;
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", cluster.next_uid));
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["namespace"] = json!(namespace);
        object["kind"] = json!(resource.kind());
        object["apiVersion"] = json!(resource.api_version());
        let key = (resource, namespace, name);
        let kind = if cluster.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        cluster.objects.insert(key, object.clone());
        let change = Change {
            resource_version: rv,
            resource,
            kind,
            object: object.clone(),
        };
        cluster.history.push(change.clone());
        drop(cluster);
        let _ = self.shared.changes.send(change);
        object
    }

    /// Deletes an object; notifies watches.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut cluster = self.shared.cluster();
        let Some(mut object) = cluster
            .objects
            .remove(&(resource, namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        cluster.resource_version += 1;
        let rv = cluster.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            resource_version: rv,
            resource,
            kind: "DELETED",
            object,
        };
        cluster.history.push(change.clone());
        drop(cluster);
        let _ = self.shared.changes.send(change);
    }

    /// Sends a BOOKMARK (the current resourceVersion) on every open watch that allows them.
    pub fn bookmark(&self) {
        self.shared.bookmarks.send_modify(|g| *g += 1);
    }

    /// Ends every open watch abruptly (the connection drops without a final chunk).
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// Compacts history past every version handed out so far: the next watch resuming from any of
    /// them gets `410 Gone` and must relist.
    pub fn compact(&self) {
        let mut cluster = self.shared.cluster();
        // Like an unrelated write in etcd, so the versions clients hold are all older.
        cluster.resource_version += 1;
        cluster.compacted = cluster.resource_version;
        cluster.history.clear();
    }

    /// Requests received so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.cluster().requests.clone()
    }

    /// Writes a kubeconfig for this server (token auth, plain HTTP on loopback).
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: http://{}
users:
  - name: fake
    user:
      token: {TOKEN}
contexts:
  - name: fake
    context:
      cluster: fake
      user: fake
current-context: fake
",
            self.addr
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A pod on `node` with the given owner (`(apiVersion, kind, name)`), labels and service account.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    labels: &[(&str, &str)],
    owner: Option<(&str, &str, &str)>,
) -> Value {
    let labels: serde_json::Map<String, Value> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    let mut metadata = json!({
        "name": name, "namespace": namespace, "uid": uid, "labels": labels,
        "creationTimestamp": "2026-11-24T10:00:00Z",
    });
    if let Some((api_version, kind, owner_name)) = owner {
        metadata["ownerReferences"] = json!([{
            "apiVersion": api_version, "kind": kind, "name": owner_name,
            "uid": format!("uid-{owner_name}"), "controller": true, "blockOwnerDeletion": true,
        }]);
    }
    json!({
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": {"phase": "Running", "qosClass": "BestEffort"},
    })
}

/// An object of kind `ReplicaSet`/`Job` owned by a `Deployment`/`CronJob` named `owner`.
pub fn owned(resource: Resource, namespace: &str, name: &str, owner_kind: &str, owner: &str) -> Value {
    let owner_api = if owner_kind == "CronJob" {
        "batch/v1"
    } else {
        "apps/v1"
    };
    json!({
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("uid-{name}"),
            "ownerReferences": [{
                "apiVersion": owner_api, "kind": owner_kind, "name": owner,
                "uid": format!("uid-{owner}"), "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "spec": {},
        "status": {},
    })
}

type Body = BoxBody<Bytes, std::io::Error>;

async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("fake API server: cannot register its listener: {e}");
            return;
        }
    };
    // Connections live in the set: aborting the server task cuts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status(code, reason, message))
}

/// Parsed request target.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_target(uri: &http::Uri) -> Option<Target> {
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("api/v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        _ => return None,
    };
    let query = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    Some(Target {
        resource: Resource::from_path(&group_version, plural)?,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        query,
    })
}

/// A parsed field or label selector: equality terms only (`a=b`, `a==b`).
struct Selector(Vec<(String, String)>);

impl Selector {
    fn parse(text: Option<&String>, fields: bool) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (key, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("unable to parse requirement: {term:?}"))?;
            if fields && !matches!(key, "spec.nodeName" | "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {key}"));
            }
            terms.push((key.to_owned(), value.to_owned()));
        }
        Ok(Self(terms))
    }

    fn matches_fields(&self, object: &Value) -> bool {
        self.0.iter().all(|(key, value)| {
            let actual = match key.as_str() {
                "spec.nodeName" => &object["spec"]["nodeName"],
                "metadata.name" => &object["metadata"]["name"],
                _ => &object["metadata"]["namespace"],
            };
            actual.as_str().unwrap_or_default() == value
        })
    }

    fn matches_labels(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(key, value)| object["metadata"]["labels"][key].as_str() == Some(value.as_str()))
    }
}

struct Filter {
    resource: Resource,
    namespace: Option<String>,
    fields: Selector,
    labels: Selector,
}

impl Filter {
    fn matches(&self, resource: Resource, object: &Value) -> bool {
        resource == self.resource
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| object["metadata"]["namespace"] == ns)
            && self.fields.matches_fields(object)
            && self.labels.matches_labels(object)
    }
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let uri = request.uri().clone();
    shared
        .cluster()
        .requests
        .push(format!("{} {}", request.method(), uri));
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if request.method() != http::Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake serves GET only",
        );
    }
    let Some(target) = parse_target(&uri) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if let Some(name) = &target.name {
        let namespace = target.namespace.clone().unwrap_or_default();
        let key = (target.resource, namespace, name.clone());
        return match shared.cluster().objects.get(&key) {
            Some(object) => full(StatusCode::OK, object.clone()),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", target.resource.plural()),
            ),
        };
    }
    let filter = match (
        Selector::parse(target.query.get("fieldSelector"), true),
        Selector::parse(target.query.get("labelSelector"), false),
    ) {
        (Ok(fields), Ok(labels)) => Filter {
            resource: target.resource,
            namespace: target.namespace.clone(),
            fields,
            labels,
        },
        (Err(message), _) | (_, Err(message)) => {
            return error(StatusCode::BAD_REQUEST, "BadRequest", &message);
        }
    };
    let watching = matches!(target.query.get("watch").map(String::as_str), Some("true" | "1"));
    if watching {
        watch_response(shared, &target, filter)
    } else {
        list_response(shared, &target, &filter)
    }
}

fn list_response(shared: &Shared, target: &Target, filter: &Filter) -> Response<Body> {
    let cluster = shared.cluster();
    let limit: usize = target
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // continue token: "<resourceVersion of the first page>/<offset>" (opaque to clients).
    let (snapshot_rv, offset) = match target.query.get("continue") {
        Some(token) => match token
            .split_once('/')
            .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)))
        {
            Some((rv, _)) if rv < cluster.compacted => {
                return error(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                );
            }
            Some(parsed) => parsed,
            None => return error(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token"),
        },
        None => (cluster.resource_version, 0),
    };
    let matching: Vec<&Value> = cluster
        .objects
        .iter()
        .filter(|((resource, _, _), object)| filter.matches(*resource, object))
        .map(|(_, object)| object)
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|object| {
            let mut item = (*object).clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": snapshot_rv.to_string()});
    if offset + page.len() < matching.len() {
        metadata["continue"] = json!(format!("{snapshot_rv}/{}", offset + page.len()));
    }
    full(
        StatusCode::OK,
        json!({
            "kind": format!("{}List", target.resource.kind()),
            "apiVersion": target.resource.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}

fn watch_response(shared: &Arc<Shared>, target: &Target, filter: Filter) -> Response<Body> {
    let from: u64 = target
        .query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let bookmarks = target.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = target
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    // Subscribe before reading history so no change falls in between.
    let mut live = shared.changes.subscribe();
    let mut drops = shared.drops.subscribe();
    let mut bookmark_requests = shared.bookmarks.subscribe();
    let (backlog, expired, compacted) = {
        let cluster = shared.cluster();
        let expired = from != 0 && from < cluster.compacted;
        let backlog: Vec<Change> = if from == 0 {
            // "Any" version: start from now (the client listed first).
            Vec::new()
        } else {
            cluster
                .history
                .iter()
                .filter(|c| c.resource_version > from)
                .cloned()
                .collect()
        };
        (backlog, expired, cluster.compacted)
    };
    let shared = shared.clone();
    let resource = target.resource;
    let stream = channel_stream(move |sender| async move {
        if expired {
            let gone = status(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {from} ({compacted})"),
            );
            let _ = sender.send(Ok(line("ERROR", gone))).await;
            return;
        }
        let mut last = from;
        for change in backlog {
            last = change.resource_version;
            if filter.matches(change.resource, &change.object)
                && sender.send(Ok(line(change.kind, change.object))).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = drops.changed() => {
                    let _ = sender.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "watch dropped"))).await;
                    return;
                }
                _ = bookmark_requests.changed(), if bookmarks => {
                    let rv = shared.cluster().resource_version;
                    let object = json!({"kind": resource.kind(), "apiVersion": resource.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}});
                    if sender.send(Ok(line("BOOKMARK", object))).await.is_err() { return; }
                }
                change = live.recv() => match change {
                    Ok(change) if change.resource_version <= last => {}
                    Ok(change) => {
                        last = change.resource_version;
                        if filter.matches(change.resource, &change.object)
                            && sender.send(Ok(line(change.kind, change.object))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = sender.send(Err(std::io::Error::other("watch lagged"))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let mut response = Response::new(http_body_util::BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn line(kind: &str, object: Value) -> Frame<Bytes> {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Frame::data(Bytes::from(text))
}

/// A body stream fed by a task through a bounded channel.
fn channel_stream<F, Fut>(
    producer: F,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(sender));
    let mut receiver = receiver;
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}
