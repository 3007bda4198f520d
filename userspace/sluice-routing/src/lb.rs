//! Replica selection: power-of-two-choices on in-flight requests, and rendezvous (HRW)
//! hashing for sticky sessions with an optional bounded load.
//!
//! The request path calls [`select`] once per request with the server from the snapshot
//! and the session header's value, if any. Selection is lock-free and allocation-free: it
//! reads the replicas' in-flight counters (relaxed atomics) and a per-thread RNG.
//!
//! **The hash is shared with the kernel.** A replica's key is
//! `sluice_abi::hrw::fnv1a64(replica id)` (precomputed as [`Replica::id_hash`]), a
//! session's is `fnv1a64(session header value)`, and a replica's weight for a session is
//! `sluice_abi::hrw::score(session_hash, replica_hash)`; the highest weight wins and ties
//! go to the lower index in [`Server::replicas`] (which is ordered by replica id). The VIP
//! connect program computes the same choice from the same crate, so there is one
//! definition of the hash (docs/routing.md, "Load balancing").

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_abi::hrw;

use crate::snapshot::{Replica, Server};

/// Node-wide load-balancing knobs (proxy configuration; per-server settings live in
/// [`crate::ServerSpec`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LbPolicy {
    /// Bounded load for sticky sessions: `Some(c)` skips a session's HRW choice while it
    /// would hold more than `ceil(c × mean in-flight)` requests (counting the new one) and
    /// tries the next HRW candidate. `c` below 1.0 (or NaN) is treated as 1.0. `None`
    /// (the default): pure HRW, a session always goes to its first choice.
    pub bounded_load: Option<f64>,
}

impl LbPolicy {
    /// Pure HRW for sessions (no load bound), P2C otherwise.
    pub const fn new() -> Self {
        LbPolicy { bounded_load: None }
    }

    /// HRW with bounded load factor `c` (see [`LbPolicy::bounded_load`]).
    pub const fn with_bounded_load(c: f64) -> Self {
        LbPolicy { bounded_load: Some(c) }
    }
}

/// The session hash of a session header value: `fnv1a64(value)`.
#[inline]
pub fn session_hash(session: &[u8]) -> u64 {
    hrw::fnv1a64(session)
}

/// Pick a replica of `server` for one request.
///
/// - No replica: `None` (the proxy answers `503` and counts demand).
/// - `session` is `Some` and non-empty: rendezvous hashing over the replicas, with the
///   policy's bounded load if set.
/// - Otherwise: power-of-two-choices on in-flight requests.
///
/// The caller counts the request with [`Server::begin_request`] (or the capped
/// [`Server::try_begin_request`]) on the returned replica.
pub fn select<'a>(
    server: &'a Server,
    session: Option<&[u8]>,
    policy: &LbPolicy,
) -> Option<&'a Arc<Replica>> {
    select_among(&server.replicas, session, policy)
}

/// [`select`] over an explicit replica slice (which must be ordered by replica id for the
/// tie rule to match the kernel's; [`Server::replicas`] is).
pub fn select_among<'a>(
    replicas: &'a [Arc<Replica>],
    session: Option<&[u8]>,
    policy: &LbPolicy,
) -> Option<&'a Arc<Replica>> {
    match session {
        Some(s) if !s.is_empty() => {
            let h = session_hash(s);
            let i = match policy.bounded_load {
                Some(c) => hrw_bounded(replicas, h, c),
                None => hrw_first(replicas, h),
            }?;
            replicas.get(i)
        }
        _ => p2c(replicas),
    }
}

/// Index of the session's first HRW choice: the highest `score(session_hash, id_hash)`,
/// ties to the lower index (exactly the kernel's loop).
pub fn hrw_first(replicas: &[Arc<Replica>], session_hash: u64) -> Option<usize> {
    HrwRanks::new(replicas, session_hash).next()
}

/// Index of the first HRW candidate that is within the load bound
/// `in_flight + 1 <= ceil(c × (total_in_flight + 1) / n)` (consistent hashing with bounded
/// loads, Mirrokni et al.). With consistent counters some replica always qualifies (the
/// least loaded one does); under concurrent updates none might, and then the first choice
/// is used.
pub fn hrw_bounded(replicas: &[Arc<Replica>], session_hash: u64, c: f64) -> Option<usize> {
    let n = replicas.len();
    if n <= 1 {
        return hrw_first(replicas, session_hash);
    }
    let total: u64 = replicas.iter().map(|r| r.stats.in_flight.load(Ordering::Relaxed)).sum();
    let c = if c.is_nan() || c < 1.0 { 1.0 } else { c };
    let bound = (c * (total as f64 + 1.0) / n as f64).ceil();
    let mut ranks = HrwRanks::new(replicas, session_hash);
    let first = ranks.next()?;
    let fits = |i: usize| (replicas[i].stats.in_flight.load(Ordering::Relaxed) + 1) as f64 <= bound;
    if fits(first) {
        return Some(first);
    }
    Some(ranks.find(|&i| fits(i)).unwrap_or(first))
}

