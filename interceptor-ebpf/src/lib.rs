//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding and is plain data, so the kernel and
//! userspace agree on its layout. Addresses are stored as 16 bytes in network order; IPv4
//! addresses use the IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one map serves both families.
//! Ports are stored in host byte order.
#![no_std]

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

/// Capacity of the target map.
pub const MAX_TARGETS: u32 = 16_384;
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
/// Number of counters in [`MAP_COUNTERS`].
pub const COUNTER_COUNT: u32 = 5;

/// Names of the counters, indexed by the `COUNTER_*` constants.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] =
    ["redirected", "skipped", "refused", "no_route", "record_failed"];

/// `RedirectConfig::flags`: redirection is active (cleared to pause redirection without detaching).
pub const CONFIG_FLAG_ENABLED: u32 = 1;

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
}
