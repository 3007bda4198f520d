//! HTTP/1.1 to replicas for the hyper path (HTTP/2 and TLS clients, and what the fast
//! path declines), framed by sluice on the raw pooled connections the fast path uses.
//!
//! hyper's client connection needs a driver task per connection, a channel hop per
//! request, a oneshot back and a task to pool the connection again: four wake-ups per
//! request. Here the request is written and the response head read inside the
//! request's own task, and the response body ([`WireBody`]) reads the socket when the
//! client side polls it, returning the connection to its pool at its clean end.
//!
//! Request bodies are framed by what is known of them: none, `content-length` when the
//! size is exact, otherwise `transfer-encoding: chunked`, whatever the method (a `GET`
//! with a body keeps it). An error of the client's body is the client's fault: it
//! becomes a 400, never a replica failure.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::io::AsyncWriteExt as _;

use super::{ReplicaPool, SendError, UpstreamReqBody, UpstreamResponse, Upstreams, WireConn};
use crate::body::BoxError;
use crate::error::RequestError;
use crate::headers::{content_length, put_field};
use crate::metrics::RetryReason;

/// Header slots when parsing a replica's response head.
const MAX_HEADERS: usize = 128;
/// Socket read size.
const READ: usize = 16 * 1024;
/// Longest chunk-size or trailer line accepted from a replica.
const MAX_LINE: usize = 4 * 1024;

fn upstream_err(addr: SocketAddr, what: impl std::fmt::Display) -> RequestError {
    RequestError::Upstream(format!("replica {addr}: {what}"))
}

