//! Idle HTTP/1.1 keep-alive connections and userspace-relayed streams over the
//! handover channel: the old process's forwarder (the proxy's [`IdleSink`], and the
//! kernel splice's relay sink) and the new process's adoption of idle connections.
//!
//! A relayed stream the new process refuses goes back to its relay here; one whose
//! answer never came is closed here (it may be relayed there: two relays of one socket
//! would interleave its bytes).
//!
//! The forwarder runs on its own thread, since the channel is blocking: the proxy queues
//! each connection as it goes idle and the thread offers them one at a time. This
//! process's copy of a socket is closed once the offer is answered either way: the new
//! process then holds its own (the socket stays open) or has refused it (it closes, as
//! the drain would have closed an idle connection).

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
};

use sluice_proxy::handover::{IdleConnection, IdleHandover, IdleSink};
use tracing::{info, warn};

use super::channel::{Channel, IdleOffer, Msg, RelayOffer, hex};
use crate::splice::{RelayHandoff, RelaySink};

/// What the forwarder offers.
enum Offer {
    Idle(IdleConnection),
    Relay(Box<RelayHandoff>),
}

/// The old process's forwarder of idle connections, until [`Forwarder::stop`].
pub(super) struct Forwarder {
    sink: Arc<Sink>,
    thread: JoinHandle<()>,
}

struct Sink {
    tx: Mutex<Option<mpsc::Sender<Offer>>>,
}

impl Sink {
    /// The forwarder's queue, while it takes offers.
    fn queue(&self) -> Option<mpsc::Sender<Offer>> {
        self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Queues `offer`; the queue outlives every sender unless its thread died, and what it
/// then drops is closed (a relay's stream is cut, as at the drain deadline).
fn enqueue(tx: &mpsc::Sender<Offer>, offer: Offer) {
    if tx.send(offer).is_err() {
        warn!("handover: the forwarder is gone; a connection is closed");
    }
}

impl IdleSink for Sink {
    fn hand_over(&self, conn: IdleConnection) -> Result<(), IdleConnection> {
        let Some(tx) = self.queue() else { return Err(conn) };
        enqueue(&tx, Offer::Idle(conn));
        Ok(())
    }
}

/// Starts handing the proxy's idle connections to the new process over `ch` (which
/// has carried the spliced pairs already); `None` (after the [`Msg::Done`]) when it
/// cannot, and they drain.
pub(super) fn forward(ch: Channel, idle: &IdleHandover) -> Option<Forwarder> {
    let (tx, rx) = mpsc::channel();
    let ch = Arc::new(ch);
    let spawned = std::thread::Builder::new().name("sluice-handover-idle".into()).spawn({
        let ch = ch.clone();
        move || run(&ch, &rx)
    });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "handover: no thread for idle connections; they drain");
            let _ = ch.send(&Msg::Done, &[]);
            return None;
        }
    };
    let sink = Arc::new(Sink { tx: Mutex::new(Some(tx)) });
    idle.start(sink.clone());
    Some(Forwarder { sink, thread })
}

impl Forwarder {
    /// The sink for the kernel splice's userspace relays.
    pub(super) fn relay_sink(&self) -> RelaySink {
        let sink = self.sink.clone();
        Arc::new(move |h| {
            let Some(tx) = sink.queue() else { return Err(h) };
            enqueue(&tx, Offer::Relay(h));
            Ok(())
        })
    }
}

