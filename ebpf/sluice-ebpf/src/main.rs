//! sluice's kernel programs.
//!
//! Userspace (the `sluice-dataplane` crate) is the only writer of policy: it fills
//! `local_replicas`, reads the counters, and decides which programs to attach. Every
//! program here is optional at runtime; a missing one means the userspace path.
#![no_std]
#![no_main]
// The kernel side necessarily reads raw context pointers handed over by the verifier.
#![allow(unsafe_code)]

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action, xdp_action,
    },
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ReusePortSockArray, SockHash, SockMap,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, cgroup_sock_addr, sk_msg, sk_reuseport, sock_ops, stream_verdict, xdp},
    maps::lpm_trie::Key as LpmKey,
    programs::{
        SkBuffContext, SkMsgContext, SkReuseportContext, SockAddrContext, SockOpsContext,
        XdpContext,
    },
};
use aya_log_ebpf::warn;
use sluice_abi::{
    AddrKey, BanValue, GuardConfig, GuardIface, GuardStats, MAX_VIP_BACKENDS, RedirectStats,
    STEER_SLOTS, SockKey, SplicePeer, SpliceStats, SteerConfig, SteerStats, SynBucket, VipBackend,
    VipService, VipSlot, VipStats, family, hrw, ipv4_mapped, vip_mode,
};

// Maps are BTF-defined so `bpftool map dump` prints keys and values with their field
// names, and are named so `bpftool map show` reads well.

/// Established proxy↔local-replica sockets, keyed by their own 4-tuple.
#[btf_map(name = "redir_socks")]
static REDIR_SOCKS: SockHash<SockKey, 65_536> = SockHash::new();

/// Local replica endpoints: only connections to or from these are tracked, so the
/// programs never touch sockets sluice does not own even inside its cgroup.
#[btf_map(name = "local_replicas")]
static LOCAL_REPLICAS: HashMap<AddrKey, u8, 16_384> = HashMap::new();

/// Redirect-path counters, one slot per CPU (no atomics needed).
#[btf_map(name = "redir_stats")]
static REDIR_STATS: PerCpuArray<RedirectStats, 1> = PerCpuArray::new();

/// Target of the sk_skb probe attach; never holds sockets.
#[btf_map(name = "probe_sockmap")]
static PROBE_SOCKMAP: SockMap<1> = SockMap::new();

/// Reads a 4-word address field from a context struct one word at a time, each at a
/// constant offset: copying the array whole lets LLVM form a moved context pointer,
/// which the verifier rejects ("dereference of modified ctx ptr").
macro_rules! ctx_ip6 {
    ($ptr:expr, $field:ident) => {{
        let p = $ptr;
        // SAFETY: `p` is the verifier-checked context pointer; each read is an aligned
        // u32 load at a constant offset inside the context.
        unsafe {
            [
                core::ptr::read_volatile(&(*p).$field[0]),
                core::ptr::read_volatile(&(*p).$field[1]),
                core::ptr::read_volatile(&(*p).$field[2]),
                core::ptr::read_volatile(&(*p).$field[3]),
            ]
        }
    }};
}

#[inline(always)]
fn stats() -> Option<&'static mut RedirectStats> {
    // SAFETY: index 0 always exists in a one-slot array; the per-CPU slot is only
    // touched by this CPU and programs do not preempt each other on one CPU.
    REDIR_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Records each newly established TCP socket whose local or remote endpoint is a
/// local replica, so `sluice_redirect` can find its peer.
#[sock_ops]
pub fn sluice_track(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let (local_ip, remote_ip) = match ctx.family() {
        family::INET => (ipv4_mapped(ctx.local_ip4()), ipv4_mapped(ctx.remote_ip4())),
        family::INET6 => (ctx_ip6!(ctx.ops, local_ip6), ctx_ip6!(ctx.ops, remote_ip6)),
        _ => return 0,
    };
    let mut key = SockKey {
        local_ip,
        remote_ip,
        // local_port is host order; remote_port is the network-order port shifted
        // into the upper half, so from_be yields the host-order port.
        local_port: ctx.local_port(),
        remote_port: u32::from_be(ctx.remote_port()),
    };
    // SAFETY: lookups only read the map value; the reference is not held.
    let ours = unsafe {
        LOCAL_REPLICAS.get(key.local()).is_some() || LOCAL_REPLICAS.get(key.remote()).is_some()
    };
    if !ours {
        return 0;
    }
    // SAFETY: `ops` is the verifier-checked context of this invocation.
    let ops = unsafe { &mut *ctx.ops };
    match REDIR_SOCKS.update(&mut key, ops, BPF_NOEXIST.into()) {
        Ok(()) => {
            if let Some(s) = stats() {
                s.socks_tracked += 1;
            }
        }
        Err(e) => {
            if let Some(s) = stats() {
                s.track_failed += 1;
            }
            warn!(&ctx, "sockhash insert failed: {}", e);
        }
    }
    0
}

