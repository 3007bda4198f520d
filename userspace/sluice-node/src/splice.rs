//! The kernel hand-off for opaque streams: when both legs of an upgraded exchange are
//! plaintext TCP they can be spliced in the kernel (sk_skb verdict) with userspace only
//! watching for close; otherwise (a TLS or HTTP/2 leg: the kernel refuses sockmap on
//! kTLS, and an h2 stream is not a socket) the bytes are relayed in userspace.
//!
//! Whether a plaintext stream is spliced follows its server's `splice` mode (see
//! [`crate::splice_policy`]): `always` splices right after the upgrade, `never` relays
//! in userspace, and `auto` starts on this module's own relay loop, which shows every
//! read to the policy and, when the stream looks latency-bound, hands both sockets to
//! the kernel at a clean point: both directions' buffers empty, every byte read
//! written. Bytes that arrived in the kernel but were not read yet are carried by the
//! splice itself (the data plane's RCVLOWAT kick), so nothing is lost, duplicated or
//! reordered.
//!
//! On an upgrade the spliced pairs move to the new process (see
//! [`crate::handover::channel`]): both processes use the same pinned sockhash, so a pair
//! never leaves the kernel path; only its sockets, its accounting and its close watching
//! change hands.

use std::{
    collections::HashMap,
    future::poll_fn,
    io,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use futures_util::future::BoxFuture;
use hyper_util::rt::TokioIo;
use sluice_dataplane::{Dataplane, DetachedPair, SpliceEnd, SpliceWatcher, splice::Leg};
use sluice_proxy::{Metrics, OpaqueStream, OpaqueStreamHandoff, into_tcp};
use sluice_routing::{InFlightGuard, RoutingTable, SpliceMode};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use crate::handover::channel::{self, Channel, Msg, RelayOffer, SpliceOffer};

use crate::splice_policy::{
    Decision, Decisions, Observer, PolicyConfig, SpliceConfig, Verdict, effective_mode,
};

/// Relay buffer per direction: what copy_bidirectional uses, doubled (fewer syscalls
/// on bulk), small enough for many idle WebSockets.
const RELAY_BUF: usize = 16 * 1024;

/// Splices plaintext pairs in the kernel as their server's mode and the adaptive
/// policy say; relays everything else in userspace.
pub struct KernelSplice {
    inner: Arc<Inner>,
}

struct Inner {
    dp: Arc<Mutex<Dataplane>>,
    watcher: SpliceWatcher,
    /// Set after the first splice failure, so the fallback is said once.
    warned: AtomicBool,
    node_mode: SpliceMode,
    policy: PolicyConfig,
    decisions: Arc<Decisions>,
    /// Names the watched pairs (see [`SpliceWatcher::watch_tagged`]).
    tags: AtomicU64,
    /// What a handover needs to know of each watched pair, by tag.
    live: Arc<Mutex<HashMap<u64, Accounted>>>,
    /// Pairs offered to a successor that never answered: it may hold them, so they are
    /// neither watched nor unspliced here, only kept open until this process exits.
    limbo: Mutex<Vec<DetachedPair>>,
    /// Set when userspace relays are to stop at a clean point and go to a successor.
    relay_handover: tokio::sync::watch::Sender<bool>,
    /// Where they go (the handover channel's forwarder), while it takes them.
    relay_sink: Mutex<Option<RelaySink>>,
}

/// A userspace-relayed stream on its way to the successor: both sockets, what it
/// counts against, and the bytes read from each side not yet written to the other.
pub(crate) struct RelayHandoff {
    /// Client (A) and replica (B) sockets, deregistered from this process's reactor.
    pub(crate) legs: [std::net::TcpStream; 2],
    /// Server and replica ids.
    pub(crate) who: (String, String),
    /// Bytes written each way so far (client → replica, replica → client).
    pub(crate) moved: (u64, u64),
    /// Whether the adaptive policy may still splice it.
    pub(crate) auto: bool,
    /// Read from the client, not yet written to the replica; and the reverse.
    pub(crate) pending: [Vec<u8>; 2],
    /// The forwarder's answer: `None` when the successor holds it (or may), the handoff
    /// back when it refused, to relay on here.
    pub(crate) reply: tokio::sync::oneshot::Sender<Option<Box<RelayHandoff>>>,
}

/// Takes a [`RelayHandoff`] (without blocking), or gives it back.
pub(crate) type RelaySink =
    Arc<dyn Fn(Box<RelayHandoff>) -> Result<(), Box<RelayHandoff>> + Send + Sync>;

/// Whom a spliced pair counts against.
#[derive(Clone)]
struct Accounted {
    server: String,
    replica: String,
    /// Bytes userspace moved each way before the splice.
    moved: (u64, u64),
}

/// What a handover of spliced pairs did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    /// Pairs the new process now holds.
    pub handed: usize,
    /// Pairs that stay here and drain (refused, or the channel failed).
    pub kept: usize,
    /// The channel failed: nothing more is offered over it.
    pub broken: bool,
}

