//! The access log: one JSON line per request, written off the request path.
//!
//! The request path fills a small [`Entry`] and hands it to a bounded queue with
//! `try_send`: it never blocks and never awaits; a full queue drops the entry and counts
//! it (`sluice_access_log_dropped_total`). One writer thread formats the entries and
//! writes them, buffered. It polls the queue instead of being woken per entry, so a
//! request never pays for a cross-thread wake-up. Off (the default), the request path
//! pays a test of an empty `Option` at each step that fills an entry: no allocation, no
//! atomic. On, sampling is decided per request from a thread-local xorshift.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use sluice_routing::{Replica, Server};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};
use crate::error::ConfigError;
use crate::metrics::Metrics;

/// `[access_log]`: the node's access log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write the access log at all. Off: no queue, no thread, one branch per request.
    pub enabled: bool,
    /// Where: a file (appended to, created if missing) or `"stdout"`.
    pub path: String,
    /// Fraction of requests logged, 0 to 1, decided per request.
    pub sample: f64,
    /// Entries the queue holds for the writer; past that, entries are dropped (counted).
    pub queue: usize,
    /// Whether servers that do not set `access_log` themselves are logged. A server's
    /// `access_log = true` or `false` wins either way.
    pub all_servers: bool,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self { enabled: false, path: "stdout".into(), sample: 1.0, queue: 8192, all_servers: true }
    }
}

impl AccessLogConfig {
    /// Checks the ranges serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample) {
            return Err(ConfigError::Invalid(format!(
                "access_log.sample must be between 0 and 1, not {}",
                self.sample
            )));
        }
        if self.queue == 0 {
            return Err(ConfigError::Invalid("access_log.queue must be at least 1".into()));
        }
        if self.path.is_empty() {
            return Err(ConfigError::Invalid("access_log.path must not be empty".into()));
        }
        Ok(())
    }
}

/// The request path's side of the access log.
pub(crate) struct AccessLog {
    tx: SyncSender<Box<Entry>>,
    /// A request is logged when the thread's next random number is below this.
    threshold: u64,
    all_servers: bool,
    metrics: Arc<Metrics>,
}

/// The writer thread's side, until it is started.
pub(crate) struct Writer {
    rx: Receiver<Box<Entry>>,
    sink: Box<dyn io::Write + Send>,
    metrics: Arc<Metrics>,
    /// Set when the proxy stops: the writer drains what is queued, flushes and ends.
    stop: Arc<AtomicBool>,
}

/// How often the writer looks at the queue when it found it empty. The queue must hold
/// this long's worth of requests (8192 entries: 800k requests a second).
const POLL: Duration = Duration::from_millis(10);
/// The writer's output buffer.
const BUFFER: usize = 64 * 1024;

impl AccessLog {
    /// Opens the sink (so a bad path fails at start-up) and makes the queue. `None`
    /// when the log is off.
    pub(crate) fn open(
        cfg: &AccessLogConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Option<(AccessLog, Writer)>, ConfigError> {
        if !cfg.enabled {
            return Ok(None);
        }
        cfg.validate()?;
        let sink: Box<dyn io::Write + Send> = if cfg.path == "stdout" {
            Box::new(io::stdout())
        } else {
            let path = PathBuf::from(&cfg.path);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| ConfigError::Read { path: cfg.path.clone(), source })?;
            Box::new(file)
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue);
        let threshold = if cfg.sample >= 1.0 {
            u64::MAX
        } else {
            // Below 2^64 for any sample < 1, so `u64::MAX` keeps meaning "always".
            (cfg.sample * 18_446_744_073_709_551_616.0) as u64
        };
        let log =
            AccessLog { tx, threshold, all_servers: cfg.all_servers, metrics: metrics.clone() };
        let writer = Writer { rx, sink, metrics: metrics.clone(), stop: Arc::default() };
        Ok(Some((log, writer)))
    }

    /// Whether this request is sampled: no syscall, no shared state.
    pub(crate) fn sample(&self) -> bool {
        match self.threshold {
            u64::MAX => true,
            0 => false,
            t => next_random() < t,
        }
    }

    /// Whether `server`'s requests are logged.
    pub(crate) fn wants(&self, server: &Server) -> bool {
        server.spec.access_log.unwrap_or(self.all_servers)
    }

    /// Hands a finished entry to the writer; never blocks. A full queue drops it.
    pub(crate) fn push(&self, entry: Box<Entry>) {
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.access_log_dropped_total.inc();
            }
        }
    }
}

thread_local! {
    static RANDOM: Cell<u64> = const { Cell::new(0) };
}

