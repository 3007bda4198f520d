//! Process-wide proxy metrics, rendered as Prometheus text. Plain atomics: the request
//! path only does relaxed increments.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A gauge that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// +1.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// -1.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// +1.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// +n.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a request provably never reached a replica, so it may go once to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The connection could not be made (refused, reset or timed out while connecting),
    /// or an HTTP/2 connection was gone before the request's stream was opened.
    Connect = 0,
    /// The replica refused the HTTP/2 stream (`REFUSED_STREAM`: not processed, RFC 9113
    /// section 8.7).
    RefusedStream = 1,
    /// The stream was above the last-stream-id of the replica's graceful `GOAWAY`.
    GoAway = 2,
}

impl RetryReason {
    /// Every reason, in discriminant order.
    pub const ALL: [RetryReason; 3] =
        [RetryReason::Connect, RetryReason::RefusedStream, RetryReason::GoAway];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::RefusedStream => "refused_stream",
            RetryReason::GoAway => "goaway",
        }
    }
}

/// All proxy metrics.
#[derive(Debug)]
pub struct Metrics {
    by_status: Vec<AtomicU64>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Client connections accepted.
    pub client_connections_total: Counter,
    /// Client connections open.
    pub client_connections_open: Gauge,
    /// Client connections closed at accept because the source is denied or banned (the
    /// reported client, after a PROXY header).
    pub client_connections_denied_total: Counter,
    /// Client connections closed because the PROXY header was missing, malformed, late,
    /// or sent by a peer not trusted to send one.
    pub client_proxy_header_refused_total: Counter,
    /// Requests refused (403) because their client is banned.
    pub client_requests_banned_total: Counter,
    /// Upstream HTTP/2 connections open.
    pub upstream_h2_open: Gauge,
    /// Upstream HTTP/1.1 connections open.
    pub upstream_h1_open: Gauge,
    /// Upstream connection attempts that failed.
    pub upstream_connect_errors_total: Counter,
    /// Requests that provably never reached a replica and were sent once to another one,
    /// by [`RetryReason`] (its discriminant is the index).
    pub upstream_retries: [Counter; RetryReason::ALL.len()],
    /// Exchanges still in flight to a draining replica when its drain deadline passed,
    /// ended by sluice (502, reset stream or closed connection).
    pub replica_drain_deadline_cancelled_total: Counter,
    /// Requests waiting in a cold-start hold for a server's first ready replica.
    pub cold_start_held: Gauge,
    /// Requests that waited in a cold-start hold and got a replica.
    pub cold_start_released_total: Counter,
    /// Requests that waited in a cold-start hold and got the 503 when it passed.
    pub cold_start_timed_out_total: Counter,
    /// Requests answered 503 at once because the server's hold was full.
    pub cold_start_hold_full_total: Counter,
    /// Opaque (upgraded) streams open.
    pub opaque_streams_open: Gauge,
    /// Opaque streams relayed in total.
    pub opaque_streams_total: Counter,
    /// Access log entries dropped because the writer's queue was full.
    pub access_log_dropped_total: Counter,
    /// Access log writes that failed (the sink refused bytes).
    pub access_log_write_errors_total: Counter,
    /// The listeners' certificates, for their expiry gauge. Read at scrape time only.
    certificates: std::sync::RwLock<Vec<crate::tls::CertSummary>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            client_connections_total: Counter::default(),
            client_connections_open: Gauge::default(),
            client_connections_denied_total: Counter::default(),
            client_proxy_header_refused_total: Counter::default(),
            client_requests_banned_total: Counter::default(),
            upstream_h2_open: Gauge::default(),
            upstream_h1_open: Gauge::default(),
            upstream_connect_errors_total: Counter::default(),
            replica_drain_deadline_cancelled_total: Counter::default(),
            cold_start_held: Gauge::default(),
            cold_start_released_total: Counter::default(),
            cold_start_timed_out_total: Counter::default(),
            cold_start_hold_full_total: Counter::default(),
            upstream_retries: Default::default(),
            opaque_streams_open: Gauge::default(),
            opaque_streams_total: Counter::default(),
            access_log_dropped_total: Counter::default(),
            access_log_write_errors_total: Counter::default(),
            certificates: std::sync::RwLock::default(),
        }
    }
}