impl KernelSplice {
    /// Starts the close watcher over the shared data plane. `config` is the node's
    /// `[splice]` section: its `mode` is the default for servers at `auto` (`never`
    /// turns splicing off) and its thresholds tune the `auto` policy.
    pub fn new(
        dp: Arc<Mutex<Dataplane>>,
        config: SpliceConfig,
        decisions: Arc<Decisions>,
    ) -> Result<KernelSplice, sluice_dataplane::DataplaneError> {
        let watcher = SpliceWatcher::spawn(dp.clone())?;
        Ok(KernelSplice {
            inner: Arc::new(Inner {
                dp,
                watcher,
                warned: AtomicBool::new(false),
                node_mode: config.mode,
                policy: config.policy(),
                decisions,
                tags: AtomicU64::new(1),
                live: Arc::default(),
                limbo: Mutex::default(),
                relay_handover: tokio::sync::watch::Sender::new(false),
                relay_sink: Mutex::default(),
            }),
        })
    }
}

impl OpaqueStreamHandoff for KernelSplice {
    fn relay(&self, stream: OpaqueStream) -> BoxFuture<'static, io::Result<(u64, u64)>> {
        let this = self.inner.clone();
        Box::pin(async move {
            let OpaqueStream { client, upstream, server, replica, splice, .. } = stream;
            let who = (server.clone(), replica.clone());
            let mode = effective_mode(this.node_mode, splice);
            match (into_tcp(client), into_tcp(upstream)) {
                (Ok((mut c, c_buf)), Ok((mut u, u_buf))) => {
                    // Flush what userspace already read past the upgrade, each to the
                    // other side, before anything else: those bytes come first.
                    u.write_all(&c_buf).await?;
                    c.write_all(&u_buf).await?;
                    let pre = (c_buf.len() as u64, u_buf.len() as u64);
                    match mode {
                        SpliceMode::Never => {
                            this.decide(Decision::Never, &server, &replica);
                            this.relay_userspace(c, u, false, pre, who).await
                        }
                        SpliceMode::Always => this.splice(c, u, pre, Decision::Always, who).await,
                        SpliceMode::Auto => this.relay_userspace(c, u, true, pre, who).await,
                    }
                }
                // A TLS or HTTP/2 client leg: userspace, with the replica side raw.
                (Err(c), Ok((mut u, u_buf))) => {
                    this.decide(Decision::NotPlaintext, &server, &replica);
                    let mut c = TokioIo::new(c);
                    c.write_all(&u_buf).await?;
                    let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut u).await?;
                    Ok((up, down + u_buf.len() as u64))
                }
                (Ok((mut c, c_buf)), Err(u)) => {
                    this.decide(Decision::NotPlaintext, &server, &replica);
                    let mut u = TokioIo::new(u);
                    u.write_all(&c_buf).await?;
                    let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut u).await?;
                    Ok((up + c_buf.len() as u64, down))
                }
                (Err(c), Err(u)) => {
                    this.decide(Decision::NotPlaintext, &server, &replica);
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    tokio::io::copy_bidirectional(&mut c, &mut u).await
                }
            }
        })
    }
}

impl Inner {
    fn decide(&self, d: Decision, server: &str, replica: &str) {
        debug!(%server, %replica, decision = d.label(), "splice policy decision");
        self.decisions.count(d);
    }

