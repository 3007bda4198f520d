//! Pooled HTTP/1.1 upstream connections respect the replica's `Connection: close` and
//! `Keep-Alive: timeout=`: a connection the replica is closing is never written to again,
//! on the fast path, the hyper path or for HTTP/2 clients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ROUNDS: usize = 8;

/// What the replica saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
    /// Requests that arrived on a connection after an answer that said it would close.
    after_close: AtomicUsize,
}

/// A raw replica answering every request with `extra` headers. When `closing`, it keeps
/// the socket open after its answer (as a replica still finishing its close would) and
/// counts any further request on it, instead of closing.
async fn replica_with(extra: &'static str, closing: bool) -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                let mut answered = false;
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if answered && closing {
                            s.after_close.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        s.requests.fetch_add(1, Ordering::SeqCst);
                        let resp = format!("HTTP/1.1 200 OK\r\n{extra}content-length: 2\r\n\r\nok");
                        if tcp.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        answered = true;
                    }
                    match tcp.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// One GET on each client path, each on its own client connection; all must be 200.
async fn round(proxy: SocketAddr) {
    for extra in ["", "te: trailers\r\n"] {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{extra}\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(T, tcp.read_to_end(&mut resp)).await.unwrap().ok();
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 200"), "{extra:?}: {text}");
    }
    let mut send = h2_client::<Empty<Bytes>>(proxy).await;
    let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "h2");
    let _ = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
}

#[tokio::test]
async fn connection_close_is_never_reused() {
    let (addr, seen) = replica_with("connection: close\r\n", true).await;
    let h = start(cfg(), doc(&[("a", addr, Protocol::Http1)])).await;
    for _ in 0..ROUNDS {
        round(h.addr()).await;
    }
    assert_eq!(seen.after_close.load(Ordering::SeqCst), 0, "request on a closing connection");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 3 * ROUNDS);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3 * ROUNDS);
}

/// A keep-alive timeout too short to use safely (1 s) means no reuse at all.
#[tokio::test]
async fn short_keep_alive_timeout_is_not_reused() {
    let (addr, seen) = replica_with("keep-alive: timeout=1\r\n", true).await;
    let h = start(cfg(), doc(&[("a", addr, Protocol::Http1)])).await;
    for _ in 0..ROUNDS {
        round(h.addr()).await;
    }
    assert_eq!(seen.after_close.load(Ordering::SeqCst), 0, "request past the keep-alive");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3 * ROUNDS);
}

/// A usable keep-alive timeout keeps pooling working.
#[tokio::test]
async fn long_keep_alive_timeout_is_reused() {
    let (addr, seen) = replica_with("keep-alive: timeout=60, max=1000\r\n", false).await;
    let h = start(cfg(), doc(&[("a", addr, Protocol::Http1)])).await;
    for _ in 0..ROUNDS {
        round(h.addr()).await;
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 3 * ROUNDS);
    assert!(seen.connections.load(Ordering::SeqCst) < 3 * ROUNDS, "never reused");
}
