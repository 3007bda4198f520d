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
        let gauges: [(&str, &str, &str, i64); 5] = [
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
        self.render_certificates(&mut out);
        out
    }

    /// Records the certificates the listeners serve (replacing any before).
    pub fn set_certificates(&self, certs: Vec<crate::tls::CertSummary>) {
        if let Ok(mut c) = self.certificates.write() {
            *c = certs;
        }
    }

    fn render_certificates(&self, out: &mut String) {
        let Ok(certs) = self.certificates.read() else { return };
        if certs.is_empty() {
            return;
        }
        let name = "sluice_tls_certificate_expiry_timestamp_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} When a served certificate expires (Unix time), per SNI name.\n# TYPE {name} gauge"
        );
        for c in certs.iter() {
            for sni in &c.names {
                let _ = writeln!(
                    out,
                    "{name}{{name=\"{}\",serial=\"{}\"}} {}",
                    label_value(sni),
                    label_value(&c.serial),
                    c.not_after
                );
            }
        }
    }
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
}
