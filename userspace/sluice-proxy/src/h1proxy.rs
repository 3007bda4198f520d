//! The HTTP/1.1 fast path: plaintext HTTP/1.1 requests to HTTP/1.1 replicas, framed by
//! sluice itself in the client connection's own task.
//!
//! Why hand-rolled: through hyper, each request crossed tasks four times (the client
//! connection's dispatcher, the upstream connection's driver, a channel and a oneshot
//! back, a task returning the connection to its pool), rebuilt every header into a map
//! twice and kept 8 KiB read buffers on every idle connection. Here a request is parsed
//! once (httparse), its head rewritten straight into the bytes sent upstream, the
//! response head rewritten into the bytes sent back, and bodies copied through as they
//! arrive, with backpressure, in one task, with no buffer held while a connection is idle.
//!
//! The path only takes what it fully understands. Anything else (HTTP/1.0, upgrades,
//! `Expect`, `Transfer-Encoding` request bodies, hop-by-hop or forwarding headers, a
//! trusted edge, auth that does not pass, a server with a mirror or an HTTP/2 replica,
//! any error answer decided before forwarding) is *declined*: the connection, with the
//! bytes already read, continues on the hyper path (`crate::proxy`), which stays the
//! authority for every rule. Declining happens before anything is counted or sent, so
//! each request is judged by exactly one path.
//!
//! A request's life, in phases:
//! 1. read a head (no buffer while idle; `header_read` bounds a slow head);
//! 2. plan: hygiene, authority, route, proxy auth, replica selection and accounting,
//!    and the forwarded head (hop-by-hop, credentials, X-Forwarded-*, request id);
//! 3. forward the head and stream the body (a pooled connection that turns out closed is
//!    replaced once, for a request not yet sent);
//! 4. read the response head, rewrite it, stream the body (length, chunked, or to EOF,
//!    which is re-chunked for the client); the client going away cancels the exchange;
//! 5. finish: a clean exchange returns the replica connection to its pool.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;

use sluice_routing::{AuthDecision, InFlightGuard, Protocol, Replica, Server, authorize};

use crate::access_log::{Entry, Proto};
use crate::error::RequestError;
use crate::headers::{content_length, is_safe_value, put_field, put_status_line};
use crate::idle::IdleSlot;
use crate::metrics::RetryReason;
use crate::proxy::{ConnInfo, ProxyState};
use crate::upstream::WireConn;

/// Header slots per replica response head.
const MAX_HEADERS: usize = 64;
/// Header slots per request head. A head with more, or more than `limits.max_headers`, is
/// declined and the hyper path (held to `limits.max_headers`) answers it. Kept below the
/// limit's default: the slots are initialised on every parse.
const REQUEST_SLOTS: usize = 64;
/// Most of a request body left unread by an early answer that is drained so the client's
/// connection stays usable, and the time it may take; past either it closes (announced).
pub(crate) const EARLY_DRAIN_BYTES: u64 = 64 * 1024;
pub(crate) const EARLY_DRAIN_TIME: Duration = Duration::from_secs(1);
/// Read size while a head is incomplete.
const HEAD_READ: usize = 4 * 1024;
/// Read size for bodies and replica responses.
const BODY_READ: usize = 16 * 1024;
/// Longest chunk-size or trailer line accepted from a replica.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bytes of a next (pipelined) request read while a response is pending; past this the
/// client is no longer read until the response is done.
const MAX_PIPELINED: usize = 64 * 1024;

/// How the fast path left a connection.
pub(crate) enum Served {
    /// Finished (closed or to be closed).
    Closed,
    /// Waiting for its next request: the connection's task holds only this until the
    /// socket is readable ([`IdleConn::poll_wake`]).
    Idle(IdleConn),
    /// Declined: serve the rest of the connection on the hyper path, starting with these
    /// bytes already read from it.
    Declined(TcpStream, Bytes, Arc<ConnInfo>),
}

/// A keep-alive connection between requests: its socket, its facts and its idle slot,
/// and no buffer.
pub(crate) struct IdleConn {
    tcp: TcpStream,
    conn: Arc<ConnInfo>,
    slot: Arc<IdleSlot>,
}

impl IdleConn {
    /// Whether the connection has a next request (`true`) or should close (`false`:
    /// expired by the idle sweep, or the socket failed). Readable wins over an expiry
    /// that races it: a request that has arrived is served.
    pub(crate) fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        match self.tcp.poll_read_ready(cx) {
            Poll::Ready(r) => {
                self.slot.leave();
                return Poll::Ready(r.is_ok());
            }
            Poll::Pending => {}
        }
        self.slot.poll_expired(cx).map(|()| false)
    }

    /// Serves the connection's next request (after [`Self::poll_wake`] said there is one).
    pub(crate) async fn resume(self, state: &Arc<ProxyState>) -> Served {
        serve_requests(state, self.tcp, self.conn, Some(self.slot)).await
    }

    /// A connection another process handed over between requests, idle from now on.
    pub(crate) fn adopted(state: &ProxyState, tcp: TcpStream, conn: Arc<ConnInfo>) -> IdleConn {
        let slot = state.idle.register();
        slot.enter(&state.idle);
        IdleConn { tcp, conn, slot }
    }

    /// The socket and its facts, to hand the connection over (it holds no bytes read).
    pub(crate) fn into_parts(self) -> (TcpStream, Arc<ConnInfo>) {
        (self.tcp, self.conn)
    }
}

