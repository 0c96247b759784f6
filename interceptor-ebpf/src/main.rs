//! eBPF programs of the interceptor.
//!
//! * `redirect_connect4` / `redirect_connect6` (cgroup/connect4, cgroup/connect6): a TCP connect to a
//!   target (address, port) is rewritten to the proxy's listener, and a record of the caller is stored
//!   under the socket cookie. UDP connects to a target on port 443 (QUIC) are refused.
//! * `refuse_quic4` / `refuse_quic6` (cgroup/sendmsg4, cgroup/sendmsg6): unconnected UDP datagrams to a
//!   target on port 443 are refused.
//! * `record_established` (sock_ops): when a redirected connection is established, its record moves to
//!   a map keyed by the client's (address, port), which is what the proxy sees as the peer of the
//!   accepted socket. The proxy deletes the record when it reads it.
//!
//! The entry points are thin shims; the logic lives in the `try_*` functions.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_get_netns_cookie, generated::bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use interceptor_ebpf::{
    CONFIG_FLAG_ENABLED, COUNTER_COUNT, COUNTER_NO_ROUTE, COUNTER_RECORD_FAILED, COUNTER_REDIRECTED,
    COUNTER_REFUSED, COUNTER_SKIPPED, ConnKey, ConnRecord, MAX_CONNECTIONS, MAX_TARGETS, RedirectConfig,
    TargetKey, TargetValue, ipv4_mapped, ipv4_unmapped,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const QUIC_PORT: u16 = 443;

#[map]
static TARGETS: HashMap<TargetKey, TargetValue> = HashMap::with_max_entries(MAX_TARGETS, 0);

