//! The workload of a pod from its controller reference. A ReplicaSet or a Job is asked once for its
//! own controller (Deployment, CronJob) and the answer is cached, so the pods of one ReplicaSet cost one
//! API call between them; when the API cannot answer, the Deployment is inferred from the names.

use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Api, Client};
use moka::future::Cache;
use prometheus::IntCounterVec;
use tracing::debug;

use super::pod::{PodFacts, Workload, WorkloadSource, controller_of, infer_deployment};

/// Why an owner could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Api {
        kind: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("reading {kind} {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        kind: &'static str,
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

/// Owner kinds that are themselves owned by the workload operators name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Intermediate {
    ReplicaSet,
    Job,
}

impl Intermediate {
    fn of(owner: &OwnerReference) -> Option<Self> {
        let group = owner.api_version.split('/').next().unwrap_or_default();
        match (owner.kind.as_str(), group) {
            ("ReplicaSet", "apps") => Some(Self::ReplicaSet),
            ("Job", "batch") => Some(Self::Job),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::ReplicaSet => "ReplicaSet",
            Self::Job => "Job",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OwnerKey {
    kind: Intermediate,
    namespace: Box<str>,
    name: Box<str>,
    uid: Box<str>,
}

/// Resolves and caches owners.
pub struct OwnerResolver {
    client: Client,
    /// The controller of each ReplicaSet/Job (None: it has none).
    parents: Cache<OwnerKey, Option<Workload>>,
    timeout: Duration,
    lookups: IntCounterVec,
}

impl OwnerResolver {
    /// `lookups`: counter labelled by result (cached, fetched, inferred, failed).
    pub fn new(client: Client, timeout: Duration, lookups: IntCounterVec) -> Self {
        Self {
            client,
            parents: Cache::builder()
                .max_capacity(20_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            timeout,
            lookups,
        }
    }

    /// The workload of a pod. Never fails: without an answer from the API it falls back to what the
    /// names say.
    pub async fn workload(&self, pod: &PodFacts) -> (Workload, WorkloadSource) {
        let Some(owner) = &pod.controller else {
            return (Workload::new("Pod", &pod.name), WorkloadSource::Direct);
        };
        let Some(kind) = Intermediate::of(owner) else {
            return (Workload::new(&owner.kind, &owner.name), WorkloadSource::Direct);
        };
        let key = OwnerKey {
            kind,
            namespace: pod.namespace.as_str().into(),
            name: owner.name.as_str().into(),
            uid: owner.uid.as_str().into(),
        };
        let entry = self
            .parents
            .entry(key)
            .or_try_insert_with(self.fetch_parent(kind, &pod.namespace, &owner.name))
            .await;
        match entry {
            Ok(entry) => {
                let result = if entry.is_fresh() { "fetched" } else { "cached" };
                self.lookups.with_label_values(&[result]).inc();
                let workload = entry
                    .into_value()
                    .unwrap_or_else(|| Workload::new(kind.kind(), &owner.name));
                (workload, WorkloadSource::Resolved)
            }
            Err(error) => {
                debug!(error = %error, pod = %pod.name, namespace = %pod.namespace, "owner lookup failed; inferring the workload from names");
                self.lookups.with_label_values(&["failed"]).inc();
                (infer(kind, owner, pod), WorkloadSource::Inferred)
            }
        }
    }

    async fn fetch_parent(
        &self,
        kind: Intermediate,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Workload>, OwnerError> {
        let client = self.client.clone();
        let request = async {
            let metadata: ObjectMeta = match kind {
                Intermediate::ReplicaSet => {
                    Api::<ReplicaSet>::namespaced(client, namespace)
                        .get(name)
                        .await?
                        .metadata
                }
                Intermediate::Job => {
                    Api::<Job>::namespaced(client, namespace)
                        .get(name)
                        .await?
                        .metadata
                }
            };
            Ok::<_, kube::Error>(metadata)
        };
        let metadata = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| OwnerError::Timeout {
                kind: kind.kind(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                timeout: self.timeout,
            })?
            .map_err(|source| OwnerError::Api {
                kind: kind.kind(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source,
            })?;
        Ok(controller_of(metadata.owner_references.as_deref()).map(|o| Workload::new(&o.kind, &o.name)))
    }
}

/// The workload when the API cannot be asked.
fn infer(kind: Intermediate, owner: &OwnerReference, pod: &PodFacts) -> Workload {
    match kind {
        Intermediate::ReplicaSet => infer_deployment(&owner.name, pod.label("pod-template-hash"))
            .map(|deployment| Workload::new("Deployment", deployment))
            .unwrap_or_else(|| Workload::new("ReplicaSet", &owner.name)),
        Intermediate::Job => Workload::new("Job", &owner.name),
    }
}