/// Sends `req` (origin-form URI, Host set, hop-by-hop headers gone) to `addr`.
pub(super) async fn send(
    up: &Upstreams,
    pool: &Arc<ReplicaPool>,
    addr: SocketAddr,
    timeout: Duration,
    req: Request<UpstreamReqBody>,
) -> Result<UpstreamResponse, SendError> {
    let (parts, body) = req.into_parts();
    let head_method = parts.method == Method::HEAD;
    let known_empty = body.is_end_stream();
    let chunked = !known_empty && body.size_hint().exact().is_none();
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let had_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        put_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else {
        let n = body.size_hint().exact().unwrap_or(0);
        // An empty body is stated where the method implies one (or the client said so).
        let implied = !matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        if n > 0 || had_length || implied {
            put_field(&mut head, b"content-length", itoa::Buffer::new().format(n).as_bytes());
        }
    }
    head.extend_from_slice(b"\r\n");

    // A pooled connection closed meanwhile fails at once: a fresh one is not a retry.
    let mut pooled = up.take_wire(addr);
    let mut reused = pooled.is_some();
    let mut conn = loop {
        let mut c = match pooled.take() {
            Some(c) => c,
            None => {
                reused = false;
                match up.connect_wire(addr, Some(timeout)).await {
                    Ok(c) => c,
                    // Nothing was written and the body is untouched: hand it back.
                    Err(e) => {
                        let req = Request::from_parts(parts, body);
                        return Err(SendError::unsent(e, RetryReason::Connect, req));
                    }
                }
            }
        };
        match c.tcp.write_all(&head).await {
            Ok(()) => break c,
            Err(_) if reused => continue,
            Err(e) => return Err(upstream_err(addr, e).into()),
        }
    };

    // The body, unless the replica answers first (then its rest is dropped, and the
    // connection is not reused). A small body is held so that, if the pooled connection
    // turns out closed under it, it can go once more on a fresh one (`replay`).
    let (mut body, held) =
        if reused && !known_empty { super::replay::hold(body) } else { (body, None) };
    let mut body_unsent = write_body(&mut conn, &mut body, known_empty, chunked).await?;

    // The response head; informational responses are skipped.
    let mut rbuf = BytesMut::new();
    let mut fresh_retry = reused && (known_empty || held.is_some());
    let parsed = loop {
        if !rbuf.is_empty() {
            match parse_head(addr, &mut rbuf, head_method)? {
                Head::Partial => {}
                Head::Informational(n) => {
                    rbuf.advance(n);
                    continue;
                }
                Head::Final(p) => break p,
            }
        }
        rbuf.reserve(READ);
        let n = match read_some(&conn, &mut rbuf).await {
            Ok(n) => n,
            // A pooled connection the replica had closed resets what was written into it.
            Err(e) if fresh_retry && rbuf.is_empty() && is_closed(&e) => 0,
            Err(e) => return Err(upstream_err(addr, e).into()),
        };
        if n > 0 {
            fresh_retry = false;
            continue;
        }
        if conn.open.is_cut() {
            // The replica had the request; it must not go anywhere again.
            return Err(upstream_err(addr, "drain deadline passed").into());
        }
        if fresh_retry && rbuf.is_empty() {
            // Closed under the request before any answer: the replica never took it.
            fresh_retry = false;
            if let Some(h) = &held {
                match h.replay() {
                    Some(b) => body = b,
                    None => {
                        return Err(
                            upstream_err(addr, "connection closed before the response").into()
                        );
                    }
                }
            }
            conn = match up.connect_wire(addr, Some(timeout)).await {
                Ok(c) => c,
                // The request never reached the replica on either connection.
                Err(e) => {
                    let req = Request::from_parts(parts, body);
                    return Err(SendError::unsent(e, RetryReason::Connect, req));
                }
            };
            conn.tcp.write_all(&head).await.map_err(|e| upstream_err(addr, e))?;
            body_unsent = write_body(&mut conn, &mut body, known_empty, chunked).await?;
            continue;
        }
        return Err(upstream_err(addr, "connection closed before the response").into());
    };
    // `Connection: close` (or HTTP/1.0) is never reused; `Keep-Alive: timeout=` bounds
    // how long the connection may wait in the pool.
    let keep = parsed.keep_alive.as_ref().is_none_or(|v| conn.keep_alive(v.as_bytes()));
    let reusable = !parsed.close && !body_unsent && keep;
    let mut response = Response::new(());
    *response.status_mut() = parsed.status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = parsed.headers;
    let body = WireBody::new(conn, rbuf, parsed.framing, reusable, pool.clone(), up.max_idle());
    let response = response.map(|()| body.boxed_unsync());
    Ok(UpstreamResponse { response, hold: Box::new(()), on_complete: None })
}

/// Writes the request body to the replica, unless it answers first or stops reading:
/// returns whether some of the body was left unsent (the connection is then not reused).
async fn write_body(
    conn: &mut WireConn,
    body: &mut UpstreamReqBody,
    known_empty: bool,
    chunked: bool,
) -> Result<bool, RequestError> {
    let mut body_unsent = false;
    if !known_empty {
        let mut trailers_sent = false;
        loop {
            let frame = tokio::select! {
                biased;
                _ = conn.tcp.readable() => {
                    body_unsent = true;
                    break;
                }
                f = body.frame() => f,
            };
            let frame = match frame {
                None => break,
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(client_body_error(&*e)),
            };
            let written = match frame.into_data() {
                Ok(data) if data.is_empty() => Ok(()),
                Ok(data) if chunked => {
                    let mut framed = Vec::with_capacity(data.len() + 12);
                    framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    framed.extend_from_slice(&data);
                    framed.extend_from_slice(b"\r\n");
                    conn.tcp.write_all(&framed).await
                }
                Ok(data) => conn.tcp.write_all(&data).await,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) if chunked => {
                        let mut end = b"0\r\n".to_vec();
                        for (name, value) in &trailers {
                            put_field(&mut end, name.as_str().as_bytes(), value.as_bytes());
                        }
                        end.extend_from_slice(b"\r\n");
                        trailers_sent = true;
                        conn.tcp.write_all(&end).await
                    }
                    _ => Ok(()),
                },
            };
            if written.is_err() {
                // The replica stopped reading: its answer (if any) says why.
                body_unsent = true;
                break;
            }
        }
        if chunked
            && !trailers_sent
            && !body_unsent
            && conn.tcp.write_all(b"0\r\n\r\n").await.is_err()
        {
            body_unsent = true;
        }
    }
    Ok(body_unsent)
}

