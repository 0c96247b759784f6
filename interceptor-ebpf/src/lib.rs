//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding and is plain data, so the kernel and
//! userspace agree on its layout. Addresses are stored as 16 bytes in network order; IPv4
//! addresses use the IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one map serves both families.
//! Ports are stored in host byte order.
#![no_std]

pub mod dns;
pub mod hello;
pub mod names;
pub mod opaque;

pub use names::{WatchedPattern, WatchedSuffix};

/// Name of the map holding the target destinations ([`TargetKey`] → [`TargetValue`]).
pub const MAP_TARGETS: &str = "TARGETS";
/// Name of the single-entry array holding the [`RedirectConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the LRU map of records waiting for the TCP handshake (socket cookie → [`ConnRecord`]).
pub const MAP_PENDING: &str = "PENDING";
/// Name of the LRU map of records of established redirected connections ([`ConnKey`] → [`ConnRecord`]).
pub const MAP_ESTABLISHED: &str = "ESTABLISHED";
/// Name of the per-CPU counter array (indices are the `COUNTER_*` constants).
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Name of the map of watched name suffixes (suffix hash → [`WatchedSuffix`], see [`names`]).
pub const MAP_WATCHED: &str = "WATCHED";
/// Name of the array of watched domains ([`DomainInfo`], indexed by domain index).
pub const MAP_DOMAINS: &str = "DOMAINS";
/// Name of the LRU map of targets learned from DNS answers ([`TargetKey`] → [`LearnedTarget`]).
pub const MAP_LEARNED: &str = "LEARNED";
/// Name of the ring buffer of [`SniEvent`]s (escaped connections, DoH/DoT hints).
pub const MAP_SNI_EVENTS: &str = "SNI_EVENTS";

/// Capacity of the target map.
pub const MAX_TARGETS: u32 = 16_384;
/// Capacity of the learned-target map (LRU: a flood of answers evicts the oldest first).
pub const MAX_LEARNED: u32 = 16_384;
/// Capacity of the watched-suffix map.
pub const MAX_WATCHED: u32 = 1_024;
/// Capacity of the domain array.
pub const MAX_DOMAINS: u32 = 512;
/// Ports per domain the kernel learns targets for.
pub const PORTS_PER_DOMAIN: usize = 4;
/// Size of the SNI event ring buffer in bytes.
pub const SNI_EVENTS_BYTES: u32 = 64 * 1024;

/// Capacity of each attribution map (LRU: the oldest unclaimed records are evicted first).
pub const MAX_CONNECTIONS: u32 = 65_536;

/// TCP connects rewritten to the proxy.
pub const COUNTER_REDIRECTED: u32 = 0;
/// Connects to a target that were left alone (the daemon's own sockets).
pub const COUNTER_SKIPPED: u32 = 1;
/// UDP datagrams or connects to a target on port 443 refused (QUIC), so clients fall back to TCP.
pub const COUNTER_REFUSED: u32 = 2;
/// Connects from another network namespace to a target while no node redirect address is configured.
pub const COUNTER_NO_ROUTE: u32 = 3;
/// Records that could not be stored (map full or update failed).
pub const COUNTER_RECORD_FAILED: u32 = 4;
/// DNS responses examined (UDP or TCP source port 53, delivered to a local socket).
pub const COUNTER_DNS_RESPONSES: u32 = 5;
/// DNS responses whose question is a watched name.
pub const COUNTER_DNS_WATCHED: u32 = 6;
/// Addresses (per port) added to or refreshed in the learned-target map.
pub const COUNTER_DNS_LEARNED: u32 = 7;
/// DNS responses that could not be parsed (truncated, bad label or pointer, name too long).
pub const COUNTER_DNS_MALFORMED: u32 = 8;
/// Learned targets that could not be stored.
pub const COUNTER_DNS_LEARN_FAILED: u32 = 9;
/// TLS ClientHellos with a watched provider SNI sent to a destination that is not a target.
pub const COUNTER_HELLO_ESCAPED: u32 = 10;
/// TLS ClientHellos to a well-known DNS-over-HTTPS name, or to port 853 (DNS over TLS).
pub const COUNTER_HELLO_ENCRYPTED_DNS: u32 = 11;
/// SNI events lost because the ring buffer was full.
pub const COUNTER_SNI_EVENTS_LOST: u32 = 12;
/// Number of counters in [`MAP_COUNTERS`].
pub const COUNTER_COUNT: u32 = 13;

