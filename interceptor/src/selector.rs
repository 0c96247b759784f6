//! Selectors over a connection's identity: the fields policy rules and bypass lists match on. Every
//! field is optional; the ones given must all match. Pod fields never match a connection whose pod is
//! unknown (a host process, or a pod not yet listed).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::identity::Identity;

/// A selector as written in the policy.
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Kubernetes namespace glob (e.g. `team-*`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Pod labels that must all be present with these exact values (like `matchLabels`).
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    /// Kubernetes service account name (exact).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Workload glob as `Kind/name` (e.g. `Deployment/chat`, `CronJob/*`, `*/batch-*`).
    #[serde(default)]
    pub workload: Option<String>,
    /// Executable path glob (e.g. `/usr/bin/java`, `/opt/**/bin/*`).
    #[serde(default)]
    pub exe: Option<String>,
    /// Command name (exact, as in /proc/<pid>/comm).
    #[serde(default)]
    pub comm: Option<String>,
    /// User id.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Cgroup path glob, relative to the cgroup2 root (e.g. `/kubepods.slice/**`).
    #[serde(default)]
    pub cgroup: Option<String>,
}

/// A compiled [`Selector`].
#[derive(Clone, Debug)]
pub struct SelectorMatcher {
    namespace: Option<Pattern>,
    pod_labels: Vec<(String, String)>,
    service_account: Option<String>,
    workload: Option<Pattern>,
    exe: Option<Pattern>,
    comm: Option<String>,
    uid: Option<u32>,
    cgroup: Option<Pattern>,
}

/// A glob, or the exact text when it has no glob syntax (compared without a regex: most selectors
/// name one namespace or one executable).
#[derive(Clone, Debug)]
pub enum Pattern {
    Exact(String),
    /// `literal*`: a prefix, then anything but `/`.
    Prefix(String),
    Glob(globset::GlobMatcher),
}

impl Pattern {
    pub fn compile(pattern: &str) -> Result<Self, String> {
        const GLOB: [char; 7] = ['*', '?', '[', ']', '{', '}', '\\'];
        if !pattern.contains(GLOB) {
            return Ok(Pattern::Exact(pattern.to_owned()));
        }
        if let Some(prefix) = pattern.strip_suffix('*')
            && !prefix.contains(GLOB)
        {
            return Ok(Pattern::Prefix(prefix.to_owned()));
        }
        compile_glob(pattern).map(Pattern::Glob)
    }

    pub fn is_match(&self, text: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == text,
            Pattern::Prefix(prefix) => text
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| !rest.contains('/')),
            Pattern::Glob(glob) => glob.is_match(text),
        }
    }

    fn is_match_path(&self, path: &std::path::Path) -> bool {
        match (self, path.to_str()) {
            (Pattern::Glob(glob), _) => glob.is_match(path),
            (_, Some(text)) => self.is_match(text),
            (_, None) => false,
        }
    }

    /// Matches `kind/name` without building the string when the pattern is exact or a prefix.
    fn is_match_pair(&self, kind: &str, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact.split_once('/').is_some_and(|(k, n)| k == kind && n == name),
            // A prefix without `/` cannot match across it: `*` stops at `/`.
            Pattern::Prefix(prefix) => prefix.split_once('/').is_some_and(|(k, n)| {
                k == kind && name.strip_prefix(n).is_some_and(|rest| !rest.contains('/'))
            }),
            Pattern::Glob(glob) => glob.is_match(format!("{kind}/{name}")),
        }
    }

    /// The exact text, when the pattern is not a glob.
    pub fn exact(&self) -> Option<&str> {
        match self {
            Pattern::Exact(exact) => Some(exact),
            _ => None,
        }
    }
}