#[map]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map]
static PENDING: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static ESTABLISHED: LruHashMap<ConnKey, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect::<false>(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect::<true>(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn refuse_quic4(ctx: SockAddrContext) -> i32 {
    match try_sendmsg::<false>(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn refuse_quic6(ctx: SockAddrContext) -> i32 {
    match try_sendmsg::<true>(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[sock_ops]
pub fn record_established(ctx: SockOpsContext) -> u32 {
    match try_record_established(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Reads the destination of a sock_addr context as (IPv6 or IPv4-mapped address, host-order port).
/// `V6` is a const parameter so that every context access has a constant offset (the verifier refuses
/// loads through a computed context pointer).
#[inline(always)]
fn destination<const V6: bool>(sa: *mut bpf_sock_addr) -> ([u8; 16], u16) {
    // SAFETY: `sa` is the context pointer the kernel handed us; each field is read with the 4-byte
    // loads the verifier accepts for bpf_sock_addr.
    unsafe {
        let port = u16::from_be(core::ptr::read_volatile(&(*sa).user_port) as u16);
        let addr = match V6 {
            false => ipv4_mapped(core::ptr::read_volatile(&(*sa).user_ip4).to_ne_bytes()),
            true => {
                let mut addr = [0u8; 16];
                let mut i = 0;
                while i < 4 {
                    let word = core::ptr::read_volatile(&(*sa).user_ip6[i]).to_ne_bytes();
                    addr[i * 4] = word[0];
                    addr[i * 4 + 1] = word[1];
                    addr[i * 4 + 2] = word[2];
                    addr[i * 4 + 3] = word[3];
                    i += 1;
                }
                addr
            }
        };
        (addr, port)
    }
}

/// Rewrites the destination of a sock_addr context.
#[inline(always)]
fn set_destination<const V6: bool>(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: u16) {
    // SAFETY: writable fields of the context, written with 4-byte stores.
    unsafe {
        match V6 {
            false => {
                let v4 = [addr[12], addr[13], addr[14], addr[15]];
                core::ptr::write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(v4));
            }
            true => {
                let mut i = 0;
                while i < 4 {
                    let word = [addr[i * 4], addr[i * 4 + 1], addr[i * 4 + 2], addr[i * 4 + 3]];
                    core::ptr::write_volatile(&mut (*sa).user_ip6[i], u32::from_ne_bytes(word));
                    i += 1;
                }
            }
        }
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(port.to_be()));
    }
}

/// The target's key and the configuration when the destination is a target and the caller is not the
/// daemon itself.
#[inline(always)]
fn match_target<const V6: bool>(ctx: &SockAddrContext) -> Option<(TargetKey, &'static RedirectConfig)> {
    let (addr, port) = destination::<V6>(ctx.sock_addr);
    let key = TargetKey::new(addr, port);
    TARGETS.get_ptr(&key)?;
    let config = CONFIG.get(0)?;
    if config.flags & CONFIG_FLAG_ENABLED == 0 {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == config.daemon_tgid {
        count(COUNTER_SKIPPED);
        return None;
    }
    Some((key, config))
}

#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some((target, config)) = match_target::<V6>(ctx) else {
        return Ok(ALLOW);
    };
    // SAFETY: context pointer provided by the kernel.
    let sock_type = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).type_) };
    if sock_type == SOCK_DGRAM {
        return Ok(refuse_quic(ctx, &target));
    }
    if sock_type != SOCK_STREAM {
        return Ok(ALLOW);
    }

    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let in_host_netns = netns_cookie == config.host_netns_cookie;
    let mapped = ipv4_unmapped(&target.addr).is_some();
    let proxy_addr = match (V6 && !mapped, in_host_netns) {
        (false, true) => ipv4_mapped(config.loopback4),
        (false, false) => ipv4_mapped(config.node4),
        (true, true) => config.loopback6,
        (true, false) => config.node6,
    };
    if is_unspecified(&proxy_addr) {
        count(COUNTER_NO_ROUTE);
        warn!(
            ctx,
            "no redirect address for a caller in another network namespace; port {}", target.port
        );
        return Ok(ALLOW);
    }

    // SAFETY: both helpers accept a sock_addr context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let record = ConnRecord {
        cgroup_id,
        netns_cookie,
        socket_cookie,
        orig_addr: target.addr,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        orig_port: target.port,
        family: if V6 { AF_INET6 } else { AF_INET },
        _pad: [0; 4],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if PENDING.insert(&socket_cookie, &record, 0).is_err() {
        // Without a record the proxy cannot know the original destination: let it go direct.
        count(COUNTER_RECORD_FAILED);
        warn!(
            ctx,
            "cannot store the connection record; connection left unredirected"
        );
        return Ok(ALLOW);
    }
    set_destination::<V6>(ctx.sock_addr, &proxy_addr, config.proxy_port);
    count(COUNTER_REDIRECTED);
    debug!(
        ctx,
        "redirected tgid {} to the proxy (original port {})", record.tgid, target.port
    );
    Ok(ALLOW)
}

#[inline(always)]
fn try_sendmsg<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    match match_target::<V6>(ctx) {
        Some((target, _)) => Ok(refuse_quic(ctx, &target)),
        None => Ok(ALLOW),
    }
}

#[inline(always)]
fn refuse_quic(ctx: &SockAddrContext, target: &TargetKey) -> i32 {
    if target.port != QUIC_PORT {
        return ALLOW;
    }
    count(COUNTER_REFUSED);
    debug!(ctx, "refused UDP to a target on port 443 (QUIC)");
    REFUSE
}

#[inline(always)]
fn is_unspecified(addr: &[u8; 16]) -> bool {
    match ipv4_unmapped(addr) {
        Some(v4) => u32::from_ne_bytes(v4) == 0,
        None => {
            let mut i = 0;
            while i < 16 {
                if addr[i] != 0 {
                    return false;
                }
                i += 1;
            }
            true
        }
    }
}

fn try_record_established(ctx: &SockOpsContext) -> Result<u32, u32> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(1);
    }
    // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = PENDING.get_ptr(&cookie) else {
        return Ok(1);
    };
    // SAFETY: the pointer comes from a successful lookup; the record is copied out at once.
    let record = unsafe { *record };
    let family = ctx.family();
    let addr = if u32::from(AF_INET) == family {
        ipv4_mapped(ctx.local_ip4().to_ne_bytes())
    } else {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            // SAFETY: 4-byte read of a readable sock_ops field.
            let word = unsafe { core::ptr::read_volatile(&(*ctx.ops).local_ip6[i]) }.to_ne_bytes();
            addr[i * 4] = word[0];
            addr[i * 4 + 1] = word[1];
            addr[i * 4 + 2] = word[2];
            addr[i * 4 + 3] = word[3];
            i += 1;
        }
        addr
    };
    let key = ConnKey::new(addr, ctx.local_port() as u16);
    if ESTABLISHED.insert(&key, &record, 0).is_err() {
        count(COUNTER_RECORD_FAILED);
    }
    let _ = PENDING.remove(&cookie);
    Ok(1)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
