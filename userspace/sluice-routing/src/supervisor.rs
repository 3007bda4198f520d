//! The replica supervisor's decisions, as a pure library (`sluice supervise` runs them
//! against real processes): given a server's desired replica count and the replicas it
//! manages, which to start and which to drain.
//!
//! - *Active* replicas are the starting and ready ones; draining ones no longer count
//!   (they are on their way out and get no new requests).
//! - Fewer active than desired: start the difference. A crashed replica is simply gone
//!   from the list, so the next plan replaces it.
//! - More active than desired: drain the surplus, starting ones first (they serve
//!   nothing yet, so draining them loses no capacity), then the newest ready ones (the
//!   oldest have proven themselves and hold the warmest caches).

use std::collections::{BTreeMap, HashMap};

use crate::model::{LaunchSpec, ServerSpec};
use crate::scaling::DesiredReplicas;

/// Where a managed replica is in its life, as far as the plan cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Started, port not yet accepting.
    Starting,
    /// Accepting connections, registered `ready`.
    Ready,
    /// Registered `draining`; stopped after its grace period.
    Draining,
}

/// One managed replica as the planner sees it: its id, phase, and a start sequence
/// number (higher = started later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Managed {
    /// Replica id.
    pub id: String,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Start order (higher = newer).
    pub seq: u64,
}

/// What to do for one server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New replicas to start.
    pub start: u32,
    /// Replicas to move to draining.
    pub drain: Vec<String>,
}

/// The plan that takes `replicas` to `desired` active replicas (module docs).
pub fn plan(desired: u32, replicas: &[Managed]) -> Plan {
    let mut active: Vec<&Managed> =
        replicas.iter().filter(|r| r.phase != Phase::Draining).collect();
    let n = u32::try_from(active.len()).unwrap_or(u32::MAX);
    if n < desired {
        return Plan { start: desired - n, drain: Vec::new() };
    }
    // Drain order: starting before ready, newest first within each.
    active.sort_by_key(|r| (r.phase == Phase::Ready, std::cmp::Reverse(r.seq)));
    let surplus = usize::try_from(n - desired).unwrap_or(usize::MAX);
    Plan { start: 0, drain: active.into_iter().take(surplus).map(|r| r.id.clone()).collect() }
}

/// The servers a supervisor runs: those with a launch spec, each with its desired count.
/// A server without a stored desired count runs `min_replicas` (the autoscaler has not
/// decided yet, or is not running); the count is clamped to `max_replicas`, which the
/// autoscaler already honours but a hand-written count may not.
pub fn targets(
    servers: &[ServerSpec],
    desired: &[DesiredReplicas],
) -> BTreeMap<String, (LaunchSpec, u32)> {
    let by_server: HashMap<&str, u32> =
        desired.iter().map(|d| (d.server.as_str(), d.replicas)).collect();
    servers
        .iter()
        .filter_map(|s| {
            let launch = s.launch.clone()?;
            let want = by_server.get(s.id.as_str()).copied().unwrap_or(s.min_replicas);
            let want = want.min(s.max_replicas.max(s.min_replicas));
            Some((s.id.clone(), (launch, want)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, phase: Phase, seq: u64) -> Managed {
        Managed { id: id.into(), phase, seq }
    }

    #[test]
    fn starts_up_to_desired_ignoring_draining() {
        assert_eq!(plan(0, &[]), Plan::default());
        assert_eq!(plan(2, &[]).start, 2);
        let rs = [m("a", Phase::Ready, 1), m("b", Phase::Draining, 2)];
        // The draining one does not count: one more to start.
        assert_eq!(plan(2, &rs), Plan { start: 1, drain: vec![] });
        assert_eq!(plan(1, &rs), Plan::default());
    }

    #[test]
    fn drains_starting_first_then_newest_ready() {
        let rs = [
            m("old", Phase::Ready, 1),
            m("new", Phase::Ready, 3),
            m("boot", Phase::Starting, 4),
            m("gone", Phase::Draining, 5),
        ];
        assert_eq!(plan(2, &rs).drain, ["boot"]);
        assert_eq!(plan(1, &rs).drain, ["boot", "new"]);
        assert_eq!(plan(0, &rs).drain, ["boot", "new", "old"]);
    }

    #[test]
    fn targets_only_launchable_servers_with_defaults_and_caps() {
        let mut a = ServerSpec::new("a", "a");
        a.launch = Some(LaunchSpec::new(["/bin/a"]));
        a.min_replicas = 1;
        a.max_replicas = 3;
        let mut b = a.clone();
        b.id = "b".into();
        let plain = ServerSpec::new("c", "c");
        let desired = [
            DesiredReplicas { server: "b".into(), replicas: 9, ts: 1 },
            DesiredReplicas { server: "c".into(), replicas: 2, ts: 1 },
        ];
        let t = targets(&[a, b, plain], &desired);
        assert_eq!(t.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(t["a"].1, 1, "no desired count: min_replicas");
        assert_eq!(t["b"].1, 3, "capped at max_replicas");
    }
}