/// Whether a read error means the replica had closed the connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

/// A request body that failed while sluice read it is the client's fault (a malformed
/// chunk, a client that went away), never the replica's; the size limit has its own
/// answer (413), which the caller decides from `LimitedBody`'s flag.
fn client_body_error(e: &(dyn std::error::Error + Send + Sync + 'static)) -> RequestError {
    tracing::debug!("request body: {e}");
    RequestError::BadRequest("malformed or incomplete request body")
}

async fn read_some(conn: &WireConn, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        match crate::io::read_drained(&conn.tcp, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.tcp.readable().await?,
            r => return r,
        }
    }
}

/// How a response body is framed on the replica connection.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// No body (HEAD, 204, 304, or `content-length: 0`).
    Empty,
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

struct Parsed {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    close: bool,
    /// The `Keep-Alive` header's value, if any (its `timeout=`).
    keep_alive: Option<HeaderValue>,
}

enum Head {
    Partial,
    Informational(usize),
    Final(Parsed),
}

/// Parses the response head at the start of `buf`. A final head is consumed from `buf`
/// (what follows is the body); an informational one is left for the caller to skip.
///
/// Header values are slices of one copy of the head's bytes, not a copy each: one
/// allocation per response head instead of one per header value.
fn parse_head(
    addr: SocketAddr,
    buf: &mut BytesMut,
    head_method: bool,
) -> Result<Head, RequestError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 64 * 1024 => {
            return Err(upstream_err(addr, "response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        Err(e) => return Err(upstream_err(addr, format!("invalid response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    if code == 101 {
        return Err(upstream_err(addr, "switched protocols without being asked"));
    }
    if (100..200).contains(&code) {
        return Ok(Head::Informational(len));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| upstream_err(addr, "invalid status code"))?;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = resp.version == Some(0);
    let mut keep_alive = None;
    // Where each kept header's name and value lie in `buf` (a head is at most 64 KiB);
    // both are cut from the frozen head once the parser's borrow of `buf` ends.
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start as u32, (start + s.len()) as u32)
    };
    let mut kept = [((0u32, 0u32), (0u32, 0u32)); MAX_HEADERS];
    let mut n_kept = 0;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(h.value)
                .ok_or_else(|| upstream_err(addr, "invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(upstream_err(addr, "conflicting content-length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let value = std::str::from_utf8(h.value).unwrap_or("");
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if chunked || !last.eq_ignore_ascii_case("chunked") {
                return Err(upstream_err(addr, "unsupported transfer-encoding"));
            }
            chunked = true;
            // De-chunked here: the client side frames the body its own way.
            continue;
        } else if name.eq_ignore_ascii_case(b"keep-alive") {
            keep_alive = Some(n_kept);
        } else if name.eq_ignore_ascii_case(b"connection") {
            let value = std::str::from_utf8(h.value).unwrap_or("");
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && resp.version == Some(0) {
                    close = false;
                }
            }
        }
        kept[n_kept] = (span(name), span(h.value));
        n_kept += 1;
    }
    if chunked && length.is_some() {
        return Err(upstream_err(addr, "both content-length and transfer-encoding"));
    }
    let framing = if head_method || code == 204 || code == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked(ChunkState::Size)
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    // The head's bytes are copied once, into an allocation of their own, and the values
    // are cut from that: a slice of the read buffer would keep the whole buffer alive for
    // as long as any value lives, and an HTTP/2 client's HPACK table keeps values for the
    // connection's life (one 16 KiB buffer per idle h2c connection).
    let head = Bytes::copy_from_slice(&buf[..len]);
    buf.advance(len);
    // Room for what the proxy adds to the response (the request id, `connection: close`):
    // a map built at exactly the replica's count is full, and the first insert rehashes
    // the whole map into a new allocation (about 800 instructions per request).
    let mut headers = HeaderMap::with_capacity(n_kept + 2);
    let mut keep_alive_value = None;
    for (i, &((ns, ne), (vs, ve))) in kept[..n_kept].iter().enumerate() {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| upstream_err(addr, "invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| upstream_err(addr, "invalid header value"))?;
        if keep_alive == Some(i) {
            keep_alive_value = Some(value.clone());
        }
        headers.append(name, value);
    }
    Ok(Head::Final(Parsed { status, headers, framing, close, keep_alive: keep_alive_value }))
}

