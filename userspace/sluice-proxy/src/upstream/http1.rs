//! HTTP/1.1 to replicas: a keep-alive pool of `hyper::client::conn::http1` connections.
//! Each connection's driver task is aborted when the exchange is dropped before its end, so
//! the replica sees the TCP connection close (its only cancellation signal in HTTP/1.1).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt as _;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{ReplicaPool, UpstreamReqBody, UpstreamResponse, Upstreams, error_chain};
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
    // `TokioIo<TcpStream>` stays the concrete I/O type so an upgraded connection can be
    // downcast back to the raw socket (see `upgrade::into_tcp`).
    let (send, conn) = Builder::new()
        .handshake::<_, UpstreamReqBody>(TokioIo::new(tcp))
        .await
        .map_err(|e| RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e))))?;
    let metrics = up.metrics.clone();
    metrics.upstream_h1_open.inc();
    struct OnEnd(Arc<crate::metrics::Metrics>);
    impl Drop for OnEnd {
        fn drop(&mut self) {
            self.0.upstream_h1_open.dec();
        }
    }
    let driver = tokio::spawn(async move {
        let _end = OnEnd(metrics);
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, "upstream http/1.1 connection ended: {e}");
        }
    });
    Ok(H1Conn { send, driver: driver.abort_handle() })
}

fn take_idle(pool: &ReplicaPool) -> Option<H1Conn> {
    let mut idle = pool.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
    while let Some((conn, _)) = idle.pop() {
        if conn.send.is_ready() {
            return Some(conn);
        }
    }
    None
}

pub(super) async fn send(
    up: &Upstreams,
    pool: &Arc<ReplicaPool>,
    addr: SocketAddr,
    timeout: Duration,
    req: Request<UpstreamReqBody>,
    upgrade: bool,
) -> Result<UpstreamResponse, RequestError> {
    let (mut parts, body) = req.into_parts();
    // Origin form on the wire; the Host header carries the authority.
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = pq.into();
    }
    let mut req = Request::from_parts(parts, body);

    let mut conn = if upgrade { None } else { take_idle(pool) };
    let resp = loop {
        let mut c = match conn.take() {
            Some(c) => c,
            None => connect(up, addr, timeout).await?,
        };
        match c.send.try_send_request(req).await {
            Ok(resp) => break (resp, c),
            Err(mut e) => match e.take_message() {
                // Not written (a pooled connection closed under us): a fresh connection is
                // not a retry, the replica never saw the request.
                Some(r) if !c.send.is_ready() => {
                    req = r;
                    continue;
                }
                _ => {
                    let err = e.into_error();
                    return Err(RequestError::Upstream(format!(
                        "replica {addr}: {}",
                        error_chain(&err)
                    )));
                }
            },
        }
    };
    let (response, conn) = resp;
    let response = response.map(|b| b.map_err(Into::into).boxed_unsync());
    if upgrade {
        return Ok(UpstreamResponse { response, hold: Box::new(conn), on_complete: None });
    }
    // The connection is held by the exchange; on a clean end it goes back to the pool.
    let slot = Arc::new(std::sync::Mutex::new(Some(conn)));
    let pool = pool.clone();
    let max_idle = up.settings.cfg.h1_max_idle_per_replica;
    let back = slot.clone();
    let on_complete: crate::body::OnComplete = Box::new(move || {
        let Some(mut conn) = back.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        tokio::spawn(async move {
            // The driver may still be finishing the exchange: wait briefly for it.
            let ready = tokio::time::timeout(Duration::from_secs(1), conn.send.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                let mut idle = pool.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < max_idle {
                    idle.push((conn, Instant::now()));
                }
            }
        });
    });
    Ok(UpstreamResponse { response, hold: Box::new(slot), on_complete: Some(on_complete) })
}