/// Sends each message straight to the peer socket's ingress queue when the peer is
/// tracked; otherwise lets it take the normal stack path.
#[sk_msg]
pub fn sluice_redirect(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: the verifier guarantees `msg` points at a valid sk_msg_md; scalar fields
    // are read at constant offsets.
    let (fam, local_port, remote_port, size) =
        unsafe { ((*md).family, (*md).local_port, (*md).remote_port, (*md).size) };
    let (local_ip, remote_ip) = match fam {
        // SAFETY: as above.
        family::INET => unsafe { (ipv4_mapped((*md).local_ip4), ipv4_mapped((*md).remote_ip4)) },
        family::INET6 => (ctx_ip6!(md, local_ip6), ctx_ip6!(md, remote_ip6)),
        _ => return sk_action::SK_PASS,
    };
    let me = SockKey { local_ip, remote_ip, local_port, remote_port: u32::from_be(remote_port) };
    let mut peer = me.peer();
    let size = size as u64;
    let verdict = REDIR_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS.into());
    if let Some(s) = stats() {
        s.messages += 1;
        if verdict == sk_action::SK_PASS as i64 {
            s.bytes_redirected += size;
        } else {
            s.no_peer += 1;
        }
    }
    // SK_DROP from the helper only means "no peer": pass the data up the normal path.
    sk_action::SK_PASS
}

/// Probe: the smallest sk_skb stream verdict program, to learn whether the kernel
/// accepts one on a sockmap.
#[stream_verdict]
pub fn probe_skb_verdict(_ctx: SkBuffContext) -> u32 {
    let _ = &PROBE_SOCKMAP;
    sk_action::SK_PASS
}

// ---- XDP guard ------------------------------------------------------------------

/// Denylisted IPv4 prefixes; a value with a deadline is a temporary ban.
#[btf_map(name = "guard_deny_v4")]
static GUARD_DENY_V4: LpmTrie<[u8; 4], BanValue, 65_536> = LpmTrie::new();

/// Denylisted IPv6 prefixes.
#[btf_map(name = "guard_deny_v6")]
static GUARD_DENY_V6: LpmTrie<[u8; 16], BanValue, 65_536> = LpmTrie::new();

/// The destination ports the guard protects (sluice's listeners); other traffic on
/// the interface is not sluice's business and passes untouched.
#[btf_map(name = "guard_ports")]
static GUARD_PORTS: HashMap<u16, u8, 64> = HashMap::new();

/// Settings at index 0.
#[btf_map(name = "guard_config")]
static GUARD_CONFIG: Array<GuardConfig, 1> = Array::new();

/// Per-source SYN buckets. LRU, so a flood of spoofed sources evicts old buckets
/// instead of failing inserts.
#[btf_map(name = "guard_syn_rate")]
static GUARD_SYN_RATE: LruHashMap<[u8; 16], SynBucket, 131_072> = LruHashMap::new();

/// Counters, one slot per CPU.
#[btf_map(name = "guard_stats")]
static GUARD_STATS: PerCpuArray<GuardStats, 1> = PerCpuArray::new();

/// Interfaces the guard is attached to and in which XDP mode. Only userspace reads
/// and writes it; it lives here so it is pinned with the rest and bpftool prints it.
#[btf_map(name = "guard_ifaces")]
static GUARD_IFACES: HashMap<u32, GuardIface, 64> = HashMap::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const NANOS_PER_TOKEN: u64 = 1_000_000_000;

