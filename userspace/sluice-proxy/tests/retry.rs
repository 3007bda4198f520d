//! The never-sent retry through real sockets: a request that provably never reached a
//! replica (connect refused, HTTP/2 REFUSED_STREAM, a stream above a graceful GOAWAY's
//! last stream id) goes once to another replica, is counted by reason, and nothing else is
//! retried. Passive ejection is off so every pick of the bad replica is exercised.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Empty};
use sluice_proxy::metrics::RetryReason;
use sluice_routing::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Requests per client path: with two replicas and P2C, the bad one is picked about half
/// the time, so missing it in every request is a 2^-N chance.
const N: usize = 24;

fn config() -> sluice_proxy::ProxyConfig {
    let mut c = cfg();
    c.lb.consecutive_failures = 0;
    c
}

fn retries(h: &Harness, reason: RetryReason) -> u64 {
    h.metrics.upstream_retries[reason as usize].get()
}

fn all_retries(h: &Harness) -> u64 {
    RetryReason::ALL.iter().map(|r| retries(h, *r)).sum()
}

/// One bodiless GET on the fast path, the hyper path (`te: trailers` is declined by the
/// fast path) and HTTP/2; returns the three statuses.
async fn get_all_paths(proxy: SocketAddr) -> Vec<u16> {
    let mut out = Vec::new();
    for extra in ["", "te: trailers\r\n"] {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{extra}\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(T, tcp.read_to_end(&mut resp)).await.unwrap().ok();
        let text = String::from_utf8_lossy(&resp);
        out.push(text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0));
    }
    let mut send = h2_client::<Empty<Bytes>>(proxy).await;
    let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
    out.push(resp.status().as_u16());
    let _ = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
    out
}

#[tokio::test]
async fn connect_refused_goes_once_to_another_replica() {
    for proto in [Protocol::Http1, Protocol::H2c] {
        let dead = dead_addr().await;
        let live = hello("live", proto).await;
        let h = start(config(), doc(&[("dead", dead, proto), ("live", live.addr, proto)])).await;
        for _ in 0..N {
            assert_eq!(get_all_paths(h.addr()).await, [200, 200, 200], "{proto:?}");
        }
        assert_eq!(live.hits(), 3 * N, "{proto:?}");
        assert!(retries(&h, RetryReason::Connect) > 0, "{proto:?}: no retry counted");
        let m = body_string(h1(h.admin, get("/metrics", "admin")).await.unwrap()).await;
        assert!(m.contains("sluice_upstream_retries_total{reason=\"connect\"}"), "{m}");
    }
}

/// A lone replica that refuses: 502, and no retry (never to the same replica).
#[tokio::test]
async fn lone_replica_is_not_retried() {
    let dead = dead_addr().await;
    let h = start(config(), doc(&[("dead", dead, Protocol::Http1)])).await;
    assert_eq!(get_all_paths(h.addr()).await, [502, 502, 502]);
    assert_eq!(all_retries(&h), 0);
}

/// A replica that reads the request and closes without answering may have acted on it:
/// 502, never retried.
#[tokio::test]
async fn a_request_the_replica_read_is_not_retried() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer = l.local_addr().unwrap();
    let _task: JoinHandle<()> = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut b = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&b[..n]),
                    }
                }
                // Read, then gone: the connection closes with the request taken.
            });
        }
    });
    let live = hello("live", Protocol::Http1).await;
    let h = start(
        config(),
        doc(&[("closer", closer, Protocol::Http1), ("live", live.addr, Protocol::Http1)]),
    )
    .await;
    let mut failed = 0;
    for _ in 0..N {
        for status in get_all_paths(h.addr()).await {
            assert!(status == 200 || status == 502, "{status}");
            failed += usize::from(status == 502);
        }
    }
    assert!(failed > 0, "the closing replica was never picked");
    assert_eq!(live.hits(), 3 * N - failed, "a failed request reached the other replica");
    assert_eq!(all_retries(&h), 0);
}

/// An h2c replica driven with the `h2` crate: `refuse` answers every stream with
/// REFUSED_STREAM; otherwise each connection is shut down at once with a graceful GOAWAY
/// whose last stream id is 0, so every stream on it is above it.
async fn misbehaving_h2(refuse: bool) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                if !refuse {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn refused_stream_and_goaway_go_once_to_another_replica() {
    for refuse in [true, false] {
        let (bad, _task) = misbehaving_h2(refuse).await;
        let live = hello("live", Protocol::H2c).await;
        let h = start(
            config(),
            doc(&[("bad", bad, Protocol::H2c), ("live", live.addr, Protocol::H2c)]),
        )
        .await;
        for _ in 0..N {
            assert_eq!(get_all_paths(h.addr()).await, [200, 200, 200], "refuse={refuse}");
        }
        assert_eq!(live.hits(), 3 * N);
        if refuse {
            assert!(retries(&h, RetryReason::RefusedStream) > 0);
        } else {
            // The GOAWAY may arrive before the stream is opened (then the connection is
            // known closed: `connect`) or after (`goaway`); either way it is counted.
            assert!(all_retries(&h) > 0);
            assert_eq!(retries(&h, RetryReason::RefusedStream), 0);
        }
    }
}