/// Names of the counters, indexed by the `COUNTER_*` constants.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "redirected",
    "skipped",
    "refused",
    "no_route",
    "record_failed",
    "dns_responses",
    "dns_watched",
    "dns_learned",
    "dns_malformed",
    "dns_learn_failed",
    "hello_escaped",
    "hello_encrypted_dns",
    "sni_events_lost",
];

/// `RedirectConfig::flags`: redirection is active (cleared to pause redirection without detaching).
pub const CONFIG_FLAG_ENABLED: u32 = 1;
/// `RedirectConfig::flags`: learn targets from the DNS answers local sockets receive.
pub const CONFIG_FLAG_LEARN_DNS: u32 = 2;
/// `RedirectConfig::flags`: report ClientHellos with a watched SNI to non-target destinations.
pub const CONFIG_FLAG_WATCH_HELLOS: u32 = 4;

/// `DomainInfo::flags`: an AI provider domain (its answers become targets).
pub const DOMAIN_FLAG_PROVIDER: u32 = 1;
/// `DomainInfo::flags`: a well-known DNS-over-HTTPS name (connections are counted as a hint).
pub const DOMAIN_FLAG_ENCRYPTED_DNS: u32 = 2;

/// `SniEvent::kind`: a ClientHello for a provider that bypassed the proxy.
pub const SNI_EVENT_ESCAPED: u32 = 1;
/// `SniEvent::kind`: a ClientHello to a DNS-over-HTTPS name.
pub const SNI_EVENT_DOH: u32 = 2;
/// `SniEvent::kind`: a ClientHello to port 853 (DNS over TLS).
pub const SNI_EVENT_DOT: u32 = 3;

/// A destination (address, port) that is redirected to the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// Destination address, IPv6 or IPv4-mapped, network order.
    pub addr: [u8; 16],
    /// Destination port, host order.
    pub port: u16,
    /// Always zero.
    pub _pad: [u8; 2],
}

/// What the daemon knows about a target; the kernel program only needs its presence.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the provider domain in the daemon's target table (for logs and metrics).
    pub domain_index: u32,
    /// Where the address came from (`TARGET_SOURCE_*`).
    pub source: u32,
}

/// The address was resolved by the daemon.
pub const TARGET_SOURCE_RESOLVED: u32 = 1;
/// The address was pinned in the policy.
pub const TARGET_SOURCE_STATIC: u32 = 2;

/// A watched domain as the kernel sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainInfo {
    /// Ports connections to learned addresses are redirected on (zero = unused slot).
    pub ports: [u16; PORTS_PER_DOMAIN],
    /// `DOMAIN_FLAG_*` bits.
    pub flags: u32,
    /// Always zero.
    pub _pad: u32,
}

/// A target learned from a DNS answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedTarget {
    /// `CLOCK_MONOTONIC` time (ns) after which the entry is no longer a target: answer TTL (capped)
    /// plus the grace period, from the last answer that carried the address.
    pub expires_ns: u64,
    /// Domain index of the question that carried the address.
    pub domain_index: u32,
    /// Always zero.
    pub _pad: u32,
}

/// A TLS ClientHello worth reporting (see `SNI_EVENT_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniEvent {
    /// Cgroup v2 id of the sending socket.
    pub cgroup_id: u64,
    /// Destination address, IPv6 or IPv4-mapped, network order.
    pub addr: [u8; 16],
    /// `SNI_EVENT_*`.
    pub kind: u32,
    /// Owner uid of the sending socket.
    pub uid: u32,
    /// Domain index of the SNI (zero for DNS over TLS).
    pub domain_index: u32,
    /// Destination port, host order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

impl SniEvent {
    /// Decodes an event as the kernel wrote it (native byte order); `None` when `bytes` is short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
            let mut out = [0u8; N];
            out.copy_from_slice(bytes.get(at..at + N)?);
            Some(out)
        }
        Some(Self {
            cgroup_id: u64::from_ne_bytes(array(bytes, 0)?),
            addr: array(bytes, 8)?,
            kind: u32::from_ne_bytes(array(bytes, 24)?),
            uid: u32::from_ne_bytes(array(bytes, 28)?),
            domain_index: u32::from_ne_bytes(array(bytes, 32)?),
            port: u16::from_ne_bytes(array(bytes, 36)?),
            _pad: 0,
        })
    }
}