    /// Hands both sockets to the kernel (nothing may be buffered in userspace) and
    /// waits for the pair to end; `pre` is what userspace already moved each way.
    async fn splice(
        &self,
        c: TcpStream,
        u: TcpStream,
        pre: (u64, u64),
        decision: Decision,
        (server, replica): (String, String),
    ) -> io::Result<(u64, u64)> {
        let (c_std, u_std) = (c.into_std()?, u.into_std()?);
        let spliced = self
            .dp
            .lock()
            .map_err(|_| io::Error::other("data plane lock poisoned"))?
            .splice(&c_std, &u_std);
        match spliced {
            Ok(pair) => {
                self.decisions.count(decision);
                debug!(decision = decision.label(), "opaque stream spliced in the kernel");
                let (tx, rx) = tokio::sync::oneshot::channel();
                let tag = self.tags.fetch_add(1, Ordering::Relaxed);
                self.lock_live().insert(tag, Accounted { server, replica, moved: pre });
                let live = self.live.clone();
                self.watcher.watch_tagged(
                    tag,
                    pair,
                    OwnedFd::from(c_std),
                    OwnedFd::from(u_std),
                    Box::new(move |end| {
                        forget(&live, tag);
                        let _ = tx.send(end);
                    }),
                );
                let end = rx.await.map_err(|_| io::Error::other("splice watcher stopped"))?;
                Ok((end.a_to_b + pre.0, end.b_to_a + pre.1))
            }
            Err(e) => {
                self.decisions.count(Decision::Failed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "kernel splice failed; relaying opaque streams in userspace");
                }
                let mut c = TcpStream::from_std(c_std)?;
                let mut u = TcpStream::from_std(u_std)?;
                let (up, down, _) = relay_loop(&mut c, &mut u, None, None).await?;
                Ok((up + pre.0, down + pre.1))
            }
        }
    }

    /// Relays a plaintext pair in userspace (`auto`: watched by the adaptive policy,
    /// which may splice it) until it closes, is spliced, or is handed to a successor
    /// at a clean point (see [`KernelSplice::hand_over_relays`]). `pre`: bytes moved
    /// each way already.
    async fn relay_userspace(
        &self,
        mut c: TcpStream,
        mut u: TcpStream,
        auto: bool,
        pre: (u64, u64),
        who: (String, String),
    ) -> io::Result<(u64, u64)> {
        let mut observer = auto.then(|| Observer::new(self.policy));
        let mut handover = Some(self.relay_handover.subscribe());
        let mut moved = pre;
        loop {
            let (up, down, stop) =
                relay_loop(&mut c, &mut u, observer.as_mut(), handover.as_mut()).await?;
            moved = (moved.0 + up, moved.1 + down);
            let (server, replica) = (&who.0, &who.1);
            match stop {
                Stop::Closed => {
                    if let Some(o) = &observer {
                        debug!(
                            %server, %replica, up = moved.0, down = moved.1,
                            bulk_windows = o.bulk_windows(), window = ?o.last_window(),
                            "splice policy: stream ended in userspace"
                        );
                        self.decisions.count(Decision::AutoUserspace);
                    }
                    return Ok(moved);
                }
                Stop::Splice => {
                    if let Some(o) = &observer {
                        debug!(
                            %server, %replica, up = moved.0, down = moved.1,
                            bulk_windows = o.bulk_windows(), window = ?o.last_window(),
                            "splice policy: stream looks latency-bound; splicing"
                        );
                    }
                    return self.splice(c, u, moved, Decision::AutoSpliced, who).await;
                }
                Stop::HandOver(pending) => {
                    // What was read and not yet written is the successor's to write.
                    let written =
                        (moved.0 - pending[0].len() as u64, moved.1 - pending[1].len() as u64);
                    let back = self.offer_relay(c, u, pending, written, auto, who.clone()).await?;
                    let Some(back) = back else {
                        debug!(%server, %replica, "userspace-relayed stream handed over");
                        return Ok(written);
                    };
                    // Refused: relay on here, its unwritten bytes first, and do not ask
                    // again.
                    let [c_std, u_std] = back.legs;
                    (c, u) = (TcpStream::from_std(c_std)?, TcpStream::from_std(u_std)?);
                    u.write_all(&back.pending[0]).await?;
                    c.write_all(&back.pending[1]).await?;
                    handover = None;
                }
            }
        }
    }

    /// Gives a relay stopped at a clean point to the successor; the pair back when it
    /// is not taken.
    async fn offer_relay(
        &self,
        c: TcpStream,
        u: TcpStream,
        pending: [Vec<u8>; 2],
        moved: (u64, u64),
        auto: bool,
        who: (String, String),
    ) -> io::Result<Option<Box<RelayHandoff>>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let legs = [c.into_std()?, u.into_std()?];
        let handoff = Box::new(RelayHandoff { legs, who, moved, auto, pending, reply });
        let sink =
            self.relay_sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let Some(sink) = sink else { return Ok(Some(handoff)) };
        if let Err(back) = sink(handoff) {
            return Ok(Some(back));
        }
        // A forwarder gone without answering may have sent it: not ours any more.
        Ok(answer.await.unwrap_or(None))
    }
}

