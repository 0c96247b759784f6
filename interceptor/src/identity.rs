//! Who made a connection: the kernel's facts, enriched from /proc and the cgroup tree.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interceptor_ebpf::ConnRecord;
use serde::Serialize;

use crate::cgroup::CgroupNames;
use crate::container::{self, CgroupIdentity};
use crate::kubernetes::PodIdentity;

/// Everything known about who made a connection, as selectors and records see it.
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub facts: &'a KernelFacts,
    pub details: &'a ProcessDetails,
    /// The pod, when the connection comes from a pod the directory knows.
    pub pod: Option<&'a PodIdentity>,
}

/// Facts recorded by the kernel program when the connection was redirected (cannot be spoofed by the app).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelFacts {
    /// Destination the application asked for.
    pub original_dst: SocketAddr,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// Command name of the calling thread.
    pub comm: String,
}

impl From<&ConnRecord> for KernelFacts {
    fn from(record: &ConnRecord) -> Self {
        let v6 = Ipv6Addr::from(record.orig_addr);
        let ip = v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6));
        let comm_len = record
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(record.comm.len());
        Self {
            original_dst: SocketAddr::new(ip, record.orig_port),
            tgid: record.tgid,
            pid: record.pid,
            uid: record.uid,
            gid: record.gid,
            cgroup_id: record.cgroup_id,
            netns_cookie: record.netns_cookie,
            socket_cookie: record.socket_cookie,
            comm: String::from_utf8_lossy(&record.comm[..comm_len]).into_owned(),
        }
    }
}

/// What /proc and the cgroup tree add to the kernel facts. Each field is `None` when the process or
/// cgroup was already gone or unreadable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessDetails {
    pub exe: Option<PathBuf>,
    /// Arguments joined by spaces, truncated to [`MAX_CMDLINE`] bytes.
    pub cmdline: Option<String>,
    /// First 16 hex digits of the SHA-256 of the whole command line (NUL-separated, untruncated):
    /// groups identical invocations without logging long arguments twice.
    pub cmdline_hash: Option<String>,
    pub user: Option<String>,
    /// Path of the cgroup relative to the cgroup2 root.
    pub cgroup: Option<String>,
    /// Pod, container or systemd unit, as the cgroup path names them.
    pub placement: CgroupIdentity,
}

/// Longest command line kept.
pub const MAX_CMDLINE: usize = 512;

/// Reads process details, cached per (process, cgroup, uid) for a short time: the connections of one
/// process cost one /proc read between them.
pub struct Enricher {
    cgroups: CgroupNames,
    users: Mutex<HashMap<u32, Option<String>>>,
    cache: moka::sync::Cache<(u32, u64, u32), Arc<ProcessDetails>>,
}

/// How long process details are reused: bounds how stale an exe is after an `execve` in place.
pub const DETAILS_TTL: Duration = Duration::from_secs(30);

impl Enricher {
    pub fn new(cgroups: CgroupNames) -> Self {
        Self {
            cgroups,
            users: Mutex::new(HashMap::new()),
            cache: moka::sync::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(DETAILS_TTL)
                .build(),
        }
    }

    fn key(facts: &KernelFacts) -> (u32, u64, u32) {
        (facts.tgid, facts.cgroup_id, facts.uid)
    }

    /// Cached details, without blocking.
    pub fn cached(&self, facts: &KernelFacts) -> Option<Arc<ProcessDetails>> {
        self.cache.get(&Self::key(facts))
    }

    /// Cached details, or reads them. Blocking on a miss (procfs, passwd): run it on a blocking thread.
    pub fn details(&self, facts: &KernelFacts) -> Arc<ProcessDetails> {
        if let Some(details) = self.cached(facts) {
            return details;
        }
        let details = Arc::new(self.read(facts));
        // A process that is already gone is not cached: its pid may be reused.
        if details.exe.is_some() {
            self.cache.insert(Self::key(facts), details.clone());
        }
        details
    }

    /// Reads the details from /proc and the cgroup tree (no cache).
    pub fn read(&self, facts: &KernelFacts) -> ProcessDetails {
        let proc_dir = self.cgroups.proc_dir(facts.tgid);
        let cgroup = self.cgroups.name(facts.cgroup_id, facts.tgid);
        let raw_cmdline = std::fs::read(proc_dir.join("cmdline")).ok();
        ProcessDetails {
            exe: std::fs::read_link(proc_dir.join("exe")).ok(),
            cmdline: raw_cmdline.as_deref().and_then(format_cmdline),
            cmdline_hash: raw_cmdline
                .as_deref()
                .filter(|raw| !raw.is_empty())
                .map(crate::digest::short_sha256),
            user: self.user_name(facts.uid),
            placement: cgroup.as_deref().map(container::parse).unwrap_or_default(),
            cgroup,
        }
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        if let Some(name) = self.users.lock().ok().and_then(|users| users.get(&uid).cloned()) {
            return name;
        }
        let name = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name);
        if let Ok(mut users) = self.users.lock() {
            users.insert(uid, name.clone());
        }
        name
    }
}

/// NUL-separated arguments to one line, truncated at a character boundary.
fn format_cmdline(raw: &[u8]) -> Option<String> {
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        return None;
    }
    let mut line = args.join(" ");
    if line.len() > MAX_CMDLINE {
        let mut end = MAX_CMDLINE;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_ebpf::ipv4_mapped;

    #[test]
    fn kernel_facts_from_record() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let record = ConnRecord {
            cgroup_id: 7,
            netns_cookie: 9,
            socket_cookie: 11,
            orig_addr: ipv4_mapped([203, 0, 113, 10]),
            tgid: 100,
            pid: 101,
            uid: 1000,
            gid: 1001,
            orig_port: 443,
            family: 2,
            _pad: [0; 4],
            comm,
        };
        let facts = KernelFacts::from(&record);
        assert_eq!(facts.original_dst, "203.0.113.10:443".parse().expect("addr"));
        assert_eq!(facts.comm, "curl");
        assert_eq!(
            (facts.tgid, facts.pid, facts.uid, facts.gid),
            (100, 101, 1000, 1001)
        );
    }

    #[test]
    fn cmdline_is_joined_and_truncated() {
        assert_eq!(
            format_cmdline(b"python3\0-m\0app\0").as_deref(),
            Some("python3 -m app")
        );
        assert_eq!(format_cmdline(b""), None);
        let long = "é".repeat(400);
        let formatted = format_cmdline(long.as_bytes()).expect("some");
        assert!(formatted.len() <= MAX_CMDLINE);
    }
}
