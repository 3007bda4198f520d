//! The certificate file watcher: polls the files that servers' certificates name (such as
//! a mounted Kubernetes Secret) and has the routing table re-read the ones that changed.
//!
//! The comparison and the parsing are `sluice-routing`'s
//! ([`RoutingTable::refresh_certificate_files`]); this module owns only the task and its
//! timer, like the other sources in this crate.

use std::future::Future;
use std::time::Duration;

use sluice_routing::RoutingTable;

/// How often [`spawn_watcher`] looks at certificate files by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Re-reads file-referenced certificates whose files changed, every `interval`, until
/// `shutdown` resolves.
pub fn spawn_watcher(
    table: RoutingTable,
    interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick() => {}
            }
            let t = table.clone();
            // Stats and reads of files are blocking work.
            if let Err(e) = tokio::task::spawn_blocking(move || t.refresh_certificate_files()).await
            {
                tracing::error!(error = %e, "certificate file watcher task failed");
            }
        }
    })
}
