//! Idle HTTP/1.1 keep-alive connections on the fast path: one sweep per proxy closes
//! those left quiet for `timeouts.connection_idle`, or for [`H1_DRAIN_IDLE`] once the
//! drain has started.
//!
//! Why not a timer per connection: a tokio `Sleep` (112 bytes) and a drain receiver's
//! `changed()` future held in every idle connection's task made that task 1.2 KiB, most of
//! an idle connection's cost. Here an idle connection holds an [`IdleSlot`] (48 bytes,
//! shared with the sweep) and waits only on its socket's readiness and the slot's waker;
//! the sweep wakes the connections it expires. Going idle costs a store of a coarse
//! timestamp, with no timer-wheel insert or removal per request.
//!
//! Precision: a connection is never closed before its limit, and at most two sweep ticks
//! (an eighth of the limit each, at most a second) after it.
//!
//! During an upgrade's handover ([`crate::handover`]) the sweep wakes every idle
//! connection to be passed to the new process instead ([`IdleSweep::hand_over`]), and
//! keeps doing so for connections that go idle later, until the process exits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::server::H1_DRAIN_IDLE;

/// [`IdleSlot::since`] while the connection is serving a request.
const BUSY: u64 = u64::MAX;
/// [`IdleSlot::since`] once the sweep has expired the connection.
const EXPIRED: u64 = u64::MAX - 1;
/// [`IdleSlot::since`] once the sweep has asked the connection to be handed over.
const HANDOVER: u64 = u64::MAX - 2;

/// One idle-capable connection's entry, shared by the connection and the sweep.
pub(crate) struct IdleSlot {
    /// The sweep's clock (ms) when the connection went idle, [`BUSY`] or [`EXPIRED`].
    since: AtomicU64,
    waker: AtomicWaker,
}

impl IdleSlot {
    /// The connection waits for its next request from now on.
    pub(crate) fn enter(&self, sweep: &IdleSweep) {
        self.since.store(sweep.now_ms.load(Ordering::Relaxed), Ordering::Release);
    }

    /// The connection has a request to serve; a racing expiry is overruled (a request
    /// that has arrived is served, as it would be over a timer).
    pub(crate) fn leave(&self) {
        self.since.store(BUSY, Ordering::Relaxed);
    }

    /// Whether the sweep has expired this idle connection or asked for it to be handed
    /// over; registers `cx` to be woken when it does.
    pub(crate) fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        match self.since.load(Ordering::Acquire) {
            EXPIRED | HANDOVER => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }

    /// Moves an idle slot to `to` and wakes its connection; `false` if it was not idle
    /// as `since` (a request arrived, or the sweep got there first).
    fn wake_as(&self, since: u64, to: u64) -> bool {
        let moved =
            self.since.compare_exchange(since, to, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if moved {
            self.waker.wake();
        }
        moved
    }
}

/// The proxy's idle connections and the clock they are stamped with.
pub(crate) struct IdleSweep {
    /// Every fast-path connection that has gone idle at least once and may still be open
    /// (the sweep drops entries whose connection has closed).
    slots: Mutex<Vec<Arc<IdleSlot>>>,
    /// Milliseconds since `epoch`, as of the last tick: a connection stamps this, so a
    /// stamp is at most one tick early.
    now_ms: AtomicU64,
    epoch: Instant,
    idle: Duration,
    draining: AtomicBool,
    drain_started: Notify,
    /// Idle connections are handed to the new process instead of waiting.
    handing_over: AtomicBool,
    /// Where they go, and how this process adopts its predecessor's.
    pub(crate) handover: crate::handover::IdleHandover,
}

impl crate::proxy::ProxyState {
    /// Whether a fast-path response retires its keep-alive connection (`connection:
    /// close`): while draining, unless idle connections are being handed over, when the
    /// connection instead goes idle and moves to the new process between requests. One
    /// with its next request already read (`pipelined`) would not go idle after this
    /// answer, so it is retired as in a drain: a client that always pipelines ends cleanly
    /// instead of at the drain deadline.
    pub(crate) fn closes_keepalive(&self, pipelined: bool) -> bool {
        self.draining.load(Ordering::Relaxed) && (pipelined || !self.idle.handing_over())
    }
}

impl IdleSweep {
    /// A sweep closing connections idle for `idle`, handing them over through
    /// `handover` once asked to.
    pub(crate) fn new(idle: Duration, handover: crate::handover::IdleHandover) -> Self {
        Self {
            handing_over: AtomicBool::new(false),
            handover,
            slots: Mutex::new(Vec::new()),
            now_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            idle,
            draining: AtomicBool::new(false),
            drain_started: Notify::new(),
        }
    }

    /// A slot for a connection going idle for the first time.
    pub(crate) fn register(&self) -> Arc<IdleSlot> {
        let slot = Arc::new(IdleSlot { since: AtomicU64::new(BUSY), waker: AtomicWaker::new() });
        // Once per connection, never per request; the sweep holds it once per tick.
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).push(slot.clone());
        slot
    }