/// A bounds-checked pointer `off` bytes into the packet, as the verifier requires.
#[inline(always)]
fn packet_ptr<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: packet_ptr checked that `off..off+size_of::<T>()` lies in the packet;
    // packet data has no alignment guarantee, hence the unaligned read.
    packet_ptr::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn guard_stats() -> Option<&'static mut GuardStats> {
    // SAFETY: index 0 exists; the per-CPU slot is only touched by this CPU.
    GUARD_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The parts of a TCP packet the guard decides on.
struct TcpMeta {
    src: [u8; 16],
    v4: bool,
    dst_port: u16,
    flags: u8,
}

#[inline(always)]
fn parse_tcp(ctx: &XdpContext) -> Option<TcpMeta> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let (src, v4, l4) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = read(ctx, ETH_HLEN)?;
            let proto: u8 = read(ctx, ETH_HLEN + 9)?;
            let frag: u16 = u16::from_be(read(ctx, ETH_HLEN + 6)?);
            // Non-first fragments carry no TCP header.
            if proto != IPPROTO_TCP || frag & 0x1fff != 0 {
                return None;
            }
            let s: [u8; 4] = read(ctx, ETH_HLEN + 12)?;
            let mut src = [0u8; 16];
            src[10] = 0xff;
            src[11] = 0xff;
            src[12] = s[0];
            src[13] = s[1];
            src[14] = s[2];
            src[15] = s[3];
            (src, true, ETH_HLEN + ((vihl & 0x0f) as usize) * 4)
        }
        ETH_P_IPV6 => {
            let next: u8 = read(ctx, ETH_HLEN + 6)?;
            // Extension headers before TCP are rare on this path; such packets pass.
            if next != IPPROTO_TCP {
                return None;
            }
            (read::<[u8; 16]>(ctx, ETH_HLEN + 8)?, false, ETH_HLEN + 40)
        }
        _ => return None,
    };
    if l4 > 60 + ETH_HLEN {
        return None;
    }
    let dst_port = u16::from_be(read::<u16>(ctx, l4 + 2)?);
    let flags: u8 = read(ctx, l4 + 13)?;
    Some(TcpMeta { src, v4, dst_port, flags })
}

#[inline(always)]
fn denied(meta: &TcpMeta, now: u64) -> bool {
    let ban = if meta.v4 {
        let addr = [meta.src[12], meta.src[13], meta.src[14], meta.src[15]];
        GUARD_DENY_V4.get(&LpmKey::new(32, addr))
    } else {
        GUARD_DENY_V6.get(&LpmKey::new(128, meta.src))
    };
    match ban {
        Some(b) => b.expires_s == 0 || now / NANOS_PER_TOKEN < b.expires_s as u64,
        None => false,
    }
}

/// Token bucket per source. Buckets are updated without atomics: two CPUs racing on
/// one source can each spend a token, which lets a flood through by at most one SYN
/// per CPU per refill — an accepted approximation for a rate limit.
#[inline(always)]
fn syn_allowed(src: &[u8; 16], cfg: &GuardConfig, now: u64) -> bool {
    let cap = cfg.syn_burst.max(1) as u64 * NANOS_PER_TOKEN;
    let rate = cfg.syn_rate_per_sec as u64;
    match GUARD_SYN_RATE.get_ptr_mut(src) {
        Some(p) => {
            // SAFETY: the pointer is the map's value slot for this key.
            let b = unsafe { &mut *p };
            let elapsed = now.saturating_sub(b.last_ns);
            // nanotokens per ns equals tokens per second; cap elapsed so the product
            // cannot overflow (a full refill needs at most cap/rate ns).
            let refill = if elapsed >= cap / rate.max(1) { cap } else { elapsed * rate };
            b.nanotokens = (b.nanotokens + refill).min(cap);
            b.last_ns = now;
            if b.nanotokens >= NANOS_PER_TOKEN {
                b.nanotokens -= NANOS_PER_TOKEN;
                true
            } else {
                false
            }
        }
        None => {
            let b = SynBucket { nanotokens: cap - NANOS_PER_TOKEN, last_ns: now };
            let _ = GUARD_SYN_RATE.insert(src, b, 0);
            true
        }
    }
}

