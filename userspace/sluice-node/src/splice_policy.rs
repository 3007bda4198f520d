//! When to splice an opaque stream in the kernel.
//!
//! Splicing wins on latency (a 64 B round trip ≈10 µs spliced vs ≈150 µs through a
//! userspace relay) but loses on bulk (≈230 MB/s spliced vs ≈1 GB/s copied in userspace
//! with 1 KiB writes: the verdict runs per skb). So in `auto` mode a stream starts on
//! the userspace relay, which feeds every read to an [`Observer`]; once a window of
//! reads looks latency-bound (most reads small, in every direction that carried data,
//! and no sustained high byte rate) the relay switches to the kernel at a clean point.
//! A bulk window keeps the stream in userspace and the next window is judged afresh.
//! Once spliced, a stream stays spliced.
//!
//! Pure: no I/O, the caller passes the clock, so it is unit-tested exhaustively.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use sluice_routing::SpliceMode;

/// The node's `[splice]` section of the run config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpliceConfig {
    /// Default for servers left at `auto`; `never` turns splicing off node-wide.
    pub mode: SpliceMode,
    /// `auto`: a read of at most this many bytes is a small message.
    pub small_read_bytes: usize,
    /// `auto`: a direction faster than this (bytes per second) is bulk.
    pub max_rate_bytes_per_sec: u64,
    /// `auto`: reads per judged window.
    pub window_reads: u32,
}

impl Default for SpliceConfig {
    fn default() -> Self {
        let p = PolicyConfig::default();
        SpliceConfig {
            mode: SpliceMode::Auto,
            small_read_bytes: p.small_read,
            max_rate_bytes_per_sec: p.max_rate,
            window_reads: p.window_reads,
        }
    }
}

impl SpliceConfig {
    /// The `auto` policy's thresholds.
    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            small_read: self.small_read_bytes,
            max_rate: self.max_rate_bytes_per_sec,
            // Fewer than min_reads per window would never be judged.
            window_reads: self.window_reads.max(PolicyConfig::default().min_reads),
            ..PolicyConfig::default()
        }
    }
}

/// Thresholds of the `auto` policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// A window is judged after this many reads (both directions together)...
    pub window_reads: u32,
    /// ...or after this long, once it has at least `min_reads`.
    pub window_time: Duration,
    /// Fewest reads a window is judged on.
    pub min_reads: u32,
    /// A read of at most this many bytes counts as a small message.
    pub small_read: usize,
    /// Percentage of small reads a direction needs to look latency-bound.
    pub small_percent: u32,
    /// A direction moving more than this (bytes per second over the window) is bulk,
    /// whatever its read sizes: many small writes at a high rate are faster copied.
    /// Interactive traffic (tokens, chat, game state) stays far below it; a bulk
    /// transfer exceeds it even while TCP is still in slow start.
    pub max_rate: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            window_reads: 32,
            window_time: Duration::from_millis(250),
            min_reads: 8,
            small_read: 2048,
            small_percent: 80,
            max_rate: 4 * 1024 * 1024,
        }
    }
}

/// What the observer concluded from a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough seen yet.
    Undecided,
    /// Latency-bound: splice at the next clean point.
    Splice,
    /// Bulk (or not clearly small): stay in userspace; the next window is judged anew.
    Bulk,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DirWindow {
    reads: u32,
    small: u32,
    bytes: u64,
}

/// Read statistics of the current window, per direction (0: client → replica,
/// 1: replica → client).
#[derive(Clone, Debug)]
pub struct Observer {
    cfg: PolicyConfig,
    start: Option<Instant>,
    dirs: [DirWindow; 2],
    /// Windows judged bulk so far (for the decision log).
    bulk_windows: u32,
    /// The last judged window, for the decision log.
    last: Option<WindowSummary>,
}

/// What the last judged window looked like (for the decision log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSummary {
    /// Reads per direction.
    pub reads: [u32; 2],
    /// Small reads per direction.
    pub small: [u32; 2],
    /// Bytes per direction.
    pub bytes: [u64; 2],
    /// The window's length.
    pub elapsed: Duration,
}

impl Observer {
    /// A fresh observer.
    pub fn new(cfg: PolicyConfig) -> Self {
        Observer { cfg, start: None, dirs: [DirWindow::default(); 2], bulk_windows: 0, last: None }
    }

    /// The last judged window.
    pub fn last_window(&self) -> Option<WindowSummary> {
        self.last
    }

    /// Windows judged bulk so far.
    pub fn bulk_windows(&self) -> u32 {
        self.bulk_windows
    }

