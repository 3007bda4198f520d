//! The XDP guard: deny list, expiring bans and a per-source SYN rate on sluice's
//! listener ports, before the TCP stack.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    maps::lpm_trie::Key as LpmKey,
    programs::XdpContext,
};
use sluice_abi::{BanValue, GuardConfig, GuardIface, GuardStats, SynBucket};

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
