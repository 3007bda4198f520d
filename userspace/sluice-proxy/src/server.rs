//! The proxy server: binds listeners, accepts connections (bounded), terminates TLS,
//! picks HTTP/1.1 or HTTP/2 per connection, and drains gracefully.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::HeaderName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use sluice_routing::RoutingTable;

use crate::access_log::{AccessLog, Writer as AccessLogWriter};
use crate::admin::{AdminHandler, AdminRoutes};
use crate::client::{BanList, is_trusted};
use crate::config::{Cidr, ProxyConfig, ProxyProtocol};
use crate::error::{ConfigError, ProxyError};
use crate::h1scan::{H1Scan, Verdicts};
use crate::headers::RequestIds;
use crate::io::{Activity, ConnIo};
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, ProxyState, handle};
use crate::upgrade::{OpaqueStreamHandoff, UserspaceRelay};
use crate::upstream::{UpstreamSettings, Upstreams};
use crate::{h1proxy, listener, tls};

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct BoundListener {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    proxy_protocol: ProxyProtocol,
    /// `trusted_proxies` and `request_id.trusted_edges`.
    trusted: Arc<[Cidr]>,
    /// `forwarded_header`: sluice sets RFC 7239 `Forwarded`.
    forwarded_header: bool,
}

/// A bound, not yet running proxy.
pub struct Proxy {
    cfg: ProxyConfig,
    routing: RoutingTable,
    listeners: Vec<BoundListener>,
    admin: Option<(TcpListener, SocketAddr)>,
    admin_routes: AdminRoutes,
    metrics: Arc<Metrics>,
    handoff: Arc<dyn OpaqueStreamHandoff>,
    on_auth_rejected: Option<AuthRejectedHook>,
    acme: Option<Arc<dyn crate::acme::ChallengeAnswers>>,
    deny: Arc<[Cidr]>,
    deny_reported: Arc<[Cidr]>,
    bans: Arc<BanList>,
    tls_certs: ListenerCerts,
    /// The access log's queue and its not yet started writer (when it is on).
    access_log: Option<(AccessLog, AccessLogWriter)>,
    idle_handover: crate::handover::IdleHandover,
}

/// The certificate sets of the TLS listeners (by configured address, in config order),
/// swappable while they serve: a config reload loads new files and stores them here; a
/// handshake in flight keeps the set it started with.
#[derive(Clone, Debug, Default)]
pub struct ListenerCerts {
    sets: Arc<[(SocketAddr, Arc<arc_swap::ArcSwap<tls::SniResolver>>)]>,
    metrics: Option<Arc<Metrics>>,
    routing: Option<RoutingTable>,
}

impl ListenerCerts {
    /// Loads the certificates of every TLS listener in `cfg` that this server also has
    /// (matched by configured address), without swapping anything in yet: on an error
    /// nothing changes.
    pub fn prepare(&self, cfg: &ProxyConfig) -> Result<PreparedCerts, ConfigError> {
        let mut sets = Vec::new();
        let mut summaries = Vec::new();
        for (addr, set) in self.sets.iter() {
            let Some(tls) =
                cfg.listeners.iter().find(|l| l.addr == *addr).and_then(|l| l.tls.as_ref())
            else {
                continue;
            };
            let result = tls::load_resolver(tls);
            if let (Err(e), Some(r)) = (&result, &self.routing) {
                // Counted as a read or a parse failure: the listener's error is a message.
                use sluice_routing::cert::CertError;
                let kind = match e {
                    ConfigError::Read { path, source } => {
                        CertError::Read { path: path.clone(), message: source.to_string() }
                    }
                    e => CertError::Parse(e.to_string()),
                };
                r.load().certificate_counters().record_error(&kind);
            }
            let (resolver, certs) = result?;
            summaries.extend(certs);
            sets.push((*addr, set.clone(), resolver));
        }
        Ok(PreparedCerts { sets, summaries, owner: self.clone() })
    }
}

/// Listener certificates loaded by [`ListenerCerts::prepare`], not yet serving.
#[derive(Debug)]
pub struct PreparedCerts {
    sets: Vec<(SocketAddr, Arc<arc_swap::ArcSwap<tls::SniResolver>>, tls::SniResolver)>,
    summaries: Vec<tls::CertSummary>,
    owner: ListenerCerts,
}

impl PreparedCerts {
    /// Swaps the loaded certificates in (new handshakes use them; those in flight finish
    /// with the set they started with). Returns the listeners whose set was replaced.
    pub fn apply(self) -> Vec<SocketAddr> {
        let mut done = Vec::with_capacity(self.sets.len());
        for (addr, set, resolver) in self.sets {
            set.store(Arc::new(resolver));
            done.push(addr);
        }
        if let Some(r) = &self.owner.routing {
            for _ in &self.summaries {
                r.load().certificate_counters().record_load();
            }
        }
        if let Some(m) = &self.owner.metrics {
            m.set_certificates(self.summaries);
        }
        done
    }
}

