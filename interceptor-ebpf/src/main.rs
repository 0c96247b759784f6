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
//! * `learn_dns` (cgroup_skb/ingress): a DNS response (UDP or TCP source port 53) whose question is a
//!   watched provider name puts the addresses of its A and AAAA answers (CNAME chains included: the
//!   answer section holds the chain's addresses) into the learned-target map, before the response
//!   reaches the socket, so the application cannot connect to an address the map does not hold yet.
//! * `watch_hellos` (cgroup_skb/egress): a TLS ClientHello to port 443 whose SNI is a watched provider
//!   but whose destination is not a target escaped the proxy: it is counted and reported to the
//!   daemon with the socket's cgroup. ClientHellos to DNS-over-HTTPS names or to port 853 are
//!   reported as hints that the node's DNS view is blind to that workload.
//!
//! The entry points are thin shims; the logic lives in the `try_*` functions.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_ns, generated::bpf_get_netns_cookie, generated::bpf_get_socket_cookie,
        generated::bpf_get_socket_uid, generated::bpf_skb_cgroup_id, generated::bpf_skb_load_bytes,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use interceptor_ebpf::{
    CONFIG_FLAG_ENABLED, CONFIG_FLAG_LEARN_DNS, CONFIG_FLAG_WATCH_HELLOS, COUNTER_COUNT,
    COUNTER_DNS_LEARN_FAILED, COUNTER_DNS_LEARNED, COUNTER_DNS_MALFORMED, COUNTER_DNS_RESPONSES,
    COUNTER_DNS_WATCHED, COUNTER_HELLO_ENCRYPTED_DNS, COUNTER_HELLO_ESCAPED, COUNTER_NO_ROUTE,
    COUNTER_RECORD_FAILED, COUNTER_REDIRECTED, COUNTER_REFUSED, COUNTER_SKIPPED, COUNTER_SNI_EVENTS_LOST,
    ConnKey, ConnRecord, DOMAIN_FLAG_ENCRYPTED_DNS, DOMAIN_FLAG_PROVIDER, DomainInfo, LearnedTarget,
    MAX_CONNECTIONS, MAX_DOMAINS, MAX_LEARNED, MAX_TARGETS, MAX_WATCHED, PORTS_PER_DOMAIN, RedirectConfig,
    SNI_EVENT_DOH, SNI_EVENT_DOT, SNI_EVENT_ESCAPED, SNI_EVENTS_BYTES, Scratch, SniEvent, TargetKey,
    TargetValue, WatchedSuffix,
    dns::{self, DnsError, MAX_ANSWERS},
    hello, ipv4_mapped, ipv4_unmapped,
    names::{self, SuffixTable},
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

#[map]
static WATCHED: HashMap<u64, WatchedSuffix> = HashMap::with_max_entries(MAX_WATCHED, 0);

#[map]
static DOMAINS: Array<DomainInfo> = Array::with_max_entries(MAX_DOMAINS, 0);

#[map]
static LEARNED: LruHashMap<TargetKey, LearnedTarget> = LruHashMap::with_max_entries(MAX_LEARNED, 0);

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SNI_EVENTS: RingBuf = RingBuf::with_byte_size(SNI_EVENTS_BYTES, 0);

const PASS: i32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
const TLS_PORT: u16 = 443;
const DOT_PORT: u16 = 853;
const NS_PER_SECOND: u64 = 1_000_000_000;

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

#[cgroup_skb(ingress)]
pub fn learn_dns(ctx: SkBuffContext) -> i32 {
    try_learn_dns(&ctx);
    PASS
}

#[cgroup_skb(egress)]
pub fn watch_hellos(ctx: SkBuffContext) -> i32 {
    try_watch_hellos(&ctx);
    PASS
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
    if !is_target(&key) {
        return None;
    }
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

/// Whether connections to `key` go to the proxy: a static or resolved target, or a learned one that
/// has not expired.
#[inline(always)]
fn is_target(key: &TargetKey) -> bool {
    if TARGETS.get_ptr(key).is_some() {
        return true;
    }
    match LEARNED.get_ptr(key) {
        Some(learned) => {
            // SAFETY: pointer from a successful lookup, read at once; the helper has no preconditions.
            let (expires_ns, now) = unsafe { ((*learned).expires_ns, bpf_ktime_get_ns()) };
            expires_ns > now
        }
        None => false,
    }
}

/// The layer-4 facts of a packet (cgroup_skb programs see it from the network header on).
struct Transport {
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    dst_addr: [u8; 16],
    /// Offset of the transport payload.
    payload: usize,
}

#[inline(always)]
fn transport(ctx: &SkBuffContext) -> Option<Transport> {
    // SAFETY: reading a field of the context the kernel handed us.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (protocol, dst_addr, l4) = match protocol {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(0).ok()?;
            let header_len = ((version_ihl & 0x0f) as usize) * 4;
            let fragment: [u8; 2] = ctx.load(6).ok()?;
            // Later fragments carry no transport header (ingress programs see reassembled datagrams).
            if header_len < 20 || u16::from_be_bytes(fragment) & 0x1fff != 0 {
                return None;
            }
            let protocol: u8 = ctx.load(9).ok()?;
            let dst: [u8; 4] = ctx.load(16).ok()?;
            (protocol, ipv4_mapped(dst), header_len)
        }
        // Extension headers are not followed: DNS and TLS packets do not carry them in practice.
        ETH_P_IPV6 => (ctx.load::<u8>(6).ok()?, ctx.load::<[u8; 16]>(24).ok()?, 40),
        _ => return None,
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let payload = match protocol {
        IPPROTO_UDP => l4 + 8,
        IPPROTO_TCP => l4 + ((ctx.load::<u8>(l4 + 12).ok()? >> 4) as usize) * 4,
        _ => return None,
    };
    Some(Transport {
        protocol,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        dst_addr,
        payload,
    })
}

/// The watched-suffix map as the name matcher sees it.
struct KernelSuffixes;

impl SuffixTable for KernelSuffixes {
    #[inline(always)]
    fn get(&self, hash: u64) -> Option<WatchedSuffix> {
        // SAFETY: the value is copied out at once; userspace replaces entries whole.
        unsafe { WATCHED.get(&hash) }.copied()
    }
}

/// Copies up to `DNS_MAX` bytes from `offset` into the scratch message buffer; returns the length.
#[inline(always)]
fn load_message(ctx: &SkBuffContext, offset: usize, scratch: &mut Scratch) -> Option<usize> {
    let available = (ctx.len() as usize).checked_sub(offset)?;
    if available == 0 {
        return None;
    }
    let len = if available > dns::DNS_EXAMINED {
        dns::DNS_EXAMINED
    } else {
        available
    };
    // Written so that the verifier sees 1 <= len <= DNS_MAX (the helper refuses a possibly empty read).
    let len = ((len - 1) & dns::DNS_MASK) + 1;
    // SAFETY: the destination is the scratch message buffer, DNS_MAX bytes long, and len <= DNS_MAX.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const core::ffi::c_void,
            offset as u32,
            scratch.msg.as_mut_ptr().cast(),
            len as u32,
        )
    };
    (loaded == 0).then_some(len)
}