impl Metrics {
    /// Records one response: its status and the time to its header.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        if let Some(c) = self.by_status.get(usize::from(status)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Count of responses with `status`.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(usize::from(status)).map(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP sluice_requests_total Responses sent, by status code.\n");
        out.push_str("# TYPE sluice_requests_total counter\n");
        for (code, c) in self.by_status.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "sluice_requests_total{{code=\"{code}\"}} {n}");
            }
        }
        out.push_str(
            "# HELP sluice_request_duration_seconds Time from request to response header.\n",
        );
        out.push_str("# TYPE sluice_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ =
                writeln!(out, "sluice_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "sluice_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "sluice_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "sluice_request_duration_seconds_count {count}");
        let gauges: [(&str, &str, &str, i64); 6] = [
            (
                "sluice_client_connections_open",
                "gauge",
                "Client connections open.",
                self.client_connections_open.get(),
            ),
            (
                "sluice_upstream_connections_open{protocol=\"h2c\"}",
                "gauge",
                "Upstream connections open.",
                self.upstream_h2_open.get(),
            ),
            (
                "sluice_upstream_connections_open{protocol=\"http1\"}",
                "",
                "",
                self.upstream_h1_open.get(),
            ),
            (
                "sluice_opaque_streams_open",
                "gauge",
                "Upgraded (opaque) streams open.",
                self.opaque_streams_open.get(),
            ),
            (
                "sluice_cold_start_held",
                "gauge",
                "Requests waiting in a cold-start hold for a server's first ready replica.",
                self.cold_start_held.get(),
            ),
            (
                "sluice_client_connections_total",
                "counter",
                "Client connections accepted.",
                self.client_connections_total.get() as i64,
            ),
        ];
        for (name, kind, help, v) in gauges {
            let base = name.split('{').next().unwrap_or(name);
            if !kind.is_empty() {
                let _ = writeln!(out, "# HELP {base} {help}\n# TYPE {base} {kind}");
            }
            let _ = writeln!(out, "{name} {v}");
        }
        let counters = [
            (
                "sluice_client_connections_denied_total",
                "Client connections closed at accept: source (or PROXY-reported client) denied or banned.",
                self.client_connections_denied_total.get(),
            ),
            (
                "sluice_client_proxy_header_refused_total",
                "Client connections closed for a missing, malformed or untrusted PROXY header.",
                self.client_proxy_header_refused_total.get(),
            ),
            (
                "sluice_client_requests_banned_total",
                "Requests refused with 403: their client is banned.",
                self.client_requests_banned_total.get(),
            ),
            (
                "sluice_upstream_connect_errors_total",
                "Failed upstream connects.",
                self.upstream_connect_errors_total.get(),
            ),
            (
                "sluice_replica_drain_deadline_cancelled_total",
                "Exchanges with a draining replica ended because its drain deadline passed.",
                self.replica_drain_deadline_cancelled_total.get(),
            ),
            (
                "sluice_cold_start_released_total",
                "Requests held for a server's first ready replica that got one.",
                self.cold_start_released_total.get(),
            ),
            (
                "sluice_cold_start_timed_out_total",
                "Requests held for a server's first ready replica that got 503 when the hold passed.",
                self.cold_start_timed_out_total.get(),
            ),
            (
                "sluice_cold_start_hold_full_total",
                "Requests answered 503 at once because their server's cold-start hold was full.",
                self.cold_start_hold_full_total.get(),
            ),
            (
                "sluice_opaque_streams_total",
                "Upgraded streams relayed.",
                self.opaque_streams_total.get(),
            ),
            (
                "sluice_access_log_dropped_total",
                "Access log entries dropped: the writer's queue was full.",
                self.access_log_dropped_total.get(),
            ),
            (
                "sluice_access_log_write_errors_total",
                "Access log writes that failed.",
                self.access_log_write_errors_total.get(),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let name = "sluice_upstream_retries_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests that never reached a replica, sent once to another.\n# TYPE {name} counter"
        );
        for reason in RetryReason::ALL {
            let v = self.upstream_retries[reason as usize].get();
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {v}", reason.as_str());
        }
        self.render_certificates(&mut out, &[]);
        render_build_info(&mut out);
        render_process(&mut out);
        out
    }

    /// [`render`](Self::render), with the expiry of the routing state's certificates too
    /// and the certificate load and refusal counters.
    pub fn render_with_certificates(
        &self,
        store: &[&sluice_routing::cert::CertSummary],
        counters: &sluice_routing::cert::CertCounters,
    ) -> String {
        let mut out = self.render();
        if !self.has_listener_certificates() {
            self.render_certificates(&mut out, store);
        } else {
            // The family's header is out already; only the series follow.
            Self::certificate_series(&mut out, store.iter().copied(), "store");
        }
        let name = "sluice_tls_certificate_reloads_total";
        let _ = writeln!(
            out,
            "# HELP {name} Certificates loaded and accepted (listeners' and servers').\n# TYPE {name} counter\n{name} {}",
            counters.loads()
        );
        let name = "sluice_tls_certificate_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Certificates refused (the last good one keeps serving), by reason.\n# TYPE {name} counter"
        );
        for (reason, n) in counters.errors() {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
        }
        out
    }

    fn has_listener_certificates(&self) -> bool {
        self.certificates.read().is_ok_and(|c| !c.is_empty())
    }

    /// Records the certificates the listeners serve (replacing any before).
    pub fn set_certificates(&self, certs: Vec<crate::tls::CertSummary>) {
        if let Ok(mut c) = self.certificates.write() {
            *c = certs;
        }
    }

    fn render_certificates(&self, out: &mut String, store: &[&crate::tls::CertSummary]) {
        let Ok(certs) = self.certificates.read() else { return };
        if certs.is_empty() && store.is_empty() {
            return;
        }
        let name = "sluice_tls_certificate_expiry_timestamp_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} When a served certificate expires (Unix time), per SNI name.\n# TYPE {name} gauge"
        );
        Self::certificate_series(out, certs.iter(), "listener");
        Self::certificate_series(out, store.iter().copied(), "store");
    }

    fn certificate_series<'a>(
        out: &mut String,
        certs: impl Iterator<Item = &'a crate::tls::CertSummary>,
        source: &str,
    ) {
        let name = "sluice_tls_certificate_expiry_timestamp_seconds";
        for c in certs {
            for sni in &c.names {
                let _ = writeln!(
                    out,
                    "{name}{{name=\"{}\",serial=\"{}\",source=\"{source}\"}} {}",
                    label_value(sni),
                    label_value(&c.serial),
                    c.not_after
                );
            }
        }
    }
}

