//! Local-replica short-cut: sock_ops records proxy <-> local-replica sockets, sk_msg
//! sends each message straight to the peer socket.

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action,
    },
    btf_maps::{HashMap, PerCpuArray, SockHash},
    macros::{btf_map, sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use sluice_abi::{AddrKey, RedirectStats, SockKey, family, ipv4_mapped};

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