/// Called with the request's client address each time proxy auth rejects a request: the
/// socket peer, or the client a trusted peer reported (PROXY header, X-Forwarded-For);
/// never a trusted address, and never a header from an untrusted peer. Runs on the request path: it must be cheap and must
/// never block (hand the event off, e.g. with a channel's `try_send`).
pub type AuthRejectedHook = Arc<dyn Fn(std::net::IpAddr) + Send + Sync>;

impl Proxy {
    /// Validates the config, loads certificates and binds every listener (so port clashes
    /// and bad certificates fail here, before anything is served).
    pub async fn bind(cfg: ProxyConfig, routing: RoutingTable) -> Result<Self, ProxyError> {
        cfg.validate()?;
        let mut listeners = Vec::with_capacity(cfg.listeners.len());
        let mut certificates = Vec::new();
        let mut listener_certs = Vec::new();
        let parse =
            |s: &String| Cidr::parse(s).map_err(|e| ConfigError::Invalid(format!("{s:?}: {e}")));
        let edges =
            cfg.request_id.trusted_edges.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
        for l in &cfg.listeners {
            let mut trusted = l.trusted_proxies.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
            trusted.extend(edges.iter().copied());
            let tls = match &l.tls {
                Some(t) => {
                    let (resolver, certs) = tls::load_resolver(t)?;
                    for _ in &certs {
                        routing.load().certificate_counters().record_load();
                    }
                    certificates.extend(certs);
                    let own = Arc::new(arc_swap::ArcSwap::from_pointee(resolver));
                    listener_certs.push((l.addr, own.clone()));
                    let live = tls::LiveResolver::new(Some(routing.clone()), own);
                    Some(TlsAcceptor::from(tls::server_config_with(Arc::new(live))?))
                }
                None => None,
            };
            let listener = listener::bind(l.addr)
                .map_err(|source| ProxyError::Bind { addr: l.addr, source })?;
            let addr = listener.local_addr()?;
            listeners.push(BoundListener {
                listener,
                addr,
                tls,
                proxy_protocol: l.proxy_protocol,
                trusted: trusted.into(),
                forwarded_header: l.forwarded_header,
            });
        }
        let admin = match cfg.admin.addr {
            Some(a) => {
                let l = listener::bind(a).map_err(|source| ProxyError::Bind { addr: a, source })?;
                let addr = l.local_addr()?;
                Some((l, addr))
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        metrics.set_certificates(certificates);
        let tls_certs = ListenerCerts {
            sets: listener_certs.into(),
            metrics: Some(metrics.clone()),
            routing: Some(routing.clone()),
        };
        let access_log = AccessLog::open(&cfg.access_log, &metrics)?;
        Ok(Self {
            cfg,
            routing,
            listeners,
            admin,
            admin_routes: AdminRoutes::default(),
            metrics,
            handoff: Arc::new(UserspaceRelay),
            on_auth_rejected: None,
            acme: None,
            deny: Arc::from([]),
            deny_reported: Arc::from([]),
            bans: Arc::default(),
            tls_certs,
            access_log,
            idle_handover: Default::default(),
        })
    }

    /// Closes connections from these sources at accept, before reading a byte: the
    /// userspace stand-in for the XDP guard's denylist when that cannot attach.
    /// Also refuses a client a trusted peer's PROXY header reports from these prefixes.
    pub fn deny_at_accept(&mut self, prefixes: Vec<Cidr>) {
        self.deny = prefixes.into();
        self.deny_reported = self.deny.clone();
    }

    /// Closes a connection whose PROXY header (from a trusted peer) reports a client in
    /// these prefixes, right after the header. For when the XDP guard enforces the deny
    /// list on socket peers but cannot see the clients behind an edge.
    pub fn deny_reported_clients(&mut self, prefixes: Vec<Cidr>) {
        self.deny_reported = prefixes.into();
    }

    /// The userspace ban list, checked at accept (socket peer), after a PROXY header (the
    /// reported client) and on every request (its client); trusted addresses are never
    /// refused by it. Whoever bans (sluice's guard) writes here.
    pub fn bans(&self) -> Arc<BanList> {
        self.bans.clone()
    }

    /// The TLS listeners' certificate sets, to reload them while the server runs.
    pub fn listener_certs(&self) -> ListenerCerts {
        self.tls_certs.clone()
    }

    /// Replaces the opaque-stream hand-off (the kernel data plane's splice).
    pub fn set_handoff(&mut self, handoff: Arc<dyn OpaqueStreamHandoff>) {
        self.handoff = handoff;
    }

    /// Answers ACME HTTP-01 challenges (`/.well-known/acme-challenge/<token>`) on every
    /// listener, before routing, from `answers`.
    pub fn set_acme_challenges(&mut self, answers: Arc<dyn crate::acme::ChallengeAnswers>) {
        self.acme = Some(answers);
    }

    /// Reports every proxy-auth rejection (401/403 decided by sluice, not by a replica)
    /// with the request's client (see [`AuthRejectedHook`]), e.g. to ban sources that keep
    /// failing.
    pub fn on_auth_rejected(&mut self, hook: AuthRejectedHook) {
        self.on_auth_rejected = Some(hook);
    }

    /// Adds (or replaces) an admin route, e.g. `/generation`.
    pub fn admin_route(&mut self, path: &str, handler: Arc<dyn AdminHandler>) {
        self.admin_routes.insert(path, handler);
    }

    /// Adds detail lines to `/readyz` (informational; readiness is unchanged).
    pub fn readyz_detail(&mut self, extra: crate::admin::AdminExtra) {
        self.admin_routes.readyz_detail(extra);
    }

    /// Adds a collector to `/metrics`.
    pub fn metrics_extra(&mut self, extra: crate::admin::MetricsExtra) {
        self.admin_routes.metrics_extra(extra);
    }

    /// Bound client listener addresses, in config order (ports resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// The client listeners' sockets, in config order (one SO_REUSEPORT group each), for
    /// the kernel's listener steering.
    pub fn listener_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.listeners.iter().map(|l| l.listener.as_fd()).collect()
    }

    /// Bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, a)| *a)
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The handover of idle HTTP/1.1 keep-alive connections during an upgrade (see
    /// [`crate::handover`]): the old process starts it, the new one adopts through it.
    pub fn idle_handover(&self) -> crate::handover::IdleHandover {
        self.idle_handover.clone()
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, sends GOAWAY to
    /// HTTP/2 clients, closes idle HTTP/1.1 connections (or, once a handover started,
    /// hands them over: [`Self::idle_handover`]), and waits for in-flight requests (and
    /// opaque streams) up to the drain deadline.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ProxyError> {
        let header = HeaderName::from_bytes(self.cfg.request_id.header.as_bytes())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let auth = self.cfg.auth.headers()?;
        let session_header = HeaderName::from_bytes(self.cfg.lb.session_header.as_bytes())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let lb = sluice_routing::LbPolicy { bounded_load: self.cfg.lb.bounded_load };
        let ejection = self.cfg.lb.ejection();
        let (signal, _) = tokio::sync::broadcast::channel(16);
        let (access_log, writer) = match self.access_log {
            Some((log, writer)) => (Some(log), Some(writer.spawn()?)),
            None => (None, None),
        };
        let idle = crate::idle::IdleSweep::new(
            self.cfg.timeouts.connection_idle,
            self.idle_handover.clone(),
        );
        let plaintext: Vec<_> = self
            .listeners
            .iter()
            .filter(|l| l.tls.is_none())
            .map(|l| (l.addr, l.trusted.clone(), l.forwarded_header))
            .collect();
        let state = Arc::new(ProxyState {
            upstreams: Upstreams::new(
                UpstreamSettings::from_config(&self.cfg),
                self.metrics.clone(),
            ),
            cfg: self.cfg,
            routing: self.routing,
            metrics: self.metrics,
            handoff: self.handoff,
            on_auth_rejected: self.on_auth_rejected,
            ids: RequestIds::new(),
            request_id_header: header,
            deny: self.deny,
            deny_reported: self.deny_reported,
            bans: self.bans,
            draining: Default::default(),
            idle,
            auth,
            session_header,
            lb,
            ejection,
            signal,
            access_log,
            acme: self.acme,
        });
        let (drain_tx, drain_rx) = watch::channel(false);
        let conns = Arc::new(Semaphore::new(state.cfg.limits.max_connections.max(1)));
        let attached = crate::handover::Attached {
            state: Arc::downgrade(&state),
            conns: conns.clone(),
            drain: drain_rx.clone(),
            listeners: plaintext,
            runtime: tokio::runtime::Handle::current(),
        };
        state.idle.handover.attach(attached, &state);
        let mut tasks = Vec::new();
        let listener_count = self.listeners.len();
        for l in self.listeners {
            tracing::info!(addr = %l.addr, tls = l.tls.is_some(), "listening");
            tasks.push(tokio::spawn(accept_loop(
                l,
                state.clone(),
                drain_rx.clone(),
                conns.clone(),
            )));
        }
        if let Some((l, addr)) = self.admin {
            tracing::info!(%addr, "admin listening");
            let routes = Arc::new(self.admin_routes.with_defaults(state.clone(), listener_count));
            tasks.push(tokio::spawn(crate::admin::serve(l, routes)));
        }
        tasks.push(tokio::spawn(reaper(state.clone())));
        tasks.push(tokio::spawn(enforce_drain_deadlines(state.clone())));
        tasks.push(tokio::spawn(sample_autoscaler_signal(state.clone())));
        // Not among `tasks`: it closes idle connections during the drain too.
        let sweep = state.clone();
        let sweep = tokio::spawn(async move { sweep.idle.run().await });

        shutdown.await;
        state.idle.handover.detach();
        tracing::info!("shutting down: draining for up to {:?}", state.cfg.timeouts.drain);
        state.draining.store(true, Ordering::Relaxed);
        state.idle.start_drain();
        for t in &tasks {
            t.abort();
        }
        let _ = drain_tx.send(true);
        drop(drain_rx);
        if tokio::time::timeout(state.cfg.timeouts.drain, drain_tx.closed()).await.is_err() {
            tracing::warn!(
                open = drain_tx.receiver_count(),
                "drain deadline passed; closing remaining connections"
            );
        } else {
            tracing::info!("drained");
        }
        sweep.abort();
        if let Some(w) = writer {
            w.stop(Duration::from_secs(1)).await;
        }
        Ok(())
    }
}

async fn reaper(state: Arc<ProxyState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let snap = state.routing.load_full();
        // Draining replicas keep their connection sets: the drain deadline cuts through them.
        let live: std::collections::HashSet<SocketAddr> = snap
            .servers()
            .flat_map(|s| {
                s.replicas.iter().map(|r| r.addr).chain(s.spec.mirror.as_ref().map(|m| m.address))
            })
            .chain(snap.draining().map(|(r, _)| r.addr))
            .collect();
        state.upstreams.reap(&|a| live.contains(a));
    }
}

/// Ends the exchanges still in flight to a draining replica once its `drain_deadline`
/// passes (see [`Upstreams::cut`]). Wakes on snapshot changes and at the next deadline,
/// never per request: the request path pays nothing for it.
async fn enforce_drain_deadlines(state: Arc<ProxyState>) {
    let mut changes = state.routing.subscribe_snapshots();
    // Addresses cut already, so each is cut (and counted) once per drain.
    let mut cut: std::collections::HashSet<SocketAddr> = Default::default();
    loop {
        let snap = state.routing.load_full();
        let now = std::time::SystemTime::now();
        let mut next: Option<std::time::SystemTime> = None;
        let mut draining = std::collections::HashSet::new();
        for (replica, deadline) in snap.draining() {
            let Some(deadline) = deadline else { continue };
            draining.insert(replica.addr);
            if deadline > now {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            } else if cut.insert(replica.addr) {
                let ended = state.upstreams.cut(replica.addr);
                state.metrics.replica_drain_deadline_cancelled_total.add(ended);
                tracing::info!(server = %replica.server, replica = %replica.id,
                    addr = %replica.addr, ended, "drain deadline passed: in-flight exchanges ended");
            }
        }
        // A replica no longer draining (deleted, or back to ready) may be connected to
        // again.
        cut.retain(|a| {
            let keep = draining.contains(a);
            if !keep {
                state.upstreams.uncut(*a);
            }
            keep
        });
        drop(snap);
        let wait = next.map(|d| d.duration_since(now).unwrap_or_default());
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Samples every server's counters once per interval for `GET /autoscaler/stream`. Runs
/// from the start whether or not anyone listens, so each record's deltas cover exactly one
/// interval.
async fn sample_autoscaler_signal(state: Arc<ProxyState>) {
    let mut sampler = sluice_routing::Sampler::new();
    let mut tick = tokio::time::interval(state.cfg.autoscaler.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = state.routing.load_full();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let records = sampler.sample(&snap, now_ms);
        if state.signal.receiver_count() == 0 {
            continue;
        }
        let mut buf = Vec::with_capacity(records.len() * 160);
        for r in &records {
            r.write_ndjson(&mut buf);
        }
        let _ = state.signal.send(bytes::Bytes::from(buf));
    }
}

async fn accept_loop(
    l: BoundListener,
    state: Arc<ProxyState>,
    drain: watch::Receiver<bool>,
    conns: Arc<Semaphore>,
) {
    loop {
        // At the connection limit, stop accepting: the kernel backlog holds the rest.
        let Ok(permit) = conns.clone().acquire_owned().await else { return };
        let (tcp, peer) = match l.listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(addr = %l.addr, "accept: {e}");
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if refused_source(&state, &l.trusted, peer.ip()) {
            state.metrics.client_connections_denied_total.inc();
            // Dropping the socket closes it before anything was read from it.
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        // Dead peers are found by TCP keepalive, not HTTP/2 PINGs: PING traffic would keep
        // an otherwise idle connection from ever reaching the idle timeout.
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
        let ident = Ident {
            mode: l.proxy_protocol,
            trusted: l.trusted.clone(),
            forwarded_header: l.forwarded_header,
        };
        let setup = serve_connection(state.clone(), tcp, peer, ident, l.tls.clone(), drain.clone());
        tokio::spawn(Connection::new(state.clone(), permit, Box::pin(setup)));
    }
}

/// What a connection's listener says about identifying its client.
struct Ident {
    mode: ProxyProtocol,
    trusted: Arc<[Cidr]>,
    forwarded_header: bool,
}

/// A boxed phase of a connection's life.
type Phase = Pin<Box<dyn Future<Output = Option<h1proxy::IdleConn>> + Send>>;

/// One client connection's task, as phases: busy (accepting, TLS, the sniff, a request;
/// boxed, so only a busy connection pays for its state) and idle between HTTP/1.1
/// requests, where the task holds nothing but the idle connection itself. An idle
/// connection's task is what most of a node's connections cost, so it stays this small.
struct Connection {
    state: Arc<ProxyState>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    phase: ConnPhase,
}

enum ConnPhase {
    Busy(Phase),
    Idle(h1proxy::IdleConn),
    Done,
}

impl Connection {
    fn new(
        state: Arc<ProxyState>,
        permit: tokio::sync::OwnedSemaphorePermit,
        setup: Phase,
    ) -> Self {
        Self::with_phase(state, permit, ConnPhase::Busy(setup))
    }

    /// A connection starting in `phase` (an adopted one starts idle); counted like an
    /// accepted one.
    fn with_phase(
        state: Arc<ProxyState>,
        permit: tokio::sync::OwnedSemaphorePermit,
        phase: ConnPhase,
    ) -> Self {
        state.metrics.client_connections_total.inc();
        state.metrics.client_connections_open.inc();
        Self { state, _permit: permit, phase }
    }
}

/// Gives an idle connection to the handover's sink (the connection then ends here; a
/// sink that cannot take it leaves it to close, as the drain would).
fn hand_over_idle(state: &ProxyState, idle: h1proxy::IdleConn) {
    let (tcp, info) = idle.into_parts();
    let Some(sink) = state.idle.handover.sink() else { return };
    // Deregisters it from this process's reactor; the descriptor stays open.
    match tcp.into_std() {
        Ok(tcp) => {
            let conn =
                crate::handover::IdleConnection { tcp, peer: info.peer, client: info.client };
            if sink.hand_over(conn).is_err() {
                tracing::debug!(peer = %info.peer, "handover: idle connection not taken; closed");
            }
        }
        Err(e) => tracing::debug!(peer = %info.peer, "handover: idle connection: {e}"),
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            this.phase = match std::mem::replace(&mut this.phase, ConnPhase::Done) {
                ConnPhase::Busy(mut f) => match f.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = ConnPhase::Busy(f);
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(idle)) => ConnPhase::Idle(idle),
                    Poll::Ready(None) => ConnPhase::Done,
                },
                ConnPhase::Idle(mut idle) => match idle.poll_wake(cx) {
                    // A request that has arrived is served here first (see `crate::handover`).
                    Poll::Pending | Poll::Ready(false) if this.state.idle.handing_over() => {
                        hand_over_idle(&this.state, idle);
                        ConnPhase::Done
                    }
                    Poll::Pending => {
                        this.phase = ConnPhase::Idle(idle);
                        return Poll::Pending;
                    }
                    Poll::Ready(true) => {
                        let state = this.state.clone();
                        ConnPhase::Busy(Box::pin(async move {
                            let served = idle.resume(&state).await;
                            after_fast_path(&state, served).await
                        }))
                    }
                    Poll::Ready(false) => ConnPhase::Done,
                },
                ConnPhase::Done => return Poll::Ready(()),
            };
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.state.metrics.client_connections_open.dec();
    }
}

/// Whether connections from `ip` are closed unserved: on the deny list, or banned (a
/// trusted address never is: banning an edge would cut off every client behind it).
fn refused_source(state: &ProxyState, trusted: &[Cidr], ip: std::net::IpAddr) -> bool {
    state.deny.iter().any(|c| c.contains(ip))
        || (state.bans.is_banned(ip) && !is_trusted(trusted, ip))
}

/// [`refused_source`] for a client a PROXY header reported.
fn refused_client(state: &ProxyState, trusted: &[Cidr], ip: std::net::IpAddr) -> bool {
    state.deny_reported.iter().any(|c| c.contains(ip))
        || (state.bans.is_banned(ip) && !is_trusted(trusted, ip))
}

/// The connection's client: the socket peer, or what a trusted peer's PROXY header
/// reports. `None` when the connection must be closed (counted): a trusted peer's header
/// missing, malformed or late, an untrusted peer sending one, or a reported client that
/// is denied or banned.
async fn identify(
    state: &ProxyState,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    mode: ProxyProtocol,
    trusted: &[Cidr],
) -> Option<std::net::IpAddr> {
    let peer_ip = peer.ip().to_canonical();
    if mode == ProxyProtocol::Off {
        return Some(peer_ip);
    }
    let timeout = state.cfg.timeouts.header_read;
    if !is_trusted(trusted, peer_ip) {
        // A PROXY header from anyone else is a spoofing attempt (or a misrouted edge):
        // believing it would let any client pick its own identity.
        return match crate::proxy_header::untrusted_sends_header(tcp, timeout).await {
            Ok(false) => Some(peer_ip),
            Ok(true) => {
                state.metrics.client_proxy_header_refused_total.inc();
                tracing::debug!(%peer, "PROXY header from an untrusted peer: closed");
                None
            }
            // The connection failed before its first bytes: nothing to serve.
            Err(_) => None,
        };
    }
    let client = match crate::proxy_header::read(tcp, mode, timeout).await {
        Ok(h) => h.source.map_or(peer_ip, |s| s.ip().to_canonical()),
        Err(e) => {
            state.metrics.client_proxy_header_refused_total.inc();
            tracing::debug!(%peer, "PROXY header refused: {e}");
            return None;
        }
    };
    if client != peer_ip && refused_client(state, trusted, client) {
        state.metrics.client_connections_denied_total.inc();
        tracing::debug!(%peer, %client, "reported client denied or banned: closed");
        return None;
    }
    Some(client)
}

/// What a plaintext connection's first bytes are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    H1,
    H2,
    /// A request line of `PRI * HTTP/2.0` (so not HTTP/1) with a wrong preface after it.
    BadH2,
}

/// The preface's request line: past it, bytes are known not to be HTTP/1.
const H2_PREFACE_LINE: usize = b"PRI * HTTP/2.0".len();

/// Reads (without consuming) enough of a plaintext connection to tell an h2c
/// prior-knowledge preface from HTTP/1.1.
async fn sniff_h2c(tcp: &TcpStream) -> io::Result<Sniffed> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(i) = buf[..n].iter().zip(H2_PREFACE).position(|(a, b)| a != b) {
            return Ok(if i >= H2_PREFACE_LINE { Sniffed::BadH2 } else { Sniffed::H1 });
        }
        if n == H2_PREFACE.len() {
            return Ok(Sniffed::H2);
        }
        // A split preface is rare; peek would return at once, so wait a little.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A connection error for an invalid HTTP/2 preface (RFC 9113 §3.4): the server preface
/// (empty SETTINGS), then GOAWAY with PROTOCOL_ERROR, then close. Not an HTTP/1.1 400:
/// the client speaks HTTP/2 and would not read one.
async fn refuse_bad_preface(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FRAMES: [u8; 26] = [
        0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, empty
        0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes, stream 0
        0, 0, 0, 0, // last stream id 0
        0, 0, 0, 0x1, // PROTOCOL_ERROR
    ];
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&FRAMES[..])).await;
    let _ = tcp.shutdown().await;
    // Closing with unread bytes would reset the connection and could discard the GOAWAY
    // before the client reads it: read a little first, bounded.
    let mut sink = [0u8; 4096];
    let read = async {
        let mut total = 0usize;
        while let Ok(n) = tcp.read(&mut sink).await {
            total += n;
            if n == 0 || total > 64 * 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), read).await;
}

