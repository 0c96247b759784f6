//! Loading and attaching the eBPF programs, and the daemon's handles on their maps.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::cgroup_skb::CgroupSkbAttachType;
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSkb, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use interceptor_ebpf::{
    CONFIG_FLAG_ENABLED, CONFIG_FLAG_LEARN_DNS, CONFIG_FLAG_WATCH_HELLOS, COUNTER_COUNT, COUNTER_NAMES,
    ConnKey, ConnRecord, DomainInfo, LearnedTarget, MAP_CONFIG, MAP_COUNTERS, MAP_DOMAINS, MAP_ESTABLISHED,
    MAP_LEARNED, MAP_PENDING, MAP_SNI_EVENTS, MAP_TARGETS, MAP_WATCHED, RedirectConfig, TargetKey,
    TargetValue, WatchedSuffix, ipv4_mapped, ipv4_unmapped,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::config::EbpfLogLevel;

/// The eBPF object built by `build.rs` from the `interceptor-ebpf` package.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor-ebpf"));

/// The cgroup/connect and sendmsg programs: (function name in the object).
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "redirect_connect4",
    "redirect_connect6",
    "refuse_quic4",
    "refuse_quic6",
];
/// The sock_ops program.
const SOCK_OPS_PROGRAM: &str = "record_established";
/// The cgroup_skb programs: DNS learning on ingress, ClientHello watching on egress.
const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("learn_dns", CgroupSkbAttachType::Ingress),
    ("watch_hellos", CgroupSkbAttachType::Egress),
];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "loading the eBPF programs was not permitted ({0}): run as root or with CAP_BPF, CAP_NET_ADMIN \
         and CAP_PERFMON"
    )]
    NotPermitted(String),
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("eBPF program {name}: {}", error_chain(error.as_ref()))]
    Program {
        name: &'static str,
        error: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {error}")]
    Map {
        name: &'static str,
        error: Box<aya::maps::MapError>,
    },
    #[error("opening cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("pinning link {0}: {1}")]
    Pin(PathBuf, String),
    #[error("bpffs directory {0}: {1}")]
    Bpffs(PathBuf, std::io::Error),
}

