//! Process-wide proxy metrics, and the one home of `/metrics` encoding for every crate.
//!
//! The request path only does relaxed increments on plain atomics. At scrape time,
//! collectors ([`Collector`]) read those atomics and encode them through
//! `prometheus-client`, as the Prometheus text format 0.0.4 or, when asked, as
//! OpenMetrics ([`Format`]). The helpers here ([`counter`], [`gauge`], [`counters`],
//! [`gauges`]) are what the node's and the store's collectors use too.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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

    /// Encodes the proxy's own families (not the routing state's: see [`ProxyCollector`]).
    pub fn encode(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let codes = self.by_status.iter().enumerate().filter_map(|(code, c)| {
            let n = c.load(Ordering::Relaxed);
            (n > 0).then(|| ([("code", code.to_string())], n))
        });
        counters(e, "sluice_responses_total", "Responses sent, by status code.", codes)?;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (le, c) in BUCKETS.iter().zip(&self.latency_buckets) {
            buckets.push((*le, c.load(Ordering::Relaxed)));
        }
        // Read the count after the buckets: an observation racing the scrape then lands in
        // +Inf rather than making the buckets add up to more than the count.
        let count = self.latency_count.load(Ordering::Relaxed);
        let finite: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(finite)));
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        e.encode_descriptor(
            "sluice_request_duration_seconds",
            "Time from request to response header.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        gauge(
            e,
            "sluice_client_connections_open",
            "Client connections open.",
            self.client_connections_open.get(),
        )?;
        gauges(
            e,
            "sluice_upstream_connections_open",
            "Upstream connections open.",
            [
                ([("protocol", "h2c")], self.upstream_h2_open.get()),
                ([("protocol", "http1")], self.upstream_h1_open.get()),
            ],
        )?;
        gauge(
            e,
            "sluice_opaque_streams_open",
            "Upgraded (opaque) streams open.",
            self.opaque_streams_open.get(),
        )?;
        gauge(
            e,
            "sluice_cold_start_held",
            "Requests waiting in a cold-start hold for a server's first ready replica.",
            self.cold_start_held.get(),
        )?;
        let plain: [(&str, &str, &Counter); 12] = [
            (
                "sluice_client_connections_total",
                "Client connections accepted.",
                &self.client_connections_total,
            ),
            (
                "sluice_client_connections_denied_total",
                "Client connections closed at accept: source (or PROXY-reported client) denied or banned.",
                &self.client_connections_denied_total,
            ),
            (
                "sluice_client_proxy_header_refused_total",
                "Client connections closed for a missing, malformed or untrusted PROXY header.",
                &self.client_proxy_header_refused_total,
            ),
            (
                "sluice_client_requests_banned_total",
                "Requests refused with 403: their client is banned.",
                &self.client_requests_banned_total,
            ),
            (
                "sluice_upstream_connect_errors_total",
                "Failed upstream connects.",
                &self.upstream_connect_errors_total,
            ),
            (
                "sluice_replica_drain_deadline_cancelled_total",
                "Exchanges with a draining replica ended because its drain deadline passed.",
                &self.replica_drain_deadline_cancelled_total,
            ),
            (
                "sluice_cold_start_released_total",
                "Requests held for a server's first ready replica that got one.",
                &self.cold_start_released_total,
            ),
            (
                "sluice_cold_start_timed_out_total",
                "Requests held for a server's first ready replica that got 503 when the hold passed.",
                &self.cold_start_timed_out_total,
            ),
            (
                "sluice_cold_start_hold_full_total",
                "Requests answered 503 at once because their server's cold-start hold was full.",
                &self.cold_start_hold_full_total,
            ),
            (
                "sluice_opaque_streams_total",
                "Upgraded streams relayed.",
                &self.opaque_streams_total,
            ),
            (
                "sluice_access_log_dropped_total",
                "Access log entries dropped: the writer's queue was full.",
                &self.access_log_dropped_total,
            ),
            (
                "sluice_access_log_write_errors_total",
                "Access log writes that failed.",
                &self.access_log_write_errors_total,
            ),
        ];
        for (name, help, c) in plain {
            counter(e, name, help, c.get())?;
        }
        counters(
            e,
            "sluice_upstream_retries_total",
            "Requests that never reached a replica, sent once to another.",
            RetryReason::ALL
                .map(|r| ([("reason", r.as_str())], self.upstream_retries[r as usize].get())),
        )
    }

    /// The expiry of the listeners' certificates and of the routing state's (`store`), and
    /// the certificate load and refusal counters.
    fn encode_certificates(
        &self,
        e: &mut DescriptorEncoder<'_>,
        store: &[&crate::tls::CertSummary],
        loads: &sluice_routing::cert::CertCounters,
    ) -> fmt::Result {
        if let Ok(listeners) = self.certificates.read()
            && !(listeners.is_empty() && store.is_empty())
        {
            let all = listeners.iter().map(|c| (c, "listener"));
            let all = all.chain(store.iter().map(|c| (*c, "store")));
            let series = all.flat_map(|(c, source)| {
                c.names.iter().map(move |sni| {
                    let labels =
                        [("name", sni.as_str()), ("serial", c.serial.as_str()), ("source", source)];
                    (labels, c.not_after)
                })
            });
            gauges(
                e,
                "sluice_tls_certificate_expiry_timestamp_seconds",
                "When a served certificate expires (Unix time), per SNI name.",
                series,
            )?;
        }
        counter(
            e,
            "sluice_tls_certificate_reloads_total",
            "Certificates loaded and accepted (listeners' and servers').",
            loads.loads(),
        )?;
        counters(
            e,
            "sluice_tls_certificate_errors_total",
            "Certificates refused (the last good one keeps serving), by reason.",
            loads.errors().map(|(reason, n)| ([("reason", reason)], n)),
        )
    }

    /// Records the certificates the listeners serve (replacing any before).
    pub fn set_certificates(&self, certs: Vec<crate::tls::CertSummary>) {
        if let Ok(mut c) = self.certificates.write() {
            *c = certs;
        }
    }
}