/// The replica's response body, read from its connection as the client side polls it.
/// Dropped before its end, it closes the connection: the replica's only cancellation
/// signal in HTTP/1.1.
pub(crate) struct WireBody {
    conn: Option<WireConn>,
    rbuf: BytesMut,
    framing: Framing,
    reusable: bool,
    pool: Arc<ReplicaPool>,
    max_idle: usize,
    done: bool,
}

/// The replica's body ended before its framing said it would.
#[derive(Debug, thiserror::Error)]
#[error("replica closed the connection mid-body")]
struct Truncated;

/// The replica's body framing is invalid.
#[derive(Debug, thiserror::Error)]
#[error("invalid chunked body from the replica")]
struct BadChunk;

impl WireBody {
    fn new(
        conn: WireConn,
        rbuf: BytesMut,
        framing: Framing,
        reusable: bool,
        pool: Arc<ReplicaPool>,
        max_idle: usize,
    ) -> Self {
        let mut body =
            Self { conn: Some(conn), rbuf, framing, reusable, pool, max_idle, done: false };
        if matches!(framing, Framing::Empty) {
            body.finish();
        }
        body
    }

    /// The body ended cleanly: the connection goes back to its pool if it can carry more.
    fn finish(&mut self) {
        self.done = true;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.rbuf.is_empty()
            && !matches!(self.framing, Framing::UntilClose)
        {
            self.pool.put_wire(conn, self.max_idle);
        }
        self.rbuf = BytesMut::new();
    }