/// An error and its sources, joined by `: ` (aya keeps the errno in the source).
fn error_chain(error: &dyn std::error::Error) -> String {
    std::iter::successors(Some(error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Where redirected connections go.
#[derive(Clone, Debug)]
pub struct RedirectTarget {
    /// Proxy listener port.
    pub proxy_port: u16,
    /// Node addresses for callers in other network namespaces (at most one per family).
    pub node_addresses: Vec<IpAddr>,
    /// Netns cookie of the daemon's network namespace.
    pub host_netns_cookie: u64,
    /// Learning targets from DNS answers, and watching for escaped ClientHellos.
    pub learning: LearningSettings,
}

/// What the packet programs do (see `interceptor-ebpf`).
#[derive(Clone, Copy, Debug)]
pub struct LearningSettings {
    /// Learn targets from the DNS answers local sockets receive.
    pub learn_dns: bool,
    /// How long a learned target outlives its answer's TTL.
    pub grace: std::time::Duration,
    /// Cap on answer TTLs.
    pub max_ttl: std::time::Duration,
    /// Report ClientHellos with a provider SNI to non-target destinations, and encrypted-DNS hints.
    pub watch_hellos: bool,
}

/// Options for [`Redirector::attach`].
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// Cgroup v2 directory to attach to.
    pub cgroup: PathBuf,
    /// When set, links are pinned there so they outlive the daemon (fail-closed).
    pub pin_dir: Option<PathBuf>,
    /// Level compiled into the programs' aya-log statements.
    pub log_level: EbpfLogLevel,
}

/// The loaded and attached programs. Dropping it detaches them (unless pinned).
pub struct Redirector {
    /// Owns the programs and their links; dropped last.
    ebpf: Ebpf,
    config: Array<MapData, RedirectConfig>,
    redirect: RedirectConfig,
    pinned: Vec<PinnedLink>,
    attached: Vec<&'static str>,
}

/// Handles on the maps other subsystems use.
pub struct Maps {
    pub targets: TargetMap,
    pub learned: LearnedMap,
    pub watched: WatchedNames,
    pub sni_events: RingBuf<MapData>,
    pub attribution: AttributionMap,
    pub counters: Counters,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Loads every program into the kernel (its verifier checks them) and unloads them, attaching nothing:
/// what `interceptor doctor` uses to prove this kernel and these privileges can run the daemon.
pub fn verify_programs() -> Result<Vec<&'static str>, EbpfError> {
    raise_memlock_limit();
    let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(classify_load_error)?;
    let mut verified = Vec::new();
    for name in SOCK_ADDR_PROGRAMS {
        let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        verified.push(name);
    }
    let program: &mut SockOps = program_mut(&mut ebpf, SOCK_OPS_PROGRAM)?;
    program.load().map_err(|e| program_error(SOCK_OPS_PROGRAM, e))?;
    verified.push(SOCK_OPS_PROGRAM);
    for (name, _) in SKB_PROGRAMS {
        let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
        program.load().map_err(|e| program_error(name, e))?;
        verified.push(name);
    }
    Ok(verified)
}

impl Redirector {
    /// Loads the programs, configures them and attaches them to the cgroup.
    pub fn attach(options: &AttachOptions, target: &RedirectTarget) -> Result<(Self, Maps), EbpfError> {
        raise_memlock_limit();
        let level = options.log_level.as_aya_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .map_err(classify_load_error)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                debug!(error = %e, "eBPF programs have no log map");
                None
            }
        };

        let mut config: Array<MapData, RedirectConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
        let redirect = redirect_config(target);
        config.set(0, redirect, 0).map_err(|e| map_error(MAP_CONFIG, e))?;
        let maps = Maps {
            targets: TargetMap {
                map: take_map(&mut ebpf, MAP_TARGETS)?,
            },
            learned: LearnedMap {
                map: take_map(&mut ebpf, MAP_LEARNED)?,
            },
            watched: WatchedNames {
                suffixes: take_map(&mut ebpf, MAP_WATCHED)?,
                domains: take_map(&mut ebpf, MAP_DOMAINS)?,
            },
            sni_events: take_map(&mut ebpf, MAP_SNI_EVENTS)?,
            attribution: AttributionMap {
                established: Mutex::new(take_map(&mut ebpf, MAP_ESTABLISHED)?),
                pending: take_map(&mut ebpf, MAP_PENDING)?,
            },
            counters: Counters {
                map: take_map(&mut ebpf, MAP_COUNTERS)?,
            },
            logger,
        };

        let cgroup = File::open(&options.cgroup).map_err(|e| EbpfError::Cgroup(options.cgroup.clone(), e))?;
        if let Some(dir) = &options.pin_dir {
            remove_stale_pins(dir)?;
        }
        let mut pinned = Vec::new();
        let mut attached = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program.load().map_err(|e| program_error(name, e))?;
            let link_id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| program_error(name, e))?;
            if let Some(dir) = &options.pin_dir {
                let link = program.take_link(link_id).map_err(|e| program_error(name, e))?;
                pinned.push(pin(link, dir, name)?);
            }
            attached.push(name);
        }
        let program: &mut SockOps = program_mut(&mut ebpf, SOCK_OPS_PROGRAM)?;
        program.load().map_err(|e| program_error(SOCK_OPS_PROGRAM, e))?;
        let link_id = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| program_error(SOCK_OPS_PROGRAM, e))?;
        if let Some(dir) = &options.pin_dir {
            let link = program
                .take_link(link_id)
                .map_err(|e| program_error(SOCK_OPS_PROGRAM, e))?;
            pinned.push(pin(link, dir, SOCK_OPS_PROGRAM)?);
        }
        attached.push(SOCK_OPS_PROGRAM);
        for (name, attach_type) in SKB_PROGRAMS {
            let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            program.load().map_err(|e| program_error(name, e))?;
            // Attached through a BPF link, which the kernel always treats as multi-attach: other
            // cgroup_skb programs on the node (systemd's IP accounting and firewalling, CNI plugins)
            // keep working on this cgroup and below it (a link refuses explicit attach flags).
            let link_id = program
                .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(|e| program_error(name, e))?;
            if let Some(dir) = &options.pin_dir {
                let link = program.take_link(link_id).map_err(|e| program_error(name, e))?;
                pinned.push(pin(link, dir, name)?);
            }
            attached.push(name);
        }
        info!(
            cgroup = %options.cgroup.display(),
            programs = ?attached,
            pinned = options.pin_dir.is_some(),
            "eBPF programs attached"
        );
        Ok((
            Self {
                ebpf,
                config,
                redirect,
                pinned,
                attached,
            },
            maps,
        ))
    }

    /// Names of the attached programs.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Stops (or resumes) redirecting new connections without detaching the programs.
    pub fn set_enabled(&mut self, enabled: bool) -> Result<(), EbpfError> {
        if enabled {
            self.redirect.flags |= CONFIG_FLAG_ENABLED;
        } else {
            self.redirect.flags &= !CONFIG_FLAG_ENABLED;
        }
        self.config
            .set(0, self.redirect, 0)
            .map_err(|e| map_error(MAP_CONFIG, e))
    }

    /// Detaches the programs (pinned links stay attached: fail-closed).
    pub fn detach(self) {
        let Self {
            ebpf,
            pinned,
            attached,
            ..
        } = self;
        let kept = !pinned.is_empty();
        drop(pinned);
        drop(ebpf);
        if kept {
            info!(programs = ?attached, "eBPF links stay pinned (fail-closed)");
        } else {
            info!(programs = ?attached, "eBPF programs detached");
        }
    }
}

