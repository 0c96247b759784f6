//! What a cgroup path says about the process in it: the Kubernetes pod (UID and QoS class), the
//! container (runtime and ID) or, for host processes, the systemd unit. Covers the layouts kubelet
//! and the runtimes create: cgroup v2 and v1, systemd and cgroupfs drivers, containerd, CRI-O and
//! Docker, the three QoS classes, pod UIDs with dashes or (systemd) underscores, and paths nested
//! under another root (kind, nested runtimes, test slices).

use serde::Serialize;

/// The container runtime that named a cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    /// A pod's container cgroup whose name carries no runtime prefix (cgroupfs driver).
    Unknown,
}

impl Runtime {
    pub const fn name(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Docker => "docker",
            Runtime::Unknown => "unknown",
        }
    }
}

/// The kubelet QoS class of a pod (its cgroup parent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const fn name(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

/// A container found in a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    pub runtime: Runtime,
    /// The full container ID (64 hex characters for the common runtimes).
    pub id: String,
}

/// What a cgroup path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CgroupIdentity {
    /// The pod UID, in the API's dashed form.
    pub pod_uid: Option<String>,
    pub qos: Option<QosClass>,
    pub container: Option<Container>,
    /// For processes outside pods: the innermost systemd unit (`nginx.service`, `session-3.scope`).
    pub systemd_unit: Option<String>,
}

/// Parses a cgroup path (as in `/proc/<pid>/cgroup`, relative to the hierarchy's root).
pub fn parse(path: &str) -> CgroupIdentity {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut identity = CgroupIdentity::default();
    // The kubelet's root (`kubepods.slice` or `kubepods`) may sit below other cgroups.
    if let Some(root) = segments
        .iter()
        .position(|s| *s == "kubepods.slice" || *s == "kubepods")
    {
        let below = &segments[root + 1..];
        for (i, segment) in below.iter().enumerate() {
            if identity.pod_uid.is_none() {
                if let Some(qos) = qos_of(segment)
                    && identity.qos.is_none()
                    && !segment.contains("-pod")
                {
                    identity.qos = Some(qos);
                    continue;
                }
                if let Some((qos, uid)) = pod_of(segment) {
                    identity.qos = identity.qos.or(qos).or(Some(QosClass::Guaranteed));
                    identity.pod_uid = Some(uid);
                    // The container is the next segment (runtimes may nest further below it).
                    if let Some(next) = below.get(i + 1) {
                        identity.container = container_of(next, true);
                    }
                    break;
                }
            }
        }
        return identity;
    }
    // Outside Kubernetes: a container of a runtime, or a systemd unit.
    for segment in segments.iter().rev() {
        if let Some(container) = container_of(segment, false) {
            identity.container = Some(container);
            return identity;
        }
    }
    // `/docker/<id>` (Docker with the cgroupfs driver).
    if let Some(i) = segments.iter().position(|s| *s == "docker")
        && let Some(id) = segments.get(i + 1).filter(|id| is_container_id(id))
    {
        identity.container = Some(Container {
            runtime: Runtime::Docker,
            id: (*id).to_owned(),
        });
        return identity;
    }
    identity.systemd_unit = segments
        .iter()
        .rev()
        .find(|s| s.ends_with(".service") || s.ends_with(".scope"))
        .map(|s| (*s).to_owned());
    identity
}

/// `kubepods-besteffort.slice`, `kubepods-burstable.slice`, `besteffort`, `burstable`.
fn qos_of(segment: &str) -> Option<QosClass> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let name = name.strip_prefix("kubepods-").unwrap_or(name);
    match name {
        "besteffort" => Some(QosClass::BestEffort),
        "burstable" => Some(QosClass::Burstable),
        _ => None,
    }
}