/// A connection's first phase: its client (PROXY header), TLS, the protocol, and then
/// the whole connection, or (on the HTTP/1.1 fast path) its requests until it first goes
/// idle. Runs boxed in the connection's task ([`Connection`]), so none of this state
/// stays with an idle connection.
async fn serve_connection(
    state: Arc<ProxyState>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    Ident { mode, trusted: trusted_set, forwarded_header }: Ident,
    tls: Option<TlsAcceptor>,
    drain: watch::Receiver<bool>,
) -> Option<h1proxy::IdleConn> {
    let state = &state;
    let t = &state.cfg.timeouts;
    // Before TLS and the h2c sniff: the PROXY header precedes the client's bytes. Skipped
    // on listeners without PROXY protocol.
    let client = if mode == ProxyProtocol::Off {
        peer.ip().to_canonical()
    } else {
        tokio::select! {
            biased;
            c = identify(state, &mut tcp, peer, mode, &trusted_set) => c?,
            // A connection that has sent nothing yet is idle: the drain closes it.
            () = drain_quiet(drain.clone()) => return None,
        }
    };
    let info = conn_info(peer, client, trusted_set, forwarded_header, tls.is_some(), drain.clone());
    let (activity, verdicts) = (info.activity.clone(), info.verdicts.clone());
    match tls {
        Some(acceptor) => {
            // Boxed, here and for each protocol below: this future lives as long as an
            // HTTP/2 or TLS connection, and a future is as large as its largest state, so
            // each protocol's state gets an allocation of its own size instead of every
            // connection carrying the largest (TLS's).
            Box::pin(serve_tls(state, tcp, acceptor, activity, verdicts, info, drain)).await;
            None
        }
        None => {
            let sniffed = tokio::select! {
                biased;
                r = tokio::time::timeout(t.header_read, sniff_h2c(&tcp)) => match r {
                    Ok(Ok(s)) => s,
                    _ => return None,
                },
                // A client's pool may hold a connection it has not used yet: while
                // draining it is an idle connection like any other.
                () = drain_quiet(drain.clone()) => return None,
            };
            match sniffed {
                Sniffed::BadH2 => Box::pin(refuse_bad_preface(tcp)).await,
                Sniffed::H2 => {
                    let io = ConnIo::new(tcp, activity);
                    Box::pin(serve_h2(state, TokioIo::new(io), info, drain)).await;
                }
                // HTTP/1.1: the fast path first.
                Sniffed::H1 => {
                    return after_fast_path(state, h1proxy::serve(state, tcp, info).await).await;
                }
            }
            None
        }
    }
}