impl Inner {
    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Accounted>> {
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn forget(live: &Mutex<HashMap<u64, Accounted>>, tag: u64) {
    live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&tag);
}

impl KernelSplice {
    /// The old process's side of a handover: from now on every plaintext stream relayed
    /// in userspace (`never`, or `auto` not yet spliced) stops at its next clean point
    /// (both directions open) and goes to `sink` with its unwritten bytes; one the
    /// successor refuses is relayed on here.
    pub(crate) fn hand_over_relays(&self, sink: RelaySink) {
        *self.inner.relay_sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(sink);
        self.inner.relay_handover.send_replace(true);
    }

    /// The new process's side: relays a stream the old process relayed in userspace,
    /// writing the bytes it had read and not written first, and counts it in flight and
    /// open like one this process upgraded.
    pub(crate) fn adopt_relay(
        &self,
        offer: &RelayOffer,
        fds: Vec<OwnedFd>,
        table: &RoutingTable,
        metrics: &Arc<Metrics>,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), String> {
        let [a, b]: [OwnedFd; 2] =
            fds.try_into().map_err(|v: Vec<_>| format!("{} descriptors, not 2", v.len()))?;
        let up = channel::unhex(&offer.up).ok_or("malformed pending bytes")?;
        let down = channel::unhex(&offer.down).ok_or("malformed pending bytes")?;
        let legs = [std::net::TcpStream::from(a), std::net::TcpStream::from(b)];
        let _rt = rt.enter();
        let mut sockets = Vec::with_capacity(2);
        for leg in legs {
            leg.set_nonblocking(true).map_err(|e| e.to_string())?;
            sockets.push(TcpStream::from_std(leg).map_err(|e| e.to_string())?);
        }
        let (Some(mut u), Some(mut c)) = (sockets.pop(), sockets.pop()) else {
            return Err("two sockets expected".to_owned());
        };
        let guard = count_in_flight(table, &offer.server, &offer.replica);
        if guard.is_none() {
            warn!(server = %offer.server, "adopted a relayed stream of a server this process does not route");
        }
        metrics.opaque_streams_open.inc();
        let (this, metrics) = (self.inner.clone(), metrics.clone());
        let (who, moved, auto) =
            ((offer.server.clone(), offer.replica.clone()), offer.moved, offer.auto);
        rt.spawn(async move {
            let relayed = async {
                u.write_all(&up).await?;
                c.write_all(&down).await?;
                let pre = (moved.0 + up.len() as u64, moved.1 + down.len() as u64);
                this.relay_userspace(c, u, auto, pre, who).await
            };
            match relayed.await {
                Ok((up, down)) => debug!(up, down, "adopted relayed stream closed"),
                Err(e) => debug!(error = %e, "adopted relayed stream failed"),
            }
            drop(guard);
            metrics.opaque_streams_open.dec();
        });
        Ok(())
    }

    /// The kernel id of the splice sockhash this process uses, for the handover hello.
    pub fn map_id(&self) -> Option<u32> {
        self.inner.dp.lock().ok()?.splice_map_id().ok()
    }