#[inline(always)]
fn try_learn_dns(ctx: &SkBuffContext) -> Option<()> {
    let config = CONFIG.get(0)?;
    if config.flags & CONFIG_FLAG_LEARN_DNS == 0 {
        return None;
    }
    let packet = transport(ctx)?;
    if packet.src_port != DNS_PORT {
        return None;
    }
    // DNS over TCP: a 2-byte length precedes the message. Only a segment that starts a message is
    // parsed; `complete` says whether the whole message is in it.
    let (offset, complete) = match packet.protocol {
        IPPROTO_UDP => (packet.payload, true),
        _ => {
            let prefix: [u8; 2] = ctx.load(packet.payload).ok()?;
            let announced = u16::from_be_bytes(prefix) as usize;
            let complete = (ctx.len() as usize).checked_sub(packet.payload + 2) == Some(announced);
            (packet.payload + 2, complete)
        }
    };
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch, used by one program run at a time on this CPU.
    let scratch = unsafe { &mut *scratch };
    let len = load_message(ctx, offset, scratch)?;
    scratch.set_msg_len(len);
    count(COUNTER_DNS_RESPONSES);
    let question = match dns::parse_question(
        &scratch.msg,
        scratch.msg_len(),
        &mut scratch.name,
        &mut scratch.work,
    ) {
        Ok(Some(question)) => question,
        Ok(None) => return None,
        Err(error) => {
            malformed(error, complete);
            return None;
        }
    };
    let name_len = scratch.opaque_name_len(question.name_len);
    let domain = names::match_name(&scratch.name, name_len, &KernelSuffixes, &mut scratch.candidates)?;
    let info = DOMAINS.get(u32::from(domain))?;
    if info.flags & DOMAIN_FLAG_PROVIDER == 0 {
        return None;
    }
    count(COUNTER_DNS_WATCHED);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    scratch.set_cursor(question.next);
    let mut index = 0;
    while index < MAX_ANSWERS {
        if index >= question.answers as usize {
            break;
        }
        let at = scratch.cursor();
        let record = match dns::parse_record(&scratch.msg, scratch.msg_len(), at, &mut scratch.work) {
            Ok(record) => record,
            Err(error) => {
                malformed(error, complete);
                break;
            }
        };
        scratch.set_cursor(record.next);
        if let Some(addr) = dns::record_address(&scratch.msg, scratch.msg_len(), &record) {
            let ttl = if record.ttl > config.dns_max_ttl_s {
                config.dns_max_ttl_s
            } else {
                record.ttl
            };
            let expires_ns = now + (u64::from(ttl) + u64::from(config.dns_grace_s)) * NS_PER_SECOND;
            learn(addr, domain, info, expires_ns);
        }
        index += 1;
    }
    Some(())
}