/// The replicas in HRW order for one session (best first), computed lazily without
/// allocating: each step is one pass over the replicas, so taking `k` ranks costs
/// `O(k × n)`. Sticky selection usually takes one.
#[derive(Clone, Debug)]
pub struct HrwRanks<'a> {
    replicas: &'a [Arc<Replica>],
    session_hash: u64,
    /// Key of the last rank returned; the next rank is the largest key below it.
    prev: Option<(u64, usize)>,
}

impl<'a> HrwRanks<'a> {
    /// Ranks of `replicas` for the session with hash `session_hash`.
    pub fn new(replicas: &'a [Arc<Replica>], session_hash: u64) -> Self {
        HrwRanks { replicas, session_hash, prev: None }
    }

    /// Total order: higher score first, then lower index (`usize::MAX - i` so "larger key
    /// is better" holds for both parts).
    fn key(&self, i: usize) -> (u64, usize) {
        (hrw::score(self.session_hash, self.replicas[i].id_hash), usize::MAX - i)
    }
}

impl Iterator for HrwRanks<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let mut best: Option<((u64, usize), usize)> = None;
        for i in 0..self.replicas.len() {
            let k = self.key(i);
            if self.prev.is_some_and(|p| k >= p) {
                continue;
            }
            if best.is_none_or(|(b, _)| k > b) {
                best = Some((k, i));
            }
        }
        let (k, i) = best?;
        self.prev = Some(k);
        Some(i)
    }
}

/// Power-of-two-choices: two distinct replicas at random, the one with fewer requests in
/// flight wins (the first drawn on a tie).
pub fn p2c(replicas: &[Arc<Replica>]) -> Option<&Arc<Replica>> {
    p2c_of(replicas.len(), |i| &replicas[i])
}

/// [`p2c`] over `n` candidates, the `i`th being `at(i)`: lets a retry choose among all
/// replicas but one without building a list.
fn p2c_of<'a>(n: usize, at: impl Fn(usize) -> &'a Arc<Replica>) -> Option<&'a Arc<Replica>> {
    match n {
        0 => None,
        1 => Some(at(0)),
        n => {
            let r = next_random();
            let n64 = n as u64;
            let a = (r % n64) as usize;
            // Second pick among the other n - 1, from the high bits.
            let mut b = ((r >> 32) % (n64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (ra, rb) = (at(a), at(b));
            // A passively ejected replica fails fast and so looks idle: skip it, unless
            // every replica is ejected (then the load rule alone decides).
            match (ra.stats.ejection.is_ejected(), rb.stats.ejection.is_ejected()) {
                (false, true) => return Some(ra),
                (true, false) => return Some(rb),
                (true, true) => {
                    if let Some(r) = (0..n).map(&at).find(|r| !r.stats.ejection.is_ejected()) {
                        return Some(r);
                    }
                }
                (false, false) => {}
            }
            if rb.stats.in_flight.load(Ordering::Relaxed)
                < ra.stats.in_flight.load(Ordering::Relaxed)
            {
                Some(rb)
            } else {
                Some(ra)
            }
        }
    }
}

/// The replica for the one retry of a request that provably never reached `failed`:
/// any replica of `server` but `failed` (never the same one), chosen as [`select`] would
/// (the session's next rendezvous rank that is not ejected, else power-of-two-choices).
/// `None` when `failed` is the only replica.
pub fn select_other<'a>(
    server: &'a Server,
    failed: &Arc<Replica>,
    session_hash: Option<u64>,
) -> Option<&'a Arc<Replica>> {
    let replicas = &server.replicas[..];
    let Some(skip) = replicas.iter().position(|r| Arc::ptr_eq(r, failed)) else {
        // `failed` left the snapshot meanwhile: every replica is another one.
        return match session_hash {
            Some(h) => hrw_first(replicas, h).and_then(|i| replicas.get(i)),
            None => p2c(replicas),
        };
    };
    match session_hash {
        Some(h) => {
            let mut others = HrwRanks::new(replicas, h).filter(|&i| i != skip);
            let first = others.next()?;
            let pick = std::iter::once(first)
                .chain(others)
                .find(|&i| !replicas[i].stats.ejection.is_ejected())
                .unwrap_or(first);
            replicas.get(pick)
        }
        None => p2c_of(replicas.len() - 1, |i| &replicas[if i >= skip { i + 1 } else { i }]),
    }
}