    /// Records one read of `n` bytes (n > 0) in direction `dir` (0 or 1) at `now`.
    pub fn observe(&mut self, dir: usize, n: usize, now: Instant) -> Verdict {
        let start = *self.start.get_or_insert(now);
        let d = &mut self.dirs[dir & 1];
        d.reads += 1;
        d.bytes += n as u64;
        if n <= self.cfg.small_read {
            d.small += 1;
        }
        let reads = self.dirs[0].reads + self.dirs[1].reads;
        let elapsed = now.saturating_duration_since(start);
        let full = reads >= self.cfg.window_reads
            || (reads >= self.cfg.min_reads && elapsed >= self.cfg.window_time);
        if !full {
            return Verdict::Undecided;
        }
        let verdict = if self.latency_bound(elapsed) { Verdict::Splice } else { Verdict::Bulk };
        if verdict == Verdict::Bulk {
            self.bulk_windows += 1;
        }
        let [a, b] = self.dirs;
        self.last = Some(WindowSummary {
            reads: [a.reads, b.reads],
            small: [a.small, b.small],
            bytes: [a.bytes, b.bytes],
            elapsed,
        });
        self.start = None;
        self.dirs = [DirWindow::default(); 2];
        verdict
    }

    fn latency_bound(&self, elapsed: Duration) -> bool {
        // A handful of small reads landing together (tokens queued behind a slow
        // client) is not a sustained rate: the window counts as at least 100 µs.
        let secs = elapsed.max(Duration::from_micros(100)).as_secs_f64();
        self.dirs.iter().filter(|d| d.reads > 0).all(|d| {
            let small_enough = d.small * 100 >= d.reads * self.cfg.small_percent;
            let rate = d.bytes as f64 / secs;
            small_enough && rate <= self.cfg.max_rate as f64
        })
    }
}

/// The mode a stream runs in: the node's `[splice] mode` is the default for servers
/// left at `auto`, and `never` on the node is a kill switch over every server.
pub fn effective_mode(node: SpliceMode, server: SpliceMode) -> SpliceMode {
    match (node, server) {
        (SpliceMode::Never, _) => SpliceMode::Never,
        (node, SpliceMode::Auto) => node,
        (_, server) => server,
    }
}

/// How a stream's splice question was settled, one count per stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `always`: spliced right after the upgrade.
    Always,
    /// `auto`: judged latency-bound and spliced.
    AutoSpliced,
    /// `auto`: ended on the userspace relay (bulk, or too short to judge).
    AutoUserspace,
    /// `never`: userspace by configuration.
    Never,
    /// A leg was not plain TCP (TLS, HTTP/2): userspace.
    NotPlaintext,
    /// The kernel refused the splice: userspace.
    Failed,
}

impl Decision {
    /// Every decision, in metrics order.
    pub const ALL: [Decision; 6] = [
        Decision::Always,
        Decision::AutoSpliced,
        Decision::AutoUserspace,
        Decision::Never,
        Decision::NotPlaintext,
        Decision::Failed,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Decision::Always => "always",
            Decision::AutoSpliced => "auto_spliced",
            Decision::AutoUserspace => "auto_userspace",
            Decision::Never => "never",
            Decision::NotPlaintext => "not_plaintext",
            Decision::Failed => "splice_failed",
        }
    }
}

/// Per-decision counters (`sluice_splice_decisions_total{decision=...}`).
#[derive(Debug, Default)]
pub struct Decisions {
    counts: [AtomicU64; 6],
}