/// What the request path knows of a connection from `peer` whose client is `client`.
fn conn_info(
    peer: SocketAddr,
    client: std::net::IpAddr,
    trusted_set: Arc<[Cidr]>,
    forwarded_header: bool,
    tls: bool,
    drain: watch::Receiver<bool>,
) -> Arc<ConnInfo> {
    Arc::new(ConnInfo {
        peer,
        client,
        trusted: is_trusted(&trusted_set, client),
        trusted_set,
        forwarded_for: crate::headers::forwarded_for(client),
        // Formatted only when sluice sets `Forwarded` (`forwarded_header`).
        forwarded_node: forwarded_header.then(|| Box::new(crate::headers::forwarded_node(client))),
        tls,
        activity: Activity::new(),
        drain,
        verdicts: Arc::new(Verdicts::default()),
    })
}

/// Adopts an idle HTTP/1.1 connection another process handed over (see
/// [`crate::handover`]) as a connection of this one, in its idle phase; a client that
/// is trusted here continues on the hyper path, as at accept.
pub(crate) fn adopt_idle(
    a: &crate::handover::Attached,
    conn: crate::handover::IdleConnection,
) -> Result<(), crate::handover::AdoptError> {
    use crate::handover::AdoptError;
    let state = a.state.upgrade().ok_or(AdoptError::NotServing)?;
    if state.draining.load(Ordering::Relaxed) {
        return Err(AdoptError::NotServing);
    }
    let local = conn.tcp.local_addr()?;
    // The listener bound to that address, or to its port on every address.
    let (_, trusted_set, forwarded_header) = a
        .listeners
        .iter()
        .find(|(addr, ..)| *addr == local)
        .or_else(|| {
            a.listeners
                .iter()
                .find(|(addr, ..)| addr.ip().is_unspecified() && addr.port() == local.port())
        })
        .ok_or(AdoptError::NoListener(local))?;
    let (peer, client) = (conn.peer, conn.client);
    if refused_source(&state, trusted_set, peer.ip())
        || (client != peer.ip().to_canonical() && refused_client(&state, trusted_set, client))
    {
        return Err(AdoptError::Refused(client));
    }
    let permit = a.conns.clone().try_acquire_owned().map_err(|_| AdoptError::AtLimit)?;
    conn.tcp.set_nonblocking(true)?;
    let _rt = a.runtime.enter();
    let tcp = TcpStream::from_std(conn.tcp)?;
    let info =
        conn_info(peer, client, trusted_set.clone(), *forwarded_header, false, a.drain.clone());
    let phase = if info.trusted {
        let st = state.clone();
        ConnPhase::Busy(Box::pin(async move {
            after_fast_path(&st, h1proxy::serve(&st, tcp, info).await).await
        }))
    } else {
        ConnPhase::Idle(h1proxy::IdleConn::adopted(&state, tcp, info))
    };
    a.runtime.spawn(Connection::with_phase(state, permit, phase));
    Ok(())
}

