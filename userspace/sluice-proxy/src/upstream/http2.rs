//! HTTP/2 (h2c prior knowledge) to replicas, on the `h2` crate directly so sluice sees the
//! replica's advertised SETTINGS_MAX_CONCURRENT_STREAMS and can open another connection
//! when every existing one is saturated.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Request, Uri};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{ReplicaPool, SendError, UpstreamReqBody, UpstreamResponse, Upstreams, error_chain};
use crate::body::BoxError;
use crate::error::RequestError;
use crate::metrics::RetryReason;

/// One multiplexed connection to a replica.
pub(super) struct H2Conn {
    send: SendRequest<Bytes>,
    /// Streams in use (shared with the socket's registration, see `OpenSockets`).
    active: Arc<AtomicUsize>,
    /// The peer's advertised limit, refreshed by the connection driver.
    peer_max: Arc<AtomicUsize>,
    cap: usize,
    closed: Arc<AtomicBool>,
    /// Milliseconds since `born` when the last stream ended.
    last_used_ms: AtomicU64,
    born: Instant,
    driver: AbortHandle,
}

impl H2Conn {
    fn try_acquire(self: &Arc<Self>) -> Option<StreamSlot> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let limit = self.peer_max.load(Ordering::Relaxed).min(self.cap);
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(StreamSlot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// Whether the pool should keep this connection.
    pub(super) fn keep(&self, now: Instant, idle: Duration) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        if self.active.load(Ordering::Acquire) > 0 {
            return true;
        }
        let last = self.born + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        now.duration_since(last) < idle
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        // Last handle gone (the pool dropped it and no stream uses it): close it now.
        self.driver.abort();
    }
}

/// A reserved stream on a connection; released on drop.
struct StreamSlot(Arc<H2Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let c = &self.0;
        c.last_used_ms.store(c.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        c.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Aborts the request-body pump when the exchange ends or is dropped.
struct AbortOnDrop(Option<AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

async fn connect(
    up: &Upstreams,
    pool: &ReplicaPool,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Arc<H2Conn>, RequestError> {
    let active = Arc::new(AtomicUsize::new(0));
    let tcp = up.connect_registered(pool, addr, timeout, active.clone()).await?;
    let cfg = &up.settings.cfg;
    let handshake = h2::client::Builder::new()
        .initial_window_size(cfg.h2_stream_window)
        .initial_connection_window_size(cfg.h2_connection_window)
        .max_header_list_size(256 * 1024)
        .enable_push(false)
        // h2 counts every reset it makes itself (a frame on a stream sluice already
        // closed or cancelled: the replica answered, then more arrived) for the life of
        // the connection and tears it down at 1024, with every stream on it. That guard
        // is for untrusted peers; a pooled connection to a replica carries millions of
        // streams, so the count is off here. A replica that misbehaves costs only the
        // resets it provokes, one per frame it sends.
        .max_local_error_reset_streams(None)
        // Remember as many locally reset streams as may be open at once, so the
        // replica's frames still in flight for them are recognised and dropped instead
        // of being protocol errors (h2's default remembers 50).
        .max_concurrent_reset_streams(cfg.h2_max_streams_per_connection.max(1))
        .handshake::<_, Bytes>(tcp);
    let (send, mut conn) = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| RequestError::Upstream(format!("h2 handshake with replica {addr} timed out")))?
        .map_err(|e| RequestError::Upstream(format!("h2 handshake with replica {addr}: {e}")))?;
    let peer_max = Arc::new(AtomicUsize::new(conn.max_concurrent_send_streams()));
    let closed = Arc::new(AtomicBool::new(false));
    let (pm, cl) = (peer_max.clone(), closed.clone());
    struct OnEnd(Arc<AtomicBool>, Arc<crate::metrics::Metrics>);
    impl Drop for OnEnd {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            self.1.upstream_h2_open.dec();
        }
    }
    // Built before the spawn and moved in, so the gauge goes down even when the driver is
    // aborted before its first poll (the future is then dropped without running).
    up.metrics.upstream_h2_open.inc();
    let end = OnEnd(cl, up.metrics.clone());
    let driver = tokio::spawn(async move {
        let _end = end;
        let res = poll_fn(|cx| {
            let r = conn.poll_unpin(cx);
            pm.store(conn.max_concurrent_send_streams(), Ordering::Relaxed);
            r
        })
        .await;
        if let Err(e) = res {
            tracing::debug!(%addr, "upstream h2 connection ended: {e}");
        }
    });
    Ok(Arc::new(H2Conn {
        send,
        active,
        peer_max,
        cap: cfg.h2_max_streams_per_connection.max(1),
        closed,
        last_used_ms: AtomicU64::new(0),
        born: Instant::now(),
        driver: driver.abort_handle(),
    }))
}

fn existing(pool: &ReplicaPool) -> Option<(SendRequest<Bytes>, StreamSlot)> {
    let mut conns = pool.h2.lock().unwrap_or_else(|e| e.into_inner());
    conns.retain(|c| !c.closed.load(Ordering::Acquire));
    conns.iter().find_map(|c| c.try_acquire().map(|slot| (c.send.clone(), slot)))
}

async fn acquire(
    up: &Upstreams,
    pool: &ReplicaPool,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(SendRequest<Bytes>, StreamSlot), RequestError> {
    if let Some(found) = existing(pool) {
        return Ok(found);
    }
    let _connecting = pool.h2_connecting.lock().await;
    // Someone may have connected while we waited.
    if let Some(found) = existing(pool) {
        return Ok(found);
    }
    // All saturated (or none yet): open another connection.
    let conn = connect(up, pool, addr, timeout).await?;
    let slot = conn
        .try_acquire()
        .ok_or_else(|| RequestError::Upstream(format!("replica {addr} allows no streams")))?;
    let send = conn.send.clone();
    pool.h2.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
    Ok((send, slot))
}

pub(super) async fn send(
    up: &Upstreams,
    pool: &ReplicaPool,
    addr: SocketAddr,
    timeout: Duration,
    req: Request<UpstreamReqBody>,
) -> Result<UpstreamResponse, SendError> {
    // Until the stream is opened nothing of the request has left: a failure hands it back.
    let (send, slot) = match acquire(up, pool, addr, timeout).await {
        Ok(found) => found,
        Err(e) => return Err(SendError::unsent(e, RetryReason::Connect, req)),
    };
    let mut send = match send.ready().await {
        Ok(s) => s,
        Err(e) => {
            let reason = if e.is_go_away() { RetryReason::GoAway } else { RetryReason::Connect };
            let e = RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e)));
            return Err(SendError::unsent(e, reason, req));
        }
    };

    let end_of_stream = req.body().is_end_stream();
    // A request refused by the replica (REFUSED_STREAM, or above a graceful GOAWAY's last
    // stream id) can go to another replica; h2 consumes the head, so keep a copy of it, as
    // forwarded (Host still set), for that case. Its body is held for a replay while it
    // stays small (`replay`); a larger body streamed into this stream and is not replayed.
    let (req, held) = if end_of_stream {
        (req, None)
    } else {
        let (parts, body) = req.into_parts();
        let (body, held) = super::replay::hold(body);
        (Request::from_parts(parts, body), held)
    };
    let replay = (end_of_stream || held.is_some()).then(|| {
        let mut r = Request::new(());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        r
    });
    // The body of a replay: none, or the held one from its start.
    let replay_body = |held: &Option<super::replay::Replay>| match held {
        None => Some(empty_body()),
        Some(h) => h.replay(),
    };
    let (mut parts, body) = req.into_parts();
    // h2 wants an absolute URI for :scheme and :authority; Host becomes :authority.
    let authority = parts
        .headers
        .remove(http::header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| addr.to_string());
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path.as_str())
        .build()
        .map_err(|_| RequestError::BadRequest("request target cannot be forwarded"))?;
    let head = Request::from_parts(parts, ());
    let (resp_fut, stream) = match send.send_request(head, end_of_stream) {
        Ok(opened) => opened,
        Err(e) => {
            // Refused before the stream was opened (the connection is going away): nothing
            // was sent. Only a bodiless request has its head to hand back.
            let error = RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e)));
            let reason = if e.is_go_away() { RetryReason::GoAway } else { RetryReason::Connect };
            return Err(match (replay, replay_body(&held)) {
                (Some(head), Some(body)) => SendError::unsent(error, reason, head.map(|()| body)),
                _ => error.into(),
            });
        }
    };

    let pump = if end_of_stream {
        AbortOnDrop(None)
    } else {
        AbortOnDrop(Some(tokio::spawn(pump(body, stream)).abort_handle()))
    };

    let resp = match resp_fut.await {
        Ok(resp) => resp,
        Err(e) => {
            let error = RequestError::Upstream(format!("replica {addr}: {}", error_chain(&e)));
            let Some(reason) = never_processed(&e) else { return Err(error.into()) };
            return Err(match (replay, replay_body(&held)) {
                (Some(head), Some(body)) => SendError::unsent(error, reason, head.map(|()| body)),
                _ => error.into(),
            });
        }
    };
    let response = resp.map(|recv| H2RecvBody { recv, data_done: false }.boxed_unsync());
    Ok(UpstreamResponse { response, hold: Box::new((pump, slot)), on_complete: None })
}