/// `sluice_build_info`: always 1, with what was built as labels.
fn render_build_info(out: &mut String) {
    let name = "sluice_build_info";
    let _ = writeln!(
        out,
        "# HELP {name} The running build, as labels (always 1).\n# TYPE {name} gauge\n\
         {name}{{version=\"{}\",profile=\"{}\",arch=\"{}\",os=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        std::env::consts::ARCH,
        std::env::consts::OS,
    );
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape time (nothing is
/// kept between scrapes). A file that cannot be read leaves its metrics out.
fn render_process(out: &mut String) {
    let p = ProcessStats::read();
    let mut metric = |name: &str, kind: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, seconds.",
        p.cpu_seconds,
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size, bytes.",
        p.resident_bytes,
    );
    metric("process_virtual_memory_bytes", "gauge", "Virtual memory size, bytes.", p.virtual_bytes);
    metric("process_open_fds", "gauge", "Open file descriptors.", p.open_fds);
    metric("process_max_fds", "gauge", "Limit on open file descriptors.", p.max_fds);
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, seconds.",
        p.start_time_seconds,
    );
}

/// What `/proc` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    start_time_seconds: Option<f64>,
}

/// The unit of `/proc/<pid>/stat` times: `USER_HZ`, 100 on every Linux architecture
/// (the kernel converts to it for userspace whatever its internal tick rate).
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    fn read() -> ProcessStats {
        let text = |p: &str| std::fs::read_to_string(p).ok();
        let mut s = ProcessStats::default();
        if let Some(stat) = text("/proc/self/stat") {
            let boot = text("/proc/stat").as_deref().and_then(boot_time);
            s.apply_stat(&stat, boot);
        }
        if let Some(status) = text("/proc/self/status") {
            s.resident_bytes = status_kib(&status, "VmRSS:").map(|k| k * 1024.0);
            s.virtual_bytes = status_kib(&status, "VmSize:").map(|k| k * 1024.0);
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
        s.max_fds = text("/proc/self/limits").as_deref().and_then(max_open_files);
        s
    }

    /// CPU time and start time from a `/proc/<pid>/stat` line; `boot` is the boot time
    /// (Unix seconds).
    fn apply_stat(&mut self, stat: &str, boot: Option<f64>) {
        // The command name (field 2) may hold spaces and parentheses: fields are counted
        // after its last `)`. There, field 3 (state) is index 0.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            self.cpu_seconds = Some((utime + stime) / USER_HZ);
        }
        if let (Some(start), Some(boot)) = (field(22), boot) {
            self.start_time_seconds = Some(boot + start / USER_HZ);
        }
    }
}