    /// One step of decoding what is buffered: a frame, the end, or `None` for more bytes.
    #[allow(clippy::type_complexity)]
    fn decode(&mut self) -> Result<Option<Option<Frame<Bytes>>>, BoxError> {
        loop {
            match &mut self.framing {
                Framing::Empty => return Ok(Some(None)),
                Framing::Length(left) => {
                    if *left == 0 {
                        return Ok(Some(None));
                    }
                    if self.rbuf.is_empty() {
                        return Ok(None);
                    }
                    let k = (*left).min(self.rbuf.len() as u64);
                    *left -= k;
                    return Ok(Some(Some(Frame::data(self.rbuf.split_to(k as usize).freeze()))));
                }
                Framing::UntilClose => {
                    if self.rbuf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(Frame::data(self.rbuf.split().freeze()))));
                }
                Framing::Chunked(state) => match *state {
                    ChunkState::Size => match httparse::parse_chunk_size(&self.rbuf) {
                        Ok(httparse::Status::Complete((n, size))) => {
                            self.rbuf.advance(n);
                            *state = if size == 0 {
                                ChunkState::Trailers
                            } else {
                                ChunkState::Data(size)
                            };
                        }
                        Ok(httparse::Status::Partial) if self.rbuf.len() <= MAX_LINE => {
                            return Ok(None);
                        }
                        _ => return Err(Box::new(BadChunk)),
                    },
                    ChunkState::Data(left) => {
                        if self.rbuf.is_empty() {
                            return Ok(None);
                        }
                        let k = left.min(self.rbuf.len() as u64);
                        *state = if k == left {
                            ChunkState::DataEnd
                        } else {
                            ChunkState::Data(left - k)
                        };
                        return Ok(Some(Some(Frame::data(
                            self.rbuf.split_to(k as usize).freeze(),
                        ))));
                    }
                    ChunkState::DataEnd => {
                        if self.rbuf.len() < 2 {
                            return Ok(None);
                        }
                        if &self.rbuf[..2] != b"\r\n" {
                            return Err(Box::new(BadChunk));
                        }
                        self.rbuf.advance(2);
                        *state = ChunkState::Size;
                    }
                    ChunkState::Trailers => {
                        let mut slots = [httparse::EMPTY_HEADER; 32];
                        match httparse::parse_headers(&self.rbuf, &mut slots) {
                            Ok(httparse::Status::Complete((n, fields))) => {
                                let mut trailers = HeaderMap::new();
                                for f in fields {
                                    if let (Ok(k), Ok(v)) = (
                                        HeaderName::from_bytes(f.name.as_bytes()),
                                        HeaderValue::from_bytes(f.value),
                                    ) {
                                        trailers.append(k, v);
                                    }
                                }
                                self.rbuf.advance(n);
                                self.framing = Framing::Empty;
                                if trailers.is_empty() {
                                    return Ok(Some(None));
                                }
                                return Ok(Some(Some(Frame::trailers(trailers))));
                            }
                            Ok(httparse::Status::Partial) if self.rbuf.len() <= MAX_LINE * 4 => {
                                return Ok(None);
                            }
                            _ => return Err(Box::new(BadChunk)),
                        }
                    }
                },
            }
        }
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decode() {
                Ok(Some(Some(frame))) => {
                    // Finish at once when the last byte is out: hyper's HTTP/1.1 server
                    // drops a length-framed body without polling it to its end.
                    if matches!(this.framing, Framing::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Some(None)) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_ref() else { return Poll::Ready(None) };
            this.rbuf.reserve(READ);
            match crate::io::read_drained(&conn.tcp, &mut this.rbuf) {
                Ok(0) => {
                    // A drain-deadline cut is not the replica's end of the body.
                    if matches!(this.framing, Framing::UntilClose) && !conn.open.is_cut() {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    this.done = true;
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(Truncated))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(conn.tcp.poll_read_ready(cx)) {
                        this.done = true;
                        this.conn = None;
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                }
                Err(e) => {
                    this.done = true;
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    fn parse(head: &[u8]) -> (Result<Head, RequestError>, BytesMut) {
        let mut buf = BytesMut::from(head);
        (parse_head(addr(), &mut buf, false), buf)
    }

    #[test]
    fn heads() {
        let (h, rest) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello");
        let Ok(Head::Final(p)) = h else { panic!("not final") };
        assert_eq!(&rest[..], b"hello", "the head is consumed, the body stays");
        assert!(matches!(p.framing, Framing::Length(5)));
        assert_eq!(p.headers["x-a"], "b");
        let (h, rest) = parse(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(matches!(h, Ok(Head::Informational(25))));
        assert_eq!(rest.len(), 25, "an informational head is left for the caller");
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n").0.is_err());
        let (h, _) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n");
        assert!(h.is_err());
        let (h, _) = parse(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        let Ok(Head::Final(p)) = h else { panic!("not final") };
        assert!(p.close && matches!(p.framing, Framing::UntilClose));
        let (h, _) = parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nkeep-alive: timeout=5\r\n\r\n",
        );
        let Ok(Head::Final(p)) = h else { panic!("not final") };
        assert!(matches!(p.framing, Framing::Chunked(_)));
        assert!(!p.headers.contains_key("transfer-encoding"), "de-chunked here");
        assert_eq!(p.keep_alive.as_ref().map(|v| v.as_bytes()), Some(&b"timeout=5"[..]));
    }
}
