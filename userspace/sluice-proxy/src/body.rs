//! Body types: the boxed body the proxy answers with, a request body that enforces a size
//! limit while streaming, and a response body that holds the request's accounting until
//! the last byte (or a drop) and turns upstream silence into an error.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

use crate::io::Progress;

/// Boxed error used by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the proxy serves.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body (error pages, admin).
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The request body grew past the server's limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Upstream sent nothing for the configured idle time.
#[derive(Debug, thiserror::Error)]
#[error("upstream idle for {0:?}")]
pub struct UpstreamIdle(pub Duration);

pin_project_lite::pin_project! {
    /// A request body that fails once more than `limit` bytes went through; its
    /// [`Progress`], when it has one, records that, so the proxy answers 413 if no
    /// response has started.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        limit: Option<u64>,
        seen: u64,
        progress: Option<Arc<Progress>>,
        count: Option<Arc<AtomicU64>>,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, limit: Option<u64>) -> Self {
        Self { inner, limit, seen: 0, progress: None, count: None }
    }

    /// Also records each chunk taken for the replica in `progress` (the exchange's idle
    /// clock: an upload that keeps moving keeps the exchange alive), and there a body
    /// over the limit.
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Also adds the bytes of each chunk to `count` (the access log's bytes in).
    pub fn with_count(mut self, count: Arc<AtomicU64>) -> Self {
        self.count = Some(count);
        self
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(p) = this.progress {
                    p.touch();
                }
                if let (Some(c), Some(data)) = (this.count, frame.data_ref()) {
                    c.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if let (Some(limit), Some(data)) = (*this.limit, frame.data_ref()) {
                    *this.seen += data.len() as u64;
                    if *this.seen > limit {
                        if let Some(p) = this.progress {
                            p.mark_body_exceeded();
                        }
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Something to run once the response body ended cleanly (e.g. return a pooled connection).
pub type OnComplete = Box<dyn FnOnce() + Send>;

pin_project_lite::pin_project! {
    /// A response body that keeps `hold` (in-flight guard, upstream stream handles) alive
    /// until the body ends or is dropped, runs `on_complete` on a clean end, and fails if
    /// no bytes of the exchange moved (either direction, see [`Progress`]) for `idle`.
    pub struct TrackedBody<B, H> {
        #[pin]
        inner: B,
        idle: Option<(Duration, Arc<Progress>)>,
        sleep: Option<Pin<Box<Sleep>>>,
        // Inline, not boxed: the body is boxed once as a whole, and a box of its own
        // would be one more allocation per request.
        hold: Option<H>,
        on_complete: Option<OnComplete>,
    }
}

impl<B, H> TrackedBody<B, H> {
    /// Wraps `inner`; `idle` is the quiet time allowed and the exchange's clock, which
    /// this body touches on every chunk and the request body on every chunk sent.
    pub fn new(
        inner: B,
        idle: Option<(Duration, Arc<Progress>)>,
        hold: H,
        on_complete: Option<OnComplete>,
    ) -> Self {
        Self { inner, idle, sleep: None, hold: Some(hold), on_complete }
    }
}

impl<B, H> Body for TrackedBody<B, H>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if this.hold.is_none() {
            // Already finished (or failed): stay finished.
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // One atomic store; the timer is re-armed only when it fires.
                if let Some((_, progress)) = this.idle.as_ref() {
                    progress.touch();
                }
                // The upstream body is complete with this frame. hyper's HTTP/1.1 server
                // drops a Content-Length body once its last byte is written, without
                // polling for the end, so this is the last chance to return the
                // upstream connection to its pool.
                if inner.is_end_stream()
                    && let Some(f) = this.on_complete.take()
                {
                    f();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // Drop the hold now so the upstream stream is released with the error.
                this.hold.take();
                this.on_complete.take();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_complete.take() {
                    f();
                }
                this.hold.take();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some((idle, progress)) = this.idle.as_ref() {
                    let idle = *idle;
                    let sleep = this.sleep.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep_until(progress.last() + idle))
                    });
                    while sleep.as_mut().poll(cx).is_ready() {
                        let deadline = progress.last() + idle;
                        if Instant::now() < deadline {
                            // Bytes moved since the timer was set: wait for the rest.
                            sleep.as_mut().reset(deadline);
                            continue;
                        }
                        this.hold.take();
                        this.on_complete.take();
                        return Poll::Ready(Some(Err(Box::new(UpstreamIdle(idle)))));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner's answer: the body must be polled to its end so `on_complete` runs.
        self.hold.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/1.1 request body that, dropped before its end (the replica answered early),
/// reads and discards a bounded rest in the background: hyper then finds the next request
/// where it should and keeps the connection, instead of closing it after the answer.
pub struct DrainOnDrop {
    inner: Option<hyper::body::Incoming>,
    cap: u64,
    time: Duration,
    /// Where a rest dropped before the response head waits for [`EarlyRest::settle`], and
    /// the declared bytes not read yet (one allocation per request for both).
    rest: EarlyRest,
}

/// The rest of a request body the replica answered before reading, handed from
/// [`DrainOnDrop`] to the response: drained before the head goes out, so the head can
/// say `Connection: close` when it does not fit (hyper would otherwise close the
/// keep-alive connection after the answer without notice).
#[derive(Clone)]
pub struct EarlyRest(Arc<RestSlot>);

/// Dropped unsettled with a rest parked (the exchange failed before a head), it drains
/// that rest in the background, as [`DrainOnDrop`] does after the head.
struct RestSlot {
    /// Declared bytes not yet read (0 once ended, or when the length is unknown).
    left: AtomicU64,
    /// The body has not ended yet (as of its last read).
    open: std::sync::atomic::AtomicBool,
    /// Its length was not declared (chunked).
    unknown_len: bool,
    state: std::sync::Mutex<RestState>,
    cap: u64,
    time: Duration,
}

impl Drop for RestSlot {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let RestState::Parked(body) = std::mem::replace(st, RestState::Claimed) {
            drain_in_background(body, self.cap, self.time);
        }
    }
}

/// Reads and discards at most `cap` bytes of `body` within `time`, in a task of its own.
fn drain_in_background(mut body: hyper::body::Incoming, cap: u64, time: Duration) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let drain = async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > cap {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(time, drain).await;
    });
}

enum RestState {
    /// The response head has not been settled yet.
    Open,
    /// The body was dropped unfinished before it.
    Parked(hyper::body::Incoming),
    /// Settled: a later drop drains in the background.
    Claimed,
}

impl EarlyRest {
    /// Declared bytes of the body not read yet, as it is read.
    pub fn left(&self) -> u64 {
        self.0.left.load(Ordering::Relaxed)
    }

    /// Whether a body of undeclared length is still being sent to the replica (not
    /// ended, not dropped) as its answer starts. An HTTP/2 replica may answer and then
    /// refuse the rest; a rest that then does not fit the drain would close the client's
    /// connection after the answer, so the answer must say close already.
    pub fn still_streaming_unknown(&self) -> bool {
        if !self.0.unknown_len || !self.0.open.load(Ordering::Relaxed) {
            return false;
        }
        let st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        matches!(*st, RestState::Open)
    }

    /// Called when the response head is ready: drains a parked rest, at most `cap` bytes
    /// within `time`. Returns whether the client's connection must close (the rest was
    /// larger, slower, or failed), which the head must then say.
    pub async fn settle(&self, cap: u64, time: Duration) -> bool {
        let parked = {
            let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            match std::mem::replace(&mut *st, RestState::Claimed) {
                RestState::Parked(b) => Some(b),
                _ => None,
            }
        };
        let Some(mut body) = parked else { return false };
        let drain = async {
            let mut seen = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return false };
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > cap {
                    return false;
                }
            }
            true
        };
        !tokio::time::timeout(time, drain).await.unwrap_or(false)
    }
}

impl DrainOnDrop {
    /// Wraps `inner`; at most `cap` more bytes within `time` are drained after a drop (none
    /// when `cap` is 0: an HTTP/2 stream is just reset).
    pub fn new(inner: hyper::body::Incoming, cap: u64, time: Duration) -> Self {
        let left = AtomicU64::new(inner.size_hint().lower());
        let open = std::sync::atomic::AtomicBool::new(!inner.is_end_stream());
        let unknown_len = inner.size_hint().exact().is_none();
        let state = std::sync::Mutex::new(RestState::Open);
        let rest = EarlyRest(Arc::new(RestSlot { left, open, unknown_len, state, cap, time }));
        Self { inner: Some(inner), cap, time, rest }
    }

    /// The handle through which the response settles a rest dropped before it.
    pub fn early_rest(&self) -> EarlyRest {
        self.rest.clone()
    }
}

impl Body for DrainOnDrop {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(b) = self.inner.as_mut() else { return Poll::Ready(None) };
        let r = Pin::new(&mut *b).poll_frame(cx);
        if r.is_ready() {
            let ended = b.is_end_stream();
            let left = if ended { 0 } else { b.size_hint().lower() };
            let slot = &self.rest.0;
            slot.left.store(left, Ordering::Relaxed);
            slot.open.store(!ended, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else { return };
        if self.cap == 0 || body.is_end_stream() || body.size_hint().lower() > self.cap {
            // Done already, or too much left: hyper closes the connection.
            return;
        }
        {
            let mut st = self.rest.0.state.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*st, RestState::Open) {
                // Before the response head: it drains this, and says close if it must.
                *st = RestState::Parked(body);
                return;
            }
        }
        drain_in_background(body, self.cap, self.time);
    }
}
