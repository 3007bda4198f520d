//! The cold-start hold (opt-in per server, `cold_start_hold`): a request that finds no
//! ready replica waits for the first one instead of taking the `503` at once.
//!
//! - The wait is woken by the routing table's snapshot changes (a replica turning ready
//!   publishes one), never by polling, and ends at the server's hold time with the same
//!   `503` an immediate refusal gets.
//! - At most `cold_start_max_held` requests of a server wait at once; beyond that the
//!   `503` is immediate. A held request keeps only its head (its body stays unread in
//!   the client's socket), so memory is bounded by that count.
//! - Servers without a hold never reach this module: the request path pays one branch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_routing::Server;
use sluice_routing::snapshot::ServerStats;

use crate::proxy::ProxyState;

/// Frees a held request's place when it leaves the hold (released, timed out, or the
/// client gone).
struct Place<'a> {
    stats: Arc<ServerStats>,
    state: &'a ProxyState,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.stats.cold_start_held.fetch_sub(1, Ordering::Relaxed);
        self.state.metrics.cold_start_held.dec();
    }
}

/// Waits up to `hold` for `server` to have a ready replica: the server as the snapshot
/// that brought one has it, or `None` (answer `503`) when the hold passed or was full.
pub(crate) async fn hold(
    state: &ProxyState,
    server: &Arc<Server>,
    hold: Duration,
) -> Option<Arc<Server>> {
    let max = server.spec.cold_start_max_held;
    let stats = server.stats.clone();
    if stats.cold_start_held.fetch_add(1, Ordering::Relaxed) >= max {
        stats.cold_start_held.fetch_sub(1, Ordering::Relaxed);
        state.metrics.cold_start_hold_full_total.inc();
        return None;
    }
    state.metrics.cold_start_held.inc();
    let _place = Place { stats, state };
    // Subscribed before the first look, so a replica turning ready in between is seen.
    let mut changes = state.routing.subscribe_snapshots();
    let id = server.id();
    let ready = async {
        loop {
            if let Some(s) = state.routing.load().server(id)
                && !s.replicas.is_empty()
            {
                return Some(s.clone());
            }
            // The table outlives every request, so this fails only at teardown.
            changes.changed().await.ok()?;
        }
    };
    match tokio::time::timeout(hold, ready).await {
        Ok(Some(s)) => {
            state.metrics.cold_start_released_total.inc();
            Some(s)
        }
        _ => {
            state.metrics.cold_start_timed_out_total.inc();
            None
        }
    }
}
