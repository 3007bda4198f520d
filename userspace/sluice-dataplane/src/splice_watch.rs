//! Watching spliced pairs for close, from one thread for all pairs.
//!
//! Each leg is registered with epoll for hang-up only (EPOLLRDHUP | EPOLLHUP |
//! EPOLLERR, edge-triggered), never for input: the kernel still signals "readable" on
//! a spliced socket for every skb it redirected away, and a read-interested watcher
//! would wake for each message while carrying nothing. A FIN on one leg is passed on
//! as a half-close of the other once the other has taken in every byte redirected to
//! it; a reset on either leg resets the other. When both directions are done the pair
//! is unspliced, both sockets are closed, and the owner is told how many bytes moved.
//!
//! For an upgrade, [`SpliceWatcher::detach_open`] gives back every pair whose both
//! directions are still open, without unsplicing it: its sockets can then go to the new
//! process, whose own watcher takes them over (registering a socket that already hung
//! up reports the hang-up at once, so no close is missed in between).

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use crate::{
    Dataplane, DataplaneError,
    splice::{Leg, SplicedPair},
};

/// How a spliced pair ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpliceEnd {
    /// Bytes the kernel moved from leg A to leg B.
    pub a_to_b: u64,
    /// Bytes the kernel moved from leg B to leg A.
    pub b_to_a: u64,
    /// False when a leg was reset, or a half-close could not wait for its bytes.
    pub clean: bool,
}

/// Called once when a pair has ended (e.g. to drop the stream's in-flight guard).
pub type OnSpliceEnd = Box<dyn FnOnce(SpliceEnd) + Send>;

struct Watched {
    /// The owner's name for the pair (see [`SpliceWatcher::watch`]).
    tag: u64,
    pair: SplicedPair,
    legs: [OwnedFd; 2],
    /// Direction finished: leg i's read side closed and passed on to the other leg.
    done: [bool; 2],
    /// Leg i read-closed; waiting (since) for the other leg to drain before passing it on.
    pending: [Option<Instant>; 2],
    clean: bool,
    on_end: Option<OnSpliceEnd>,
}

/// A pair taken back out of the watcher, still spliced (see
/// [`SpliceWatcher::detach_open`]).
pub struct DetachedPair {
    /// The tag it was watched under.
    pub tag: u64,
    /// The pair, as the kernel paths know it.
    pub pair: SplicedPair,
    /// Legs A and B.
    pub legs: [OwnedFd; 2],
    /// The owner's end callback, not yet called.
    pub on_end: OnSpliceEnd,
}

enum Cmd {
    Watch(Box<Watched>),
    Detach(mpsc::Sender<Vec<DetachedPair>>),
    Stop,
}

