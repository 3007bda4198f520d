//! The scaling rule, as a library: from the autoscaler stream's records (see
//! [`crate::signal`]) to a desired replica count per server.
//!
//! **Instantaneous recommendation** (one record):
//!
//! ```text
//! demand      = in_flight, or at least 1 when no_replica_503 > 0 (scale from zero)
//! base        = ceil(demand / target_concurrency)
//! recommended = clamp(base + buffer_replicas, min_replicas, max_replicas)   if base > 0
//!             = min_replicas                                                 if base = 0
//! ```
//!
//! Buffer replicas are headroom *for traffic*, added before the clamp: `max_replicas` is a
//! hard cap (the cost bound a user sets) and an idle server goes down to `min_replicas`
//! (scale to zero stays possible with `min_replicas = 0`, whatever the buffer).
//!
//! **Windows** (stabilization; `current` is the desired count last applied):
//!
//! - *Up*: `lo` = the lowest recommendation in effect at any time during the last
//!   `scale_up_window`. If `lo > current`, desired becomes `lo`: demand must have stayed
//!   above `current` for the whole window, and we go only as high as it stayed.
//! - *Down*: `hi` = the highest recommendation during the last `scale_down_window`. If
//!   `hi < current`, desired becomes `hi`: demand must have stayed below for the whole
//!   window, and we go only as low as it stayed.
//! - Otherwise desired stays. (Both cannot hold at once: `lo <= now <= hi`.)
//! - A window counts only once the history covers it: a recommender that has seen a
//!   server for less than a window does not move it in that direction (so a restarted
//!   autoscaler never acts on a partial view).
//! - **Scale from zero** is the exception: when `current` is 0 and the latest
//!   recommendation is positive, desired becomes that recommendation at once. A request
//!   is already waiting (it got a `503`), and no window protects anything at zero.
//! - A window of zero means "act on the latest record".
//!
//! A recommendation is "in effect" from its record's timestamp until the next record's
//! (records are one per interval; gaps hold the last value). History is stored
//! run-length encoded, so an idle server costs one entry however long the windows are.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::ServerSpec;
use crate::signal::ServerRecord;

/// A server's scaling settings (from its [`ServerSpec`]), as carried in the autoscaler
/// stream so the consumer needs no access to the routing store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalePolicy {
    /// In-flight requests per replica to aim for (>= 1; 0 is treated as 1).
    pub target_concurrency: u32,
    /// Lower bound.
    pub min_replicas: u32,
    /// Upper bound (a `min_replicas` above it wins: min is a floor).
    pub max_replicas: u32,
    /// Extra replicas on top of a non-zero demand.
    pub buffer_replicas: u32,
    /// Scale-up window, milliseconds.
    pub scale_up_window_ms: u64,
    /// Scale-down window, milliseconds.
    pub scale_down_window_ms: u64,
}

impl From<&ServerSpec> for ScalePolicy {
    fn from(s: &ServerSpec) -> Self {
        ScalePolicy {
            target_concurrency: s.target_concurrency,
            min_replicas: s.min_replicas,
            max_replicas: s.max_replicas,
            buffer_replicas: s.buffer_replicas,
            scale_up_window_ms: duration_ms(s.scale_up_window),
            scale_down_window_ms: duration_ms(s.scale_down_window),
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ScalePolicy {
    /// The instantaneous recommendation for `in_flight` requests and `no_replica_503`
    /// refusals in the interval (module docs).
    pub fn recommend(&self, in_flight: u64, no_replica_503: u64) -> u32 {
        let demand = if no_replica_503 > 0 { in_flight.max(1) } else { in_flight };
        let target = u64::from(self.target_concurrency.max(1));
        let base = demand.div_ceil(target);
        let raw = if base == 0 { 0 } else { base.saturating_add(u64::from(self.buffer_replicas)) };
        let capped = raw.min(u64::from(self.max_replicas));
        // min is applied last: it is a floor even when misconfigured above max.
        u32::try_from(capped).unwrap_or(u32::MAX).max(self.min_replicas)
    }
}

/// The autoscaler's output for one server, as stored for an orchestrator (etcd key
/// `<prefix>desired/<server>`, or one entry of the desired-replicas file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredReplicas {
    /// Server id.
    pub server: String,
    /// Replicas the orchestrator should run.
    pub replicas: u32,
    /// When it was decided, unix milliseconds (the record's `ts`).
    pub ts: u64,
}

/// What [`Recommender::observe`] concluded for one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The instantaneous recommendation from this record alone.
    pub recommended: u32,
    /// The desired replica count after the windows.
    pub desired: u32,
    /// Whether `desired` differs from the previous one (write it to the store).
    pub changed: bool,
}

/// Per-server scaling state, fed one record per server per interval.
#[derive(Debug, Default)]
pub struct Recommender {
    servers: HashMap<String, History>,
}

#[derive(Debug)]
struct History {
    /// (start unix ms, recommendation) runs, oldest first; consecutive runs differ.
    runs: VecDeque<(u64, u32)>,
    /// Last record's timestamp (records older than this are ignored).
    last_ts: u64,
    desired: u32,
}

impl Recommender {
    /// An empty recommender.
    pub fn new() -> Self {
        Recommender::default()
    }

