//! Replica-side connections. sluice owns each replica's connection set: HTTP/2 (h2c prior
//! knowledge) connections multiplexed up to the replica's advertised stream limit, with a
//! new connection opened when all are saturated (hyper's pooled client will not do that),
//! and an HTTP/1.1 keep-alive pool. Replicas are IP:port; there is no DNS here.

mod http1;
mod http2;
mod replay;
mod wire;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{BoxError, OnComplete};
use crate::config::{ProxyConfig, UpstreamConfig};
use crate::error::RequestError;
use crate::metrics::{Metrics, RetryReason};

pub use self::http1::UpgradeRegistration;
pub use self::replay::REPLAY_BODY_BYTES;

/// The body sluice sends upstream.
pub type UpstreamReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// The body sluice receives from upstream.
pub type UpstreamRespBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which wire protocol to speak to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireProtocol {
    /// HTTP/2 with prior knowledge.
    H2c,
    /// HTTP/1.1.
    Http1,
}

/// A response from a replica plus what must live as long as its body.
pub struct UpstreamResponse {
    /// The response (body streams from the replica).
    pub response: Response<UpstreamRespBody>,
    /// Stream/connection handles; dropping them cancels the upstream exchange.
    pub hold: Box<dyn Send>,
    /// Run after the body ended cleanly (returns a keep-alive connection to its pool).
    pub on_complete: Option<OnComplete>,
}

/// Why [`Upstreams::send`] failed. `unsent` is the request handed back untouched when it
/// provably never reached the replica (nothing of it was written, or the replica said it
/// did not process it): the caller may send it once to another replica, and only then.
pub struct SendError {
    /// The failure, as the client would be told.
    pub error: RequestError,
    /// The request and why it is known to be unsent, if it is.
    pub unsent: Option<(RetryReason, Request<UpstreamReqBody>)>,
}

impl SendError {
    fn unsent(error: RequestError, reason: RetryReason, req: Request<UpstreamReqBody>) -> Self {
        Self { error, unsent: Some((reason, req)) }
    }
}

impl From<RequestError> for SendError {
    fn from(error: RequestError) -> Self {
        Self { error, unsent: None }
    }
}

/// Settings the upstream side needs.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this.
    pub pool_idle: Duration,
    /// Pool and window settings.
    pub cfg: UpstreamConfig,
}

impl UpstreamSettings {
    /// From the proxy config.
    pub fn from_config(c: &ProxyConfig) -> Self {
        Self {
            connect_timeout: c.timeouts.connect,
            pool_idle: c.timeouts.upstream_pool_idle,
            cfg: c.upstream.clone(),
        }
    }
}

/// Connections to one replica address.
#[derive(Default)]
struct ReplicaPool {
    /// Its open sockets, so a drain deadline can end them (see [`Upstreams::cut`]).
    open: Arc<OpenSockets>,
    h2: Mutex<Vec<Arc<http2::H2Conn>>>,
    /// One h2 connect at a time per replica, so a burst against a cold (or saturated)
    /// replica opens one connection and multiplexes onto it instead of one per request.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Idle raw HTTP/1.1 connections ([`WireConn`]), most recent last; shared by the
    /// fast path and [`wire`].
    wire_idle: Mutex<Vec<(WireConn, Instant)>>,
}

/// The open sockets to one replica address. Registered once per connection (not per
/// request: a pooled connection carries many), so that when a draining replica's
/// deadline passes [`Upstreams::cut`] can shut them down; the tasks blocked on them are
/// then woken by the kernel, as if the replica had reset them. Nothing on the request
/// path looks at it.
#[derive(Default)]
pub(crate) struct OpenSockets {
    /// id → the socket (a duplicate of its descriptor) and what it carries.
    fds: Mutex<HashMap<u64, (OwnedFd, Streams)>>,
    next: std::sync::atomic::AtomicU64,
    /// Set once the deadline passed: no new connection is opened to the address.
    cut: std::sync::atomic::AtomicBool,
}

/// The streams a registered socket carries: `None` for a raw HTTP/1.1 connection, which
/// carries one exchange while out of the pool; an h2c connection's stream count.
type Streams = Option<Arc<std::sync::atomic::AtomicUsize>>;

/// One registered socket; deregisters on drop. The registry holds a duplicate of the
/// socket's descriptor (one `dup` per connection, none per request), so a shutdown
/// through it reaches the connection's socket and nothing else; it is dropped before
/// the socket closes (declared before it in the owning struct: fields drop in order), so
/// it never keeps a closed connection's socket open.
pub(crate) struct Registered {
    set: Arc<OpenSockets>,
    id: u64,
}