/// Drops packets to sluice's ports from denylisted or banned sources, and SYNs from
/// sources over their new-connection rate, before the TCP stack sees them.
#[xdp]
pub fn sluice_guard(ctx: XdpContext) -> u32 {
    let Some(meta) = parse_tcp(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: lookup result is only tested for presence.
    if unsafe { GUARD_PORTS.get(meta.dst_port) }.is_none() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let is_syn = meta.flags & TCP_SYN != 0 && meta.flags & TCP_ACK == 0;
    let verdict = if denied(&meta, now) {
        Some(0)
    } else if is_syn {
        match GUARD_CONFIG.get(0) {
            Some(cfg) if cfg.syn_rate_per_sec > 0 && !syn_allowed(&meta.src, cfg, now) => Some(1),
            _ => None,
        }
    } else {
        None
    };
    if let Some(s) = guard_stats() {
        s.inspected += 1;
        if is_syn {
            s.syns += 1;
        }
        match verdict {
            Some(0) => s.dropped_denied += 1,
            Some(_) => s.dropped_syn_rate += 1,
            None => {}
        }
    }
    if verdict.is_some() { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

// ---- Server virtual addresses ----------------------------------------------------

/// VIP → how many replicas and how to pick one.
#[btf_map(name = "vip_services")]
static VIP_SERVICES: HashMap<AddrKey, VipService, 4096> = HashMap::new();

/// (VIP, slot) → replica. Flat on purpose: map-in-map updates cost milliseconds.
#[btf_map(name = "vip_backends")]
static VIP_BACKENDS: HashMap<VipSlot, VipBackend, 65_536> = HashMap::new();

/// Counters, one slot per CPU.
#[btf_map(name = "vip_stats")]
static VIP_STATS: PerCpuArray<VipStats, 1> = PerCpuArray::new();

const SOCK_STREAM: u32 = 1;
const VERDICT_ALLOW: i32 = 1;

#[inline(always)]
fn vip_stats() -> Option<&'static mut VipStats> {
    // SAFETY: index 0 exists; the per-CPU slot is only touched by this CPU.
    VIP_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The replica a new connection to `vip` goes to, if the VIP is ours and has one.
#[inline(always)]
fn pick_backend(vip: &AddrKey) -> Option<Option<VipBackend>> {
    // SAFETY: the value is copied out at once.
    let svc = unsafe { VIP_SERVICES.get(vip) }.copied()?;
    if svc.count == 0 {
        return Some(None);
    }
    let index = if svc.mode == vip_mode::HRW {
        // The session is the connecting process: its connections stick together.
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let session = hrw::fnv1a64(&tgid.to_le_bytes());
        let mut best = 0u32;
        let mut best_score = 0u64;
        let mut i = 0u32;
        while i < MAX_VIP_BACKENDS && i < svc.count {
            let slot = VipSlot { vip: *vip, index: i };
            // SAFETY: the value is copied out at once.
            if let Some(b) = unsafe { VIP_BACKENDS.get(slot) } {
                let score = hrw::score(session, b.id_hash);
                if i == 0 || score > best_score {
                    best = i;
                    best_score = score;
                }
            }
            i += 1;
        }
        best
    } else {
        svc.selected
    };
    let slot = VipSlot { vip: *vip, index };
    // SAFETY: the value is copied out at once.
    Some(unsafe { VIP_BACKENDS.get(slot) }.copied())
}

#[inline(always)]
fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffff_u32.to_be()
}

/// Rewrites TCP connects to a server's virtual address into the replica userspace
/// selected, so callers on the node reach servers without DNS or a proxy hop.
#[cgroup_sock_addr(connect4)]
pub fn sluice_vip4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier-checked context; scalar fields at constant offsets.
    let (ty, ip4, port_be) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    if ty != SOCK_STREAM {
        return VERDICT_ALLOW;
    }
    // user_port holds the network-order port in its low 16 bits.
    let vip = AddrKey::from_ipv4_be(ip4, u16::from_be(port_be as u16));
    let Some(choice) = pick_backend(&vip) else {
        return VERDICT_ALLOW;
    };
    let stats = vip_stats();
    match choice {
        Some(b) if is_v4_mapped(&b.addr.ip) => {
            // SAFETY: 4-byte writes to writable context fields.
            unsafe {
                (*sa).user_ip4 = b.addr.ip[3];
                (*sa).user_port = ((b.addr.port as u16).to_be()) as u32;
            }
            if let Some(s) = stats {
                s.connects += 1;
                s.rewritten += 1;
            }
        }
        Some(_) => {
            if let Some(s) = stats {
                s.connects += 1;
                s.family_mismatch += 1;
            }
        }
        None => {
            if let Some(s) = stats {
                s.connects += 1;
                s.no_backend += 1;
            }
        }
    }
    VERDICT_ALLOW
}

/// The IPv6 twin of `sluice_vip4`: VIPs may be IPv6, or IPv4 reached through a
/// dual-stack socket as an IPv4-mapped address; replicas of either family fit.
#[cgroup_sock_addr(connect6)]
pub fn sluice_vip6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier-checked context; scalar fields at constant offsets.
    let (ty, port_be) = unsafe { ((*sa).type_, (*sa).user_port) };
    if ty != SOCK_STREAM {
        return VERDICT_ALLOW;
    }
    let vip = AddrKey { ip: ctx_ip6!(sa, user_ip6), port: u16::from_be(port_be as u16) as u32 };
    let Some(choice) = pick_backend(&vip) else {
        return VERDICT_ALLOW;
    };
    let stats = vip_stats();
    match choice {
        Some(b) => {
            // SAFETY: 4-byte writes to writable context fields, one word at a time.
            unsafe {
                (*sa).user_ip6[0] = b.addr.ip[0];
                (*sa).user_ip6[1] = b.addr.ip[1];
                (*sa).user_ip6[2] = b.addr.ip[2];
                (*sa).user_ip6[3] = b.addr.ip[3];
                (*sa).user_port = ((b.addr.port as u16).to_be()) as u32;
            }
            if let Some(s) = stats {
                s.connects += 1;
                s.rewritten += 1;
            }
        }
        None => {
            if let Some(s) = stats {
                s.connects += 1;
                s.no_backend += 1;
            }
        }
    }
    VERDICT_ALLOW
}