    /// The old process's side of a handover (blocking): offers every spliced pair
    /// whose both directions are open to the new process, one at a time, and closes its
    /// copies of a pair's sockets once the new process has acknowledged it. A pair the
    /// new process refuses goes back to this process's watcher and drains here. The
    /// caller says [`Msg::Done`] once it has offered everything else too.
    pub fn export(&self, ch: &Channel) -> Exported {
        let inner = &self.inner;
        let mut out = Exported::default();
        let mut broken = false;
        for d in inner.watcher.detach_open() {
            let accounted = inner.lock_live().get(&d.tag).cloned();
            let Some(acc) = accounted.filter(|_| !broken) else {
                self.rewatch(d);
                out.kept += 1;
                continue;
            };
            let offer = SpliceOffer {
                tag: d.tag,
                server: acc.server,
                replica: acc.replica,
                written_before: d.pair.written_before(),
                moved: acc.moved,
            };
            if let Err(e) = ch.send(&Msg::Splice(offer), &[d.legs[0].as_fd(), d.legs[1].as_fd()]) {
                warn!(error = %e, "handover: offering a spliced pair failed; it drains here");
                broken = true;
                self.rewatch(d);
                out.kept += 1;
                continue;
            }
            match ch.recv() {
                Ok((Msg::Ack { tag, adopted: true, .. }, _)) if tag == d.tag => {
                    self.handed_over(d);
                    out.handed += 1;
                }
                Ok((Msg::Ack { tag, adopted: false, error }, _)) if tag == d.tag => {
                    warn!(error = ?error, "handover: the new process refused a spliced pair");
                    self.rewatch(d);
                    out.kept += 1;
                }
                other => {
                    // It has the sockets and may be watching them: unsplicing or
                    // closing them here could cut its stream, so they wait for exit.
                    warn!(answer = ?other.map(|(m, _)| m), "handover: no clear answer");
                    broken = true;
                    inner.limbo.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(d);
                    out.kept += 1;
                }
            }
        }
        out.broken = broken;
        out
    }

    fn rewatch(&self, d: DetachedPair) {
        let [a, b] = d.legs;
        self.inner.watcher.watch_tagged(d.tag, d.pair, a, b, d.on_end);
    }

    /// The new process holds the pair: close this process's copies (the sockets stay
    /// open, and spliced, through the new process's) and end the stream here.
    fn handed_over(&self, d: DetachedPair) {
        let DetachedPair { tag, pair, legs, on_end } = d;
        let (a_to_b, b_to_a) = match self.inner.dp.lock() {
            Ok(dp) => (
                dp.spliced_bytes(&pair, Leg::A).unwrap_or(0),
                dp.spliced_bytes(&pair, Leg::B).unwrap_or(0),
            ),
            Err(_) => (0, 0),
        };
        drop(legs);
        forget(&self.inner.live, tag);
        debug!(a_to_b, b_to_a, "spliced stream handed over");
        on_end(SpliceEnd { a_to_b, b_to_a, clean: true });
    }