impl Selector {
    /// Compiles the globs; the error names what is wrong.
    pub fn compile(&self) -> Result<SelectorMatcher, String> {
        let empty = self.namespace.is_none()
            && self.pod_labels.is_empty()
            && self.service_account.is_none()
            && self.workload.is_none()
            && self.exe.is_none()
            && self.comm.is_none()
            && self.uid.is_none()
            && self.cgroup.is_none();
        if empty {
            return Err("an empty selector would match everything; give at least one field".into());
        }
        if let Some(workload) = &self.workload
            && !workload.contains('/')
        {
            return Err(format!(
                "workload {workload:?} must be `Kind/name` (e.g. `Deployment/{workload}`)"
            ));
        }
        Ok(SelectorMatcher {
            namespace: self.namespace.as_deref().map(Pattern::compile).transpose()?,
            pod_labels: self
                .pod_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service_account: self.service_account.clone(),
            workload: self.workload.as_deref().map(Pattern::compile).transpose()?,
            exe: self.exe.as_deref().map(Pattern::compile).transpose()?,
            comm: self.comm.clone(),
            uid: self.uid,
            cgroup: self.cgroup.as_deref().map(Pattern::compile).transpose()?,
        })
    }
}

impl SelectorMatcher {
    /// Whether the identity matches every field given.
    pub fn matches(&self, identity: &Identity<'_>) -> bool {
        let facts = identity.facts;
        let details = identity.details;
        let pod = identity.pod;
        self.comm.as_deref().is_none_or(|c| c == facts.comm)
            && self.uid.is_none_or(|u| u == facts.uid)
            && self
                .exe
                .as_ref()
                .is_none_or(|g| details.exe.as_deref().is_some_and(|e| g.is_match_path(e)))
            && self
                .cgroup
                .as_ref()
                .is_none_or(|g| details.cgroup.as_deref().is_some_and(|c| g.is_match(c)))
            && self
                .namespace
                .as_ref()
                .is_none_or(|g| pod.is_some_and(|p| g.is_match(&p.namespace)))
            && self
                .service_account
                .as_deref()
                .is_none_or(|sa| pod.and_then(|p| p.service_account.as_deref()) == Some(sa))
            && self
                .workload
                .as_ref()
                .is_none_or(|g| pod.is_some_and(|p| g.is_match_pair(&p.workload.kind, &p.workload.name)))
            && self
                .pod_labels
                .iter()
                .all(|(k, v)| pod.and_then(|p| p.label(k)) == Some(v.as_str()))
    }

    /// The one namespace the selector requires, when it names it exactly (rule index).
    pub fn exact_namespace(&self) -> Option<&str> {
        self.namespace.as_ref().and_then(Pattern::exact)
    }

    /// One label the selector requires (rule index).
    pub fn first_label(&self) -> Option<(&str, &str)> {
        self.pod_labels.first().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether any field needs the pod's metadata.
    pub fn uses_pod(&self) -> bool {
        self.namespace.is_some()
            || !self.pod_labels.is_empty()
            || self.service_account.is_some()
            || self.workload.is_some()
    }
}

fn compile_glob(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?} is not a valid glob: {e}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::identity::{KernelFacts, ProcessDetails};
    use crate::kubernetes::{PodIdentity, Workload, WorkloadSource};

    fn facts(comm: &str, uid: u32) -> KernelFacts {
        KernelFacts {
            original_dst: "203.0.113.10:443".parse().expect("addr"),
            tgid: 1,
            pid: 1,
            uid,
            gid: 0,
            cgroup_id: 1,
            netns_cookie: 1,
            socket_cookie: 1,
            comm: comm.into(),
        }
    }

    fn details(exe: Option<&str>, cgroup: Option<&str>) -> ProcessDetails {
        ProcessDetails {
            exe: exe.map(PathBuf::from),
            cgroup: cgroup.map(Into::into),
            ..ProcessDetails::default()
        }
    }

    fn pod() -> PodIdentity {
        PodIdentity {
            uid: "u".into(),
            namespace: "team-a".into(),
            name: "chat-abc".into(),
            labels: vec![("app".into(), "chat".into()), ("tier".into(), "web".into())].into_boxed_slice(),
            service_account: Some("chat-sa".into()),
            node: None,
            workload: Workload::new("Deployment", "chat"),
            workload_source: WorkloadSource::Resolved,
        }
    }

    fn compile(yaml: &str) -> Result<SelectorMatcher, String> {
        let selector: Selector = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        selector.compile()
    }

