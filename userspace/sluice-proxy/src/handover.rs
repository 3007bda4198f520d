//! Idle HTTP/1.1 keep-alive connections passed between two processes during an upgrade.
//!
//! An idle fast-path connection holds no bytes read from its client (it goes idle only
//! with an empty read buffer), so between requests it is nothing but its socket and what
//! the proxy knows of its client. The old process gives each one, as it goes idle, to an
//! [`IdleSink`] (the node's handover channel); the new process adopts each with
//! [`IdleHandover::adopt`] into its own idle phase. Bytes of a next request that arrive
//! while the descriptor is in flight wait in the socket for the new process.
//!
//! A connection busy with a request finishes it where it is (its response keeps the
//! connection alive while handing over), goes idle and is handed over then; one still
//! busy when the old process's drain deadline passes is cut as without a handover.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Semaphore, watch};

use crate::config::Cidr;
use crate::proxy::ProxyState;

/// An idle HTTP/1.1 connection between processes: its socket and its client.
#[derive(Debug)]
pub struct IdleConnection {
    /// The client socket (plaintext, between requests, nothing of it read and unused).
    pub tcp: std::net::TcpStream,
    /// The socket peer.
    pub peer: SocketAddr,
    /// The client: `peer`, or what a trusted peer's PROXY header reported.
    pub client: IpAddr,
}

/// Where the old process's idle connections go during a handover.
pub trait IdleSink: Send + Sync {
    /// Takes the connection (it must not block: queue it); gives it back when it
    /// cannot, and the proxy then closes it as a drain would.
    fn hand_over(&self, conn: IdleConnection) -> Result<(), IdleConnection>;
}

/// Why an offered connection was not adopted (the old process then closes it).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// This process is draining (or has stopped serving).
    #[error("this process no longer serves")]
    NotServing,
    /// `limits.max_connections` connections are open.
    #[error("at the connection limit")]
    AtLimit,
    /// No plaintext listener of this process has the socket's local address.
    #[error("no plaintext listener for {0}")]
    NoListener(SocketAddr),
    /// The client is denied or banned here.
    #[error("client {0} refused")]
    Refused(IpAddr),
    /// The socket could not be registered.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A proxy's idle-connection handover, from `Proxy::idle_handover`: usable
/// before the server runs (adopted connections then wait for it) and while it runs.
#[derive(Clone, Default)]
pub struct IdleHandover {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    sink: Mutex<Option<Arc<dyn IdleSink>>>,
    attach: Mutex<Attach>,
}

#[derive(Default)]
enum Attach {
    /// The server has not started: connections adopted so far.
    #[default]
    Pending,
    Queued(Vec<IdleConnection>),
    Running(Attached),
    Stopped,
}

/// What adopting a connection needs of the running server.
pub(crate) struct Attached {
    pub(crate) state: Weak<ProxyState>,
    pub(crate) conns: Arc<Semaphore>,
    pub(crate) drain: watch::Receiver<bool>,
    /// Each plaintext listener's bound address, trusted prefixes and `forwarded_header`.
    pub(crate) listeners: Vec<(SocketAddr, Arc<[Cidr]>, bool)>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for IdleHandover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleHandover").finish_non_exhaustive()
    }
}

impl IdleHandover {
    /// The old process's side: from now on every idle fast-path HTTP/1.1 connection
    /// (idle now, or going idle later) goes to `sink` instead of waiting here, and
    /// responses no longer close keep-alive connections because of the drain.
    pub fn start(&self, sink: Arc<dyn IdleSink>) {
        *lock(&self.inner.sink) = Some(sink);
        if let Attach::Running(a) = &*lock(&self.inner.attach)
            && let Some(state) = a.state.upgrade()
        {
            state.idle.hand_over();
        }
    }

    /// The new process's side: serves `conn` (handed over by the old process between
    /// requests) as one of this process's idle connections; its next request is read
    /// here. Before the server runs it is queued until it does.
    pub fn adopt(&self, conn: IdleConnection) -> Result<(), AdoptError> {
        let mut attach = lock(&self.inner.attach);
        match &mut *attach {
            Attach::Pending => *attach = Attach::Queued(vec![conn]),
            Attach::Queued(q) => q.push(conn),
            Attach::Running(a) => crate::server::adopt_idle(a, conn)?,
            Attach::Stopped => return Err(AdoptError::NotServing),
        }
        Ok(())
    }

    pub(crate) fn sink(&self) -> Option<Arc<dyn IdleSink>> {
        lock(&self.inner.sink).clone()
    }

    /// The server runs: adopts what was queued, and hands over at once if asked to
    /// already.
    pub(crate) fn attach(&self, attached: Attached, state: &ProxyState) {
        {
            let mut attach = lock(&self.inner.attach);
            if let Attach::Queued(q) = std::mem::take(&mut *attach) {
                for conn in q {
                    if let Err(e) = crate::server::adopt_idle(&attached, conn) {
                        tracing::warn!(error = %e, "handover: a queued idle connection not adopted");
                    }
                }
            }
            *attach = Attach::Running(attached);
        }
        if self.sink().is_some() {
            state.idle.hand_over();
        }
    }

    /// The server drains: nothing more is adopted (and the drain is not held open).
    pub(crate) fn detach(&self) {
        *lock(&self.inner.attach) = Attach::Stopped;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> IdleConnection {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = l.local_addr().unwrap();
        let tcp = std::net::TcpStream::connect(peer).unwrap();
        IdleConnection { tcp, peer, client: peer.ip() }
    }

    #[test]
    fn adopted_before_the_server_runs_waits_and_a_draining_one_adopts_nothing() {
        let h = IdleHandover::default();
        h.adopt(conn()).unwrap();
        h.adopt(conn()).unwrap();
        assert!(matches!(&*lock(&h.inner.attach), Attach::Queued(q) if q.len() == 2));
        assert!(h.sink().is_none(), "nothing is handed over until asked");
        h.detach();
        assert!(matches!(h.adopt(conn()), Err(AdoptError::NotServing)));
    }
}