/// Per-CPU scratch space of the packet programs (too large for the 512-byte stack).
#[repr(C)]
pub struct Scratch {
    pub msg: [u8; dns::DNS_MAX],
    pub name: [u8; names::NAME_MAX],
    pub candidates: names::Candidates,
    /// Offset of the next DNS record. Kept in memory on purpose: the verifier does not track map
    /// values, so each loop iteration starts from the same state and verification stays linear.
    pub cursor: u32,
    /// Length of the name in `name`, kept in memory for the same reason.
    pub name_len: u32,
    /// Bytes loaded into `msg`, kept in memory for the same reason.
    pub msg_len: u32,
    pub work: dns::ParseWork,
}

impl Scratch {
    /// Records how many bytes `msg` holds.
    #[inline(always)]
    pub fn set_msg_len(&mut self, value: usize) {
        opaque::set(&mut self.msg_len, value as u32);
    }

    /// How many bytes `msg` holds, read from memory each time (see [`opaque`]).
    #[inline(always)]
    pub fn msg_len(&self) -> usize {
        opaque::get(&self.msg_len) as usize & dns::DNS_MASK
    }

    /// Stores a name length and reads it back through memory (see [`opaque`]).
    #[inline(always)]
    pub fn opaque_name_len(&mut self, value: usize) -> usize {
        opaque::set(&mut self.name_len, value as u32);
        opaque::get(&self.name_len) as usize
    }

    /// Offset of the next DNS record (see [`opaque`]).
    #[inline(always)]
    pub fn cursor(&self) -> usize {
        opaque::get(&self.cursor) as usize
    }

    #[inline(always)]
    pub fn set_cursor(&mut self, value: usize) {
        opaque::set(&mut self.cursor, value as u32);
    }
}

/// Where redirected connections go, and which sockets must never be redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Netns cookie of the daemon's network namespace: callers there are sent to loopback.
    pub host_netns_cookie: u64,
    /// Process id (tgid) of the daemon: its own connects are never redirected.
    pub daemon_tgid: u32,
    /// `CONFIG_FLAG_*` bits.
    pub flags: u32,
    /// Proxy listener port, host order.
    pub proxy_port: u16,
    /// Always zero.
    pub _pad: [u8; 6],
    /// IPv4 listener for callers in the daemon's namespace (network order), usually 127.0.0.1.
    pub loopback4: [u8; 4],
    /// IPv4 listener for callers in other namespaces (network order); zero when not configured.
    pub node4: [u8; 4],
    /// IPv6 listener for callers in the daemon's namespace, usually ::1.
    pub loopback6: [u8; 16],
    /// IPv6 listener for callers in other namespaces; zero when not configured.
    pub node6: [u8; 16],
    /// Seconds a learned target outlives the TTL of the answer that carried it.
    pub dns_grace_s: u32,
    /// Answer TTLs above this many seconds are capped.
    pub dns_max_ttl_s: u32,
}

/// The client side of a redirected connection, as the proxy sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client address, IPv6 or IPv4-mapped, network order.
    pub addr: [u8; 16],
    /// Client port, host order.
    pub port: u16,
    /// Always zero.
    pub _pad: [u8; 6],
}

/// What the kernel knew about a connection when it was redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// Cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Netns cookie of the caller's network namespace.
    pub netns_cookie: u64,
    /// Socket cookie of the client socket.
    pub socket_cookie: u64,
    /// Original destination address, IPv6 or IPv4-mapped, network order.
    pub orig_addr: [u8; 16],
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    /// User id of the caller.
    pub uid: u32,
    /// Group id of the caller.
    pub gid: u32,
    /// Original destination port, host order.
    pub orig_port: u16,
    /// Address family of the socket (`AF_INET` = 2 or `AF_INET6` = 10).
    pub family: u16,
    /// Always zero.
    pub _pad: [u8; 4],
    /// Command name of the calling thread, NUL padded.
    pub comm: [u8; 16],
}

impl TargetKey {
    /// A key for `addr` (16 bytes, network order) and `port` (host order).
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 2],
        }
    }
}

impl ConnKey {
    /// A key for `addr` (16 bytes, network order) and `port` (host order).
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: [0; 6],
        }
    }
}

/// The IPv4-mapped IPv6 form of an IPv4 address given in network order.
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address, if it is one.
pub const fn ipv4_unmapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
    {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are #[repr(C)], Copy, have no padding bytes and every bit pattern is valid.
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::TargetValue {}
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::DomainInfo {}
    unsafe impl aya::Pod for super::LearnedTarget {}
    unsafe impl aya::Pod for super::SniEvent {}
    unsafe impl aya::Pod for super::WatchedSuffix {}
}