impl Forwarder {
    /// No more connections are taken (the proxy closes any that go idle from now on);
    /// waits for those queued to be offered, and for the [`Msg::Done`].
    pub(super) async fn stop(self) {
        self.sink.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

fn run(ch: &Channel, rx: &mpsc::Receiver<Offer>) {
    let (mut handed, mut closed, mut broken) = (0u64, 0u64, false);
    let mut relays = (0u64, 0u64);
    for (tag, offer) in (1u64..).zip(rx.iter()) {
        let conn = match offer {
            Offer::Idle(conn) => conn,
            Offer::Relay(h) => {
                let answer = if broken { Relayed::Kept } else { offer_relay(ch, tag, &h) };
                broken |= answer != Relayed::Adopted && answer != Relayed::Refused;
                let RelayHandoff { legs, who, moved, auto, pending, reply } = *h;
                if answer == Relayed::Kept || answer == Relayed::Refused {
                    relays.1 += 1;
                    let back = RelayHandoff { legs, who, moved, auto, pending, reply: dummy() };
                    let _ = reply.send(Some(Box::new(back)));
                } else {
                    // Adopted, or maybe: this process's copies close here.
                    relays.0 += 1;
                    let _ = reply.send(None);
                }
                continue;
            }
        };
        if broken {
            closed += 1;
            continue;
        }
        let offer = IdleOffer { tag, peer: conn.peer, client: conn.client };
        if let Err(e) = ch.send(&Msg::Idle(offer), &[conn.tcp.as_fd()]) {
            warn!(error = %e, "handover: offering an idle connection failed; the rest close");
            broken = true;
            closed += 1;
            continue;
        }
        match ch.recv() {
            Ok((Msg::Ack { tag: t, adopted: true, .. }, _)) if t == tag => handed += 1,
            Ok((Msg::Ack { tag: t, adopted: false, error }, _)) if t == tag => {
                warn!(error = ?error, peer = %conn.peer, "handover: idle connection refused; closed");
                closed += 1;
            }
            other => {
                // Whether it holds the socket or not, closing this copy cannot cut it.
                warn!(answer = ?other.map(|(m, _)| m), "handover: no clear answer; the rest close");
                broken = true;
                closed += 1;
            }
        }
        // `conn` (this process's copy) closes here.
    }
    if !broken {
        let _ = ch.send(&Msg::Done, &[]);
    }
    info!(handed, closed, "idle connections handed to the new process");
    if relays != (0, 0) {
        info!(handed = relays.0, kept = relays.1, "relayed streams handed to the new process");
    }
}

/// A reply slot for a handoff given back (nobody answers it again).
fn dummy() -> tokio::sync::oneshot::Sender<Option<Box<RelayHandoff>>> {
    tokio::sync::oneshot::channel().0
}

/// What became of a relayed stream offered to the new process.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relayed {
    /// It relays it now.
    Adopted,
    /// It said no: relayed on here.
    Refused,
    /// Not offered (the channel failed first): relayed on here.
    Kept,
    /// No clear answer: it may relay it, so it is not relayed here.
    Unclear,
}

/// Offers one relayed stream to the new process.
fn offer_relay(ch: &Channel, tag: u64, h: &RelayHandoff) -> Relayed {
    let offer = RelayOffer {
        tag,
        server: h.who.0.clone(),
        replica: h.who.1.clone(),
        moved: h.moved,
        auto: h.auto,
        up: hex(&h.pending[0]),
        down: hex(&h.pending[1]),
    };
    if let Err(e) = ch.send(&Msg::Relay(offer), &[h.legs[0].as_fd(), h.legs[1].as_fd()]) {
        warn!(error = %e, "handover: offering a relayed stream failed; it stays here");
        return Relayed::Kept;
    }
    match ch.recv() {
        Ok((Msg::Ack { tag: t, adopted: true, .. }, _)) if t == tag => Relayed::Adopted,
        Ok((Msg::Ack { tag: t, adopted: false, error }, _)) if t == tag => {
            warn!(error = ?error, "handover: the new process refused a relayed stream; it stays here");
            Relayed::Refused
        }
        other => {
            warn!(answer = ?other.map(|(m, _)| m), "handover: no clear answer for a relayed stream; closed here");
            Relayed::Unclear
        }
    }
}

/// The new process's side of an [`IdleOffer`].
pub(super) fn adopt(
    idle: &IdleHandover,
    offer: &IdleOffer,
    fds: Vec<OwnedFd>,
) -> Result<(), String> {
    let [fd]: [OwnedFd; 1] =
        fds.try_into().map_err(|v: Vec<_>| format!("{} descriptors, not 1", v.len()))?;
    let conn = IdleConnection {
        tcp: std::net::TcpStream::from(fd),
        peer: offer.peer,
        client: offer.client,
    };
    idle.adopt(conn).map_err(|e| e.to_string())
}
