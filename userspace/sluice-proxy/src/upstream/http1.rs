//! HTTP/1.1 upgrades to replicas (WebSocket): a fresh `hyper::client::conn::http1`
//! connection per upgrade, whose socket hyper hands back after the 101 (plain requests go
//! over [`super::wire`]). The driver task is aborted when the exchange is dropped before
//! its end, so the replica sees the TCP connection close.
//!
//! The socket is registered in its replica's [`super::OpenSockets`] for as long as the
//! upgraded stream lives ([`UpgradeRegistration`]), so a draining replica's deadline
//! ends WebSockets as it ends ordinary exchanges.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt as _;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;

use super::{OpenH1, Registered, UpstreamReqBody, UpstreamResponse, Upstreams, error_chain};
use crate::error::RequestError;

/// An upgrade connection's socket registered for its replica's drain deadline (see
/// [`Upstreams::cut`]): keep it as long as the upgraded stream (or the declined
/// upgrade's response) lives; dropping it deregisters the socket.
pub struct UpgradeRegistration {
    _registered: Registered,
}

/// An HTTP/1.1 connection to a replica; dropping it closes the connection.
pub struct H1Conn {
    send: SendRequest<UpstreamReqBody>,
    driver: AbortHandle,
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn connect(
    up: &Upstreams,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(H1Conn, UpgradeRegistration), RequestError> {
    // Refused once the replica's drain deadline passed, like every other connection.
    let open = up.pool(addr).open.clone();
    let tcp = up.connect_open(&open, addr, timeout).await?;
    // One `dup` per upgrade connection, none per byte relayed.
    let registration = UpgradeRegistration { _registered: open.register(&tcp, None)? };
    // The concrete I/O type `into_tcp` downcasts an upgraded connection to.
    let io: crate::upgrade::PlainUpstreamIo = TokioIo::new(tcp);
    let (send, conn) = Builder::new()
        .handshake::<_, UpstreamReqBody>(io)
        .await
        .map_err(|e| RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e))))?;
    let open = OpenH1::new(&up.metrics);
    let driver = tokio::spawn(async move {
        let _open = open;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, "upstream http/1.1 connection ended: {e}");
        }
    });
    Ok((H1Conn { send, driver: driver.abort_handle() }, registration))
}

/// Sends an upgrade request on a fresh connection, never pooled afterwards: after a 101,
/// `hyper::upgrade::on` on the response yields the replica socket.
pub(super) async fn send_upgrade(
    up: &Upstreams,
    addr: SocketAddr,
    timeout: Duration,
    req: Request<UpstreamReqBody>,
) -> Result<(UpstreamResponse, UpgradeRegistration), RequestError> {
    let (mut parts, body) = req.into_parts();
    // Origin form on the wire; the Host header carries the authority.
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = pq.into();
    }
    let (mut c, registration) = connect(up, addr, timeout).await?;
    let response = c
        .send
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e))))?;
    let response = response.map(|b| b.map_err(Into::into).boxed_unsync());
    Ok((UpstreamResponse { response, hold: Box::new(c), on_complete: None }, registration))
}
