//! A read-side scanner for HTTP/1.1 client connections that notes, per request head, what
//! hyper's parser hides: a head carrying both `Content-Length` and `Transfer-Encoding`
//! (hyper silently drops the length). The proxy consults it to answer 400, as the framing
//! is ambiguous for any other parser. It follows message framing (length, chunked) to find
//! each head; anything it does not understand turns it off (hyper stays the authority).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-request verdicts in arrival order (`true` = ambiguous framing).
#[derive(Debug, Default)]
pub struct Verdicts(Mutex<VecDeque<bool>>);

impl Verdicts {
    /// The verdict for the next request hyper hands to the service.
    pub fn next(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front().unwrap_or(false)
    }

    fn push(&self, v: bool) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push_back(v);
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers(Vec<u8>),
    Off,
}

const MAX_LINE: usize = 64 * 1024;

#[derive(Debug)]
struct Scanner {
    state: State,
    max_head: usize,
    verdicts: Arc<Verdicts>,
}

fn find_crlfcrlf(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

impl Scanner {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    if buf.is_empty() {
                        // Empty lines before a request line are allowed.
                        let skip = data.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        // The common case: a whole head in one read, nothing carried over.
                        // It is scanned where it lies, without a copy.
                        if let Some(end) = find_crlfcrlf(data) {
                            let (head, rest) = data.split_at(end);
                            self.on_head(head);
                            data = rest;
                            continue;
                        }
                    }
                    let start = buf.len().saturating_sub(3);
                    buf.extend_from_slice(data);
                    match find_crlfcrlf(&buf[start..]) {
                        Some(end) => {
                            let end = start + end;
                            let used = end - (buf.len() - data.len());
                            let head = std::mem::take(buf);
                            self.on_head(&head[..end]);
                            data = &data[used..];
                        }
                        None => {
                            if buf.len() > self.max_head {
                                self.state = State::Off;
                            }
                            return;
                        }
                    }
                }
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > MAX_LINE {
                            self.state = State::Off;
                        }
                        return;
                    };
                    line.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    let text = String::from_utf8_lossy(line);
                    let hex = text.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(hex, 16) {
                        Ok(0) => State::Trailers(Vec::new()),
                        Ok(n) => State::ChunkData(n),
                        Err(_) => State::Off,
                    };
                }
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                }
                State::ChunkDataEnd(left) => {
                    let n = usize::from(*left).min(data.len());
                    data = &data[n..];
                    *left -= n as u8;
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(buf) => {
                    // Ends at an empty line: "\r\n" right away, or "\r\n\r\n" after fields.
                    buf.extend_from_slice(data);
                    let end = if buf.starts_with(b"\r\n") { Some(2) } else { find_crlfcrlf(buf) };
                    match end {
                        Some(end) => {
                            let rest = buf.split_off(end);
                            self.state = State::Head(Vec::new());
                            self.feed(&rest);
                            return;
                        }
                        None => {
                            if buf.len() > self.max_head {
                                self.state = State::Off;
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    fn on_head(&mut self, head: &[u8]) {
        // Uninitialised: zeroing 256 headers (8 KiB) per request cost more than the parse.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 256];
        let mut req = httparse::Request::new(&mut []);
        let Ok(httparse::Status::Complete(_)) = req.parse_with_uninit_headers(head, &mut headers)
        else {
            self.state = State::Off;
            return;
        };
        let mut cl: Option<u64> = None;
        let mut te = false;
        let mut chunked = false;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .or(Some(0));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .map(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
                    .unwrap_or(false);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        self.verdicts.push(te && cl.is_some());
        self.state = if upgrade {
            // After a possible 101 the bytes are opaque; the scanner's job is done.
            State::Off
        } else if te {
            if chunked { State::ChunkSize(Vec::new()) } else { State::Off }
        } else {
            match cl {
                Some(0) | None => State::Head(Vec::new()),
                Some(n) => State::Body(n),
            }
        };
    }
}

pin_project_lite::pin_project! {
    /// Wraps the read side of an HTTP/1.1 client connection with the scanner.
    #[derive(Debug)]
    pub struct H1Scan<T> {
        #[pin]
        inner: T,
        scanner: Scanner,
    }
}

impl<T> H1Scan<T> {
    /// Wraps `inner`; verdicts go to `verdicts`.
    pub fn new(inner: T, max_head: usize, verdicts: Arc<Verdicts>) -> Self {
        Self { inner, scanner: Scanner { state: State::Head(Vec::new()), max_head, verdicts } }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead> AsyncRead for H1Scan<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && !matches!(this.scanner.state, State::Off) {
            this.scanner.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for H1Scan<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Vec<bool> {
        let v = Arc::new(Verdicts::default());
        let mut s =
            Scanner { state: State::Head(Vec::new()), max_head: 65536, verdicts: v.clone() };
        for c in chunks {
            s.feed(c);
        }
        let out: Vec<bool> = v.0.lock().unwrap().iter().copied().collect();
        drop(s);
        out
    }

    #[test]
    fn follows_framing() {
        let two = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(scan(&[two]), vec![false, false]);
        // Byte at a time.
        let singles: Vec<&[u8]> = two.chunks(1).collect();
        assert_eq!(scan(&singles), vec![false, false]);
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(scan(&[chunked]), vec![false, true]);
        let singles: Vec<&[u8]> = chunked.chunks(1).collect();
        assert_eq!(scan(&singles), vec![false, true]);
    }
}