    /// The new process's side: takes a pair offered by the old process into this
    /// process's close watcher and in-flight accounting. The pair stays spliced
    /// throughout (both processes share the sockhash).
    pub fn adopt(
        &self,
        offer: &SpliceOffer,
        fds: Vec<OwnedFd>,
        table: &RoutingTable,
        metrics: &Arc<Metrics>,
    ) -> Result<(), String> {
        let [a, b]: [OwnedFd; 2] =
            fds.try_into().map_err(|v: Vec<_>| format!("{} descriptors, not 2", v.len()))?;
        let inner = &self.inner;
        let pair = inner
            .dp
            .lock()
            .map_err(|_| "data plane lock poisoned".to_owned())?
            .adopt_splice(&a, &b, offer.written_before)
            .map_err(|e| e.to_string())?;
        let guard = count_in_flight(table, &offer.server, &offer.replica);
        if guard.is_none() {
            warn!(server = %offer.server, "adopted a spliced stream of a server this process does not route");
        }
        metrics.opaque_streams_open.inc();
        let tag = inner.tags.fetch_add(1, Ordering::Relaxed);
        inner.lock_live().insert(
            tag,
            Accounted {
                server: offer.server.clone(),
                replica: offer.replica.clone(),
                moved: offer.moved,
            },
        );
        let (live, metrics) = (inner.live.clone(), metrics.clone());
        let moved = offer.moved;
        inner.watcher.watch_tagged(
            tag,
            pair,
            a,
            b,
            Box::new(move |end| {
                drop(guard);
                metrics.opaque_streams_open.dec();
                forget(&live, tag);
                debug!(
                    up = end.a_to_b + moved.0,
                    down = end.b_to_a + moved.1,
                    clean = end.clean,
                    "adopted spliced stream closed"
                );
            }),
        );
        Ok(())
    }
}

/// Counts an adopted stream in flight like one this process routed: against its
/// server and, when this process routes it too, its replica.
fn count_in_flight(table: &RoutingTable, server: &str, replica: &str) -> Option<InFlightGuard> {
    let snap = table.load_full();
    let s = snap.server(server)?;
    let stats = s.replicas.iter().find(|r| r.id == replica).map(|r| r.stats.clone());
    Some(InFlightGuard::new(s.stats.clone(), stats.unwrap_or_default()))
}

/// Logs what a handover of spliced pairs did.
pub fn log_export(e: Exported) {
    if e.handed + e.kept > 0 {
        info!(handed = e.handed, kept = e.kept, "spliced streams handed to the new process");
    }
}

/// One direction of the relay.
struct Dir {
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Read side saw EOF.
    eof: bool,
    /// EOF passed on (the other socket's write side shut).
    shut: bool,
    total: u64,
}

impl Dir {
    fn new() -> Self {
        Dir {
            buf: vec![0; RELAY_BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
            eof: false,
            shut: false,
            total: 0,
        }
    }

    fn empty(&self) -> bool {
        self.pos == self.len
    }

    /// Moves bytes `from` → `to` as far as the sockets allow. Ok(true) when progress
    /// was made; a read's size goes to `observe`.
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        mut observe: impl FnMut(usize),
    ) -> Poll<io::Result<bool>> {
        let mut progressed = false;
        while !self.empty() {
            match Pin::new(&mut *to).poll_write(cx, &self.buf[self.pos..self.len]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pos += n;
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.empty() && !self.eof {
            let mut rb = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                    } else {
                        (self.pos, self.len) = (0, n);
                        self.total += n as u64;
                        observe(n);
                    }
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if self.eof && self.empty() && !self.shut {
            // A peer already gone makes the shutdown fail: the half-close is moot then.
            let _ = ready!(Pin::new(&mut *to).poll_shutdown(cx));
            self.shut = true;
            progressed = true;
        }
        Poll::Ready(Ok(progressed))
    }
}

/// Why [`relay_loop`] returned.
enum Stop {
    /// Both directions closed.
    Closed,
    /// The observer wants it spliced, and nothing is buffered.
    Splice,
    /// A handover asked for it, both directions open: the bytes read and not yet
    /// written (client → replica, replica → client).
    HandOver([Vec<u8>; 2]),
}

/// Relays both directions until both are closed, or, with an observer, until it
/// judges the stream latency-bound and both directions are at a clean point, or, with
/// `handover`, once that is set and both directions are open. Returns bytes read
/// (client → replica, replica → client) and why it stopped.
async fn relay_loop(
    c: &mut TcpStream,
    u: &mut TcpStream,
    mut observer: Option<&mut Observer>,
    handover: Option<&mut tokio::sync::watch::Receiver<bool>>,
) -> io::Result<(u64, u64, Stop)> {
    let mut dirs = [Dir::new(), Dir::new()];
    let mut want_splice = false;
    let mut asked = false;
    let mut handover = std::pin::pin!(async move {
        let fired = match handover {
            Some(rx) => rx.wait_for(|h| *h).await.is_ok(),
            None => false,
        };
        if !fired {
            std::future::pending::<()>().await;
        }
    });
    poll_fn(|cx| {
        loop {
            let [up, down] = &mut dirs;
            // Polled until it fires, never after.
            if !asked && handover.as_mut().poll(cx).is_ready() {
                asked = true;
            }
            // A half-closed stream finishes here.
            if asked && !up.eof && !down.eof {
                let pending =
                    [up.buf[up.pos..up.len].to_vec(), down.buf[down.pos..down.len].to_vec()];
                return Poll::Ready(Ok((up.total, down.total, Stop::HandOver(pending))));
            }
            // A clean point: nothing buffered either way, every byte read written, and
            // both directions open (a half-closed stream is not worth the switch).
            if want_splice && up.empty() && down.empty() && !up.eof && !down.eof {
                return Poll::Ready(Ok((up.total, down.total, Stop::Splice)));
            }
            if up.shut && down.shut {
                return Poll::Ready(Ok((up.total, down.total, Stop::Closed)));
            }
            let mut saw = |dir: usize, n: usize| {
                if let Some(o) = observer.as_deref_mut()
                    && !want_splice
                    && o.observe(dir, n, Instant::now()) == Verdict::Splice
                {
                    want_splice = true;
                }
            };
            let a = up.poll_step(cx, c, u, |n| saw(0, n))?;
            let b = down.poll_step(cx, u, c, |n| saw(1, n))?;
            match (a, b) {
                (Poll::Ready(true), _) | (_, Poll::Ready(true)) => continue,
                _ => return Poll::Pending,
            }
        }
    })
    .await
}