impl Decisions {
    /// Counts one stream's decision.
    pub fn count(&self, d: Decision) {
        self.counts[d as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The current count of `d`.
    pub fn get(&self, d: Decision) -> u64 {
        self.counts[d as usize].load(Ordering::Relaxed)
    }
}

/// `sluice_splice_decisions_total{decision}` on each `/metrics` scrape.
impl prometheus_client::collector::Collector for Decisions {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        sluice_proxy::metrics::counters(
            &mut e,
            "sluice_splice_decisions_total",
            "Opaque streams by how the kernel splice question was settled.",
            Decision::ALL.map(|d| ([("decision", d.label())], self.get(d))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(o: &mut Observer, t0: Instant, reads: &[(usize, usize, u64)]) -> Vec<Verdict> {
        reads
            .iter()
            .map(|&(dir, n, at_us)| o.observe(dir, n, t0 + Duration::from_micros(at_us)))
            .collect()
    }

    #[test]
    fn small_interactive_messages_are_spliced_after_one_window() {
        let mut o = Observer::new(PolicyConfig::default());
        let t0 = Instant::now();
        // A 64 B echo every 150 µs, both ways: 32 reads fill the window.
        let reads: Vec<_> = (0..32).map(|i| (i % 2, 64, i as u64 * 150)).collect();
        let v = feed(&mut o, t0, &reads);
        assert!(v[..31].iter().all(|v| *v == Verdict::Undecided));
        assert_eq!(v[31], Verdict::Splice);
    }

    #[test]
    fn large_reads_are_bulk_and_the_next_window_is_judged_afresh() {
        let mut o = Observer::new(PolicyConfig::default());
        let t0 = Instant::now();
        let bulk: Vec<_> = (0..32).map(|i| (0, 16 * 1024, i as u64 * 1000)).collect();
        assert_eq!(*feed(&mut o, t0, &bulk).last().unwrap(), Verdict::Bulk);
        assert_eq!(o.bulk_windows(), 1);
        // The stream turns interactive: the next window splices.
        let small: Vec<_> = (0..32).map(|i| (1, 100, 40_000 + i as u64 * 1000)).collect();
        assert_eq!(*feed(&mut o, t0, &small).last().unwrap(), Verdict::Splice);
    }

    #[test]
    fn many_small_reads_at_a_high_rate_stay_in_userspace() {
        let mut o = Observer::new(PolicyConfig::default());
        let t0 = Instant::now();
        // 1 KiB reads every microsecond ≈ 1 GB/s: the userspace copy is faster.
        let reads: Vec<_> = (0..5000).map(|i| (0, 1024, i as u64)).collect();
        let v = feed(&mut o, t0, &reads);
        assert!(v.iter().all(|v| *v != Verdict::Splice));
        assert!(v.contains(&Verdict::Bulk));
    }

    #[test]
    fn small_reads_at_a_moderate_sustained_rate_are_bulk() {
        let mut o = Observer::new(PolicyConfig::default());
        let t0 = Instant::now();
        // 1 KiB every 100 µs ≈ 10 MB/s: a slowed-down bulk copy, not an interaction.
        let reads: Vec<_> = (0..32).map(|i| (0, 1024, i as u64 * 100)).collect();
        assert_eq!(*feed(&mut o, t0, &reads).last().unwrap(), Verdict::Bulk);
    }

    #[test]
    fn a_bulk_direction_keeps_the_whole_stream_in_userspace() {
        let mut o = Observer::new(PolicyConfig::default());
        let t0 = Instant::now();
        // Downloads in 16 KiB reads, small acks upstream: half the reads are small,
        // but the download direction is bulk.
        let reads: Vec<_> =
            (0..32).map(|i| if i % 2 == 0 { (1, 16 * 1024, i) } else { (0, 40, i) }).collect();
        let reads: Vec<_> = reads.into_iter().map(|(d, n, i)| (d, n, i as u64 * 100)).collect();
        assert_eq!(*feed(&mut o, t0, &reads).last().unwrap(), Verdict::Bulk);
    }

    #[test]
    fn a_slow_stream_is_judged_on_time_once_it_has_enough_reads() {
        let cfg = PolicyConfig::default();
        let mut o = Observer::new(cfg);
        let t0 = Instant::now();
        // One small message every 100 ms: after min_reads and window_time, spliced.
        let reads: Vec<_> = (0..8).map(|i| (i % 2, 20, i as u64 * 100_000)).collect();
        let v = feed(&mut o, t0, &reads);
        assert_eq!(v[..7], [Verdict::Undecided; 7]);
        assert_eq!(v[7], Verdict::Splice);
    }

    #[test]
    fn a_few_reads_never_decide() {
        let mut o = Observer::new(PolicyConfig::default());
        let t0 = Instant::now();
        let reads: Vec<_> = (0..7).map(|i| (0, 10, i as u64 * 1_000_000)).collect();
        assert!(feed(&mut o, t0, &reads).iter().all(|v| *v == Verdict::Undecided));
    }

    #[test]
    fn node_never_overrides_and_node_default_fills_auto() {
        use SpliceMode::*;
        assert_eq!(effective_mode(Never, Always), Never);
        assert_eq!(effective_mode(Auto, Always), Always);
        assert_eq!(effective_mode(Always, Auto), Always);
        assert_eq!(effective_mode(Auto, Auto), Auto);
        assert_eq!(effective_mode(Always, Never), Never);
    }

    #[test]
    fn decisions_render_every_label() {
        let d = Decisions::default();
        d.count(Decision::AutoSpliced);
        d.count(Decision::AutoSpliced);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(d));
        let out = sluice_proxy::metrics::Format::Prometheus.encode(&registry);
        assert!(out.contains("sluice_splice_decisions_total{decision=\"auto_spliced\"} 2"));
        assert!(out.contains("sluice_splice_decisions_total{decision=\"never\"} 0"));
    }
}