/// A client connection on the fast path.
struct Client {
    tcp: TcpStream,
    /// Bytes read and not yet used; unallocated while the connection is idle.
    buf: BytesMut,
}

/// What phase 2 decided for one request.
struct Plan {
    server: Arc<Server>,
    replica: Arc<Replica>,
    _in_flight: InFlightGuard,
    head_len: usize,
    body_len: u64,
    head_method: bool,
    client_close: bool,
    rid: String,
    /// The session's hash, for a retry's choice of replica.
    session_hash: Option<u64>,
    /// The one retry (`retry_elsewhere`) was used.
    retried: bool,
}

/// The one retry of a request that provably never reached `plan.replica` (the same policy
/// as the hyper path's, `crate::proxy`): moves the plan to another ready replica (never
/// the same one), counting the failure against the first and the retry by `reason`.
/// `false` when the retry was used already or no other replica can take it; the caller
/// then fails the request as it would have.
fn retry_elsewhere(state: &ProxyState, plan: &mut Plan, reason: RetryReason) -> bool {
    if plan.retried {
        return false;
    }
    plan.retried = true;
    let Some(other) =
        sluice_routing::lb::select_other(&plan.server, &plan.replica, plan.session_hash).cloned()
    else {
        return false;
    };
    let Ok(guard) = plan.server.try_begin_retry(&other) else { return false };
    plan.replica.stats.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::proxy::record_failure(state, &plan.server, &plan.replica);
    state.metrics.upstream_retries[reason as usize].inc();
    tracing::debug!(request_id = %plan.rid, from = %plan.replica.addr, to = %other.addr,
        reason = reason.as_str(), "never sent; retrying on another replica");
    plan._in_flight = guard;
    plan.replica = other;
    true
}

enum Planned {
    /// Forward it; the forwarded head is in `out`.
    Go(Plan),
    /// More bytes are needed for a whole head.
    Partial,
    /// The hyper path decides this one.
    Decline,
}

/// Serves `tcp`'s requests until it goes idle or closes, or hands it over to the hyper
/// path. The connection's bytes have started to arrive (the h2c sniff saw them).
pub(crate) async fn serve(state: &Arc<ProxyState>, tcp: TcpStream, conn: Arc<ConnInfo>) -> Served {
    // A trusted edge's forwarding headers and request ids are kept and extended, and its
    // requests' clients read from X-Forwarded-For: the hyper path does that.
    if conn.trusted {
        return Served::Declined(tcp, Bytes::new(), conn);
    }
    serve_requests(state, tcp, conn, None).await
}

/// The request loop: requests are served while bytes of one are there (pipelined ones
/// included); with none left the connection goes idle, holding no buffer.
async fn serve_requests(
    state: &Arc<ProxyState>,
    tcp: TcpStream,
    conn: Arc<ConnInfo>,
    slot: Option<Arc<IdleSlot>>,
) -> Served {
    let mut client = Client { tcp, buf: BytesMut::new() };
    let mut out = Vec::new();
    loop {
        // Phase 1: a head.
        let start = Instant::now();
        let deadline = start + state.cfg.timeouts.header_read;
        let plan = loop {
            if !client.buf.is_empty() {
                out.clear();
                match plan(state, &conn, &client.buf, &mut out) {
                    Planned::Go(p) => break p,
                    Planned::Decline => {
                        return Served::Declined(client.tcp, client.buf.freeze(), conn);
                    }
                    Planned::Partial => {
                        if client.buf.len() > state.cfg.limits.max_header_bytes {
                            // hyper answers 431.
                            return Served::Declined(client.tcp, client.buf.freeze(), conn);
                        }
                    }
                }
            }
            match read_some(&client.tcp, &mut client.buf, HEAD_READ, deadline).await {
                Ok(0) | Err(_) => return Served::Closed,
                Ok(_) => {}
            }
        };
        // Off, the access log costs this one branch.
        let mut log = match &state.access_log {
            Some(l) if l.sample() && l.wants(&plan.server) => {
                let mut e = Entry::begin(start, Proto::Http11, false, conn.client, conn.peer);
                e.server = Some(plan.server.clone());
                // Until a retry moves it, which the outcome records.
                e.replica = Some(plan.replica.clone());
                e.proto_out = Some(Proto::Http11);
                e.request_id.clone_from(&plan.rid);
                Some(e)
            }
            _ => None,
        };
        let next = exchange(state, &mut client, plan, &mut out, start, &mut log).await;
        if let (Some(mut e), Some(l)) = (log, &state.access_log) {
            e.end(!matches!(next, Next::Abort));
            l.push(e);
        }
        match next {
            Next::KeepAlive if client.buf.is_empty() => {
                // Idle: stamped now, closed by the sweep if nothing comes (`crate::idle`).
                let slot = slot.unwrap_or_else(|| state.idle.register());
                slot.enter(&state.idle);
                return Served::Idle(IdleConn { tcp: client.tcp, conn, slot });
            }
            Next::KeepAlive => {}
            Next::Close => {
                let _ = client.tcp.shutdown().await;
                return Served::Closed;
            }
            Next::Abort => return Served::Closed,
        }
    }
}

