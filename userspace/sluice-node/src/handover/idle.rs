//! Idle HTTP/1.1 keep-alive connections over the handover channel: the old process's
//! forwarder (the proxy's [`IdleSink`]) and the new process's adoption.
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

use super::channel::{Channel, IdleOffer, Msg};

/// The old process's forwarder of idle connections, until [`Forwarder::stop`].
pub(super) struct Forwarder {
    sink: Arc<Sink>,
    thread: JoinHandle<()>,
}

struct Sink {
    tx: Mutex<Option<mpsc::Sender<IdleConnection>>>,
}

impl IdleSink for Sink {
    fn hand_over(&self, conn: IdleConnection) -> Result<(), IdleConnection> {
        match &*self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(tx) => tx.send(conn).map_err(|e| e.0),
            None => Err(conn),
        }
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
    /// No more connections are taken (the proxy closes any that go idle from now on);
    /// waits for those queued to be offered, and for the [`Msg::Done`].
    pub(super) async fn stop(self) {
        self.sink.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

fn run(ch: &Channel, rx: &mpsc::Receiver<IdleConnection>) {
    let (mut handed, mut closed, mut broken) = (0u64, 0u64, false);
    for (tag, conn) in (1u64..).zip(rx.iter()) {
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
