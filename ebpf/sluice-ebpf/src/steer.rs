//! Listener steering: sk_reuseport picks the serving generation's listener and moves
//! queued connections off closing ones during a handover.

use aya_ebpf::{
    bindings::sk_action,
    btf_maps::{Array, PerCpuArray, ReusePortSockArray},
    macros::{btf_map, sk_reuseport},
    programs::SkReuseportContext,
};
use sluice_abi::{STEER_SLOTS, SteerConfig, SteerStats};

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