/// Reads at most `max` more bytes into `buf` by `deadline`; `Ok(0)` at end of stream.
async fn read_some(
    tcp: &TcpStream,
    buf: &mut BytesMut,
    max: usize,
    deadline: Instant,
) -> io::Result<usize> {
    buf.reserve(max);
    loop {
        match crate::io::read_drained(tcp, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        match tokio::time::timeout_at(deadline, tcp.readable()).await {
            Ok(r) => r?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

/// What kind of request header a name is, for the fast path's rules.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    ContentLength,
    Connection,
    /// sluice sets it (X-Forwarded-*, the request id), or it is an `_` look-alike of a
    /// forwarding header: the client's copy is dropped.
    Replaced,
    /// The hyper path handles requests carrying it.
    Decline,
    /// Proxy-auth credentials and look-alikes: read, never forwarded.
    Auth,
    Other,
}

fn field(state: &ProxyState, name: &str) -> Field {
    let n = name.as_bytes();
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    if is("host") {
        Field::Host
    } else if is("content-length") {
        Field::ContentLength
    } else if is("connection") {
        Field::Connection
    } else if is("x-forwarded-for")
        || is("forwarded")
        || is("x-real-ip")
        || is("x-forwarded-proto")
        || is("x-forwarded-host")
        || is(state.request_id_header.as_str())
        || crate::headers::is_forwarding_lookalike(n)
    {
        Field::Replaced
    } else if is("transfer-encoding")
        || is("upgrade")
        || is("expect")
        || is("te")
        || is("keep-alive")
        || is("http2-settings")
        || (n.len() >= 6 && n[..6].eq_ignore_ascii_case(b"proxy-"))
    {
        Field::Decline
    } else if state.auth.is_auth_header(n) {
        Field::Auth
    } else {
        Field::Other
    }
}

/// Phase 2 for the head at the start of `buf`; on `Go`, the forwarded head is in `out`.
fn plan(state: &ProxyState, conn: &ConnInfo, buf: &[u8], out: &mut Vec<u8>) -> Planned {
    // Banned while the connection was open: the hyper path refuses (and counts) it.
    if state.bans.is_banned(conn.client) {
        return Planned::Decline;
    }
    let mut slots = [httparse::EMPTY_HEADER; REQUEST_SLOTS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Planned::Partial,
        Err(_) => return Planned::Decline,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Planned::Decline;
    };
    // Hygiene: origin form only, within the limits. An ACME challenge is answered on the
    // hyper path, before routing (one prefix compare, no allocation).
    if method == "CONNECT"
        || !path.starts_with('/')
        || (state.acme.is_some() && path.starts_with(crate::acme::CHALLENGE_PREFIX))
        || path.len() > state.cfg.limits.max_uri_bytes
        || head_len > state.cfg.limits.max_header_bytes
        || req.headers.len() > state.cfg.limits.max_headers
    {
        return Planned::Decline;
    }
    let (mut host, mut length, mut close) = (None, None, false);
    let (mut key, mut secret) = (None, None);
    let (mut keys, mut secrets) = (0, 0);
    // Each name is classified once; the forwarding pass below reuses it.
    let mut kinds = [Field::Other; REQUEST_SLOTS];
    for (h, kind) in req.headers.iter().zip(kinds.iter_mut()) {
        if !is_safe_value(h.value) {
            return Planned::Decline;
        }
        *kind = field(state, h.name);
        match *kind {
            Field::Host if host.is_none() => host = Some(h.value),
            Field::ContentLength if length.is_none() => match content_length(h.value) {
                Some(n) => length = Some(n),
                None => return Planned::Decline,
            },
            Field::Connection => {
                if h.value.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                    return Planned::Decline;
                }
            }
            Field::Auth => {
                if h.name.eq_ignore_ascii_case(state.auth.key()) {
                    keys += 1;
                    key = Some(h.value);
                } else if h.name.eq_ignore_ascii_case(state.auth.secret()) {
                    secrets += 1;
                    secret = Some(h.value);
                }
            }
            Field::Host | Field::ContentLength | Field::Decline => return Planned::Decline,
            Field::Replaced | Field::Other => {}
        }
    }
    // Phase 2b: authority and route.
    let Some(raw_host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Planned::Decline;
    };
    let Ok(authority) = sluice_routing::canonical_authority_cow(raw_host) else {
        return Planned::Decline;
    };
    let snap = state.routing.load();
    let Some(server) = snap.lookup(&authority) else { return Planned::Decline };
    // Phase 2c: proxy auth; a request that does not pass is answered (and counted) there.
    if !server.spec.unauthenticated {
        let key = if keys == 1 { key } else { None };
        let secret = if secrets == 1 { secret } else { None };
        if authorize(&snap, server, key, secret) != AuthDecision::Allow {
            return Planned::Decline;
        }
    }
    let limit = server.spec.limits.max_body_bytes.or(state.cfg.limits.max_body_bytes);
    if server.replicas.is_empty()
        || server.spec.mirror.is_some()
        || server.at_in_flight_cap()
        || server.replicas.iter().any(|r| r.protocol != Protocol::Http1)
        || limit.is_some_and(|l| length.unwrap_or(0) > l)
    {
        return Planned::Decline;
    }
    // Phase 2d: select and count.
    let session_name =
        server.spec.session_header.as_deref().unwrap_or(state.session_header.as_str());
    let session =
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(session_name)).map(|h| h.value);
    let Some(replica) = sluice_routing::lb::select(server, session, &state.lb) else {
        return Planned::Decline;
    };
    let Ok(in_flight) = server.try_begin_request(replica) else { return Planned::Decline };
    let session_hash = session.map(sluice_routing::lb::session_hash);
    let rid = state.ids.next_id();

    // Phase 2e: the forwarded head.
    out.reserve(head_len + 160);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (h, kind) in req.headers.iter().zip(kinds) {
        match kind {
            Field::Other | Field::ContentLength => put_field(out, h.name.as_bytes(), h.value),
            Field::Host => put_field(out, b"host", h.value),
            _ => {}
        }
    }
    put_field(out, b"x-forwarded-for", conn.forwarded_for.as_bytes());
    put_field(out, b"x-real-ip", conn.forwarded_for.as_bytes());
    put_field(out, b"x-forwarded-proto", b"http");
    put_field(out, b"x-forwarded-host", raw_host.as_bytes());
    // The client's own `Forwarded` was dropped above (the fast path serves no trusted peer).
    if let Some(node) = &conn.forwarded_node {
        out.extend_from_slice(b"forwarded: ");
        crate::headers::put_forwarded_element(out, node.as_bytes(), raw_host.as_bytes(), b"http");
        out.extend_from_slice(b"\r\n");
    }
    put_field(out, state.request_id_header.as_str().as_bytes(), rid.as_bytes());
    out.extend_from_slice(b"\r\n");
    Planned::Go(Plan {
        server: server.clone(),
        replica: replica.clone(),
        _in_flight: in_flight,
        head_len,
        body_len: length.unwrap_or(0),
        head_method: method == "HEAD",
        client_close: close,
        rid,
        session_hash,
        retried: false,
    })
}

/// What the connection does after an exchange.
enum Next {
    KeepAlive,
    /// Close cleanly (after `connection: close`).
    Close,
    /// Close now: the response was cut short, so the client must see it fail.
    Abort,
}

/// How a replica's response body is framed.
#[derive(Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the replica closes; re-chunked towards the client.
    UntilClose,
}