/// `btime` of `/proc/stat`: when the system booted, Unix seconds.
fn boot_time(stat: &str) -> Option<f64> {
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// A `kB` line of `/proc/<pid>/status`.
fn status_kib(status: &str, key: &str) -> Option<f64> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The soft limit on open files from `/proc/<pid>/limits`.
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render() {
        let m = Metrics::default();
        m.observe(200, Duration::from_millis(3));
        m.observe(503, Duration::from_secs(30));
        let t = m.render();
        assert!(t.contains("sluice_requests_total{code=\"200\"} 1"), "{t}");
        assert!(t.contains("sluice_request_duration_seconds_bucket{le=\"0.005\"} 1"), "{t}");
        assert!(t.contains("sluice_request_duration_seconds_bucket{le=\"+Inf\"} 2"), "{t}");
    }

    #[test]
    fn process_stat_parsing() {
        // A command name with a space and a parenthesis, as the kernel writes it.
        let stat = "4711 (sluice (x) y) S 1 4711 4711 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 \
                    9 0 12345 100000 200 18446744073709551615";
        let mut s = ProcessStats::default();
        s.apply_stat(stat, Some(1_700_000_000.0));
        assert_eq!(s.cpu_seconds, Some(3.0));
        let start = s.start_time_seconds.unwrap();
        assert!((start - 1_700_000_123.45).abs() < 1e-3, "{start}");
        assert_eq!(boot_time("cpu 1 2\nbtime 1700000000\nprocesses 9\n"), Some(1.7e9));
        assert_eq!(status_kib("Name:\tx\nVmRSS:\t  1024 kB\n", "VmRSS:"), Some(1024.0));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        let now = ProcessStats::read();
        assert!(now.resident_bytes.is_some_and(|b| b > 0.0), "{now:?}");
        assert!(now.open_fds.is_some_and(|n| n >= 1.0), "{now:?}");
        assert!(now.start_time_seconds.is_some_and(|t| t > 1.6e9), "{now:?}");
    }
}
