//! The smallest program of each type, loaded and attached by the start-up probe to
//! learn what the kernel accepts; they never see sluice's traffic.

use aya_ebpf::{
    bindings::{sk_action, xdp_action},
    btf_maps::SockMap,
    macros::{btf_map, cgroup_sock_addr, sk_reuseport, stream_verdict, xdp},
    programs::{SkBuffContext, SkReuseportContext, SockAddrContext, XdpContext},
};

/// Target of the sk_skb probe attach; never holds sockets.
#[btf_map(name = "probe_sockmap")]
static PROBE_SOCKMAP: SockMap<1> = SockMap::new();

/// Probe: the smallest sk_skb stream verdict program, to learn whether the kernel
/// accepts one on a sockmap.
#[stream_verdict]
pub fn probe_skb_verdict(_ctx: SkBuffContext) -> u32 {
    let _ = &PROBE_SOCKMAP;
    sk_action::SK_PASS
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