/// Phases 3-5 for one planned request.
async fn exchange(
    state: &ProxyState,
    client: &mut Client,
    mut plan: Plan,
    out: &mut Vec<u8>,
    start: Instant,
    log: &mut Option<Box<Entry>>,
) -> Next {
    let t = &state.cfg.timeouts;
    let idle = plan.server.spec.timeouts.idle.or(t.upstream_idle);
    // Before the response head the replica may stay quiet this long (idle, at most the
    // first-byte timeout), counted afresh from each byte that moves: every write below and
    // every `read_response` call starts its own wait.
    let before_head = crate::proxy::head_wait(state, &plan.server);
    let mut addr = plan.replica.addr;
    client.buf.advance(plan.head_len);
    // The body bytes that came with the head travel with it.
    let first = plan.body_len.min(client.buf.len() as u64) as usize;
    out.extend_from_slice(&client.buf[..first]);
    client.buf.advance(first);
    let mut body_left = plan.body_len - first as u64;
    if let Some(e) = log.as_mut() {
        e.bytes_in = first as u64;
    }

    // Phase 3: forward. A pooled connection the replica closed meanwhile fails at once;
    // the request, held whole in `out`, then goes once to a fresh connection.
    let mut reused = true;
    let mut up = state.upstreams.take_wire(addr);
    let mut up = loop {
        let mut c = match up.take() {
            Some(c) => c,
            None => {
                reused = false;
                match state.upstreams.connect_wire(addr, plan.server.spec.timeouts.connect).await {
                    Ok(c) => c,
                    // Nothing was written: the request may go once to another replica.
                    Err(_) if retry_elsewhere(state, &mut plan, RetryReason::Connect) => {
                        addr = plan.replica.addr;
                        continue;
                    }
                    Err(e) => {
                        return fail(state, client, &plan, e, start, body_left > 0, log).await;
                    }
                }
            }
        };
        match write_upstream(&mut c, out, before_head).await {
            Ok(()) => break c,
            Err(Some(_)) if reused => continue,
            Err(Some(e)) => {
                let e = RequestError::Upstream(format!("replica {addr}: {e}"));
                return fail(state, client, &plan, e, start, body_left > 0, log).await;
            }
            Err(None) => {
                let e = RequestError::UpstreamTimeout;
                return fail(state, client, &plan, e, start, body_left > 0, log).await;
            }
        }
    };
    // A request sent on a pooled connection is kept (with a body up to the replay bound,
    // added as it is written) until the replica answers: if the connection turns out
    // closed before any response byte, it goes once more.
    let mut sent = if reused && body_left <= crate::upstream::REPLAY_BODY_BYTES as u64 {
        Some(std::mem::take(out))
    } else {
        out.clear();
        None
    };
    // The rest of the body, unless the replica answers first.
    let mut body_unread = false;
    while body_left > 0 {
        tokio::select! {
            biased;
            _ = up.tcp.readable() => {
                body_unread = true;
                break;
            }
            r = read_some(&client.tcp, &mut client.buf, BODY_READ, Instant::now() + t.stream_idle) => {
                match r {
                    Ok(0) | Err(_) => return Next::Abort,
                    Ok(_) => {}
                }
            }
        }
        let n = body_left.min(client.buf.len() as u64) as usize;
        match write_upstream(&mut up, &client.buf[..n], before_head).await {
            Ok(()) => {}
            // The replica stopped reading: its answer (if any) says why.
            Err(Some(_)) => {
                body_unread = true;
                break;
            }
            // Not reading and not answering for the whole wait: nothing moves.
            Err(None) => {
                let e = RequestError::UpstreamTimeout;
                return fail(state, client, &plan, e, start, true, log).await;
            }
        }
        if let Some(s) = sent.as_mut() {
            s.extend_from_slice(&client.buf[..n]);
        }
        client.buf.advance(n);
        body_left -= n as u64;
        if let Some(e) = log.as_mut() {
            e.bytes_in += n as u64;
        }
    }
    if body_left > 0 {
        body_unread = true;
    }
    // The replica answered early: the replica leg is spoilt, but a small rest of the body is
    // read and dropped so the client's connection goes on (else the answer says close).
    let upstream_short = body_unread;
    if body_unread && body_left <= EARLY_DRAIN_BYTES {
        let deadline = Instant::now() + EARLY_DRAIN_TIME;
        while (client.buf.len() as u64) < body_left {
            match read_some(&client.tcp, &mut client.buf, BODY_READ, deadline).await {
                Ok(0) => return Next::Abort,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if client.buf.len() as u64 >= body_left {
            if let Some(s) = sent.as_mut() {
                // The rest completes the request kept for a fresh connection.
                s.extend_from_slice(&client.buf[..body_left as usize]);
            }
            client.buf.advance(body_left as usize);
            body_unread = false;
        }
    }

    // Phase 4: the response head (informational responses are skipped).
    let mut rbuf = BytesMut::new();
    // Only a request kept whole can go again.
    let mut attempt_fresh = sent.is_some() && !body_unread;
    // Whether the head sent to the client says close: decided once, at the head, so the
    // connection closes after the answer exactly when the answer said it would.
    let mut said_close;
    let (framing, replica_close, status) = loop {
        if !rbuf.is_empty() {
            out.clear();
            let pipelined = !client.buf.is_empty();
            let close = plan.client_close || body_unread || state.closes_keepalive(pipelined);
            said_close = close;
            match response_head(state, &plan, &mut up, &rbuf, close, out) {
                Ok(Some((len, head))) => {
                    plan.replica.stats.ejection.record_success();
                    rbuf.advance(len);
                    match head {
                        Some(h) => break h,
                        None => continue, // 1xx
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return fail(state, client, &plan, e, start, body_unread, log).await;
                }
            }
        }
        match read_response(client, &up, &mut rbuf, Some(before_head)).await {
            Ok(n) if n > 0 => attempt_fresh = false,
            // Cut at a drain deadline: the replica had the request, so it goes nowhere
            // again.
            Ok(_) if attempt_fresh && rbuf.is_empty() && !up.open.is_cut() => {
                // The pooled connection was closed under the request: the replica never
                // read it, so a fresh connection is not a retry.
                attempt_fresh = false;
                let request = sent.as_deref().unwrap_or_default();
                let fresh = loop {
                    let timeout = plan.server.spec.timeouts.connect;
                    match state.upstreams.connect_wire(addr, timeout).await {
                        Ok(c) => break c,
                        // Never sent on either connection: once to another replica.
                        Err(_) if retry_elsewhere(state, &mut plan, RetryReason::Connect) => {
                            addr = plan.replica.addr;
                        }
                        Err(e) => {
                            return fail(state, client, &plan, e, start, false, log).await;
                        }
                    }
                };
                up = fresh;
                if let Err(e) = up.tcp.write_all(request).await {
                    let e = RequestError::Upstream(format!("replica {addr}: {e}"));
                    return fail(state, client, &plan, e, start, false, log).await;
                }
            }
            Ok(_) => {
                let e = RequestError::Upstream(format!(
                    "replica {addr} closed the connection before responding"
                ));
                return fail(state, client, &plan, e, start, body_unread, log).await;
            }
            Err(Failure::ClientGone) => return Next::Abort,
            Err(Failure::Timeout) => {
                let e = RequestError::UpstreamTimeout;
                return fail(state, client, &plan, e, start, body_unread, log).await;
            }
            Err(Failure::Io(e)) => {
                let e = RequestError::Upstream(format!("replica {addr}: {e}"));
                return fail(state, client, &plan, e, start, body_unread, log).await;
            }
        }
    };
    if let Some(mut request) = sent
        && out.capacity() == 0
    {
        // Keep the connection's output buffer for the response head's successors.
        request.clear();
        *out = request;
    }
    state.metrics.observe(status, start.elapsed());
    if let Some(e) = log.as_mut() {
        e.head(status);
        e.replica = Some(plan.replica.clone());
        e.proto_out = Some(Proto::Http11);
    }
    let close_after = said_close;

    // Phase 4b: the body, as it arrives.
    let head_len = out.len() as u64;
    let mut sent = 0;
    let streamed = stream_body(state, client, &mut up, &mut rbuf, out, framing, idle, &mut sent);
    let streamed = streamed.await;
    if let Some(e) = log.as_mut() {
        e.bytes_out = sent.saturating_sub(head_len);
    }
    let complete = match streamed {
        Ok(()) => true,
        Err(()) => return Next::Abort,
    };

    // Phase 5: finish.
    let reusable = complete
        && !replica_close
        && !upstream_short
        && rbuf.is_empty()
        && !matches!(framing, Framing::UntilClose);
    if reusable {
        state.upstreams.put_wire(addr, up);
    }
    if close_after { Next::Close } else { Next::KeepAlive }
}

/// Writes `bytes` to the replica unless it takes no byte for `quiet`: `Err(None)` then,
/// `Err(Some(_))` when the write failed. The timer is only registered if the write has to
/// wait (the usual write completes at once).
async fn write_upstream(
    up: &mut WireConn,
    bytes: &[u8],
    quiet: Duration,
) -> Result<(), Option<io::Error>> {
    let mut rest = bytes;
    while !rest.is_empty() {
        match tokio::time::timeout(quiet, up.tcp.write(rest)).await {
            Ok(Ok(0)) => return Err(Some(io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => rest = &rest[n..],
            Ok(Err(e)) => return Err(Some(e)),
            Err(_) => return Err(None),
        }
    }
    Ok(())
}

/// Why waiting for a replica's bytes ended without any.
enum Failure {
    ClientGone,
    Timeout,
    Io(io::Error),
}

/// Reads replica bytes into `rbuf`, watching the client meanwhile: a client that closes
/// cancels the exchange (the replica sees its connection close), and bytes of a next
/// request are kept for later. `Ok(0)` when the replica closed.
async fn read_response(
    client: &mut Client,
    up: &WireConn,
    rbuf: &mut BytesMut,
    idle: Option<Duration>,
) -> Result<usize, Failure> {
    rbuf.reserve(BODY_READ);
    let deadline = idle.map(|d| Instant::now() + d);
    loop {
        match crate::io::read_drained(&up.tcp, rbuf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(n) => return Ok(n),
            Err(e) => return Err(Failure::Io(e)),
        }
        let watch_client = client.buf.len() < MAX_PIPELINED;
        tokio::select! {
            biased;
            r = up.tcp.readable() => r.map_err(Failure::Io)?,
            r = client.tcp.readable(), if watch_client => {
                r.map_err(|_| Failure::ClientGone)?;
                client.buf.reserve(HEAD_READ);
                match crate::io::read_drained(&client.tcp, &mut client.buf) {
                    Ok(0) => return Err(Failure::ClientGone),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(Failure::ClientGone),
                }
            }
            () = sleep_until_opt(deadline) => return Err(Failure::Timeout),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Parses a response head at the start of `rbuf`. `Ok(None)`: incomplete.
/// `Ok(Some((len, None)))`: an informational response to skip. Otherwise the client's
/// head is written to `out`, with the framing, whether the replica closes, and the status.
#[allow(clippy::type_complexity)]
fn response_head(
    state: &ProxyState,
    plan: &Plan,
    up: &mut WireConn,
    rbuf: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, Option<(Framing, bool, u16)>)>, RequestError> {
    let addr = plan.replica.addr;
    let invalid = |what: &str| RequestError::Upstream(format!("replica {addr}: {what}"));
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(rbuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if rbuf.len() > state.cfg.limits.max_header_bytes {
                return Err(invalid("response head too large"));
            }
            return Ok(None);
        }
        Err(e) => return Err(invalid(&format!("invalid response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    if code == 101 {
        return Err(invalid("switched protocols without being asked"));
    }
    if (100..200).contains(&code) {
        return Ok(Some((len, None)));
    }
    let Ok(status) = StatusCode::from_u16(code) else {
        return Err(invalid("invalid status code"));
    };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut replica_close = resp.version == Some(0);
    let mut named: Vec<&str> = Vec::new();
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            let v = content_length(h.value).ok_or_else(|| invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(invalid("conflicting content-length"));
            }
            length = Some(v);
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            let v =
                std::str::from_utf8(h.value).map_err(|_| invalid("invalid transfer-encoding"))?;
            let last = v.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") || chunked {
                return Err(invalid("unsupported transfer-encoding"));
            }
            chunked = true;
        } else if n.eq_ignore_ascii_case(b"keep-alive") {
            // `timeout=`: how long the pooled connection stays usable (too short: not).
            if !up.keep_alive(h.value) {
                replica_close = true;
            }
        } else if n.eq_ignore_ascii_case(b"connection") {
            let v = std::str::from_utf8(h.value).unwrap_or("");
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    replica_close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    if resp.version == Some(0) {
                        replica_close = false;
                    }
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        }
    }
    let framing = if plan.head_method || code == 204 || code == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    if chunked && length.is_some() {
        return Err(invalid("both content-length and transfer-encoding"));
    }

    // One allocation for the head sluice writes (about the replica's, plus the request
    // id): `out` arrives empty, and growing it field by field cost five reallocations.
    out.reserve(len + 96);
    put_status_line(out, status);
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        let hop = n.eq_ignore_ascii_case(b"connection")
            || n.eq_ignore_ascii_case(b"keep-alive")
            || n.eq_ignore_ascii_case(b"te")
            || n.eq_ignore_ascii_case(b"transfer-encoding")
            || n.eq_ignore_ascii_case(b"upgrade")
            || n.eq_ignore_ascii_case(b"http2-settings")
            || (n.len() >= 6 && n[..6].eq_ignore_ascii_case(b"proxy-"))
            || n.eq_ignore_ascii_case(state.request_id_header.as_str().as_bytes())
            || named.iter().any(|x| x.as_bytes().eq_ignore_ascii_case(n));
        if !hop {
            put_field(out, n, h.value);
        }
    }
    if matches!(framing, Framing::Chunked | Framing::UntilClose) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    put_field(out, state.request_id_header.as_str().as_bytes(), plan.rid.as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((len, Some((framing, replica_close, code)))))
}

/// Streams the response body after the head in `out`, adding the bytes written to the
/// client to `sent`; `Err` when either side failed mid-body (the client must then see the
/// connection fail, never a clean end).
#[allow(clippy::too_many_arguments)]
async fn stream_body(
    state: &ProxyState,
    client: &mut Client,
    up: &mut WireConn,
    rbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    framing: Framing,
    idle: Option<Duration>,
    sent: &mut u64,
) -> Result<(), ()> {
    let stall = state.cfg.timeouts.stream_idle;

    match framing {
        Framing::None => write_counted(client, out, stall, sent).await,
        Framing::Length(n) => {
            let first = n.min(rbuf.len() as u64) as usize;
            out.extend_from_slice(&rbuf[..first]);
            rbuf.advance(first);
            write_counted(client, out, stall, sent).await?;
            let mut left = n - first as u64;
            while left > 0 {
                read_body(client, up, rbuf, idle).await?;
                let k = left.min(rbuf.len() as u64) as usize;
                write_counted(client, &rbuf[..k], stall, sent).await?;
                rbuf.advance(k);
                left -= k as u64;
            }
            Ok(())
        }
        Framing::Chunked => {
            let mut dec = Chunks::default();
            loop {
                let (used, done) = dec.advance(rbuf)?;
                out.extend_from_slice(&rbuf[..used]);
                rbuf.advance(used);
                if done || !out.is_empty() {
                    write_counted(client, out, stall, sent).await?;
                    out.clear();
                }
                if done {
                    return Ok(());
                }
                read_body(client, up, rbuf, idle).await?;
            }
        }
        Framing::UntilClose => {
            loop {
                if !rbuf.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", rbuf.len()).as_bytes());
                    out.extend_from_slice(rbuf);
                    out.extend_from_slice(b"\r\n");
                    rbuf.clear();
                }
                if !out.is_empty() {
                    write_counted(client, out, stall, sent).await?;
                    out.clear();
                }
                rbuf.reserve(BODY_READ);
                match read_response(client, up, rbuf, idle).await {
                    // A drain-deadline cut is not the replica's end of the body.
                    Ok(0) if up.open.is_cut() => return Err(()),
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return Err(()),
                }
            }
            write_counted(client, b"0\r\n\r\n", stall, sent).await
        }
    }
}

/// More body bytes from the replica; `Err` if it closed, failed, went silent for `idle`,
/// or the client went away.
async fn read_body(
    client: &mut Client,
    up: &WireConn,
    rbuf: &mut BytesMut,
    idle: Option<Duration>,
) -> Result<(), ()> {
    match read_response(client, up, rbuf, idle).await {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(()),
    }
}

/// [`write_client`], adding what was written to `sent`.
async fn write_counted(
    client: &mut Client,
    bytes: &[u8],
    stall: Duration,
    sent: &mut u64,
) -> Result<(), ()> {
    write_client(client, bytes, stall).await?;
    *sent += bytes.len() as u64;
    Ok(())
}

async fn write_client(client: &mut Client, bytes: &[u8], stall: Duration) -> Result<(), ()> {
    match tokio::time::timeout(stall, client.tcp.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Answers a request the fast path had taken with sluice's own error (502/504), counted
/// as the hyper path counts it (against the replica, and in the status metrics). The
/// connection stays usable unless `body_unread` (the rest of the request body is still
/// on it), the client asked to close, or sluice is draining.
async fn fail(
    state: &ProxyState,
    client: &mut Client,
    plan: &Plan,
    e: RequestError,
    start: Instant,
    body_unread: bool,
    log: &mut Option<Box<Entry>>,
) -> Next {
    tracing::debug!(request_id = %plan.rid, status = e.status().as_u16(), "rejected: {e}");
    // Only the replica's own failures count against it (and towards its ejection); a
    // client's malformed body does not.
    if matches!(e, RequestError::Upstream(_) | RequestError::UpstreamTimeout) {
        plan.replica.stats.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::proxy::record_failure(state, &plan.server, &plan.replica);
    }
    state.metrics.observe(e.status().as_u16(), start.elapsed());
    let close = body_unread || plan.client_close || state.closes_keepalive(!client.buf.is_empty());
    let mut out = Vec::with_capacity(256);
    let body_len = e.write_h1(&state.request_id_header, &plan.rid, close, &mut out);
    if let Some(l) = log {
        l.head(e.status().as_u16());
        l.error = Some(e.reason());
        l.replica = Some(plan.replica.clone());
        l.proto_out = Some(Proto::Http11);
        l.bytes_out = body_len as u64;
    }
    if write_client(client, &out, state.cfg.timeouts.stream_idle).await.is_err() {
        return Next::Abort;
    }
    if close { Next::Close } else { Next::KeepAlive }
}

/// Finds the end of a chunked body while its bytes pass through unchanged.
#[derive(Default)]
struct Chunks {
    state: ChunkState,
}

#[derive(Default)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Chunks {
    /// Consumes what it can of `buf`: returns how many bytes belong to the body so far and
    /// whether the body ended there. A partial line is left for the next call.
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), ()> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        at += n;
                        self.state = ChunkState::Trailers;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        at += n;
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) => {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err(());
                        }
                        return Ok((at, false));
                    }
                    Err(_) => return Err(()),
                },
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return Ok((at, false));
                    }
                    let k = left.min(rest.len() as u64);
                    at += k as usize;
                    self.state =
                        if k == left { ChunkState::DataEnd } else { ChunkState::Data(left - k) };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok((at, false));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(());
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => match memchr::memmem::find(rest, b"\r\n") {
                    Some(0) => return Ok((at + 2, true)),
                    Some(i) => at += i + 2,
                    None => {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err(());
                        }
                        return Ok((at, false));
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(body: &[u8]) -> Option<usize> {
        let mut c = Chunks::default();
        match c.advance(body) {
            Ok((n, true)) => Some(n),
            _ => None,
        }
    }

    #[test]
    fn chunked_end() {
        assert_eq!(end_of(b"5\r\nhello\r\n0\r\n\r\nNEXT"), Some(15));
        assert_eq!(end_of(b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n"), Some(35));
        assert_eq!(end_of(b"5\r\nhel"), None);
        assert!(Chunks::default().advance(b"zz\r\n").is_err());
        assert!(Chunks::default().advance(b"1\r\nabc\r\n").is_err());
    }

    #[test]
    fn chunked_across_reads() {
        let body = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n";
        for split in 1..body.len() {
            let mut c = Chunks::default();
            let (a, done) = c.advance(&body[..split]).unwrap();
            assert!(!done || split == body.len());
            let mut rest = body[a..split].to_vec();
            rest.extend_from_slice(&body[split..]);
            let (b, done) = c.advance(&rest).unwrap();
            assert!(done, "split at {split}");
            assert_eq!(a + b, body.len());
        }
    }
}