/// `kubepods-besteffort-pod<uid_underscored>.slice`, `kubepods-pod<uid>.slice` (guaranteed),
/// `pod<uid-dashed>` (cgroupfs). Returns the QoS the name states and the dashed UID.
fn pod_of(segment: &str) -> Option<(Option<QosClass>, String)> {
    let (qos, uid) = if let Some(name) = segment.strip_suffix(".slice") {
        let rest = name.strip_prefix("kubepods-")?;
        let (qos, uid) = match rest.split_once("-pod") {
            Some((class, uid)) => (qos_of(class), uid),
            None => (None, rest.strip_prefix("pod")?),
        };
        (qos, uid.replace('_', "-"))
    } else {
        (None, segment.strip_prefix("pod")?.to_owned())
    };
    is_uid(&uid).then_some((qos, uid))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, or (inside a pod's cgroup,
/// cgroupfs driver) the bare `<id>`. `crio-conmon-<id>.scope` is CRI-O's monitor, not a container.
fn container_of(segment: &str, in_pod: bool) -> Option<Container> {
    let (runtime, id) = if let Some(scope) = segment.strip_suffix(".scope") {
        if let Some(id) = scope.strip_prefix("cri-containerd-") {
            (Runtime::Containerd, id)
        } else if let Some(id) = scope.strip_prefix("crio-") {
            if id.starts_with("conmon-") {
                return None;
            }
            (Runtime::Crio, id)
        } else if let Some(id) = scope.strip_prefix("docker-") {
            (Runtime::Docker, id)
        } else {
            return None;
        }
    } else if in_pod {
        let id = segment
            .strip_prefix("cri-containerd-")
            .or_else(|| segment.strip_prefix("crio-"))
            .or_else(|| segment.strip_prefix("docker-"))
            .unwrap_or(segment);
        (Runtime::Unknown, id)
    } else {
        return None;
    };
    is_container_id(id).then(|| Container {
        runtime,
        id: id.to_owned(),
    })
}

/// Container IDs are hex (64 characters for containerd, CRI-O and Docker; accept 12 and up).
fn is_container_id(id: &str) -> bool {
    (12..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID: 36 characters, hex and dashes in the 8-4-4-4-12 layout.
fn is_uid(uid: &str) -> bool {
    let groups: Vec<&str> = uid.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f0e2d3c-4b5a-6978-8a9b-0c1d2e3f4001";
    const UID_SYSTEMD: &str = "1f0e2d3c_4b5a_6978_8a9b_0c1d2e3f4001";
    const ID: &str = "4e2b7a0f9c1d3e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";

    fn pod(path: &str) -> (Option<String>, Option<QosClass>, Option<Container>) {
        let identity = parse(path);
        assert_eq!(identity.systemd_unit, None, "{path}");
        (identity.pod_uid, identity.qos, identity.container)
    }

    fn container(runtime: Runtime) -> Option<Container> {
        Some(Container {
            runtime,
            id: ID.to_owned(),
        })
    }

    #[test]
    fn systemd_driver_layouts() {
        for (path, qos, runtime) in [
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
                ),
                QosClass::BestEffort,
                Runtime::Containerd,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/crio-{ID}.scope"
                ),
                QosClass::Burstable,
                Runtime::Crio,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{ID}.scope"),
                QosClass::Guaranteed,
                Runtime::Docker,
            ),
        ] {
            assert_eq!(
                pod(&path),
                (Some(UID.to_owned()), Some(qos), container(runtime)),
                "{path}"
            );
        }
    }

    #[test]
    fn cgroupfs_driver_and_cgroup_v1_layouts() {
        for (path, qos) in [
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                QosClass::BestEffort,
            ),
            (format!("/kubepods/burstable/pod{UID}/{ID}"), QosClass::Burstable),
            (format!("/kubepods/pod{UID}/{ID}"), QosClass::Guaranteed),
        ] {
            assert_eq!(
                pod(&path),
                (Some(UID.to_owned()), Some(qos), container(Runtime::Unknown)),
                "{path}"
            );
        }
    }

    #[test]
    fn nested_roots_subcgroups_and_pod_sandboxes() {
        // Under another root (kind node, test slice), and a sub-cgroup inside the container.
        let path = format!(
            "/ict.slice/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope/init"
        );
        assert_eq!(
            pod(&path),
            (
                Some(UID.to_owned()),
                Some(QosClass::BestEffort),
                container(Runtime::Containerd)
            )
        );
        // A process directly in the pod cgroup (no container segment).
        let path =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice");
        assert_eq!(
            pod(&path),
            (Some(UID.to_owned()), Some(QosClass::Burstable), None)
        );
        // CRI-O's conmon is not the container.
        let path = format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope");
        assert_eq!(
            pod(&path),
            (Some(UID.to_owned()), Some(QosClass::Guaranteed), None)
        );
    }

    #[test]
    fn host_processes_and_plain_containers() {
        assert_eq!(
            parse("/system.slice/nginx.service").systemd_unit.as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            parse("/user.slice/user-1000.slice/session-3.scope")
                .systemd_unit
                .as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            parse(&format!("/system.slice/docker-{ID}.scope")).container,
            container(Runtime::Docker)
        );
        assert_eq!(
            parse(&format!("/docker/{ID}")).container,
            container(Runtime::Docker)
        );
        assert_eq!(parse("/"), CgroupIdentity::default());
        assert_eq!(parse(""), CgroupIdentity::default());
    }

    #[test]
    fn malformed_names_are_not_taken_for_pods_or_containers() {
        let identity =
            parse("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podnot-a-uid.slice/x");
        assert_eq!(identity.pod_uid, None);
        assert_eq!(identity.qos, Some(QosClass::BestEffort));
        assert_eq!(identity.container, None);
        assert_eq!(parse("/system.slice/docker-xyz.scope").container, None);
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod{UID}/not-hex")).container,
            None
        );
    }
}