/// Where the HTTP/1.1 fast path left a connection: idle (the caller waits for its next
/// request), closed, or declined, and then served by hyper from the bytes the fast path
/// had read until it closes.
async fn after_fast_path(
    state: &Arc<ProxyState>,
    served: h1proxy::Served,
) -> Option<h1proxy::IdleConn> {
    let (tcp, read, info) = match served {
        h1proxy::Served::Idle(idle) => return Some(idle),
        h1proxy::Served::Closed => return None,
        h1proxy::Served::Declined(tcp, read, info) => (tcp, read, info),
    };
    // The fast path does not keep the activity clock (only `drive` reads it): the
    // declined request's bytes are the connection's latest activity.
    info.activity.touch();
    let max_head = state.cfg.limits.max_header_bytes;
    let io = crate::upgrade::plain_client_io(
        tcp,
        info.activity.clone(),
        read,
        max_head,
        info.verdicts.clone(),
    );
    let drain = info.drain.clone();
    Box::pin(serve_h1(state, io, info, drain)).await;
    None
}

/// A TLS connection: the handshake (ALPN picks HTTP/2 or HTTP/1.1), then hyper.
async fn serve_tls(
    state: &Arc<ProxyState>,
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    activity: Arc<Activity>,
    verdicts: Arc<Verdicts>,
    info: Arc<ConnInfo>,
    drain: watch::Receiver<bool>,
) {
    let t = &state.cfg.timeouts;
    let (peer, client) = (info.peer, info.client);
    let max_head = state.cfg.limits.max_header_bytes;
    let io = ConnIo::new(tcp, activity.clone());
    let accept = Box::pin(acceptor.accept(io));
    let stream = match tokio::time::timeout(t.tls_handshake, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %client, "tls handshake: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, %client, "tls handshake timed out");
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2);
    if h2 {
        Box::pin(serve_h2(state, TokioIo::new(stream), info, drain)).await;
    } else {
        let io = TokioIo::new(H1Scan::new(stream, max_head, verdicts));
        Box::pin(serve_h1(state, io, info, drain)).await;
    }
}