/// Whether a stream error proves the replica did not process the request: it refused the
/// stream (RFC 9113 section 8.7), or the stream was above the last stream id of a
/// graceful (`NO_ERROR`) GOAWAY. h2 gives exactly those streams the GOAWAY's own error;
/// the streams at or below it finish, or fail with another error when the connection
/// ends. A GOAWAY with an error code is not trusted: h2 then fails every stream with it.
fn never_processed(e: &h2::Error) -> Option<RetryReason> {
    if !e.is_remote() {
        return None;
    }
    if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Some(RetryReason::RefusedStream);
    }
    if e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR) {
        return Some(RetryReason::GoAway);
    }
    None
}

fn empty_body() -> UpstreamReqBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Streams the request body into the h2 stream, honouring the replica's flow control.
async fn pump(mut body: UpstreamReqBody, mut tx: SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = poll_fn(|cx| tx.poll_reset(cx)) => return,
        };
        match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while !data.is_empty() {
                        tx.reserve_capacity(data.len());
                        match poll_fn(|cx| tx.poll_capacity(cx)).await {
                            Some(Ok(0)) => continue,
                            Some(Ok(n)) => {
                                let chunk = data.split_to(n.min(data.len()));
                                if tx.send_data(chunk, false).is_err() {
                                    return;
                                }
                            }
                            _ => return,
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = tx.send_trailers(trailers);
                        return;
                    }
                }
            },
            Some(Err(e)) => {
                tracing::debug!("request body failed: {e}");
                tx.send_reset(h2::Reason::CANCEL);
                return;
            }
        }
    }
}

/// An h2 response stream as an `http_body::Body` (data, then trailers).
struct H2RecvBody {
    recv: RecvStream,
    data_done: bool,
}

impl Body for H2RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    // Hand the window back as soon as hyper takes the bytes: hyper only
                    // polls us when the client side can take more, so this is backpressure.
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}