/// A counter: `name` may end in `_total` (the encoder adds the suffix where the format
/// wants it, and names the family without it in OpenMetrics).
pub fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let base = name.strip_suffix("_total").unwrap_or(name);
    e.encode_descriptor(base, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

/// A counter family: one series per label set.
pub fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let base = name.strip_suffix("_total").unwrap_or(name);
    let mut m = e.encode_descriptor(base, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(&labels)?.encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
    }
    Ok(())
}

/// A gauge.
pub fn gauge<V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: V,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&v)
}

/// A gauge family: one series per label set.
pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0.0 text, ending in `# EOF`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header prefers it (as Prometheus does by default:
    /// OpenMetrics at q=1, `text/plain` lower), else the Prometheus text format. A media
    /// range at `q=0` is refused, not chosen.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else { return Format::Prometheus };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let range = range.to_ascii_lowercase();
            let mut params = range.split(';');
            let media = params.next().unwrap_or("").trim().to_owned();
            let q = params
                .find_map(|p| p.trim().strip_prefix("q=").map(|q| q.trim().parse::<f32>()))
                .map_or(1.0, |q| q.unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Encodes every collector of `registry`.
    pub fn encode(self, registry: &Registry) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let done = match self {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry),
        };
        // Writing into a String only fails if a collector fails; what was written stands.
        if let Err(e) = done {
            tracing::warn!(error = %e, "encoding /metrics");
        }
        out
    }
}

/// The proxy's collector: its [`Metrics`], the routing state's generation, certificates
/// and per-server and per-replica series (at most `max_servers` servers), the build and
/// the process.
pub struct ProxyCollector {
    metrics: std::sync::Arc<Metrics>,
    routing: sluice_routing::RoutingTable,
    max_servers: usize,
}

impl ProxyCollector {
    /// A collector reading `metrics` and the snapshot current at each scrape.
    pub fn new(
        metrics: std::sync::Arc<Metrics>,
        routing: sluice_routing::RoutingTable,
        max_servers: usize,
    ) -> ProxyCollector {
        ProxyCollector { metrics, routing, max_servers }
    }
}

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyCollector").field("max_servers", &self.max_servers).finish()
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let snap = self.routing.load_full();
        self.metrics.encode(&mut e)?;
        let store: Vec<&sluice_routing::cert::CertSummary> =
            snap.certificates().filter_map(|c| c.loaded.as_ref().map(|l| &l.summary)).collect();
        self.metrics.encode_certificates(&mut e, &store, snap.certificate_counters())?;
        gauge(
            &mut e,
            "sluice_routing_generation",
            "Generation of the routing snapshot.",
            snap.generation(),
        )?;
        encode_servers(&mut e, &snap, self.max_servers)?;
        encode_build_info(&mut e)?;
        ProcessStats::read().encode(&mut e)
    }
}