impl OpenSockets {
    fn register(
        self: &Arc<Self>,
        tcp: &TcpStream,
        streams: Streams,
    ) -> Result<Registered, RequestError> {
        let fd = tcp
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| RequestError::Upstream(format!("registering a replica socket: {e}")))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.fds.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (fd, streams));
        Ok(Registered { set: self.clone(), id })
    }

    /// Whether the address's drain deadline passed.
    pub(crate) fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    /// Shuts every registered socket down; returns the exchanges they carried.
    fn cut(&self) -> u64 {
        self.cut.store(true, Ordering::Relaxed);
        let fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        let mut exchanges = 0u64;
        for (fd, streams) in fds.values() {
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
            exchanges += streams.as_ref().map_or(1, |n| n.load(Ordering::Relaxed) as u64);
        }
        exchanges
    }
}

/// A registered socket for a connection driven elsewhere (the h2 driver): deregistered
/// before the socket closes (field order).
pub(crate) struct RegisteredStream {
    _registered: Registered,
    tcp: TcpStream,
}

impl tokio::io::AsyncRead for RegisteredStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for RegisteredStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let gone = self.set.fds.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        // The duplicate is closed outside the lock.
        drop(gone);
    }
}

/// A raw HTTP/1.1 connection to a replica, framed by sluice itself (`crate::h1proxy`,
/// [`wire`]) in the task of the request using it: no driver task, no channel.
/// Dropping it closes the connection.
pub(crate) struct WireConn {
    /// Declared before `tcp`: deregistered before the socket closes.
    _registered: Registered,
    /// The replica address's sockets (to tell a deadline cut from a replica's close).
    pub(crate) open: Arc<OpenSockets>,
    /// The socket.
    pub(crate) tcp: TcpStream,
    /// Not to be reused from then on: the replica's `Keep-Alive: timeout=` (see
    /// [`WireConn::keep_alive`]).
    keep_until: Option<Instant>,
    _open: OpenH1,
}

/// Counts a replica HTTP/1.1 connection in `upstream_h1_open` for as long as it lives.
struct OpenH1(Arc<Metrics>);

impl OpenH1 {
    pub(super) fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.upstream_h1_open.inc();
        Self(metrics.clone())
    }
}

impl Drop for OpenH1 {
    fn drop(&mut self) {
        self.0.upstream_h1_open.dec();
    }
}

impl ReplicaPool {
    /// Keeps `conn` for the next request, unless `max` are idle already.
    fn put_wire(&self, conn: WireConn, max: usize) {
        let now = Instant::now();
        if conn.expired(now) {
            return;
        }
        let mut idle = self.wire_idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < max {
            idle.push((conn, now));
        }
    }
}

impl WireConn {
    /// Applies a response's `Keep-Alive` header value: `false` when the connection must
    /// not be reused at all (the replica's timeout is too short to use safely).
    pub(crate) fn keep_alive(&mut self, value: &[u8]) -> bool {
        match crate::headers::keep_alive_deadline(value, Instant::now()) {
            Some(Some(until)) => {
                self.keep_until = Some(until);
                true
            }
            Some(None) => false,
            None => true,
        }
    }

    /// Whether the replica's stated keep-alive time has run out.
    fn expired(&self, now: Instant) -> bool {
        self.keep_until.is_some_and(|t| now >= t)
    }

    /// Whether an idle connection can no longer carry a request: the replica closed it or
    /// sent bytes nobody asked for. Costs no system call unless the socket is flagged
    /// readable, which an idle keep-alive connection never is while it is usable.
    fn is_stale(&self) -> bool {
        use futures_util::FutureExt as _;
        if self.tcp.readable().now_or_never().is_none() {
            return false;
        }
        let mut probe = [0u8; 1];
        !matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// All upstream connection sets, keyed by replica address.
pub struct Upstreams {
    settings: UpstreamSettings,
    metrics: Arc<Metrics>,
    /// foldhash, not SipHash: looked up on every request, keyed only by replica addresses
    /// from the routing state.
    pools: RwLock<HashMap<SocketAddr, Arc<ReplicaPool>, foldhash::fast::RandomState>>,
}

impl Upstreams {
    /// An empty set.
    pub fn new(settings: UpstreamSettings, metrics: Arc<Metrics>) -> Self {
        Self { settings, metrics, pools: RwLock::new(HashMap::default()) }
    }

    fn pool(&self, addr: SocketAddr) -> Arc<ReplicaPool> {
        if let Some(p) = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            return p.clone();
        }
        self.pools.write().unwrap_or_else(|e| e.into_inner()).entry(addr).or_default().clone()
    }

    /// Sends `req` (URI in origin form, Host header set) to the replica at `addr`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        proto: WireProtocol,
        connect_timeout: Option<Duration>,
        req: Request<UpstreamReqBody>,
    ) -> Result<UpstreamResponse, SendError> {
        let pool = self.pool(addr);
        let ct = connect_timeout.unwrap_or(self.settings.connect_timeout);
        match proto {
            WireProtocol::H2c => http2::send(self, &pool, addr, ct, req).await,
            WireProtocol::Http1 => wire::send(self, &pool, addr, ct, req).await,
        }
    }