// ---- Listener steering -------------------------------------------------------------

/// sluice's listeners by slot. Pinned and shared: an upgrading process adds its own
/// listeners to the idle half, then flips `steer_config`.
#[btf_map(name = "steer_socks")]
static STEER_SOCKS: ReusePortSockArray<{ STEER_SLOTS as usize }> = ReusePortSockArray::new();

/// The active slot range at index 0.
#[btf_map(name = "steer_config")]
static STEER_CONFIG: Array<SteerConfig, 1> = Array::new();

/// Counters, one slot per CPU.
#[btf_map(name = "steer_stats")]
static STEER_STATS: PerCpuArray<SteerStats, 1> = PerCpuArray::new();

/// Listeners of the active generation tried per connection: a generation holds one
/// socket per listening address (each its own SO_REUSEPORT group), and a socket of
/// another group cannot be selected, so the probe walks on until one of this group
/// takes it. Bounded for the verifier; sluice has a handful of listening addresses.
const STEER_PROBES: u32 = 8;

/// One selection attempt, as a BPF subprogram: inlined into the loop, the program was
/// refused by the verifier (a variable-offset stack access in its log).
#[inline(never)]
fn try_select(ctx: &SkReuseportContext, slot: u32) -> bool {
    STEER_SOCKS.select_reuseport(ctx, slot).is_ok()
}

/// Picks the listener for each new connection (flow hash over the active generation's
/// sockets of this connection's group), and when a listener closes, moves its pending
/// requests and queued connections to an active listener instead of resetting them:
/// no SYN is lost during an upgrade.
#[sk_reuseport(migrate)]
pub fn sluice_steer(ctx: SkReuseportContext) -> u32 {
    let Some(cfg) = STEER_CONFIG.get(0).copied() else {
        return sk_action::SK_PASS;
    };
    let migrating = ctx.migrating_sk().is_some();
    if cfg.count == 0 {
        // No steering configured: the kernel's own choice (and, for a migration,
        // its own pick of a live listener).
        return sk_action::SK_PASS;
    }
    let start = ctx.hash() % cfg.count;
    let mut selected = false;
    let mut i = 0;
    while i < STEER_PROBES && i < cfg.count {
        // The other groups' sockets answer EXDEV; the first of this group is taken.
        let offset = if start + i >= cfg.count { start + i - cfg.count } else { start + i };
        if try_select(&ctx, cfg.base + offset) {
            selected = true;
            break;
        }
        i += 1;
    }
    // SAFETY: index 0 exists; the per-CPU slot is only touched by this CPU.
    if let Some(s) = STEER_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p }) {
        match (selected, migrating) {
            (true, true) => s.migrated += 1,
            (true, false) => s.selected += 1,
            (false, _) => s.fallback += 1,
        }
    }
    sk_action::SK_PASS
}

