//! Server virtual addresses: cgroup connect4/6 rewrite a connect to a VIP into the
//! replica userspace selected.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use sluice_abi::{
    AddrKey, MAX_VIP_BACKENDS, VipBackend, VipService, VipSlot, VipStats, hrw, vip_mode,
};

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
