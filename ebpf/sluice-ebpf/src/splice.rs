//! Stream splicing: an sk_skb verdict program carries an upgraded stream's bytes from
//! one socket to its peer.

use aya_ebpf::{
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, SockHash},
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use sluice_abi::{SockKey, SplicePeer, SpliceStats, family, ipv4_mapped};

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
