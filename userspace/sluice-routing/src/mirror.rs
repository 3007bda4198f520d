//! Mirroring policy: which requests are copied to a server's shadow target.
//!
//! The copy itself is the proxy's (docs/routing.md, "Mirroring"): a bounded tee that
//! never makes the primary wait. This module only decides *whether* a request is
//! mirrored, from [`MirrorSpec::fraction`], with a per-thread RNG (no locks, no shared
//! counter to contend on).

use crate::lb::next_random;
use crate::model::MirrorSpec;
use crate::snapshot::Server;

/// Whether to mirror a request given a uniformly random `sample`: true for a `fraction`
/// of samples. `fraction <= 0` (or NaN) never mirrors, `>= 1` always does.
pub fn should_mirror_sample(spec: &MirrorSpec, sample: u64) -> bool {
    let f = spec.fraction;
    if f >= 1.0 {
        return true;
    }
    if f.is_nan() || f <= 0.0 {
        return false;
    }
    // Top 53 bits → a uniform f64 in [0, 1).
    ((sample >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < f
}

impl Server {
    /// The server's mirror target when this request is sampled for mirroring, else `None`.
    pub fn should_mirror(&self) -> Option<&MirrorSpec> {
        let spec = self.spec.mirror.as_ref()?;
        should_mirror_sample(spec, next_random()).then_some(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::tests::server_with;
    use crate::model::{Protocol, ServerSpec};

    fn spec(fraction: f64) -> MirrorSpec {
        MirrorSpec {
            address: "127.0.0.1:9".parse().unwrap(),
            protocol: Protocol::Http1,
            fraction,
            max_buffer_bytes: 1024,
        }
    }

    #[test]
    fn edges() {
        for s in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(!should_mirror_sample(&spec(0.0), s));
            assert!(!should_mirror_sample(&spec(f64::NAN), s));
            assert!(should_mirror_sample(&spec(1.0), s));
        }
        assert!(should_mirror_sample(&spec(0.5), 0));
        assert!(!should_mirror_sample(&spec(0.5), u64::MAX));
        assert!(should_mirror_sample(&spec(0.5), u64::MAX / 2 - 4096));
        assert!(!should_mirror_sample(&spec(0.5), u64::MAX / 2 + 4096));
    }

    #[test]
    fn samples_the_fraction() {
        let mut s = ServerSpec::new("s", "s");
        assert!(server_with(s.clone(), vec![]).should_mirror().is_none());
        s.mirror = Some(spec(0.05));
        let server = server_with(s, vec![]);
        let hits = (0..100_000).filter(|_| server.should_mirror().is_some()).count();
        // 5% ± a generous margin (σ ≈ 69).
        assert!((4500..5500).contains(&hits), "{hits}");
    }
}