fn redirect_config(target: &RedirectTarget) -> RedirectConfig {
    let node4 = target.node_addresses.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(v4.octets()),
        IpAddr::V6(_) => None,
    });
    let node6 = target.node_addresses.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(v6.octets()),
        IpAddr::V4(_) => None,
    });
    let learning = &target.learning;
    let mut flags = CONFIG_FLAG_ENABLED;
    if learning.learn_dns {
        flags |= CONFIG_FLAG_LEARN_DNS;
    }
    if learning.watch_hellos {
        flags |= CONFIG_FLAG_WATCH_HELLOS;
    }
    let seconds = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    RedirectConfig {
        host_netns_cookie: target.host_netns_cookie,
        daemon_tgid: std::process::id(),
        flags,
        proxy_port: target.proxy_port,
        _pad: [0; 6],
        loopback4: Ipv4Addr::LOCALHOST.octets(),
        node4: node4.unwrap_or([0; 4]),
        loopback6: Ipv6Addr::LOCALHOST.octets(),
        node6: node6.unwrap_or([0; 16]),
        dns_grace_s: seconds(learning.grace),
        dns_max_ttl_s: seconds(learning.max_ttl),
    }
}

fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if let Err(e) = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        unlimited.rlim_cur,
        unlimited.rlim_max,
    ) {
        debug!(error = %e, "cannot raise RLIMIT_MEMLOCK (not needed on kernels >= 5.11)");
    }
}

fn classify_load_error(error: aya::EbpfError) -> EbpfError {
    let text = format!("{error:#}");
    let chain = std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    if chain.contains("Operation not permitted") || chain.contains("Permission denied") {
        EbpfError::NotPermitted(chain)
    } else {
        debug!(error = %text, "eBPF load failed");
        EbpfError::Load(Box::new(error))
    }
}

fn program_error(name: &'static str, source: aya::programs::ProgramError) -> EbpfError {
    EbpfError::Program {
        name,
        error: Box::new(source),
    }
}

fn map_error(name: &'static str, source: aya::maps::MapError) -> EbpfError {
    EbpfError::Map {
        name,
        error: Box::new(source),
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::MissingProgram(name))?;
    program.try_into().map_err(|e| program_error(name, e))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    T::try_from(map).map_err(|e| map_error(name, e))
}