    /// Sends an HTTP/1.1 upgrade request on a fresh connection (never pooled afterwards);
    /// the response's `hyper::upgrade::on` yields the replica socket after a 101. Keep the
    /// [`UpgradeRegistration`] for the upgraded stream's life: through it a drain
    /// deadline ends the stream.
    pub async fn send_upgrade(
        &self,
        addr: SocketAddr,
        connect_timeout: Option<Duration>,
        req: Request<UpstreamReqBody>,
    ) -> Result<(UpstreamResponse, UpgradeRegistration), RequestError> {
        let ct = connect_timeout.unwrap_or(self.settings.connect_timeout);
        http1::send_upgrade(self, addr, ct, req).await
    }

    /// An idle raw HTTP/1.1 connection to `addr` (the most recently used), if one is usable.
    pub(crate) fn take_wire(&self, addr: SocketAddr) -> Option<WireConn> {
        let pool = self.pool(addr);
        let mut idle = pool.wire_idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((conn, _)) = idle.pop() {
            // The clock is read only for a replica that stated a keep-alive time.
            let expired = conn.keep_until.is_some_and(|t| Instant::now() >= t);
            if !expired && !conn.is_stale() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a raw connection whose last exchange ended cleanly to `addr`'s pool.
    pub(crate) fn put_wire(&self, addr: SocketAddr, conn: WireConn) {
        self.pool(addr).put_wire(conn, self.max_idle());
    }

    /// Idle HTTP/1.1 connections kept per replica.
    fn max_idle(&self) -> usize {
        self.settings.cfg.h1_max_idle_per_replica
    }

    /// A new raw HTTP/1.1 connection to `addr`.
    pub(crate) async fn connect_wire(
        &self,
        addr: SocketAddr,
        timeout: Option<Duration>,
    ) -> Result<WireConn, RequestError> {
        let open = self.pool(addr).open.clone();
        let tcp = self
            .connect_open(&open, addr, timeout.unwrap_or(self.settings.connect_timeout))
            .await?;
        let registered = open.register(&tcp, None)?;
        Ok(WireConn {
            _registered: registered,
            open,
            tcp,
            keep_until: None,
            _open: OpenH1::new(&self.metrics),
        })
    }

    /// A draining replica's deadline passed: end every exchange still on a connection to
    /// `addr` (shut its sockets down; before the response head the client gets a 502,
    /// after it a reset stream or a closed connection, never a clean end) and open no
    /// new one. Returns how many exchanges were ended.
    pub fn cut(&self, addr: SocketAddr) -> u64 {
        let Some(pool) = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&addr).cloned()
        else {
            return 0;
        };
        // Idle connections carry nothing: closed, not counted.
        pool.wire_idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        pool.open.cut()
    }

    /// A new connection to `addr` for a driver task, registered as carrying `streams`.
    async fn connect_registered(
        &self,
        pool: &ReplicaPool,
        addr: SocketAddr,
        timeout: Duration,
        streams: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Result<RegisteredStream, RequestError> {
        let tcp = self.connect_open(&pool.open, addr, timeout).await?;
        let registered = pool.open.register(&tcp, Some(streams))?;
        Ok(RegisteredStream { _registered: registered, tcp })
    }

    /// `addr` is no longer a draining replica past its deadline (it left the store, or is
    /// ready again): connections to it may be opened again.
    pub fn uncut(&self, addr: SocketAddr) {
        if let Some(pool) = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            pool.open.cut.store(false, Ordering::Relaxed);
        }
    }

    /// Connects unless `addr`'s drain deadline passed.
    async fn connect_open(
        &self,
        open: &OpenSockets,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, RequestError> {
        if open.is_cut() {
            return Err(RequestError::Upstream(format!("replica {addr}: drain deadline passed")));
        }
        self.connect(addr, timeout).await
    }

    /// Closes idle connections older than the pool idle timeout and forgets replicas not
    /// in `live` (their in-flight exchanges finish on the handles they hold).
    pub fn reap(&self, live: &dyn Fn(&SocketAddr) -> bool) {
        let now = Instant::now();
        let idle = self.settings.pool_idle;
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        pools.retain(|addr, _| live(addr));
        for pool in pools.values() {
            pool.h2.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.keep(now, idle));
            pool.wire_idle.lock().unwrap_or_else(|e| e.into_inner()).retain(|(c, since)| {
                !c.expired(now) && !c.is_stale() && now.duration_since(*since) < idle
            });
        }
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, RequestError> {
        let res = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
        let err = match res {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => connect_reason(addr, &e),
            Err(_) => format!("connect to replica {addr} timed out"),
        };
        self.metrics.upstream_connect_errors_total.inc();
        tracing::debug!(%addr, "{err}");
        Err(RequestError::Upstream(err))
    }
}

fn connect_reason(addr: SocketAddr, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => format!("replica {addr} refused the connection"),
        _ => format!("connect to replica {addr}: {e}"),
    }
}

/// Renders an error with its sources for a short 502 reason.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