#[inline(always)]
fn malformed(error: DnsError, complete: bool) {
    // A TCP segment that holds only the start of a long message ends early by nature.
    if complete || error != DnsError::Truncated {
        count(COUNTER_DNS_MALFORMED);
    }
}

/// Adds (or extends) the learned target `addr` on each of the domain's ports.
#[inline(always)]
fn learn(addr: [u8; 16], domain: u16, info: &DomainInfo, expires_ns: u64) {
    let mut i = 0;
    while i < PORTS_PER_DOMAIN {
        let port = info.ports[i];
        i += 1;
        if port == 0 {
            continue;
        }
        let key = TargetKey::new(addr, port);
        if let Some(existing) = LEARNED.get_ptr_mut(&key) {
            // SAFETY: pointer from a successful lookup; a concurrent update of the same entry writes an
            // expiry that is about as recent.
            unsafe {
                if (*existing).expires_ns < expires_ns {
                    (*existing).expires_ns = expires_ns;
                }
            }
            count(COUNTER_DNS_LEARNED);
            continue;
        }
        let value = LearnedTarget {
            expires_ns,
            domain_index: u32::from(domain),
            _pad: 0,
        };
        if LEARNED.insert(&key, &value, 0).is_ok() {
            count(COUNTER_DNS_LEARNED);
        } else {
            count(COUNTER_DNS_LEARN_FAILED);
        }
    }
}

#[inline(always)]
fn try_watch_hellos(ctx: &SkBuffContext) -> Option<()> {
    let config = CONFIG.get(0)?;
    if config.flags & CONFIG_FLAG_WATCH_HELLOS == 0 {
        return None;
    }
    let packet = transport(ctx)?;
    if packet.protocol != IPPROTO_TCP || (packet.dst_port != TLS_PORT && packet.dst_port != DOT_PORT) {
        return None;
    }
    let head: [u8; 6] = ctx.load(packet.payload).ok()?;
    if !hello::looks_like_client_hello(&head) {
        return None;
    }
    if packet.dst_port == DOT_PORT {
        count(COUNTER_HELLO_ENCRYPTED_DNS);
        report(ctx, &packet, SNI_EVENT_DOT, 0);
        return Some(());
    }
    if is_target(&TargetKey::new(packet.dst_addr, packet.dst_port)) {
        return None;
    }
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch, used by one program run at a time on this CPU.
    let scratch = unsafe { &mut *scratch };
    let len = load_message(ctx, packet.payload, scratch)?;
    scratch.set_msg_len(len);
    let name_len = hello::server_name(&scratch.msg, scratch.msg_len(), &mut scratch.name).ok()?;
    let name_len = scratch.opaque_name_len(name_len);
    let domain = names::match_name(&scratch.name, name_len, &KernelSuffixes, &mut scratch.candidates)?;
    let info = DOMAINS.get(u32::from(domain))?;
    if info.flags & DOMAIN_FLAG_ENCRYPTED_DNS != 0 {
        count(COUNTER_HELLO_ENCRYPTED_DNS);
        report(ctx, &packet, SNI_EVENT_DOH, domain);
    } else if info.flags & DOMAIN_FLAG_PROVIDER != 0 {
        count(COUNTER_HELLO_ESCAPED);
        report(ctx, &packet, SNI_EVENT_ESCAPED, domain);
    }
    Some(())
}

#[inline(always)]
fn report(ctx: &SkBuffContext, packet: &Transport, kind: u32, domain: u16) {
    // SAFETY: both helpers accept a cgroup_skb context.
    let (cgroup_id, uid) = unsafe { (bpf_skb_cgroup_id(ctx.skb.skb), bpf_get_socket_uid(ctx.skb.skb)) };
    let event = SniEvent {
        cgroup_id,
        addr: packet.dst_addr,
        kind,
        uid,
        domain_index: u32::from(domain),
        port: packet.dst_port,
        _pad: 0,
    };
    if SNI_EVENTS.output::<SniEvent>(&event, 0).is_err() {
        count(COUNTER_SNI_EVENTS_LOST);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
