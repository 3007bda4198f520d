//! Tenant isolation: per-server caps on in-flight requests and on buffered bytes, so a
//! flood or a slow reader on one server cannot starve the others.
//!
//! Both caps are enforced with a single atomic on the server's [`ServerStats`] (shared
//! across snapshots, so a snapshot swap neither resets nor doubles them) and released by
//! RAII guards, so a cancelled request gives its share back.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::snapshot::{InFlightGuard, Replica, Server, ServerStats};

/// The server is at `limits.max_in_flight`: answer `503` with `Retry-After` (the refusal
/// is already counted in `ServerStats::over_limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverLimit {
    /// The cap that was hit.
    pub max_in_flight: u32,
}

impl Server {
    /// [`Server::begin_request`] under the server's `limits.max_in_flight`: refuses (and
    /// counts `over_limit`) when the server already has that many requests in flight.
    /// The check and the increment are one atomic step, so concurrent requests never
    /// overshoot the cap.
    pub fn try_begin_request(&self, replica: &Arc<Replica>) -> Result<InFlightGuard, OverLimit> {
        let Some(cap) = self.spec.limits.max_in_flight else {
            return Ok(self.begin_request(replica));
        };
        let cap64 = u64::from(cap);
        let admitted =
            self.stats.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap64).then_some(n + 1)
            });
        match admitted {
            Ok(_) => {
                Ok(InFlightGuard::server_already_counted(self.stats.clone(), replica.stats.clone()))
            }
            Err(_) => {
                self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
                Err(OverLimit { max_in_flight: cap })
            }
        }
    }

    /// [`Self::try_begin_request`] for the one retry of a request already counted: the
    /// server's request counter is not bumped again (the other replica's is: it gets a
    /// request), so `sluice_requests_total{server}` counts each client request once.
    pub fn try_begin_retry(&self, replica: &Arc<Replica>) -> Result<InFlightGuard, OverLimit> {
        let guard = self.try_begin_request(replica)?;
        self.stats.requests.fetch_sub(1, Ordering::Relaxed);
        Ok(guard)
    }

    /// Whether the server is at its in-flight cap right now (a cheap pre-check before
    /// doing work for a request; [`Server::try_begin_request`] is the authoritative one).
    pub fn at_in_flight_cap(&self) -> bool {
        self.spec
            .limits
            .max_in_flight
            .is_some_and(|cap| self.stats.in_flight.load(Ordering::Relaxed) >= u64::from(cap))
    }

    /// Reserve `n` bytes of the server's buffer budget (`limits.max_buffered_bytes`;
    /// unlimited when unset, but still counted in `ServerStats::buffered_bytes`). `None`
    /// when the budget cannot hold them: the caller degrades (drops the mirror copy,
    /// streams instead of buffering), it never waits.
    pub fn try_reserve_bytes(&self, n: u64) -> Option<BytesPermit> {
        let mut permit = BytesPermit {
            stats: self.stats.clone(),
            limit: self.spec.limits.max_buffered_bytes,
            held: 0,
        };
        permit.try_grow(n).then_some(permit)
    }
}

/// Bytes held against a server's buffer budget; released on drop. Grows and shrinks as a
/// buffer fills and drains (one atomic operation each).
#[derive(Debug)]
pub struct BytesPermit {
    stats: Arc<ServerStats>,
    limit: Option<u64>,
    held: u64,
}

impl BytesPermit {
    /// Bytes this permit holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Take `n` more bytes if the budget allows; `false` (and nothing taken) otherwise.
    pub fn try_grow(&mut self, n: u64) -> bool {
        let counter = &self.stats.buffered_bytes;
        let ok = match self.limit {
            None => {
                counter.fetch_add(n, Ordering::Relaxed);
                true
            }
            Some(limit) => counter
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    used.checked_add(n).filter(|&total| total <= limit)
                })
                .is_ok(),
        };
        if ok {
            self.held += n;
        }
        ok
    }

    /// Give back up to `n` bytes (a buffer drained); returns how many were released.
    pub fn release(&mut self, n: u64) -> u64 {
        let n = n.min(self.held);
        self.held -= n;
        self.stats.buffered_bytes.fetch_sub(n, Ordering::Relaxed);
        n
    }
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        self.stats.buffered_bytes.fetch_sub(self.held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::tests::{replica, server_with};
    use crate::model::ServerSpec;

    #[test]
    fn in_flight_cap() {
        let mut spec = ServerSpec::new("s", "s");
        spec.limits.max_in_flight = Some(2);
        let r = replica("a");
        let s = server_with(spec, vec![r.clone()]);
        let g1 = s.try_begin_request(&r).unwrap();
        assert!(!s.at_in_flight_cap());
        let g2 = s.try_begin_request(&r).unwrap();
        assert!(s.at_in_flight_cap());
        assert_eq!(s.try_begin_request(&r).unwrap_err(), OverLimit { max_in_flight: 2 });
        assert_eq!(s.stats.over_limit.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats.in_flight.load(Ordering::Relaxed), 2);
        assert_eq!(r.stats.in_flight.load(Ordering::Relaxed), 2);
        // Refusals are not requests.
        assert_eq!(s.stats.requests.load(Ordering::Relaxed), 2);
        drop(g1);
        let g3 = s.try_begin_request(&r).unwrap();
        drop((g2, g3));
        assert_eq!(s.stats.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(r.stats.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(s.stats.requests.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn no_cap_counts_like_begin_request() {
        let r = replica("a");
        let s = server_with(ServerSpec::new("s", "s"), vec![r.clone()]);
        let guards: Vec<_> = (0..100).map(|_| s.try_begin_request(&r).unwrap()).collect();
        assert_eq!(s.stats.in_flight.load(Ordering::Relaxed), 100);
        drop(guards);
        assert_eq!(s.stats.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn cap_holds_under_contention() {
        let mut spec = ServerSpec::new("s", "s");
        spec.limits.max_in_flight = Some(10);
        let r = replica("a");
        let s = Arc::new(server_with(spec, vec![r.clone()]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..10_000 {
                        if let Ok(g) = s.try_begin_request(&r) {
                            held.push(g);
                        }
                        assert!(s.stats.in_flight.load(Ordering::Relaxed) <= 10);
                        if i % 3 == 0 {
                            held.pop();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.stats.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn byte_budget() {
        let mut spec = ServerSpec::new("s", "s");
        spec.limits.max_buffered_bytes = Some(100);
        let s = server_with(spec, vec![]);
        let mut a = s.try_reserve_bytes(60).unwrap();
        assert!(s.try_reserve_bytes(41).is_none());
        let b = s.try_reserve_bytes(40).unwrap();
        assert_eq!(s.stats.buffered_bytes.load(Ordering::Relaxed), 100);
        assert!(!a.try_grow(1));
        assert_eq!(a.release(30), 30);
        assert!(a.try_grow(30));
        assert_eq!(a.release(1000), 60);
        assert_eq!(a.held(), 0);
        assert!(a.try_grow(10));
        drop(b);
        assert_eq!(s.stats.buffered_bytes.load(Ordering::Relaxed), 10);
        drop(a);
        assert_eq!(s.stats.buffered_bytes.load(Ordering::Relaxed), 0);
        // Unlimited: counted, never refused.
        let s = server_with(ServerSpec::new("u", "u"), vec![]);
        let p = s.try_reserve_bytes(u64::MAX / 2).unwrap();
        assert_eq!(s.stats.buffered_bytes.load(Ordering::Relaxed), u64::MAX / 2);
        drop(p);
        assert_eq!(s.stats.buffered_bytes.load(Ordering::Relaxed), 0);
    }
}
