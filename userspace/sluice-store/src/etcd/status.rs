//! What the reconciler reports: connected or not, revision, last contact.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::SourceStatus;

/// The source's view of the store, for `/readyz` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// A watch is established and answering.
    pub connected: bool,
    /// A full listing has been applied at least once (before that the table is empty).
    pub synced: bool,
    /// The etcd revision of the last applied change (the table's generation from etcd).
    pub last_revision: u64,
    /// When etcd last answered anything (response, event, progress notification).
    pub last_contact: Option<Instant>,
    /// Since when the source has been without a working watch (`None` while connected).
    pub disconnected_at: Option<Instant>,
    /// How long the source has been without a working watch, as of this reading.
    pub since_disconnect: Option<Duration>,
    /// The last failure, if any (cleared once connected again).
    pub last_error: Option<String>,
    /// How many times the watch has been (re-)established.
    pub connects: u64,
    /// How many full listings have been applied.
    pub relists: u64,
    /// How many stored values have been ignored as malformed.
    pub malformed_values: u64,
    /// How many sessions ended in a failure (connect, list or watch).
    pub failures: u64,
}

impl StoreStatus {
    /// Whether a failure now would be the start of an outage (worth a warning), rather
    /// than one more failed retry.
    pub(super) fn is_first_failure(&self) -> bool {
        self.connected || self.failures == 0
    }

    /// True when the routing state may lag the store: never synced, or disconnected.
    pub fn is_stale(&self) -> bool {
        !self.synced || !self.connected
    }

    /// The view every source shares ([`SourceStatus`], as the file source reports it),
    /// for admin code that treats sources alike.
    pub fn to_source_status(&self) -> SourceStatus {
        SourceStatus {
            healthy: !self.is_stale(),
            last_error: self.last_error.clone(),
            last_success: self
                .last_contact
                .and_then(|t| SystemTime::now().checked_sub(t.elapsed())),
            generation: self.last_revision,
            loads: self.relists,
            failures: self.failures,
        }
    }

    /// One line for `/readyz` detail, e.g. `etcd: connected, revision 42` or
    /// `etcd: stale for 3.2s (revision 42): transport error`.
    pub fn summary(&self) -> String {
        if !self.is_stale() {
            return format!("etcd: connected, revision {}", self.last_revision);
        }
        let age = self
            .since_disconnect
            .map(|d| format!(" for {:.1}s", d.as_secs_f64()))
            .unwrap_or_default();
        let what = if self.synced { "stale" } else { "not synced" };
        let err = self.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        format!("etcd: {what}{age} (revision {}){err}", self.last_revision)
    }
}

/// Cheap, cloneable reader of the source's [`StoreStatus`].
#[derive(Clone, Debug)]
pub struct StatusHandle {
    pub(super) rx: watch::Receiver<StoreStatus>,
}

impl StatusHandle {
    /// The current status, with `since_disconnect` computed now.
    pub fn get(&self) -> StoreStatus {
        let mut s = self.rx.borrow().clone();
        s.since_disconnect = s.disconnected_at.map(|t| t.elapsed());
        s
    }

    /// The underlying channel, for callers that select on changes. Its values carry
    /// `since_disconnect: None`; compute it from `disconnected_at` (or use [`Self::get`]).
    pub fn receiver(&self) -> watch::Receiver<StoreStatus> {
        self.rx.clone()
    }

    /// Wait until the status changes (returns `false` once the source is gone).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Wait (bounded) until `pred` holds for the status; returns the matching status.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&StoreStatus) -> bool,
    ) -> Option<StoreStatus> {
        let fut = self.rx.wait_for(|s| pred(s));
        let matched = matches!(tokio::time::timeout(timeout, fut).await, Ok(Ok(_)));
        matched.then(|| self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_summary() {
        let mut s = StoreStatus {
            connected: true,
            synced: true,
            last_revision: 42,
            last_contact: None,
            disconnected_at: None,
            since_disconnect: None,
            last_error: None,
            connects: 1,
            relists: 1,
            malformed_values: 0,
            failures: 0,
        };
        assert!(!s.is_stale());
        assert_eq!(s.summary(), "etcd: connected, revision 42");
        s.connected = false;
        s.since_disconnect = Some(Duration::from_millis(3200));
        s.last_error = Some("transport error".into());
        assert!(s.is_stale());
        assert_eq!(s.summary(), "etcd: stale for 3.2s (revision 42): transport error");
        let common = s.to_source_status();
        assert!(!common.healthy);
        assert_eq!(common.generation, 42);
        assert_eq!(common.last_error.as_deref(), Some("transport error"));
    }
}
