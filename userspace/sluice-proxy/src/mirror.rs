//! Mirroring: a bounded tee of a request to a server's shadow target.
//!
//! The primary's body is wrapped in a [`TeeBody`]: every frame goes on to the primary as
//! before and a copy (a refcounted `Bytes` clone, no memcpy) is queued for the mirror
//! without waiting. The queue is bounded by `mirror.max_buffer_bytes` and charged to the
//! server's buffer budget (`limits.max_buffered_bytes`). When a frame does not fit, the
//! mirror copy is abandoned at once: the queue is cleared, the budget released, the mirror
//! request aborted (its body errors, so it is never mistaken for a complete request), and
//! `mirror_dropped` counted. The primary never waits for the mirror.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::sync::Notify;

use sluice_routing::{BytesPermit, MirrorSpec, Protocol, Server, ServerStats};

use crate::body::BoxError;
use crate::proxy::ProxyState;
use crate::upstream::{UpstreamReqBody, WireProtocol};

/// The mirror copy was abandoned (mirror too slow, failed, or the primary's body ended
/// early).
#[derive(Debug, thiserror::Error)]
#[error("mirror copy dropped")]
pub struct MirrorDropped;

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Finished,
    Aborted,
}

struct TeeState {
    queue: VecDeque<Frame<Bytes>>,
    queued: u64,
    permit: Option<BytesPermit>,
    end: End,
    waker: Option<Waker>,
}

struct Tee {
    state: Mutex<TeeState>,
    max: u64,
    stats: Arc<ServerStats>,
    /// Wakes the mirror task when the copy is aborted.
    aborted: Notify,
}

impl Tee {
    fn lock(&self) -> MutexGuard<'_, TeeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Abandon the copy (once): free the queue and the budget, count the drop.
    fn abort(&self) {
        let mut st = self.lock();
        if st.end == End::Aborted {
            return;
        }
        st.end = End::Aborted;
        st.queue.clear();
        st.queued = 0;
        st.permit = None;
        let waker = st.waker.take();
        drop(st);
        self.stats.mirror_dropped.fetch_add(1, Ordering::Relaxed);
        self.aborted.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queue a copy of a frame without waiting; abort if it does not fit.
    fn offer(&self, frame: &Frame<Bytes>) {
        let copy = if let Some(d) = frame.data_ref() {
            Frame::data(d.clone())
        } else if let Some(t) = frame.trailers_ref() {
            Frame::trailers(t.clone())
        } else {
            return;
        };
        let len = copy.data_ref().map_or(0, |d| d.len() as u64);
        let mut st = self.lock();
        if st.end != End::Open {
            return;
        }
        let fits =
            st.queued + len <= self.max && st.permit.as_mut().is_some_and(|p| p.try_grow(len));
        if !fits {
            drop(st);
            self.abort();
            return;
        }
        st.queued += len;
        st.queue.push_back(copy);
        if let Some(w) = st.waker.take() {
            drop(st);
            w.wake();
        }
    }

    fn finish(&self) {
        let mut st = self.lock();
        if st.end == End::Open {
            st.end = End::Finished;
            if let Some(w) = st.waker.take() {
                drop(st);
                w.wake();
            }
        }
    }

    fn is_aborted(&self) -> bool {
        self.lock().end == End::Aborted
    }
}

pin_project_lite::pin_project! {
    /// The primary's request body with a non-blocking copy to the mirror.
    pub struct TeeBody {
        #[pin]
        inner: UpstreamReqBody,
        tee: Arc<Tee>,
    }

    impl PinnedDrop for TeeBody {
        fn drop(this: Pin<&mut Self>) {
            // hyper drops a Content-Length body after its last byte without polling for the
            // end: that is a complete copy. Dropped earlier (primary cancelled or failed),
            // the copy is incomplete.
            if this.inner.is_end_stream() {
                this.tee.finish();
            } else if this.tee.lock().end == End::Open {
                this.tee.abort();
            }
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.tee.offer(frame);
                if inner.is_end_stream() {
                    this.tee.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => this.tee.abort(),
            Poll::Ready(None) => this.tee.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The mirror request's body: the queued copies, then the end (or an error if aborted).
struct MirrorBody {
    tee: Arc<Tee>,
}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut st = self.tee.lock();
        if st.end == End::Aborted {
            return Poll::Ready(Some(Err(Box::new(MirrorDropped))));
        }
        if let Some(frame) = st.queue.pop_front() {
            let len = frame.data_ref().map_or(0, |d| d.len() as u64);
            st.queued -= len;
            if let Some(p) = st.permit.as_mut() {
                p.release(len);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if st.end == End::Finished {
            return Poll::Ready(None);
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// If `server` samples this request for mirroring, start the mirror request (same method,
/// target and forwarded headers, to `mirror.address`) and return the primary's body wrapped
/// in the tee; otherwise return `body` unchanged.
pub(crate) fn maybe_tee(
    state: &Arc<ProxyState>,
    server: &Arc<Server>,
    parts: &http::request::Parts,
    body: UpstreamReqBody,
) -> UpstreamReqBody {
    let Some(spec) = server.should_mirror() else {
        return body;
    };
    let Some(permit) = server.try_reserve_bytes(0) else {
        return body;
    };
    server.stats.mirrored.fetch_add(1, Ordering::Relaxed);
    let tee = Arc::new(Tee {
        state: Mutex::new(TeeState {
            queue: VecDeque::new(),
            queued: 0,
            permit: Some(permit),
            end: End::Open,
            waker: None,
        }),
        max: spec.max_buffer_bytes,
        stats: server.stats.clone(),
        aborted: Notify::new(),
    });
    let wire = match spec.protocol {
        Protocol::H2c => WireProtocol::H2c,
        _ => WireProtocol::Http1,
    };
    let mut req = Request::new(MirrorBody { tee: tee.clone() }.boxed_unsync());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = match wire {
        WireProtocol::H2c => Version::HTTP_2,
        WireProtocol::Http1 => Version::HTTP_11,
    };
    tokio::spawn(run_mirror(
        state.clone(),
        spec.clone(),
        server.spec.timeouts.connect,
        wire,
        req,
        tee.clone(),
    ));
    TeeBody { inner: body, tee }.boxed_unsync()
}

async fn run_mirror(
    state: Arc<ProxyState>,
    spec: MirrorSpec,
    connect_timeout: Option<std::time::Duration>,
    wire: WireProtocol,
    req: Request<UpstreamReqBody>,
    tee: Arc<Tee>,
) {
    let send = state.upstreams.send(spec.address, wire, connect_timeout, req);
    let up = tokio::select! {
        r = send => r,
        _ = tee.aborted.notified() => return,
    };
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            tracing::debug!(mirror = %spec.address, "mirror request failed: {}", e.error);
            tee.abort();
            return;
        }
    };
    // Read and discard the response; stop at once if the copy is aborted meanwhile.
    let mut body = up.response.into_body();
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tee.aborted.notified() => return,
        };
        match frame {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(mirror = %spec.address, "mirror response failed: {e}");
                if !tee.is_aborted() {
                    tee.abort();
                }
                return;
            }
            None => break,
        }
    }
    if let Some(f) = up.on_complete {
        f();
    }
    drop(up.hold);
}