/// The per-server and per-replica series of the busiest `max_servers` servers
/// ([`sluice_routing::signal::busiest_servers`]). Replicas are the routable ones; a
/// draining replica's remaining requests still count in its server's
/// `sluice_server_in_flight`.
fn encode_servers(
    e: &mut DescriptorEncoder<'_>,
    snap: &sluice_routing::Snapshot,
    max_servers: usize,
) -> fmt::Result {
    use sluice_routing::snapshot::{Replica, Server};
    let (servers, omitted) = sluice_routing::signal::busiest_servers(snap, max_servers);
    gauge(
        e,
        "sluice_metrics_servers_omitted",
        "Servers left out of the per-server and per-replica series ([admin] metrics_max_servers).",
        omitted as u64,
    )?;
    type Get = fn(&Server) -> u64;
    let families: [(&str, MetricType, &str, Get); 9] = [
        ("sluice_server_in_flight", MetricType::Gauge, "Requests in flight to the server.", |s| {
            s.stats.in_flight.load(Ordering::Relaxed)
        }),
        (
            "sluice_requests_total",
            MetricType::Counter,
            "Requests routed to one of the server's replicas.",
            |s| s.stats.requests.load(Ordering::Relaxed),
        ),
        (
            "sluice_server_no_replica_total",
            MetricType::Counter,
            "503s because no replica was ready (scale-from-zero demand).",
            |s| s.stats.no_replica.load(Ordering::Relaxed),
        ),
        (
            "sluice_server_over_limit_total",
            MetricType::Counter,
            "503s because the server was at its in-flight cap.",
            |s| s.stats.over_limit.load(Ordering::Relaxed),
        ),
        (
            "sluice_server_auth_rejected_total",
            MetricType::Counter,
            "Requests rejected by proxy auth (401 and 403).",
            |s| s.stats.auth_rejected.load(Ordering::Relaxed),
        ),
        (
            "sluice_server_mirrored_total",
            MetricType::Counter,
            "Requests copied to the mirror.",
            |s| s.stats.mirrored.load(Ordering::Relaxed),
        ),
        (
            "sluice_server_mirror_dropped_total",
            MetricType::Counter,
            "Mirror copies dropped (mirror too slow, failed, or no buffer budget).",
            |s| s.stats.mirror_dropped.load(Ordering::Relaxed),
        ),
        (
            "sluice_server_buffered_bytes",
            MetricType::Gauge,
            "Bytes held in proxy buffers for the server.",
            |s| s.stats.buffered_bytes.load(Ordering::Relaxed),
        ),
        ("sluice_server_replicas", MetricType::Gauge, "Routable replicas.", |s| {
            s.replicas.len() as u64
        }),
    ];
    for (name, kind, help, get) in families {
        let series = servers.iter().map(|s| ([("server", s.id())], get(s)));
        match kind {
            MetricType::Counter => counters(e, name, help, series)?,
            _ => gauges(e, name, help, series)?,
        }
    }
    type GetReplica = fn(&Replica) -> u64;
    let replica_families: [(&str, MetricType, &str, GetReplica); 5] = [
        (
            "sluice_replica_in_flight",
            MetricType::Gauge,
            "Requests in flight to the replica.",
            |r| r.stats.in_flight.load(Ordering::Relaxed),
        ),
        (
            "sluice_replica_requests_total",
            MetricType::Counter,
            "Requests sent to the replica.",
            |r| r.stats.requests.load(Ordering::Relaxed),
        ),
        (
            "sluice_replica_failures_total",
            MetricType::Counter,
            "Requests to the replica that failed at the transport level.",
            |r| r.stats.failures.load(Ordering::Relaxed),
        ),
        (
            "sluice_replica_ejected",
            MetricType::Gauge,
            "1 while the replica is passively ejected from selection.",
            |r| u64::from(r.stats.ejection.is_ejected()),
        ),
        (
            "sluice_replica_ejections_total",
            MetricType::Counter,
            "Passive ejections of the replica after consecutive upstream failures.",
            |r| r.stats.ejection.total.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, get) in replica_families {
        let series = servers.iter().flat_map(|s| {
            s.replicas
                .iter()
                .map(move |r| ([("server", s.id()), ("replica", r.id.as_str())], get(r)))
        });
        match kind {
            MetricType::Counter => counters(e, name, help, series)?,
            _ => gauges(e, name, help, series)?,
        }
    }
    Ok(())
}

/// `sluice_build_info`: always 1, with what was built as labels. `commit` is
/// `SLUICE_COMMIT` at build time (`cargo xtask image` sets it from git), else `unknown`.
fn encode_build_info(e: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let labels = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", option_env!("SLUICE_COMMIT").unwrap_or("unknown")),
        ("profile", if cfg!(debug_assertions) { "debug" } else { "release" }),
        ("arch", std::env::consts::ARCH),
        ("os", std::env::consts::OS),
    ];
    gauges(e, "sluice_build_info", "The running build, as labels (always 1).", [(labels, 1u64)])
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
    /// The standard `process_*` metrics. A file that could not be read leaves its
    /// metrics out.
    fn encode(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(v) = self.cpu_seconds {
            e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, seconds.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, f64, u64>(&v, None)?;
        }
        let gauges: [(&str, &str, Option<f64>); 5] = [
            ("process_resident_memory_bytes", "Resident memory size, bytes.", self.resident_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size, bytes.", self.virtual_bytes),
            ("process_open_fds", "Open file descriptors.", self.open_fds),
            ("process_max_fds", "Limit on open file descriptors.", self.max_fds),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, seconds.",
                self.start_time_seconds,
            ),
        ];
        for (name, help, v) in gauges {
            if let Some(v) = v {
                gauge(e, name, help, v)?;
            }
        }
        Ok(())
    }

    /// Reads `/proc/self` now (nothing is kept between scrapes).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(format: Format, m: Metrics, table: &sluice_routing::RoutingTable) -> String {
        scrape_bounded(format, m, table, usize::MAX)
    }

    fn scrape_bounded(
        format: Format,
        m: Metrics,
        table: &sluice_routing::RoutingTable,
        max_servers: usize,
    ) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProxyCollector::new(
            std::sync::Arc::new(m),
            table.clone(),
            max_servers,
        )));
        format.encode(&registry)
    }

    fn table() -> sluice_routing::RoutingTable {
        use sluice_routing::model::{NodeConfig, ReplicaSpec, RoutingDoc, ServerSpec};
        let doc = RoutingDoc {
            servers: vec![ServerSpec::new("a", "a"), ServerSpec::new("b", "b")],
            replicas: vec![
                ReplicaSpec::new("a", "r1", "127.0.0.1:1".parse().unwrap()),
                ReplicaSpec::new("a", "r2", "127.0.0.1:2".parse().unwrap()),
            ],
            tokens: vec![],
        };
        sluice_routing::RoutingTable::from_doc(NodeConfig::default(), doc).unwrap()
    }

    #[test]
    fn encode_prometheus_text() {
        let m = Metrics::default();
        m.observe(200, Duration::from_millis(3));
        m.observe(503, Duration::from_secs(30));
        let t = table();
        let snap = t.load_full();
        let a = snap.server("a").unwrap();
        let _g = a.begin_request(&a.replicas[1]);
        let out = scrape(Format::Prometheus, m, &t);
        for want in [
            "# TYPE sluice_responses_total counter\n",
            "sluice_responses_total{code=\"200\"} 1\n",
            "sluice_request_duration_seconds_bucket{le=\"0.005\"} 1\n",
            "sluice_request_duration_seconds_bucket{le=\"+Inf\"} 2\n",
            "sluice_request_duration_seconds_count 2\n",
            "# TYPE sluice_server_in_flight gauge\n",
            "sluice_server_in_flight{server=\"a\"} 1\n",
            "sluice_server_in_flight{server=\"b\"} 0\n",
            "sluice_requests_total{server=\"a\"} 1\n",
            "sluice_server_replicas{server=\"a\"} 2\n",
            "sluice_replica_in_flight{server=\"a\",replica=\"r2\"} 1\n",
            "sluice_replica_requests_total{server=\"a\",replica=\"r2\"} 1\n",
            "sluice_metrics_servers_omitted 0\n",
            "sluice_upstream_retries_total{reason=\"goaway\"} 0\n",
            "sluice_build_info{version=\"",
            ",commit=\"",
            "# TYPE process_cpu_seconds_total counter\n",
            "# TYPE process_resident_memory_bytes gauge\n",
        ] {
            assert!(out.contains(want), "{want:?} missing from:\n{out}");
        }
        assert_eq!(out.matches("# TYPE sluice_replica_in_flight").count(), 1);
        assert!(!out.contains("# EOF"), "{out}");
    }

    #[test]
    fn per_server_series_are_bounded() {
        let t = table();
        let snap = t.load_full();
        let a = snap.server("a").unwrap();
        drop(a.begin_request(&a.replicas[0]));
        let out = scrape_bounded(Format::Prometheus, Metrics::default(), &t, 1);
        assert!(out.contains("sluice_requests_total{server=\"a\"} 1\n"), "{out}");
        assert!(out.contains("sluice_replica_requests_total{server=\"a\",replica=\"r1\"} 1\n"));
        assert!(!out.contains("server=\"b\""), "{out}");
        assert!(out.contains("sluice_metrics_servers_omitted 1\n"), "{out}");
    }

    #[test]
    fn encode_openmetrics() {
        let out = scrape(Format::OpenMetrics, Metrics::default(), &table());
        assert!(out.ends_with("# EOF\n"), "{out}");
        // OpenMetrics names a counter family without its `_total` samples' suffix.
        assert!(out.contains("# TYPE sluice_client_connections counter\n"), "{out}");
        assert!(out.contains("sluice_client_connections_total 0\n"), "{out}");
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;q=0.5";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
        let refused = "application/openmetrics-text;q=0, text/plain";
        assert_eq!(Format::negotiate(Some(refused)), Format::Prometheus, "q=0 refuses");
        let lower = "application/openmetrics-text;q=0.2, text/plain;q=0.9";
        assert_eq!(Format::negotiate(Some(lower)), Format::Prometheus, "text preferred");
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; Version=1.0.0")),
            Format::OpenMetrics
        );
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