    #[test]
    fn process_fields_match_on_every_given_field() {
        let m = compile("{exe: \"/usr/bin/*\", uid: 1000}").expect("valid");
        let (f, d) = (facts("curl", 1000), details(Some("/usr/bin/curl"), None));
        assert!(m.matches(&Identity {
            facts: &f,
            details: &d,
            pod: None
        }));
        let f0 = facts("curl", 0);
        assert!(!m.matches(&Identity {
            facts: &f0,
            details: &d,
            pod: None
        }));
        let other = details(Some("/usr/local/bin/curl"), None);
        assert!(!m.matches(&Identity {
            facts: &f,
            details: &other,
            pod: None
        }));
        let unknown = details(None, None);
        assert!(
            !m.matches(&Identity {
                facts: &f,
                details: &unknown,
                pod: None
            }),
            "an unknown exe never matches an exe glob"
        );
        let m = compile("{cgroup: \"/kubepods.slice/**\"}").expect("valid");
        let d = details(None, Some("/kubepods.slice/a/b.scope"));
        assert!(m.matches(&Identity {
            facts: &f,
            details: &d,
            pod: None
        }));
    }

    #[test]
    fn pod_fields_match_the_pod_and_never_an_unknown_one() {
        let (f, d, p) = (facts("python3", 0), details(None, None), pod());
        let with_pod = Identity {
            facts: &f,
            details: &d,
            pod: Some(&p),
        };
        let without = Identity {
            facts: &f,
            details: &d,
            pod: None,
        };
        for yaml in [
            "{namespace: \"team-*\"}",
            "{workload: Deployment/chat}",
            "{workload: \"*/ch*\"}",
            "{serviceAccount: chat-sa}",
            "{podLabels: {app: chat, tier: web}}",
            "{namespace: team-a, comm: python3}",
        ] {
            let m = compile(yaml).expect(yaml);
            assert!(m.uses_pod(), "{yaml}");
            assert!(m.matches(&with_pod), "{yaml} should match the pod");
            assert!(!m.matches(&without), "{yaml} must not match without a pod");
        }
        for yaml in [
            "{namespace: team-b}",
            "{workload: StatefulSet/chat}",
            "{serviceAccount: default}",
            "{podLabels: {app: chat, tier: db}}",
            "{namespace: team-a, comm: curl}",
        ] {
            assert!(
                !compile(yaml).expect(yaml).matches(&with_pod),
                "{yaml} must not match"
            );
        }
    }

    #[test]
    fn exact_and_prefix_patterns_agree_with_globs() {
        for (pattern, text) in [
            ("team-a", "team-a"),
            ("team-a", "team-ab"),
            ("team-*", "team-a"),
            ("team-*", "team-a/b"),
            ("team-*", "other"),
            ("/usr/bin/py*", "/usr/bin/python3"),
            ("/usr/bin/py*", "/usr/bin/py/x"),
            ("t?am", "team"),
        ] {
            let fast = Pattern::compile(pattern).expect("pattern");
            let glob = compile_glob(pattern).expect("glob");
            assert_eq!(fast.is_match(text), glob.is_match(text), "{pattern} vs {text}");
        }
        for (pattern, kind, name) in [
            ("Deployment/chat", "Deployment", "chat"),
            ("Deployment/chat", "StatefulSet", "chat"),
            ("Deployment/ch*", "Deployment", "chat"),
            ("Deployment/ch*", "Deployment", "other"),
            ("Deploy*", "Deployment", "chat"),
            ("*/chat", "Job", "chat"),
        ] {
            let fast = Pattern::compile(pattern).expect("pattern");
            let glob = compile_glob(pattern).expect("glob");
            assert_eq!(
                fast.is_match_pair(kind, name),
                glob.is_match(format!("{kind}/{name}")),
                "{pattern} vs {kind}/{name}"
            );
        }
    }

    #[test]
    fn bad_selectors_are_explained() {
        assert!(compile("{}").expect_err("empty").contains("empty selector"));
        assert!(
            compile("{exe: \"[\"}")
                .expect_err("glob")
                .contains("not a valid glob")
        );
        assert!(
            compile("{workload: chat}")
                .expect_err("kind")
                .contains("Kind/name")
        );
        assert!(
            compile("{namespce: a}")
                .expect_err("typo")
                .contains("unknown field")
        );
    }
}