/// Pins a program's link as `dir/name` so it outlives the daemon.
fn pin<L>(link: L, dir: &Path, name: &str) -> Result<PinnedLink, EbpfError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let path = dir.join(name);
    let fd_link = FdLink::try_from(link).map_err(|e| EbpfError::Pin(path.clone(), e.to_string()))?;
    fd_link
        .pin(&path)
        .map_err(|e| EbpfError::Pin(path, e.to_string()))
}

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir` can hold pins: its parent must be on a bpffs. When the conventional mount point
/// `/sys/fs/bpf` exists but nothing is mounted there, bpffs is mounted (as systemd does at boot).
fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let is_bpffs = |path: &Path| {
        nix::sys::statfs::statfs(path)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| EbpfError::Bpffs(parent.to_owned(), std::io::Error::from(e)))?;
        info!(path = %parent.display(), "mounted the BPF filesystem");
        return Ok(());
    }
    Err(EbpfError::Bpffs(
        parent.to_owned(),
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a BPF filesystem (mount -t bpf bpf <dir>)",
        ),
    ))
}

/// Removes links pinned by an earlier daemon (fail-closed), which detaches them.
fn remove_stale_pins(dir: &Path) -> Result<(), EbpfError> {
    ensure_bpffs(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| EbpfError::Bpffs(dir.to_owned(), e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| EbpfError::Bpffs(dir.to_owned(), e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "removed a link pinned by an earlier daemon"),
            Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a stale pinned link"),
        }
    }
    Ok(())
}

/// Removes every pinned link under `dir` and the directory itself (`interceptor detach`).
pub fn unpin_all(dir: &Path) -> Result<usize, EbpfError> {
    if !dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| EbpfError::Bpffs(dir.to_owned(), e))?;
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path()).map_err(|e| EbpfError::Bpffs(entry.path(), e))?;
        removed += 1;
    }
    std::fs::remove_dir(dir).map_err(|e| EbpfError::Bpffs(dir.to_owned(), e))?;
    Ok(removed)
}

/// The target map: destinations redirected to the proxy. Owned by the target-discovery task.
pub struct TargetMap {
    map: HashMap<MapData, TargetKey, TargetValue>,
}

impl TargetMap {
    pub fn insert(&mut self, addr: SocketAddr, value: TargetValue) -> Result<(), EbpfError> {
        self.map
            .insert(target_key(addr), value, 0)
            .map_err(|e| map_error(MAP_TARGETS, e))
    }

    pub fn remove(&mut self, addr: SocketAddr) -> Result<(), EbpfError> {
        match self.map.remove(&target_key(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(MAP_TARGETS, e)),
        }
    }
}

/// The targets the kernel learned from DNS answers. The kernel adds and extends entries; the daemon
/// removes expired ones (the kernel already ignores them) and reports what is there.
pub struct LearnedMap {
    map: HashMap<MapData, TargetKey, LearnedTarget>,
}

impl LearnedMap {
    /// Every entry: (destination, domain index, expiry on the `CLOCK_MONOTONIC` clock in ns).
    pub fn entries(&self) -> Vec<(SocketAddr, u32, u64)> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(key, value)| (socket_addr(&key), value.domain_index, value.expires_ns))
            .collect()
    }

    /// Removes the entry for `addr` if it expired at or before `now_ns` (the kernel may have just
    /// extended it: it is read again first). Returns whether it was removed.
    pub fn remove_expired(&mut self, addr: SocketAddr, now_ns: u64) -> Result<bool, EbpfError> {
        let key = target_key(addr);
        match self.map.get(&key, 0) {
            Ok(value) if value.expires_ns <= now_ns => match self.map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(true),
                Err(e) => Err(map_error(MAP_LEARNED, e)),
            },
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_error(MAP_LEARNED, e)),
        }
    }
}

/// The names the kernel watches in DNS answers and ClientHellos.
pub struct WatchedNames {
    suffixes: HashMap<MapData, u64, WatchedSuffix>,
    domains: Array<MapData, DomainInfo>,
}

impl WatchedNames {
    /// Sets domain `index`.
    pub fn set_domain(&mut self, index: u32, info: DomainInfo) -> Result<(), EbpfError> {
        self.domains
            .set(index, info, 0)
            .map_err(|e| map_error(MAP_DOMAINS, e))
    }

    /// Sets the patterns of one suffix hash.
    pub fn set_suffix(&mut self, hash: u64, suffix: WatchedSuffix) -> Result<(), EbpfError> {
        self.suffixes
            .insert(hash, suffix, 0)
            .map_err(|e| map_error(MAP_WATCHED, e))
    }
}

/// The current `CLOCK_MONOTONIC` time in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A socket address from 16 address bytes (IPv4-mapped for IPv4) and a port.
pub fn socket_addr_from(addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = match ipv4_unmapped(addr) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(*addr)),
    };
    SocketAddr::new(ip, port)
}

fn socket_addr(key: &TargetKey) -> SocketAddr {
    socket_addr_from(&key.addr, key.port)
}

fn address_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn target_key(addr: SocketAddr) -> TargetKey {
    TargetKey::new(address_bytes(addr.ip()), addr.port())
}

/// The attribution maps: the proxy takes the record of each accepted connection.
pub struct AttributionMap {
    established: Mutex<HashMap<MapData, ConnKey, ConnRecord>>,
    pending: HashMap<MapData, u64, ConnRecord>,
}

impl AttributionMap {
    /// Takes (reads and deletes) the record of the connection whose client is `peer`.
    pub fn take(&self, peer: SocketAddr) -> Option<ConnRecord> {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let key = ConnKey::new(address_bytes(ip), peer.port());
        let mut map = self.established.lock().ok()?;
        let record = map.get(&key, 0).ok()?;
        if let Err(e) = map.remove(&key) {
            warn!(error = %e, "cannot delete a connection record");
        }
        Some(record)
    }

    /// Entries in (pending, established): both drain to zero when every redirected connection was accepted.
    pub fn entry_counts(&self) -> (usize, usize) {
        let pending = self.pending.keys().filter(Result::is_ok).count();
        let established = self
            .established
            .lock()
            .map(|m| m.keys().filter(Result::is_ok).count())
            .unwrap_or(0);
        (pending, established)
    }
}

/// The per-CPU counters of the programs.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// (name, value summed over CPUs) for each counter.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        (0..COUNTER_COUNT)
            .map(|i| {
                let total = self.map.get(&i, 0).map(|values| values.iter().sum()).unwrap_or(0);
                (COUNTER_NAMES[i as usize], total)
            })
            .collect()
    }
}

/// Registers a kernel ring buffer (which owns its map fd) with the tokio reactor.
#[allow(unsafe_code)]
pub fn register_ring<T: std::os::fd::AsRawFd>(ring: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `ring` owns its map fd, which stays open and unchanged until `ring` is dropped, and the
    // AsyncFd owns `ring`.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Waits until the ring buffer is readable; `None` at `shutdown` or when polling failed (logged,
/// naming `what`).
pub async fn next_readable<'a, T: std::os::fd::AsRawFd>(
    fd: &'a mut AsyncFd<T>,
    shutdown: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<tokio::io::unix::AsyncFdReadyMutGuard<'a, T>> {
    let readable = tokio::select! {
        _ = shutdown.cancelled() => return None,
        readable = fd.readable_mut() => readable,
    };
    match readable {
        Ok(guard) => Some(guard),
        Err(e) => {
            warn!(error = %e, "{what} failed; its events are lost from now on");
            None
        }
    }
}

/// Forwards aya-log records of the programs into `tracing` until `shutdown`.
pub async fn forward_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut fd = match register_ring(logger) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the eBPF log buffer; eBPF logs are lost");
            return;
        }
    };
    while let Some(mut guard) = next_readable(&mut fd, &shutdown, "the eBPF log buffer").await {
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