/// xorshift64*, one state per thread, seeded on first use.
fn next_random() -> u64 {
    RANDOM.with(|r| {
        let mut x = r.get();
        if x == 0 {
            use std::hash::BuildHasher as _;
            x = std::collections::hash_map::RandomState::new()
                .hash_one(std::thread::current().id())
                | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

impl Writer {
    /// Starts the writer thread; the returned handle stops it.
    pub(crate) fn spawn(self) -> io::Result<WriterHandle> {
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || self.run())?;
        Ok(WriterHandle { stop, thread })
    }

    fn run(self) {
        let mut out = io::BufWriter::with_capacity(BUFFER, self.sink);
        let mut line = Vec::with_capacity(512);
        let mut failing = false;
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let mut wrote = false;
            let ended = loop {
                match self.rx.try_recv() {
                    Ok(entry) => {
                        line.clear();
                        entry.write_json(&mut line);
                        if let Err(e) = out.write_all(&line) {
                            write_failed(&self.metrics, &mut failing, &e);
                        }
                        wrote = true;
                    }
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            if wrote || ended || stopping {
                match out.flush() {
                    Ok(()) => failing = false,
                    Err(e) => write_failed(&self.metrics, &mut failing, &e),
                }
            }
            if ended || stopping {
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Counts a failed write; warns once per run of failures.
fn write_failed(metrics: &Metrics, failing: &mut bool, e: &io::Error) {
    metrics.access_log_write_errors_total.inc();
    if !*failing {
        tracing::warn!("access log: writing failed: {e}");
        *failing = true;
    }
}

/// A running writer thread.
pub(crate) struct WriterHandle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl WriterHandle {
    /// Asks the writer to write what is queued and end, waiting at most `wait` (a sink
    /// that does not take bytes must not hold up shutdown).
    pub(crate) async fn stop(self, wait: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + wait;
        while !self.thread.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The protocol of one side of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Http10,
    Http11,
    Http2,
}

impl Proto {
    pub(crate) fn of(v: http::Version) -> Proto {
        if v == http::Version::HTTP_10 || v == http::Version::HTTP_09 {
            Proto::Http10
        } else if v >= http::Version::HTTP_2 {
            Proto::Http2
        } else {
            Proto::Http11
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Proto::Http10 => "HTTP/1.0",
            Proto::Http11 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        }
    }
}

/// One request's record, filled on the request path and formatted by the writer.
pub(crate) struct Entry {
    time: SystemTime,
    start: Instant,
    pub(crate) request_id: String,
    pub(crate) server: Option<Arc<Server>>,
    pub(crate) replica: Option<Arc<Replica>>,
    /// 0 until a response head was sent.
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    /// Counted by the request body while it streams (the hyper path).
    pub(crate) bytes_in_counter: Option<Arc<AtomicU64>>,
    pub(crate) bytes_out: u64,
    ttfb: Option<Duration>,
    duration: Duration,
    pub(crate) proto_in: Proto,
    pub(crate) tls: bool,
    pub(crate) proto_out: Option<Proto>,
    pub(crate) client: IpAddr,
    pub(crate) peer: SocketAddr,
    /// Why sluice answered itself ([`crate::RequestError::reason`]).
    pub(crate) error: Option<&'static str>,
    /// Whether the response ended cleanly (else it was cut short: client gone, replica
    /// failed mid-body).
    pub(crate) complete: bool,
}

impl Entry {
    /// A request that arrived at `start`.
    pub(crate) fn begin(
        start: Instant,
        proto_in: Proto,
        tls: bool,
        client: IpAddr,
        peer: SocketAddr,
    ) -> Box<Entry> {
        Box::new(Entry {
            time: {
                let now = SystemTime::now();
                now.checked_sub(start.elapsed()).unwrap_or(now)
            },
            start,
            request_id: String::new(),
            server: None,
            replica: None,
            status: 0,
            bytes_in: 0,
            bytes_in_counter: None,
            bytes_out: 0,
            ttfb: None,
            duration: Duration::ZERO,
            proto_in,
            tls,
            proto_out: None,
            client,
            peer,
            error: None,
            complete: false,
        })
    }

    /// The response head went out now.
    pub(crate) fn head(&mut self, status: u16) {
        self.status = status;
        self.ttfb = Some(self.start.elapsed());
    }

    /// The response is over now (`complete`: it ended cleanly).
    pub(crate) fn end(&mut self, complete: bool) {
        self.duration = self.start.elapsed();
        self.complete = complete;
        if let Some(c) = &self.bytes_in_counter {
            self.bytes_in = c.load(Ordering::Relaxed);
        }
    }

    /// The JSON line.
    fn write_json(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Line<'a> {
            time: String,
            request_id: &'a str,
            server: Option<&'a str>,
            replica: Option<&'a str>,
            replica_addr: Option<SocketAddr>,
            status: u16,
            bytes_in: u64,
            bytes_out: u64,
            duration_ms: f64,
            ttfb_ms: Option<f64>,
            protocol_in: &'static str,
            tls: bool,
            protocol_out: Option<&'static str>,
            client: IpAddr,
            peer: SocketAddr,
            error: Option<&'static str>,
            complete: bool,
        }
        let ms = |d: Duration| (d.as_micros() as f64) / 1000.0;
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            request_id: &self.request_id,
            server: self.server.as_ref().map(|s| s.id()),
            replica: self.replica.as_ref().map(|r| r.id.as_str()),
            replica_addr: self.replica.as_ref().map(|r| r.addr),
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: ms(self.duration),
            ttfb_ms: self.ttfb.map(ms),
            protocol_in: self.proto_in.as_str(),
            tls: self.tls,
            protocol_out: self.proto_out.map(Proto::as_str),
            client: self.client,
            peer: self.peer,
            error: self.error,
            complete: self.complete,
        };
        // Serializing plain fields into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &line);
        out.push(b'\n');
    }
}

/// Keeps `log` for a request routed to `server` if the server is logged, and names it.
pub(crate) fn route(
    log: &mut Option<Box<Entry>>,
    access: Option<&AccessLog>,
    server: &Arc<Server>,
) {
    if log.is_none() {
        return;
    }
    if access.is_some_and(|a| a.wants(server)) {
        if let Some(e) = log.as_mut() {
            e.server = Some(server.clone());
        }
    } else {
        *log = None;
    }
}

/// A request's entry (the hyper path) until its response head is out: a request
/// dropped before then (its client left) is still logged, with status 0, incomplete.
pub(crate) struct Unanswered<'a> {
    /// The entry, taken once the response head is out.
    pub(crate) entry: Option<Box<Entry>>,
    state: &'a crate::proxy::ProxyState,
}

impl<'a> Unanswered<'a> {
    /// Guards `entry` (none: the request is not logged).
    pub(crate) fn new(state: &'a crate::proxy::ProxyState, entry: Option<Box<Entry>>) -> Self {
        Self { entry, state }
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let (Some(mut e), Some(log)) = (self.entry.take(), &self.state.access_log) {
            e.end(false);
            log.push(e);
        }
    }
}

/// A response body (the hyper path) that counts its bytes and hands its request's entry
/// to the writer when it ends or is dropped.
pub(crate) struct LoggedBody {
    inner: ProxyBody,
    entry: Option<Box<Entry>>,
    state: Arc<crate::proxy::ProxyState>,
}

impl LoggedBody {
    /// Wraps the response body of the request `entry` describes.
    pub(crate) fn new(
        inner: ProxyBody,
        entry: Box<Entry>,
        state: Arc<crate::proxy::ProxyState>,
    ) -> Self {
        Self { inner, entry: Some(entry), state }
    }

    fn finish(&mut self, complete: bool) {
        if let (Some(mut e), Some(log)) = (self.entry.take(), &self.state.access_log) {
            e.end(complete);
            log.push(e);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // hyper drops a body it knows is over without polling it to `None`.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            Some(Ok(frame)) => {
                if let (Some(e), Some(data)) = (self.entry.as_mut(), frame.data_ref()) {
                    e.bytes_out += data.len() as u64;
                }
            }
            Some(Err(_)) => self.finish(false),
            None => self.finish(true),
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_ratio() {
        let cfg = |sample| AccessLogConfig { enabled: true, sample, ..Default::default() };
        let metrics = Arc::new(Metrics::default());
        for (sample, lo, hi) in [(0.0, 0, 0), (1.0, 10_000, 10_000), (0.25, 2_200, 2_800)] {
            let (log, _w) = AccessLog::open(&cfg(sample), &metrics).unwrap().unwrap();
            let n = (0..10_000).filter(|_| log.sample()).count();
            assert!((lo..=hi).contains(&n), "sample {sample}: {n}");
        }
        assert!(cfg(1.5).validate().is_err());
        assert!(cfg(-0.1).validate().is_err());
        assert!(AccessLog::open(&AccessLogConfig::default(), &metrics).unwrap().is_none());
    }

    #[test]
    fn json_line() {
        let mut e = Entry::begin(
            Instant::now(),
            Proto::Http11,
            false,
            "10.0.0.1".parse().unwrap(),
            "10.0.0.1:4000".parse().unwrap(),
        );
        e.request_id = "ab\"c".into();
        e.head(503);
        e.error = Some("no_replica");
        e.end(true);
        let mut out = Vec::new();
        e.write_json(&mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["request_id"], "ab\"c");
        assert_eq!(v["status"], 503);
        assert_eq!(v["server"], serde_json::Value::Null);
        assert_eq!(v["error"], "no_replica");
        assert_eq!(v["client"], "10.0.0.1");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