// ---- Stream splicing -----------------------------------------------------------------

/// Sockets of spliced pairs (upgraded client and replica legs), by their own 4-tuple.
#[btf_map(name = "splice_socks")]
static SPLICE_SOCKS: SockHash<SockKey, 65_536> = SockHash::new();

/// Each spliced socket's peer.
#[btf_map(name = "splice_peers")]
static SPLICE_PEERS: HashMap<SockKey, SplicePeer, 65_536> = HashMap::new();

/// Counters, one slot per CPU.
#[btf_map(name = "splice_stats")]
static SPLICE_STATS: PerCpuArray<SpliceStats, 1> = PerCpuArray::new();

/// Sends every byte a spliced socket receives straight out of its peer, so opaque
/// streams (WebSockets, CONNECT tunnels) never climb to userspace. A socket without a
/// peer entry keeps its bytes for userspace (SK_PASS), which is the fallback.
#[stream_verdict]
pub fn sluice_splice(ctx: SkBuffContext) -> u32 {
    let skb = ctx.skb.skb;
    // SAFETY: the verifier-checked __sk_buff; scalar fields at constant offsets.
    let (fam, local_port, remote_port, len) =
        unsafe { ((*skb).family, (*skb).local_port, (*skb).remote_port, (*skb).len) };
    let (local_ip, remote_ip) = match fam {
        // SAFETY: as above.
        family::INET => unsafe { (ipv4_mapped((*skb).local_ip4), ipv4_mapped((*skb).remote_ip4)) },
        family::INET6 => (ctx_ip6!(skb, local_ip6), ctx_ip6!(skb, remote_ip6)),
        _ => return sk_action::SK_PASS,
    };
    let me = SockKey { local_ip, remote_ip, local_port, remote_port: u32::from_be(remote_port) };
    // A FIN reaches the verdict as a zero-length skb. Redirected, the kernel's send of
    // zero bytes counts as a broken pipe on the peer (EPOLLERR, transmit stopped), so it
    // stays here: the close watcher passes the FIN on itself.
    if len == 0 {
        return sk_action::SK_PASS;
    }
    // SAFETY: STEER_STATS-style per-CPU slot; index 0 exists.
    let stats = SPLICE_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p });
    let Some(entry) = SPLICE_PEERS.get_ptr_mut(me) else {
        if let Some(s) = stats {
            s.no_peer += 1;
        }
        return sk_action::SK_PASS;
    };
    // SAFETY: the map's value slot for this key; one socket's skbs are processed one
    // at a time, so the byte count needs no atomic.
    let entry = unsafe { &mut *entry };
    let mut peer = entry.peer;
    let verdict = SPLICE_SOCKS.redirect_skb(&ctx, &mut peer, 0);
    // Only bytes actually handed to the peer count: userspace waits for exactly those.
    if verdict == sk_action::SK_PASS as i64 {
        entry.bytes += len as u64;
        if let Some(s) = stats {
            s.skbs += 1;
            s.bytes += len as u64;
        }
    }
    verdict as u32
}

/// Probe: the smallest XDP program.
#[xdp]
pub fn probe_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Probe: the smallest sk_reuseport program (kernel's default selection).
#[sk_reuseport]
pub fn probe_reuseport(_ctx: SkReuseportContext) -> u32 {
    sk_action::SK_PASS
}

/// Probe: the smallest cgroup connect4 program (allow every connect unchanged).
#[cgroup_sock_addr(connect4)]
pub fn probe_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible license: sockmap and redirect helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
