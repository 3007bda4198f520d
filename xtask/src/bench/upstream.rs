//! The one upstream every system under test forwards to: a single-threaded hyper server
//! speaking HTTP/1.1 and h2c (prior knowledge) on one port, answering every request with
//! a fixed small body, plus an SSE endpoint for the streaming scenario.
//!
//! It runs as its own process (`xtask bench __upstream`) so it can be pinned like the
//! others and so its CPU never mixes with the proxy's.

use std::{
    convert::Infallible,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Either, Full, channel::Channel};
use hyper::{body::Frame, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

/// The fixed response body (small on purpose: the benchmarks measure the proxy, not copies).
pub const BODY: &[u8] = b"hello from bench\n";

/// Connections accepted so far (read through [`ACCEPTED_PATH`]).
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Path answering with the number of connections accepted so far: shows whether a proxy
/// reuses its upstream connections.
pub const ACCEPTED_PATH: &str = "/__bench/accepted";

type Body = Either<Full<Bytes>, Channel<Bytes, Infallible>>;

/// Serves until killed; prints `listening <addr>` on stdout once bound.
pub fn main(bind: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(bind).await.with_context(|| format!("bind {bind}"))?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            ACCEPTED.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // Enough streams that h2load's -m never queues at the upstream.
                builder.http2().max_concurrent_streams(1024);
                let _ = builder.serve_connection(TokioIo::new(tcp), service_fn(handle)).await;
            });
        }
    })
}

async fn handle(req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/sse" {
        return Ok(sse(req.uri().query().unwrap_or("")));
    }
    if req.uri().path() == ACCEPTED_PATH {
        let n = ACCEPTED.load(Ordering::Relaxed).to_string();
        return Ok(Response::new(Either::Left(Full::new(Bytes::from(n)))));
    }
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from_static(BODY))));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    Ok(resp)
}

/// `/sse?n=EVENTS&ms=INTERVAL`: an event stream of `n` small events, one every `ms`
/// milliseconds (first one at once), like a model streaming tokens.
fn sse(query: &str) -> Response<Body> {
    let mut n: u32 = 100;
    let mut ms: u64 = 20;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => n = v.parse().unwrap_or(n).min(100_000),
            Some(("ms", v)) => ms = v.parse().unwrap_or(ms).clamp(1, 60_000),
            _ => {}
        }
    }
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(ms));
        for i in 0..n {
            tick.tick().await;
            let event = Bytes::from(format!("data: {{\"token\":{i}}}\n\n"));
            if tx.send(Frame::data(event)).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(Either::Right(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp
}

/// Asks the upstream at `addr` how many connections it has accepted (this query's own
/// connection not counted).
pub fn accepted(addr: SocketAddr) -> Option<u64> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req =
        format!("GET {ACCEPTED_PATH} HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).ok()?;
    let n: u64 = text.split("\r\n\r\n").nth(1)?.trim().parse().ok()?;
    Some(n.saturating_sub(1))
}