thread_local! {
    // Seeded per thread from std's randomly keyed hasher; `| 1` keeps xorshift off zero.
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(0x5eed_u32) | 1);
}

/// A cheap per-thread xorshift64*: selection and sampling need spread, not secrecy.
pub(crate) fn next_random() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Protocol, ServerSpec};
    use crate::snapshot::{ReplicaStats, ServerStats};

    pub(crate) fn replica(id: &str) -> Arc<Replica> {
        Arc::new(Replica {
            id: id.to_owned(),
            server: "s".to_owned(),
            addr: "127.0.0.1:1".parse().unwrap(),
            protocol: Protocol::Http1,
            id_hash: hrw::fnv1a64(id.as_bytes()),
            stats: Arc::new(ReplicaStats::default()),
        })
    }

    pub(crate) fn server_with(spec: ServerSpec, replicas: Vec<Arc<Replica>>) -> Server {
        Server {
            spec: Arc::new(spec),
            replicas: replicas.into(),
            stats: Arc::new(ServerStats::default()),
        }
    }

    fn replicas(n: usize) -> Vec<Arc<Replica>> {
        // Zero-padded so id order = index order, as in a snapshot.
        (0..n).map(|i| replica(&format!("r-{i:03}"))).collect()
    }

    fn set_load(r: &Replica, n: u64) {
        r.stats.in_flight.store(n, Ordering::Relaxed);
    }

    /// The kernel's loop (ebpf/sluice-ebpf VIP connect), transcribed.
    fn kernel_choice(replicas: &[Arc<Replica>], session: u64) -> usize {
        let mut best = 0;
        let mut best_score = 0;
        for (i, r) in replicas.iter().enumerate() {
            let score = hrw::score(session, r.id_hash);
            if i == 0 || score > best_score {
                best = i;
                best_score = score;
            }
        }
        best
    }

    #[test]
    fn empty_and_single() {
        let p = LbPolicy::default();
        assert!(select_among(&[], None, &p).is_none());
        assert!(select_among(&[], Some(b"x"), &p).is_none());
        assert!(select_among(&[], Some(b"x"), &LbPolicy::with_bounded_load(1.25)).is_none());
        let one = replicas(1);
        set_load(&one[0], 1000);
        assert_eq!(select_among(&one, None, &p).unwrap().id, "r-000");
        assert_eq!(
            select_among(&one, Some(b"x"), &LbPolicy::with_bounded_load(1.0)).unwrap().id,
            "r-000"
        );
    }

    #[test]
    fn same_session_sticks_for_1000_requests() {
        let rs = replicas(8);
        let server = server_with(ServerSpec::new("s", "s"), rs);
        let p = LbPolicy::default();
        let first = select(&server, Some(b"user-42"), &p).unwrap().id.clone();
        for i in 0..1000u64 {
            // Loads change under it; pure HRW ignores them.
            set_load(&server.replicas[(i % 8) as usize], i);
            assert_eq!(select(&server, Some(b"user-42"), &p).unwrap().id, first);
        }
    }

    #[test]
    fn matches_the_kernel_choice() {
        for n in [1, 2, 3, 7, 64] {
            let rs = replicas(n);
            for s in 0..2000u32 {
                let h = session_hash(format!("sess-{s}").as_bytes());
                assert_eq!(hrw_first(&rs, h), Some(kernel_choice(&rs, h)), "n={n} s={s}");
            }
        }
        // Ties go to the lower index: duplicate ids score equal.
        let dup = vec![replica("a"), replica("a"), replica("a")];
        assert_eq!(hrw_first(&dup, 7), Some(0));
        assert_eq!(HrwRanks::new(&dup, 7).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn ranks_are_a_permutation_in_score_order() {
        let rs = replicas(10);
        let h = session_hash(b"abc");
        let ranks: Vec<usize> = HrwRanks::new(&rs, h).collect();
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let scores: Vec<u64> = ranks.iter().map(|&i| hrw::score(h, rs[i].id_hash)).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn removing_a_replica_moves_only_its_sessions() {
        let all = replicas(5);
        let without: Vec<Arc<Replica>> = all.iter().filter(|r| r.id != "r-002").cloned().collect();
        let p = LbPolicy::default();
        let mut moved_from_removed = 0;
        for s in 0..10_000u32 {
            let sess = format!("session-{s}");
            let before = &select_among(&all, Some(sess.as_bytes()), &p).unwrap().id;
            let after = &select_among(&without, Some(sess.as_bytes()), &p).unwrap().id;
            if before == "r-002" {
                moved_from_removed += 1;
                assert_ne!(after, "r-002");
            } else {
                assert_eq!(before, after, "session {sess} moved though its replica stayed");
            }
        }
        // Roughly a fifth of the sessions lived on the removed replica.
        assert!((1500..2500).contains(&moved_from_removed), "{moved_from_removed}");
        // Adding it back moves exactly those sessions back (and no others).
    }

    #[test]
    fn adding_a_replica_moves_sessions_only_to_it() {
        let four = replicas(4);
        let mut five = four.clone();
        five.push(replica("r-004"));
        let p = LbPolicy::default();
        for s in 0..10_000u32 {
            let sess = format!("session-{s}");
            let before = &select_among(&four, Some(sess.as_bytes()), &p).unwrap().id;
            let after = &select_among(&five, Some(sess.as_bytes()), &p).unwrap().id;
            assert!(before == after || after == "r-004");
        }
    }

    #[test]
    fn sessions_spread_evenly() {
        let rs = replicas(4);
        let mut counts = [0u32; 4];
        for s in 0..10_000u32 {
            counts[hrw_first(&rs, session_hash(format!("u{s}").as_bytes())).unwrap()] += 1;
        }
        for c in counts {
            assert!((2000..3000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let rs = replicas(2);
        set_load(&rs[0], 10);
        for _ in 0..100 {
            assert_eq!(p2c(&rs).unwrap().id, "r-001");
        }
        let rs = replicas(3);
        set_load(&rs[0], 10);
        set_load(&rs[1], 10);
        let picks = (0..3000).filter(|_| p2c(&rs).unwrap().id == "r-002").count();
        // r-002 is in the random pair 2/3 of the time and then always wins.
        assert!((1800..2200).contains(&picks), "{picks}");
        // With equal loads P2C spreads over all replicas.
        let rs = replicas(4);
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            let r = p2c(&rs).unwrap();
            counts[rs.iter().position(|x| Arc::ptr_eq(x, r)).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn select_other_never_picks_the_failed_replica() {
        let spec = ServerSpec::new("s", "s");
        let rs = replicas(3);
        let server = server_with(spec.clone(), rs.clone());
        for i in 0..300u32 {
            let failed = &rs[(i % 3) as usize];
            let session = (i % 2 == 0).then(|| session_hash(format!("u{i}").as_bytes()));
            let other = select_other(&server, failed, session).unwrap();
            assert!(!Arc::ptr_eq(other, failed));
        }
        // Sticky: the next rendezvous rank of the session.
        let h = session_hash(b"user");
        let mut ranks = HrwRanks::new(&rs, h);
        let (first, second) = (ranks.next().unwrap(), ranks.next().unwrap());
        assert!(Arc::ptr_eq(select_other(&server, &rs[first], Some(h)).unwrap(), &rs[second]));
        // A lone replica has no other.
        let one = server_with(spec, rs[..1].to_vec());
        assert!(select_other(&one, &rs[0], None).is_none());
    }

    #[test]
    fn p2c_skips_ejected_replicas() {
        let rs = replicas(3);
        let policy =
            crate::snapshot::EjectionPolicy { threshold: 2, base_ms: 60_000, max_ms: 60_000 };
        assert!(!rs[0].stats.ejection.record_failure(&policy, true));
        assert!(rs[0].stats.ejection.record_failure(&policy, true));
        assert!(rs[0].stats.ejection.is_ejected());
        for _ in 0..1000 {
            assert!(!Arc::ptr_eq(p2c(&rs).unwrap(), &rs[0]));
        }
        // Every replica ejected: selection still answers.
        for r in &rs[1..] {
            r.stats.ejection.record_failure(&policy, true);
            r.stats.ejection.record_failure(&policy, true);
        }
        assert!(p2c(&rs).is_some());
    }

    #[test]
    fn ejection_backs_off_and_spares_the_last_replica() {
        let e = crate::snapshot::Ejection::default();
        let policy = crate::snapshot::EjectionPolicy { threshold: 1, base_ms: 1000, max_ms: 3000 };
        assert!(!e.record_failure(&policy, false), "last ready replica ejected");
        assert!(e.record_failure(&policy, true));
        let first = e.remaining_ms();
        assert!(first > 900 && first <= 1000, "{first}");
        // Pretend the ejection ran out, fail again: twice as long, then capped.
        e.until_ms.store(1, Ordering::Relaxed);
        assert!(e.record_failure(&policy, true));
        assert!(e.remaining_ms() > 1900, "{}", e.remaining_ms());
        e.until_ms.store(1, Ordering::Relaxed);
        assert!(e.record_failure(&policy, true));
        assert!(e.remaining_ms() <= 3000);
        // A success after the ejection resets the backoff.
        e.until_ms.store(1, Ordering::Relaxed);
        e.record_success();
        assert!(e.record_failure(&policy, true));
        assert!(e.remaining_ms() <= 1000);
        let off = crate::snapshot::EjectionPolicy { threshold: 0, ..policy };
        assert!(!crate::snapshot::Ejection::default().record_failure(&off, true));
    }

    #[test]
    fn empty_session_falls_back_to_p2c() {
        let rs = replicas(2);
        set_load(&rs[1], 5);
        for _ in 0..50 {
            assert_eq!(select_among(&rs, Some(b""), &LbPolicy::default()).unwrap().id, "r-000");
        }
    }

    #[test]
    fn bounded_load_spills_to_the_next_candidate() {
        let rs = replicas(4);
        let sess = b"hot-session";
        let h = session_hash(sess);
        let order: Vec<usize> = HrwRanks::new(&rs, h).collect();
        let bounded = LbPolicy::with_bounded_load(1.25);
        // Idle: the first choice.
        assert_eq!(hrw_bounded(&rs, h, 1.25), Some(order[0]));
        // First choice hot: total 100, bound ceil(1.25 × 101 / 4) = 32 → spill to rank 2.
        set_load(&rs[order[0]], 100);
        assert_eq!(select_among(&rs, Some(sess), &bounded).unwrap().id, rs[order[1]].id);
        // Pure HRW does not spill.
        assert_eq!(
            select_among(&rs, Some(sess), &LbPolicy::default()).unwrap().id,
            rs[order[0]].id
        );
        // Second choice at 40: total 140, bound ceil(1.25 × 141 / 4) = 45, fits.
        set_load(&rs[order[1]], 40);
        assert_eq!(hrw_bounded(&rs, h, 1.25), Some(order[1]));
        // At 50: total 150, bound ceil(1.25 × 151 / 4) = 48 → rank 3.
        set_load(&rs[order[1]], 50);
        assert_eq!(hrw_bounded(&rs, h, 1.25), Some(order[2]));
        // Load evens out: back to the first choice.
        for r in &rs {
            set_load(r, 10);
        }
        assert_eq!(hrw_bounded(&rs, h, 1.25), Some(order[0]));
        // At exactly the bound the replica still fits: total 40, bound ceil(1.0 × 41 / 4)
        // = 11, and 10 + 1 <= 11.
        assert_eq!(hrw_bounded(&rs, h, 1.0), Some(order[0]));
        // c < 1 is clamped to 1; NaN too.
        assert_eq!(hrw_bounded(&rs, h, 0.1), Some(order[0]));
        assert_eq!(hrw_bounded(&rs, h, f64::NAN), Some(order[0]));
    }

    #[test]
    fn bounded_load_keeps_every_replica_within_the_bound() {
        // Every request is the same hot session and none finish: with c = 1.5 the
        // replicas fill evenly up to the bound instead of one taking everything.
        let rs = replicas(4);
        let h = session_hash(b"one-hot-session");
        for _ in 0..400 {
            let i = hrw_bounded(&rs, h, 1.5).unwrap();
            rs[i].stats.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        let loads: Vec<u64> =
            rs.iter().map(|r| r.stats.in_flight.load(Ordering::Relaxed)).collect();
        // Final bound: ceil(1.5 × 400 / 4) = 150 (each pick checked against the total
        // before it).
        assert!(loads.iter().all(|&l| l <= 150), "{loads:?}");
        assert_eq!(loads.iter().sum::<u64>(), 400);
        // The spill follows HRW order: the first choice is full.
        assert_eq!(loads[hrw_first(&rs, h).unwrap()], 150, "{loads:?}");
    }
}
