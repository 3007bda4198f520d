//! A small request body held so that a request the replica provably never took (a refused
//! h2 stream, a stream above a graceful GOAWAY, a pooled HTTP/1.1 connection found closed
//! before any answer) can be sent once more with its body.
//!
//! The body streams to the replica as it arrives; the frames taken from the client are
//! also kept (reference-counted `Bytes`, no copy) until [`REPLAY_BODY_BYTES`] is passed,
//! the exchange is committed (a response head arrived), or the body fails. A replay reads
//! the kept frames from the start and then continues with the rest of the client's body,
//! so a body still arriving is replayable too. A body past the bound is not held: it was
//! streamed, and cannot be sent again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

use super::UpstreamReqBody;
use crate::body::BoxError;

/// The most request-body bytes held for a replay; a larger body is never replayed.
pub const REPLAY_BODY_BYTES: usize = 64 * 1024;

/// The reader of a body that was replayed since: it must not read on.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by its replay")]
struct Superseded;

enum Held {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Held {
    fn to_frame(&self) -> Frame<Bytes> {
        match self {
            Held::Data(b) => Frame::data(b.clone()),
            Held::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

struct Log {
    /// Frames with absolute indices `base..base + frames.len()`.
    frames: VecDeque<Held>,
    base: usize,
    held_bytes: usize,
    /// The next frame the current reader takes (absolute), and the data bytes before it.
    cursor: usize,
    cursor_bytes: u64,
    /// The client's body; `None` once it ended.
    inner: Option<UpstreamReqBody>,
    /// The client's body as it was announced.
    hint: SizeHint,
    /// Frames are still kept (no commit, bound not passed, no error).
    recording: bool,
    /// Bumped by each replay; only the reader of the current epoch reads.
    epoch: u64,
}

/// The handle that can replay a held body; dropping it commits (stops holding).
pub(crate) struct Replay(Arc<Mutex<Log>>);

/// A reader of a held body (the body sent upstream).
struct Reader {
    log: Arc<Mutex<Log>>,
    epoch: u64,
}

/// Wraps `body` so it can be replayed while it stays within [`REPLAY_BODY_BYTES`]. An
/// empty body, or one announced larger than the bound, is returned as it is.
pub(crate) fn hold(body: UpstreamReqBody) -> (UpstreamReqBody, Option<Replay>) {
    let hint = body.size_hint();
    if body.is_end_stream() || hint.lower() > REPLAY_BODY_BYTES as u64 {
        return (body, None);
    }
    let log = Arc::new(Mutex::new(Log {
        frames: VecDeque::new(),
        base: 0,
        held_bytes: 0,
        cursor: 0,
        cursor_bytes: 0,
        inner: Some(body),
        hint,
        recording: true,
        epoch: 0,
    }));
    let reader = Reader { log: log.clone(), epoch: 0 };
    (reader.boxed_unsync(), Some(Replay(log)))
}

impl Replay {
    /// A body that sends the request's body again from its first byte, if all of it that
    /// was taken is still held. The previous reader stops (it fails if polled again).
    pub(crate) fn replay(&self) -> Option<UpstreamReqBody> {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Only a body known to fit: announced within the bound, or ended within it (a body
        // of unknown length still arriving might outgrow it).
        let fits = log.hint.upper().is_some_and(|n| n <= REPLAY_BODY_BYTES as u64)
            || log.inner.as_ref().is_none_or(|b| b.is_end_stream());
        if !log.recording || log.base != 0 || !fits {
            return None;
        }
        log.epoch += 1;
        log.cursor = 0;
        log.cursor_bytes = 0;
        Some(Reader { log: self.0.clone(), epoch: log.epoch }.boxed_unsync())
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        // Committed: keep nothing more, and let go of what the reader has passed.
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.recording = false;
        while log.base < log.cursor && log.frames.pop_front().is_some() {
            log.base += 1;
        }
        if log.frames.is_empty() {
            log.base = log.cursor;
            log.held_bytes = 0;
        }
    }
}

impl Log {
    /// Stops holding: the body can no longer be replayed.
    fn spoil(&mut self) {
        self.recording = false;
        self.frames.clear();
        self.held_bytes = 0;
        self.base = self.cursor;
    }
}

impl Body for Reader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut guard = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let log = &mut *guard;
        if log.epoch != self.epoch {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if log.cursor < log.base + log.frames.len() {
            let idx = log.cursor - log.base;
            let frame = if log.recording {
                log.frames[idx].to_frame()
            } else {
                // Committed while replaying: what is passed is let go of.
                let held = log.frames.pop_front().map(|h| h.to_frame());
                log.base += 1;
                match held {
                    Some(f) => f,
                    None => return Poll::Ready(None),
                }
            };
            log.cursor += 1;
            if let Some(d) = frame.data_ref() {
                log.cursor_bytes += d.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(inner) = log.inner.as_mut() else { return Poll::Ready(None) };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                log.inner = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                log.spoil();
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let len = frame.data_ref().map_or(0, Bytes::len);
        if log.recording && log.held_bytes + len > REPLAY_BODY_BYTES {
            log.spoil();
        }
        log.cursor += 1;
        log.cursor_bytes += len as u64;
        if log.recording {
            let held = match frame.data_ref() {
                Some(d) => Some(Held::Data(d.clone())),
                None => frame.trailers_ref().map(|t| Held::Trailers(t.clone())),
            };
            match held {
                Some(h) => {
                    log.frames.push_back(h);
                    log.held_bytes += len;
                }
                // A frame of a kind that cannot be kept: not replayable.
                None => log.spoil(),
            }
        } else {
            log.base = log.cursor;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.epoch == self.epoch
            && log.cursor >= log.base + log.frames.len()
            && log.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut hint = SizeHint::new();
        hint.set_lower(log.hint.lower().saturating_sub(log.cursor_bytes));
        if let Some(upper) = log.hint.upper() {
            hint.set_upper(upper.saturating_sub(log.cursor_bytes));
        }
        hint
    }
}
