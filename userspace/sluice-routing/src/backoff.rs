//! Retry delays: capped exponential backoff with jitter, for everything in sluice that
//! reconnects (the etcd source, the autoscaler's streams).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Capped exponential backoff with jitter (each delay is drawn from [d/2, d]), so a fleet
/// of nodes does not reconnect in lockstep after an etcd outage.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: RandomState,
    draws: u64,
}

impl Backoff {
    /// Delays start at `initial` (at least 1 ms) and double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            rng: RandomState::new(),
            draws: 0,
        }
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The next delay to wait, drawn from [d/2, d] of the current step.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        // Randomly keyed hasher over a counter: enough randomness for jitter, no RNG dep.
        let mut h = self.rng.build_hasher();
        h.write_u64(self.draws);
        self.draws += 1;
        let frac = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_capped_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        let caps = [100, 200, 400, 800, 800, 800];
        for (d, cap) in delays.iter().zip(caps) {
            let cap = Duration::from_millis(cap);
            assert!(*d <= cap && *d >= cap / 2, "{d:?} vs {cap:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
