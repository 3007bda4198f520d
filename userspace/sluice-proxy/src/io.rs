//! Connection I/O wrapper that records when bytes last moved, so idle connections (and
//! clients that stall with their window at zero) can be closed without per-request timers.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `at` as milliseconds since [`epoch`].
fn ms_at(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64
}

/// When bytes of one upstream exchange last moved, in either direction: a request-body
/// chunk taken for the replica or a response chunk received. One atomic store per chunk;
/// the exchange's single timer reads it only when it fires (and re-arms if bytes moved),
/// so a busy stream costs no timer churn. It also carries whether the request body
/// crossed its limit: the body and the request path share this record already, and a
/// second shared flag would be a second allocation per request.
#[derive(Debug)]
pub struct Progress {
    last_ms: AtomicU64,
    body_exceeded: AtomicBool,
}

impl Progress {
    /// A fresh record: bytes moved now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { last_ms: AtomicU64::new(now_ms()), body_exceeded: AtomicBool::new(false) })
    }

    /// Records that the request body went over its limit.
    pub fn mark_body_exceeded(&self) {
        self.body_exceeded.store(true, Ordering::Relaxed);
    }

    /// Whether the request body went over its limit.
    pub fn body_exceeded(&self) -> bool {
        self.body_exceeded.load(Ordering::Relaxed)
    }

    /// Records that bytes moved now.
    pub fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// When bytes last moved.
    pub fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once no bytes moved for `quiet`: one timer, re-armed only when it fires
    /// early because bytes moved meanwhile.
    pub async fn quiet_for(&self, quiet: Duration) {
        let sleep = tokio::time::sleep_until(self.last() + quiet);
        tokio::pin!(sleep);
        loop {
            (&mut sleep).await;
            let deadline = self.last() + quiet;
            if Instant::now() >= deadline {
                return;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// Activity of one client connection.
#[derive(Debug)]
pub struct Activity {
    last_ms: AtomicU64,
    active: AtomicUsize,
}

impl Activity {
    /// A fresh record (now, no requests).
    pub fn new() -> Arc<Self> {
        Arc::new(Self { last_ms: AtomicU64::new(now_ms()), active: AtomicUsize::new(0) })
    }

    /// Records that bytes moved now.
    pub(crate) fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Marks a request that arrived `at` (the caller's clock reading, so the request
    /// path reads the clock once) in flight on this connection until the guard drops.
    pub fn request(self: &Arc<Self>, at: Instant) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(ms_at(at), Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Resolves once the connection has been idle too long: `idle` with no request in
    /// flight, `stalled` with requests in flight but no bytes moving.
    pub async fn idle_expired(&self, idle: Duration, stalled: Duration) {
        loop {
            let limit = if self.active.load(Ordering::Relaxed) == 0 { idle } else { stalled };
            let last = epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            // Re-check at least every `idle`: requests may finish meanwhile, which switches
            // the limit from `stalled` to `idle`.
            tokio::time::sleep_until(deadline.min(now + idle.min(stalled))).await;
        }
    }
}

/// Guard of one in-flight request on a connection.
#[derive(Debug)]
pub struct ActiveRequest(Arc<Activity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream that updates an [`Activity`] on every successful read or write.
    #[derive(Debug)]
    pub struct ConnIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        // Bytes read from `inner` before this wrapper took over (the HTTP/1.1 fast path
        // hands a connection to hyper with the request it declined): read first.
        prefix: Bytes,
    }
}

impl<T> ConnIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity, prefix: Bytes::new() }
    }

    /// Wraps `inner`, whose next bytes are `prefix` (already read from it).
    pub fn with_prefix(inner: T, activity: Arc<Activity>, prefix: Bytes) -> Self {
        Self { inner, activity, prefix }
    }

    /// The wrapped stream (for handing a raw socket to the kernel data plane) and the
    /// prefix bytes not read yet, which come before anything still in the stream.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<T: AsyncRead> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Reads what `tcp` has into `buf`'s spare capacity, as `TcpStream::try_read_buf` does,
/// and when the read came back short (the socket is drained) also clears the socket's
/// read readiness, as tokio's own `poll_read` does. Without that, the next read after
/// every request is a `recv` that can only fail with EAGAIN: a third of the HTTP/1.1
/// path's system calls. The readiness is cleared with the event seen *before* the read
/// (the outer `try_io`), so bytes arriving meanwhile still wake the task.
pub(crate) fn read_drained(
    tcp: &tokio::net::TcpStream,
    buf: &mut bytes::BytesMut,
) -> io::Result<usize> {
    let spare = buf.capacity() - buf.len();
    let mut got = None;
    let r = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = tcp.try_read_buf(buf)?;
        got = Some(n);
        if n > 0 && n < spare { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
    });
    match got {
        Some(n) => Ok(n),
        None => r,
    }
}