    /// Start a server's desired count at `current` (e.g. the value already in the store)
    /// instead of the first record's routable replica count. Clears its history.
    pub fn seed(&mut self, server: &str, current: u32) {
        self.servers.insert(
            server.to_owned(),
            History { runs: VecDeque::new(), last_ts: 0, desired: current },
        );
    }

    /// The desired count last decided for `server`.
    pub fn desired(&self, server: &str) -> Option<u32> {
        self.servers.get(server).map(|h| h.desired)
    }

    /// Forget a server (deleted, or no longer in the stream).
    pub fn forget(&mut self, server: &str) {
        self.servers.remove(server);
    }

    /// Servers with state.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether no server has state.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Feed one record (with its server's policy) and decide. A server seen for the first
    /// time starts at its record's routable replica count unless [`Recommender::seed`]ed.
    /// Records must arrive in time order per server; an older one is ignored (its
    /// decision repeats the current state).
    pub fn observe(&mut self, policy: &ScalePolicy, record: &ServerRecord) -> Decision {
        let rec = policy.recommend(record.in_flight, record.no_replica_503);
        let initial = u32::try_from(record.replicas.len()).unwrap_or(u32::MAX);
        self.observe_at(&record.server, record.ts, rec, policy, initial)
    }

    /// [`Recommender::observe`] with the recommendation already computed.
    fn observe_at(
        &mut self,
        server: &str,
        ts: u64,
        rec: u32,
        policy: &ScalePolicy,
        initial: u32,
    ) -> Decision {
        let h = self.servers.entry(server.to_owned()).or_insert_with(|| History {
            runs: VecDeque::new(),
            last_ts: 0,
            desired: initial,
        });
        if ts < h.last_ts {
            return Decision { recommended: rec, desired: h.desired, changed: false };
        }
        h.last_ts = ts;
        if h.runs.back().is_none_or(|&(_, r)| r != rec) {
            h.runs.push_back((ts, rec));
        }
        // Keep the run in effect at the start of the longer window, drop older ones.
        let keep_from =
            ts.saturating_sub(policy.scale_up_window_ms.max(policy.scale_down_window_ms));
        while h.runs.len() > 1 && h.runs.get(1).is_some_and(|&(start, _)| start <= keep_from) {
            h.runs.pop_front();
        }
        let before = h.desired;
        let next = if before == 0 && rec > 0 {
            rec
        } else if let Some(lo) =
            window_extreme(&h.runs, ts, policy.scale_up_window_ms, Extreme::Min)
            && lo > before
        {
            lo
        } else if let Some(hi) =
            window_extreme(&h.runs, ts, policy.scale_down_window_ms, Extreme::Max)
            && hi < before
        {
            hi
        } else {
            before
        };
        h.desired = next;
        Decision { recommended: rec, desired: next, changed: next != before }
    }
}

#[derive(Clone, Copy)]
enum Extreme {
    Min,
    Max,
}

/// The min or max recommendation in effect during `[now - window, now]`, or `None` when
/// the history does not reach back to the window's start.
fn window_extreme(
    runs: &VecDeque<(u64, u32)>,
    now: u64,
    window: u64,
    which: Extreme,
) -> Option<u32> {
    let start = now.checked_sub(window)?;
    let first = runs.front()?;
    if first.0 > start {
        return None;
    }
    // Runs that are in effect somewhere in the window: the last one starting at or before
    // `start`, and every later one.
    let from = runs.iter().rposition(|&(s, _)| s <= start).unwrap_or(0);
    let values = runs.iter().skip(from).map(|&(_, r)| r);
    match which {
        Extreme::Min => values.min(),
        Extreme::Max => values.max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::ReplicaRecord;

    fn policy(target: u32, min: u32, max: u32, buffer: u32, up_s: u64, down_s: u64) -> ScalePolicy {
        ScalePolicy {
            target_concurrency: target,
            min_replicas: min,
            max_replicas: max,
            buffer_replicas: buffer,
            scale_up_window_ms: up_s * 1000,
            scale_down_window_ms: down_s * 1000,
        }
    }

    #[test]
    fn instantaneous_rule_table() {
        // (target, min, max, buffer, in_flight, no_replica_503, expected)
        let table: &[(u32, u32, u32, u32, u64, u64, u32)] = &[
            (10, 0, 100, 0, 0, 0, 0),                                 // idle → min (0)
            (10, 2, 100, 0, 0, 0, 2),                                 // idle → min (2)
            (10, 0, 100, 3, 0, 0, 0),  // idle: buffer only applies to demand
            (10, 1, 100, 3, 0, 0, 1),  // idle → min even with a buffer
            (10, 0, 100, 0, 1, 0, 1),  // ceil(1/10)
            (10, 0, 100, 0, 10, 0, 1), // exactly one replica's worth
            (10, 0, 100, 0, 11, 0, 2), // ceil(11/10)
            (10, 0, 100, 2, 11, 0, 4), // + buffer
            (10, 5, 100, 0, 11, 0, 5), // below min → min
            (10, 0, 3, 0, 100, 0, 3),  // above max → max
            (10, 0, 3, 5, 11, 0, 3),   // buffer does not exceed max
            (10, 0, 100, 0, 0, 7, 1),  // scale from zero: 503s count as ≥ 1 in flight
            (10, 0, 100, 1, 0, 7, 2),  // ... plus buffer
            (10, 0, 100, 0, 25, 7, 3), // demand already above 1: in-flight rules
            (1, 0, 1000, 0, 999, 0, 999), // target 1
            (0, 0, 100, 0, 5, 0, 5),   // target 0 treated as 1
            (10, 5, 3, 0, 100, 0, 5),  // min > max: min is the floor
            (u32::MAX, 0, u32::MAX, u32::MAX, u64::MAX, 0, u32::MAX), // no overflow
        ];
        for &(t, min, max, buf, inf, nr, want) in table {
            let p = policy(t, min, max, buf, 0, 0);
            assert_eq!(p.recommend(inf, nr), want, "{p:?} in_flight={inf} 503s={nr}");
        }
    }

    fn record(ts_s: u64, in_flight: u64, no_replica: u64, replicas: usize) -> ServerRecord {
        ServerRecord {
            server: "s".into(),
            ts: ts_s * 1000,
            in_flight,
            replicas: (0..replicas)
                .map(|i| ReplicaRecord { id: format!("r{i}"), in_flight: 0 })
                .collect(),
            request_rate: 0.0,
            no_replica_503: no_replica,
            scale: None,
        }
    }

    /// Feed `(t seconds, in_flight, 503s)` records, check desired after each.
    fn run(p: &ScalePolicy, start: u32, steps: &[(u64, u64, u64, u32)]) {
        let mut r = Recommender::new();
        r.seed("s", start);
        for &(t, inf, nr, want) in steps {
            let d = r.observe(p, &record(t, inf, nr, 0));
            assert_eq!(d.desired, want, "t={t}s in_flight={inf} 503s={nr}: {d:?}");
        }
    }

    #[test]
    fn zero_windows_follow_the_latest_record() {
        let p = policy(10, 0, 100, 0, 0, 0);
        run(&p, 0, &[(0, 0, 0, 0), (1, 35, 0, 4), (2, 5, 0, 1), (3, 0, 0, 0), (4, 100, 0, 10)]);
    }

    #[test]
    fn scale_up_waits_for_the_whole_window() {
        // Up window 10 s, down window 60 s, currently 1 replica.
        let p = policy(10, 1, 100, 0, 10, 60);
        run(
            &p,
            1,
            &[
                (0, 5, 0, 1),   // rec 1 since t=0
                (1, 30, 0, 1),  // rec 3 since t=1: window [−9, 1] not covered yet
                (5, 30, 0, 1),  // window [−5, 5] reaches before the history
                (10, 30, 0, 1), // window [0, 10] still includes rec 1 (t=0..1)
                (11, 30, 0, 3), // window [1, 11]: rec 3 throughout → 3
                (12, 80, 0, 3), // rec 8 since t=12
                (13, 30, 0, 3), // dip back to 3 at t=13
                (22, 80, 0, 3), // window [12, 22] includes the dip → min 3, stays
                (23, 80, 0, 3), // window [13, 23]: 3 at t=13 (rec 3 in effect 13..22)
                (32, 80, 0, 8), // window [22, 32]: rec 8 since 22 → 8
            ],
        );
    }

    #[test]
    fn scale_up_goes_only_as_high_as_demand_stayed() {
        let p = policy(10, 0, 100, 0, 10, 600);
        run(
            &p,
            2,
            &[
                (0, 20, 0, 2),  // rec 2 = current
                (1, 50, 0, 2),  // rec 5
                (5, 90, 0, 2),  // rec 9
                (11, 90, 0, 5), // window [1, 11]: min 5 → 5
                (15, 90, 0, 9), // window [5, 15]: 9 since t=5 → 9
            ],
        );
    }

    #[test]
    fn scale_down_waits_and_goes_only_as_low_as_demand_stayed() {
        let p = policy(10, 0, 100, 0, 0, 30);
        run(
            &p,
            0,
            &[
                (0, 100, 0, 10), // up at once (up window 0, from zero)
                (1, 40, 0, 10),  // rec 4
                (10, 20, 0, 10), // rec 2
                (30, 20, 0, 10), // window [0, 30] includes rec 10 at t=0
                (31, 20, 0, 4),  // window [1, 31]: max 4 → 4
                (40, 20, 0, 2),  // window [10, 40]: 2 since t=10 → 2
                (41, 0, 0, 2),   // idle: rec 0
                (70, 0, 0, 2),   // window [40, 70] still includes rec 2 (t=40..41)
                (71, 0, 0, 0),   // window [41, 71]: idle throughout → min 0
            ],
        );
    }

    #[test]
    fn zero_traffic_goes_to_min_after_the_window() {
        let p = policy(10, 2, 100, 1, 5, 5);
        run(&p, 6, &[(0, 0, 0, 6), (4, 0, 0, 6), (5, 0, 0, 2), (100, 0, 0, 2)]);
    }

    #[test]
    fn scale_from_zero_is_immediate() {
        // Long windows; zero replicas; 503s for lack of one.
        let p = policy(10, 0, 100, 1, 60, 300);
        run(
            &p,
            0,
            &[
                (0, 0, 0, 0),   // idle at zero
                (1, 0, 3, 2),   // demand (503s): ≥ 1 in flight + buffer 1 → 2 at once
                (2, 25, 0, 2),  // rec 4: the up window applies again (not from zero)
                (62, 25, 0, 4), // window [2, 62]: 4 throughout
            ],
        );
    }

    #[test]
    fn flapping_demand_does_not_move_it() {
        let p = policy(10, 0, 100, 0, 10, 10);
        let mut steps = Vec::new();
        for t in 0..100u64 {
            let inf = if t % 4 < 2 { 50 } else { 10 };
            steps.push((t, inf, 0, 3));
        }
        run(&p, 3, &steps);
    }

    #[test]
    fn first_record_seeds_from_routable_replicas_and_old_records_are_ignored() {
        let p = policy(10, 0, 100, 0, 0, 0);
        let mut r = Recommender::new();
        let d = r.observe(&p, &record(10, 0, 0, 3));
        assert_eq!(d, Decision { recommended: 0, desired: 0, changed: true });
        let d = r.observe(&p, &record(11, 40, 0, 0));
        assert_eq!(d, Decision { recommended: 4, desired: 4, changed: true });
        let d = r.observe(&p, &record(5, 0, 0, 0));
        assert_eq!(d, Decision { recommended: 0, desired: 4, changed: false });
        assert_eq!(r.desired("s"), Some(4));
        // With windows, the first record's replica count is the starting point.
        let p = policy(10, 0, 100, 0, 30, 30);
        let mut r = Recommender::new();
        let d = r.observe(&p, &record(10, 0, 0, 3));
        assert_eq!(d.desired, 3);
        assert!(!d.changed);
        r.forget("s");
        assert!(r.is_empty());
    }

    #[test]
    fn idle_history_stays_small() {
        let p = policy(10, 0, 100, 0, 60, 300);
        let mut r = Recommender::new();
        r.seed("s", 0);
        for t in 0..10_000u64 {
            r.observe(&p, &record(t, if t % 1000 == 0 { 30 } else { 0 }, 0, 0));
        }
        let runs = r.servers.get("s").map(|h| h.runs.len()).unwrap();
        // At most the changes within the longest window (300 s) plus one.
        assert!(runs <= 3, "{runs}");
    }

    #[test]
    fn policy_from_spec() {
        let mut s = ServerSpec::new("s", "s");
        s.target_concurrency = 7;
        s.scale_up_window = Duration::from_secs(30);
        let p = ScalePolicy::from(&s);
        assert_eq!(p.target_concurrency, 7);
        assert_eq!(p.scale_up_window_ms, 30_000);
        assert_eq!(p.scale_down_window_ms, 300_000);
        assert_eq!(p.max_replicas, 100);
    }
}
