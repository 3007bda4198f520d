//! HTTP/1.1 upgrades to replicas (WebSocket): a fresh `hyper::client::conn::http1`
//! connection per upgrade, whose socket hyper hands back after the 101 (plain requests go
//! over [`super::wire`]). The driver task is aborted when the exchange is dropped before
//! its end, so the replica sees the TCP connection close.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt as _;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;

use super::{OpenH1, UpstreamReqBody, UpstreamResponse, Upstreams, error_chain};
use crate::error::RequestError;

/// An HTTP/1.1 connection to a replica; dropping it closes the connection.
pub struct H1Conn {
    send: SendRequest<UpstreamReqBody>,
    driver: AbortHandle,
}

impl H1Conn {
    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
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
) -> Result<H1Conn, RequestError> {
    let tcp = up.connect(addr, timeout).await?;
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
    Ok(H1Conn { send, driver: driver.abort_handle() })
}

/// Sends an upgrade request on a fresh connection, never pooled afterwards: after a 101,
/// `hyper::upgrade::on` on the response yields the replica socket.
pub(super) async fn send_upgrade(
    up: &Upstreams,
    addr: SocketAddr,
    timeout: Duration,
    req: Request<UpstreamReqBody>,
) -> Result<UpstreamResponse, RequestError> {
    let (mut parts, body) = req.into_parts();
    // Origin form on the wire; the Host header carries the authority.
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = pq.into();
    }
    let mut c = connect(up, addr, timeout).await?;
    let response = c
        .send
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e))))?;
    let response = response.map(|b| b.map_err(Into::into).boxed_unsync());
    Ok(UpstreamResponse { response, hold: Box::new(c), on_complete: None })
}
