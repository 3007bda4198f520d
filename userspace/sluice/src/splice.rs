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

use std::{
    future::poll_fn,
    io,
    os::fd::OwnedFd,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use futures_util::future::BoxFuture;
use hyper_util::rt::TokioIo;
use sluice_dataplane::{Dataplane, SpliceWatcher};
use sluice_proxy::{OpaqueStream, OpaqueStreamHandoff, into_tcp};
use sluice_routing::SpliceMode;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, warn};

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
            }),
        })
    }
}

impl OpaqueStreamHandoff for KernelSplice {
    fn relay(&self, stream: OpaqueStream) -> BoxFuture<'static, io::Result<(u64, u64)>> {
        let this = self.inner.clone();
        Box::pin(async move {
            let OpaqueStream { client, upstream, server, replica, splice, .. } = stream;
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
                            let (up, down, _) = relay_loop(&mut c, &mut u, None).await?;
                            Ok((up + pre.0, down + pre.1))
                        }
                        SpliceMode::Always => this.splice(c, u, pre, Decision::Always).await,
                        SpliceMode::Auto => {
                            let mut observer = Observer::new(this.policy);
                            let (up, down, switch) =
                                relay_loop(&mut c, &mut u, Some(&mut observer)).await?;
                            let moved = (pre.0 + up, pre.1 + down);
                            if switch {
                                debug!(
                                    %server, %replica, up = moved.0, down = moved.1,
                                    bulk_windows = observer.bulk_windows(),
                                    window = ?observer.last_window(),
                                    "splice policy: stream looks latency-bound; splicing"
                                );
                                this.splice(c, u, moved, Decision::AutoSpliced).await
                            } else {
                                debug!(
                                    %server, %replica, up = moved.0, down = moved.1,
                                    bulk_windows = observer.bulk_windows(),
                                    window = ?observer.last_window(),
                                    "splice policy: stream ended in userspace"
                                );
                                this.decisions.count(Decision::AutoUserspace);
                                Ok(moved)
                            }
                        }
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
                self.watcher.watch(
                    pair,
                    OwnedFd::from(c_std),
                    OwnedFd::from(u_std),
                    Box::new(move |end| {
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
                let (up, down, _) = relay_loop(&mut c, &mut u, None).await?;
                Ok((up + pre.0, down + pre.1))
            }
        }
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

/// Relays both directions until both are closed, or, with an observer, until it
/// judges the stream latency-bound and both directions are at a clean point. Returns
/// bytes moved (client → replica, replica → client) and whether to splice now.
async fn relay_loop(
    c: &mut TcpStream,
    u: &mut TcpStream,
    mut observer: Option<&mut Observer>,
) -> io::Result<(u64, u64, bool)> {
    let mut dirs = [Dir::new(), Dir::new()];
    let mut want_splice = false;
    poll_fn(|cx| {
        loop {
            let [up, down] = &mut dirs;
            // A clean point: nothing buffered either way, every byte read written, and
            // both directions open (a half-closed stream is not worth the switch).
            if want_splice && up.empty() && down.empty() && !up.eof && !down.eof {
                return Poll::Ready(Ok((up.total, down.total, true)));
            }
            if up.shut && down.shut {
                return Poll::Ready(Ok((up.total, down.total, false)));
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