    /// From now on idle connections close after [`H1_DRAIN_IDLE`] of quiet.
    pub(crate) fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_started.notify_one();
    }

    /// From now on idle connections are handed over (see [`crate::handover`]): every one
    /// idle now is woken, and one going idle later is handed over at once.
    pub(crate) fn hand_over(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for slot in slots.iter() {
            let since = slot.since.load(Ordering::Acquire);
            if since < HANDOVER {
                slot.wake_as(since, HANDOVER);
            }
        }
    }

    /// Whether idle connections are handed over instead of waiting.
    pub(crate) fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// Runs the sweep until the task is aborted.
    pub(crate) async fn run(&self) {
        let mut drain_from = None;
        loop {
            let limit = if drain_from.is_some() { H1_DRAIN_IDLE } else { self.idle };
            let tick = (limit / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = self.drain_started.notified(), if drain_from.is_none() => {}
            }
            let now = self.clock();
            self.now_ms.store(now, Ordering::Relaxed);
            if drain_from.is_none() && self.draining.load(Ordering::Relaxed) {
                drain_from = Some(now);
                // Re-evaluate at once with the drain's limit and tick.
                continue;
            }
            self.expire(now, drain_from, limit, tick);
        }
    }

    fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }

    /// Expires the connections quiet for `limit` as of `now`; drops closed ones' slots.
    fn expire(&self, now: u64, drain_from: Option<u64>, limit: Duration, tick: Duration) {
        // A stamp is up to one tick early (the clock it reads advances once per tick), so
        // the tick is added: nothing closes before its limit.
        let quiet_ms = u64::try_from((limit + tick).as_millis()).unwrap_or(u64::MAX / 2);
        // The backstop for a connection that went idle as the handover began (it checks
        // the flag, the handover wakes slots; each tick catches one that slipped between).
        let handing_over = self.handing_over();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|slot| {
            if Arc::strong_count(slot) == 1 {
                return false;
            }
            let since = slot.since.load(Ordering::Acquire);
            // Busy, expired or being handed over already.
            if since >= HANDOVER {
                return true;
            }
            if handing_over {
                slot.wake_as(since, HANDOVER);
                return true;
            }
            // Quiet since it went idle, or since the drain began if that was later.
            let from = drain_from.map_or(since, |d| d.max(since));
            if now.saturating_sub(from) >= quiet_ms {
                slot.wake_as(since, EXPIRED);
            }
            true
        });
        // A burst of connections that has gone leaves its capacity behind otherwise.
        if slots.capacity() > 64 && slots.len() < slots.capacity() / 4 {
            let keep = slots.len() * 2;
            slots.shrink_to(keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(slot: &IdleSlot) -> Poll<()> {
        let waker = futures_util::task::noop_waker();
        slot.poll_expired(&mut Context::from_waker(&waker))
    }

    #[test]
    fn expires_only_after_the_limit_and_only_idle_slots() {
        let sweep = IdleSweep::new(Duration::from_secs(2), Default::default());
        let tick = Duration::from_millis(250);
        let (idle, busy) = (sweep.register(), sweep.register());
        sweep.now_ms.store(1_000, Ordering::Relaxed);
        idle.enter(&sweep);
        sweep.expire(3_000, None, Duration::from_secs(2), tick);
        assert!(poll(&idle).is_pending(), "limit plus a tick not reached");
        sweep.expire(3_250, None, Duration::from_secs(2), tick);
        assert!(poll(&idle).is_ready());
        assert!(poll(&busy).is_pending(), "a busy connection never expires");
    }

    #[test]
    fn drain_counts_quiet_from_its_start_and_closed_slots_are_dropped() {
        let sweep = IdleSweep::new(Duration::from_secs(120), Default::default());
        let tick = Duration::from_millis(62);
        let slot = sweep.register();
        slot.enter(&sweep);
        let gone = sweep.register();
        drop(gone);
        sweep.expire(10_000, Some(9_800), H1_DRAIN_IDLE, tick);
        assert!(poll(&slot).is_pending(), "quiet 200 ms since the drain began");
        sweep.expire(10_400, Some(9_800), H1_DRAIN_IDLE, tick);
        assert!(poll(&slot).is_ready());
        assert_eq!(sweep.slots.lock().unwrap().len(), 1);
        // A request that arrived races the expiry and wins; the next idle spell is new.
        slot.leave();
        sweep.now_ms.store(10_400, Ordering::Relaxed);
        slot.enter(&sweep);
        assert!(poll(&slot).is_pending());
    }

    #[test]
    fn a_handover_wakes_idle_slots_now_and_later_ones_at_the_next_tick() {
        let sweep = IdleSweep::new(Duration::from_secs(120), Default::default());
        let tick = Duration::from_millis(250);
        let (idle, busy) = (sweep.register(), sweep.register());
        idle.enter(&sweep);
        sweep.hand_over();
        assert!(sweep.handing_over());
        assert!(poll(&idle).is_ready(), "an idle connection is woken at once");
        assert!(poll(&busy).is_pending(), "a busy one finishes its request first");
        // It goes idle after the handover began (and missed the flag): the tick catches it.
        busy.enter(&sweep);
        sweep.expire(1_000, None, Duration::from_secs(120), tick);
        assert!(poll(&busy).is_ready());
    }
}
