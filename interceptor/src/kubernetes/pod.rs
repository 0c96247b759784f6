//! The compact identity of a pod kept in the directory: only what records and policy selectors use,
//! a few hundred bytes per pod instead of the full API object.

use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// The workload a pod belongs to, as operators name it: `Deployment/chat`, `CronJob/nightly`,
/// `StatefulSet/db`, `DaemonSet/agent`, `Job/once`, or `Pod/name` for a bare pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: Box<str>,
    pub name: Box<str>,
}

impl Workload {
    pub fn new(kind: &str, name: &str) -> Self {
        Self {
            kind: kind.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// How the workload was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadSource {
    /// The pod's controller is the workload (StatefulSet, DaemonSet, bare pod, ...).
    Direct,
    /// Read from the owner's own owner reference (ReplicaSet → Deployment, Job → CronJob).
    Resolved,
    /// The API could not be asked; derived from names (a ReplicaSet named `<deployment>-<pod-template-hash>`).
    Inferred,
}

impl WorkloadSource {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadSource::Direct => "direct",
            WorkloadSource::Resolved => "resolved",
            WorkloadSource::Inferred => "inferred",
        }
    }
}

/// A pod on this node, as the directory keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub uid: Box<str>,
    pub namespace: Box<str>,
    pub name: Box<str>,
    /// Sorted by key.
    pub labels: Box<[(Box<str>, Box<str>)]>,
    pub service_account: Option<Box<str>>,
    pub node: Option<Box<str>>,
    pub workload: Workload,
    pub workload_source: WorkloadSource,
}

impl PodIdentity {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.labels[i].1)
    }

    /// The labels as `key=value` pairs separated by commas (a label selector's syntax).
    pub fn labels_text(&self) -> String {
        let mut text = String::new();
        for (i, (key, value)) in self.labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(key);
            text.push('=');
            text.push_str(value);
        }
        text
    }
}

/// The fields of a pod object the directory needs, before its workload is resolved.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(Box<str>, Box<str>)>,
    pub service_account: Option<String>,
    pub node: Option<String>,
    pub controller: Option<OwnerReference>,
}

impl PodFacts {
    /// `None` for an object without uid, namespace or name (the API server always sets them).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let mut labels: Vec<(Box<str>, Box<str>)> = meta
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect();
        labels.sort();
        let spec = pod.spec.as_ref();
        Some(Self {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            labels,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty()),
            node: spec.and_then(|s| s.node_name.clone()),
            controller: controller_of(meta.owner_references.as_deref()),
        })
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }

    pub fn into_identity(self, workload: Workload, workload_source: WorkloadSource) -> PodIdentity {
        PodIdentity {
            uid: self.uid.into(),
            namespace: self.namespace.into(),
            name: self.name.into(),
            labels: self.labels.into_boxed_slice(),
            service_account: self.service_account.map(Into::into),
            node: self.node.map(Into::into),
            workload,
            workload_source,
        }
    }
}

/// The owner reference marked `controller: true`, else the only one.
pub fn controller_of(owners: Option<&[OwnerReference]>) -> Option<OwnerReference> {
    let owners = owners?;
    owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(if owners.len() == 1 { owners.first() } else { None })
        .cloned()
}

/// A ReplicaSet made by a Deployment is named `<deployment>-<pod-template-hash>`, and its pods carry
/// the hash as a label: the Deployment's name without asking the API.
pub fn infer_deployment<'a>(replicaset: &'a str, pod_template_hash: Option<&str>) -> Option<&'a str> {
    let hash = pod_template_hash.filter(|h| !h.is_empty())?;
    let prefix = replicaset.strip_suffix(hash)?.strip_suffix('-')?;
    (!prefix.is_empty()).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn owner(kind: &str, name: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller,
            block_owner_deletion: None,
        }
    }

    #[test]
    fn facts_keep_what_selectors_use() {
        let pod = Pod {
            metadata: ObjectMeta {
                uid: Some("0b4a1c2e-1111-2222-3333-444455556666".into()),
                namespace: Some("team-a".into()),
                name: Some("chat-7d9f8b6c5d-x2x9q".into()),
                labels: Some(
                    [("app", "chat"), ("pod-template-hash", "7d9f8b6c5d")]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                ),
                owner_references: Some(vec![
                    owner("Other", "x", None),
                    owner("ReplicaSet", "chat-7d9f8b6c5d", Some(true)),
                ]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("chat-sa".into()),
                node_name: Some("node-1".into()),
                ..PodSpec::default()
            }),
            status: None,
        };
        let facts = PodFacts::from_pod(&pod).expect("complete pod");
        assert_eq!(
            facts.controller.as_ref().map(|o| o.kind.as_str()),
            Some("ReplicaSet")
        );
        assert_eq!(facts.label("app"), Some("chat"));
        let identity = facts.into_identity(Workload::new("Deployment", "chat"), WorkloadSource::Resolved);
        assert_eq!(identity.label("pod-template-hash"), Some("7d9f8b6c5d"));
        assert_eq!(identity.label("missing"), None);
        assert_eq!(identity.labels_text(), "app=chat,pod-template-hash=7d9f8b6c5d");
        assert_eq!(identity.workload.to_string(), "Deployment/chat");
        assert_eq!(identity.service_account.as_deref(), Some("chat-sa"));
    }

    #[test]
    fn a_pod_without_uid_is_ignored() {
        assert!(PodFacts::from_pod(&Pod::default()).is_none());
    }

    #[test]
    fn deployment_name_is_inferred_only_from_a_matching_hash() {
        assert_eq!(
            infer_deployment("chat-7d9f8b6c5d", Some("7d9f8b6c5d")),
            Some("chat")
        );
        assert_eq!(infer_deployment("my-api-v2-5c9", Some("5c9")), Some("my-api-v2"));
        assert_eq!(infer_deployment("chat-7d9f8b6c5d", Some("other")), None);
        assert_eq!(infer_deployment("chat-7d9f8b6c5d", None), None);
        assert_eq!(infer_deployment("-abc", Some("abc")), None);
        assert_eq!(infer_deployment("chatabc", Some("abc")), None);
    }

    #[test]
    fn several_owners_without_a_controller_name_none() {
        let owners = [owner("A", "a", None), owner("B", "b", None)];
        assert!(controller_of(Some(&owners)).is_none());
        assert_eq!(
            controller_of(Some(&owners[..1])).map(|o| o.name),
            Some("a".to_owned())
        );
    }
}