const WAKE_TOKEN: u64 = u64::MAX;
/// A half-close waits at most this long for its peer to take in redirected bytes.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The close watcher for spliced pairs.
pub struct SpliceWatcher {
    cmds: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
    wakeups: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn epoll_ctl(
    ep: &OwnedFd,
    op: libc::c_int,
    fd: &OwnedFd,
    events: u32,
    token: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: both descriptors are open for the duration of the call; `ev` is valid.
    cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) }).map(|_| ())
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2); the returned descriptor is owned exactly once.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn poke(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

fn shutdown_write(fd: &OwnedFd) {
    // SAFETY: shutdown(2) on an open socket descriptor.
    let _ = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// Makes the coming close send RST instead of FIN: a reset on one leg is a reset on
/// the other, so neither end mistakes an aborted stream for a complete one.
fn set_reset_on_close(fd: &OwnedFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a valid linger struct and its size.
    let _ = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

impl SpliceWatcher {
    /// Starts the watcher thread over a shared data plane.
    pub fn spawn(dataplane: Arc<Mutex<Dataplane>>) -> Result<SpliceWatcher, DataplaneError> {
        let io = |e| DataplaneError::io("starting the splice watcher", e);
        // SAFETY: plain epoll_create1(2); the descriptor is owned exactly once below.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map_err(io)?;
        // SAFETY: `ep` is a fresh descriptor nobody else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let wake = Arc::new(eventfd().map_err(io)?);
        epoll_ctl(&ep, libc::EPOLL_CTL_ADD, &wake, libc::EPOLLIN as u32, WAKE_TOKEN).map_err(io)?;
        let (cmds, rx) = mpsc::channel();
        let wakeups = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("sluice-splice".into())
            .spawn({
                let (wake, wakeups) = (wake.clone(), wakeups.clone());
                move || run(ep, wake, rx, dataplane, wakeups)
            })
            .map_err(io)?;
        Ok(SpliceWatcher { cmds, wake, wakeups, thread: Some(thread) })
    }

    /// Takes ownership of a spliced pair's sockets and watches them until both
    /// directions are closed; `on_end` runs on the watcher thread at the end.
    pub fn watch(&self, pair: SplicedPair, a: OwnedFd, b: OwnedFd, on_end: OnSpliceEnd) {
        self.watch_tagged(0, pair, a, b, on_end);
    }

    /// [`SpliceWatcher::watch`], naming the pair `tag` for the owner: the tag comes back
    /// with the pair from [`SpliceWatcher::detach_open`].
    pub fn watch_tagged(
        &self,
        tag: u64,
        pair: SplicedPair,
        a: OwnedFd,
        b: OwnedFd,
        on_end: OnSpliceEnd,
    ) {
        let w = Watched {
            tag,
            pair,
            legs: [a, b],
            done: [false; 2],
            pending: [None; 2],
            clean: true,
            on_end: Some(on_end),
        };
        if self.cmds.send(Cmd::Watch(Box::new(w))).is_ok() {
            poke(&self.wake);
        }
    }

    /// Stops watching every pair whose both directions are still open and returns them,
    /// still spliced and with their end callbacks not called: the caller now owns them
    /// (to hand them to another process, or to [`SpliceWatcher::watch`] them again).
    /// Pairs already half-closed stay and finish here.
    pub fn detach_open(&self) -> Vec<DetachedPair> {
        let (tx, rx) = mpsc::channel();
        if self.cmds.send(Cmd::Detach(tx)).is_err() {
            return Vec::new();
        }
        poke(&self.wake);
        rx.recv().unwrap_or_default()
    }

    /// How many times the watcher thread woke up (for tests and metrics: it should
    /// wake per close, never per message).
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

impl Drop for SpliceWatcher {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        poke(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    ep: OwnedFd,
    wake: Arc<OwnedFd>,
    cmds: mpsc::Receiver<Cmd>,
    dp: Arc<Mutex<Dataplane>>,
    wakeups: Arc<AtomicU64>,
) {
    let mut pairs: HashMap<u64, Watched> = HashMap::new();
    let mut next_id: u64 = 0;
    // Tokens of the pairs' legs: pair id * 2 + leg (below the wake token).
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let interest = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLET) as u32;
    loop {
        let waiting = pairs.values().any(|w| w.pending.iter().any(Option::is_some));
        let timeout = if waiting { 1 } else { -1 };
        // SAFETY: `events` is a valid buffer of the given length for the call.
        let n = unsafe {
            libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout)
        };
        wakeups.fetch_add(1, Ordering::Relaxed);
        let n = match cvt(n) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!(error = %e, "splice watcher: epoll_wait failed; stopping");
                return;
            }
        };
        for ev in &events[..n] {
            let (token, flags) = (ev.u64, ev.events);
            if token == WAKE_TOKEN {
                drain_eventfd(&wake);
                while let Ok(cmd) = cmds.try_recv() {
                    match cmd {
                        Cmd::Stop => {
                            for (_, w) in pairs.drain() {
                                finish(w, &dp, false);
                            }
                            return;
                        }
                        Cmd::Detach(reply) => {
                            let open: Vec<u64> = pairs
                                .iter()
                                .filter(|(_, w)| w.done == [false; 2] && w.pending == [None; 2])
                                .map(|(id, _)| *id)
                                .collect();
                            let mut out = Vec::with_capacity(open.len());
                            for id in open {
                                let Some(mut w) = pairs.remove(&id) else { continue };
                                for leg in &w.legs {
                                    let _ = epoll_ctl(&ep, libc::EPOLL_CTL_DEL, leg, 0, 0);
                                }
                                let Some(on_end) = w.on_end.take() else { continue };
                                out.push(DetachedPair {
                                    tag: w.tag,
                                    pair: w.pair,
                                    legs: w.legs,
                                    on_end,
                                });
                            }
                            let _ = reply.send(out);
                        }
                        Cmd::Watch(w) => {
                            let id = next_id;
                            next_id += 1;
                            let ok =
                                epoll_ctl(&ep, libc::EPOLL_CTL_ADD, &w.legs[0], interest, id * 2)
                                    .is_ok()
                                    && epoll_ctl(
                                        &ep,
                                        libc::EPOLL_CTL_ADD,
                                        &w.legs[1],
                                        interest,
                                        id * 2 + 1,
                                    )
                                    .is_ok();
                            if ok {
                                pairs.insert(id, *w);
                            } else {
                                finish(*w, &dp, false);
                            }
                        }
                    }
                }
                continue;
            }
            let (id, leg) = (token / 2, (token % 2) as usize);
            let Some(w) = pairs.get_mut(&id) else { continue };
            if flags & libc::EPOLLERR as u32 != 0 {
                // A reset: pass it on and end the pair now.
                w.clean = false;
                set_reset_on_close(&w.legs[1 - leg]);
                w.done = [true; 2];
            } else if !w.done[leg] && w.pending[leg].is_none() {
                w.pending[leg] = Some(Instant::now());
            }
        }
        // Pass on half-closes whose bytes have all reached the other leg.
        let mut ended = Vec::new();
        for (id, w) in pairs.iter_mut() {
            for leg in 0..2 {
                let Some(since) = w.pending[leg] else { continue };
                let from = if leg == 0 { Leg::A } else { Leg::B };
                let drained = match dp.lock() {
                    Ok(dp) => dp.splice_drained(&w.pair, from, &w.legs[1 - leg]).unwrap_or(true),
                    Err(_) => true,
                };
                let expired = since.elapsed() >= DRAIN_LIMIT;
                if drained || expired {
                    if expired && !drained {
                        warn!(
                            "splice: peer did not take in redirected bytes in time; closing anyway"
                        );
                        w.clean = false;
                    }
                    shutdown_write(&w.legs[1 - leg]);
                    w.pending[leg] = None;
                    w.done[leg] = true;
                }
            }
            if w.done == [true; 2] {
                ended.push(*id);
            }
        }
        for id in ended {
            if let Some(w) = pairs.remove(&id) {
                let _ = epoll_ctl(&ep, libc::EPOLL_CTL_DEL, &w.legs[0], 0, 0);
                let _ = epoll_ctl(&ep, libc::EPOLL_CTL_DEL, &w.legs[1], 0, 0);
                let clean = w.clean;
                finish(w, &dp, clean);
            }
        }
    }
}

fn finish(mut w: Watched, dp: &Arc<Mutex<Dataplane>>, clean: bool) {
    let (a_to_b, b_to_a) = match dp.lock() {
        Ok(mut dp) => {
            let counts = (
                dp.spliced_bytes(&w.pair, Leg::A).unwrap_or(0),
                dp.spliced_bytes(&w.pair, Leg::B).unwrap_or(0),
            );
            if let Err(e) = dp.unsplice(w.pair) {
                warn!(error = %e, "splice: removing a finished pair failed");
            }
            counts
        }
        Err(_) => (0, 0),
    };
    debug!(a_to_b, b_to_a, clean, "spliced stream ended");
    // Closing both legs happens when `w` drops, after the owner hears the outcome.
    if let Some(f) = w.on_end.take() {
        f(SpliceEnd { a_to_b, b_to_a, clean });
    }
}