async fn serve_h1<I>(
    state: &Arc<ProxyState>,
    io: I,
    info: Arc<ConnInfo>,
    drain: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let c = &state.cfg;
    let svc_state = state.clone();
    let svc_info = info.clone();
    let svc = service_fn(move |req| handle(svc_state.clone(), svc_info.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(c.timeouts.header_read)
        .max_buf_size(c.limits.max_header_bytes)
        .max_headers(c.limits.max_headers)
        .keep_alive(true)
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    drive(conn.as_mut(), |c| c.graceful_shutdown(), drain, &info.activity, state, H1_DRAIN_IDLE)
        .await;
}

async fn serve_h2<I>(
    state: &Arc<ProxyState>,
    io: I,
    info: Arc<ConnInfo>,
    drain: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let c = &state.cfg;
    let svc_state = state.clone();
    let svc_info = info.clone();
    // The request's future (several KiB: every phase's state) goes to the heap once, here,
    // unstarted. hyper moves the stream that wraps it three times before polling it (into
    // the stream, to the executor, into the executor's box); boxed, each move copies a
    // pointer instead of the whole future.
    let svc = service_fn(move |req| Box::pin(handle(svc_state.clone(), svc_info.clone(), req)));
    // Streams run in this connection's task (see `h2streams`), not a task each.
    let exec = crate::h2streams::StreamExec::default();
    let conn = hyper::server::conn::http2::Builder::new(exec.clone())
        .timer(TokioTimer::new())
        .max_concurrent_streams(c.limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(c.limits.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(c.limits.h2_stream_window)
        .initial_connection_window_size(c.limits.h2_connection_window)
        // hyper's default lets each stream buffer 400 KiB past the client's window: a
        // slow reader's response then sits in sluice instead of the replica's window.
        .max_send_buf_size(c.limits.h2_max_send_buffer as usize)
        .enable_connect_protocol()
        .serve_connection(io, svc);
    let conn = crate::h2streams::WithStreams::new(conn, exec);
    let mut conn = std::pin::pin!(conn);
    drive(
        conn.as_mut(),
        |c| c.conn().graceful_shutdown(),
        drain,
        &info.activity,
        state,
        Duration::ZERO,
    )
    .await;
}

/// How long an HTTP/1.1 connection must have been quiet, once the drain started, before
/// it is closed. HTTP/1.1 has no GOAWAY: closing a keep-alive connection the moment the
/// drain starts races a request the client is sending on it. Busy connections instead
/// end cleanly with `connection: close` on their next response (see `proxy::handle`),
/// and only connections the client left quiet this long are closed under it.
pub(crate) const H1_DRAIN_IDLE: Duration = Duration::from_millis(500);

/// Resolves once the drain has been under way for [`H1_DRAIN_IDLE`]: a connection that
/// has not sent a byte by then is closed like an idle keep-alive connection.
async fn drain_quiet(mut drain: watch::Receiver<bool>) {
    if drain.wait_for(|d| *d).await.is_err() {
        // The server is gone without a drain: nothing to wait for here.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(H1_DRAIN_IDLE).await;
}

/// Polls a connection to its end, starting a graceful shutdown when the drain begins and
/// dropping it (closing the socket) when it has been idle or stalled too long.
async fn drive<F, E>(
    mut conn: Pin<&mut F>,
    graceful: impl Fn(Pin<&mut F>),
    mut drain: watch::Receiver<bool>,
    activity: &Activity,
    state: &ProxyState,
    drain_idle: Duration,
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let t = &state.cfg.timeouts;
    let mut draining = *drain.borrow();
    // Graceful shutdown (GOAWAY for h2; for h1, closing if idle) is started once the
    // connection has been quiet for `drain_idle` after the drain began.
    let mut shut = false;
    if draining && drain_idle.is_zero() {
        shut = true;
        graceful(conn.as_mut());
    }
    loop {
        tokio::select! {
            // The connection first: a request that has just arrived is read (and the
            // connection is busy) before the quiet-drain check below can close it.
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("client connection: {e}");
                }
                return;
            }
            _ = drain.changed(), if !draining => {
                draining = true;
                if drain_idle.is_zero() {
                    shut = true;
                    graceful(conn.as_mut());
                }
            }
            _ = activity.idle_expired(drain_idle, t.stream_idle), if draining && !shut => {
                shut = true;
                graceful(conn.as_mut());
            }
            _ = activity.idle_expired(t.connection_idle, t.stream_idle) => {
                tracing::debug!("closing idle client connection");
                return;
            }
        }
    }
}
