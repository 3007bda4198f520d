//! The never-sent retry through real sockets: a request that provably never reached a
//! replica (connect refused, HTTP/2 REFUSED_STREAM, a stream above a graceful GOAWAY's
//! last stream id) goes once to another replica, is counted by reason, and nothing else is
//! retried. Passive ejection is off so every pick of the bad replica is exercised.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use sluice_proxy::RetryReason;
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
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
        // A retried request is still one request of its server.
        let requests = m
            .lines()
            .find_map(|l| l.strip_prefix("sluice_requests_total{server=\"hello\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert_eq!(requests, Some((3 * N) as f64), "{proto:?}: {m}");
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
                // The socket stays open a while, as a replica finishing its graceful
                // shutdown keeps it: a request body written meanwhile is not a broken pipe.
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                drop(conn);
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

/// A replica that answers with the request body it received.
async fn echo(proto: Protocol) -> TestReplica {
    replica(proto, |req: Request<hyper::body::Incoming>| async move {
        let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        http::Response::new(text(body))
    })
    .await
}

/// Splits a raw HTTP/1.1 response into its status and body (content-length or chunked).
fn status_and_body(resp: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(resp);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") else { return (status, vec![]) };
    let head = text[..end].to_ascii_lowercase();
    let rest = &resp[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        (status, dechunk(rest).unwrap_or_default())
    } else {
        (status, rest.to_vec())
    }
}

/// Decodes a complete chunked body (no extensions, no trailers); `None` if incomplete.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n")?;
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line]).ok()?, 16).ok()?;
        b = &b[line + 2..];
        if n == 0 {
            return b.starts_with(b"\r\n").then_some(out);
        }
        out.extend_from_slice(b.get(..n)?);
        b = b.get(n + 2..)?;
    }
}

/// One POST carrying `body` on each client path: the HTTP/1.1 fast path (length), the
/// hyper path with a length and chunked (`te: trailers` is declined by the fast path), and
/// HTTP/2. Returns each status with the body of the answer.
async fn post_all_paths(proxy: SocketAddr, body: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let chunked = {
        let mut c = format!("{:x}\r\n", body.len()).into_bytes();
        c.extend_from_slice(body);
        c.extend_from_slice(b"\r\n0\r\n\r\n");
        c
    };
    let n = body.len();
    let shapes: [(String, &[u8]); 3] = [
        (format!("content-length: {n}\r\n"), body),
        (format!("content-length: {n}\r\nte: trailers\r\n"), body),
        ("transfer-encoding: chunked\r\nte: trailers\r\n".to_string(), &chunked),
    ];
    for (framing, payload) in shapes {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        let mut req =
            format!("POST / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{framing}\r\n")
                .into_bytes();
        req.extend_from_slice(payload);
        tcp.write_all(&req).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(T, tcp.read_to_end(&mut resp)).await.unwrap().ok();
        out.push(status_and_body(&resp));
    }
    let mut send = h2_client::<http_body_util::Full<Bytes>>(proxy).await;
    let req = Request::post(format!("http://{HOST}/"))
        .body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let resp = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let got = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
    out.push((status, got.map(|c| c.to_bytes().to_vec()).unwrap_or_default()));
    out
}

/// A refused h2 stream, or one above a graceful GOAWAY, is replayed with its small body
/// on the other replica, which gets the body whole.
#[tokio::test]
async fn refused_stream_and_goaway_replay_a_small_body() {
    let body = b"{\"small\": \"body that fits the replay bound\"}";
    for refuse in [true, false] {
        let (bad, _task) = misbehaving_h2(refuse).await;
        let live = echo(Protocol::H2c).await;
        let h = start(
            config(),
            doc(&[("bad", bad, Protocol::H2c), ("live", live.addr, Protocol::H2c)]),
        )
        .await;
        for _ in 0..N {
            for (i, (status, got)) in post_all_paths(h.addr(), body).await.into_iter().enumerate() {
                let text = String::from_utf8_lossy(&got);
                assert_eq!(status, 200, "refuse={refuse} path {i}: {text}");
                assert_eq!(got, body, "refuse={refuse} path {i}");
            }
        }
        assert_eq!(live.hits(), 4 * N);
        if refuse {
            assert!(retries(&h, RetryReason::RefusedStream) > 0, "no refused-stream retry");
        } else {
            assert!(all_retries(&h) > 0, "no goaway retry");
        }
    }
}

/// A body larger than the replay bound is never replayed: a refused stream is a 502.
#[tokio::test]
async fn refused_stream_with_a_large_body_is_not_replayed() {
    let body = vec![b'x'; sluice_proxy::REPLAY_BODY_BYTES + 1];
    let (bad, _task) = misbehaving_h2(true).await;
    let live = echo(Protocol::H2c).await;
    let h =
        start(config(), doc(&[("bad", bad, Protocol::H2c), ("live", live.addr, Protocol::H2c)]))
            .await;
    let mut failed = 0;
    for _ in 0..N / 2 {
        for (status, got) in post_all_paths(h.addr(), &body).await {
            assert!(status == 200 || status == 502, "{status}");
            if status == 200 {
                assert_eq!(got.len(), body.len());
            }
            failed += usize::from(status == 502);
        }
    }
    assert!(failed > 0, "the refusing replica was never picked");
    assert_eq!(all_retries(&h), 0);
}

/// An HTTP/1.1 replica that answers the first request of each connection (echoing its
/// body, keep-alive) and closes the connection under the next one after reading it
/// whole, with no answer: a pooled connection the replica was closing. With `once`, it
/// stops listening after its first connection (a replica going away): a fresh
/// connection to it is refused. Counts answers and requests closed under.
async fn closes_second_request(
    once: bool,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let closed_under = Arc::new(AtomicUsize::new(0));
    let (a, cu) = (answered.clone(), closed_under.clone());
    let task = tokio::spawn(async move {
        let mut accepting = Some(l);
        while let Some(Ok((mut tcp, _))) = match &accepting {
            Some(l) => Some(l.accept().await),
            None => None,
        } {
            if once {
                accepting = None; // the listener closes: connects are refused from now
            }
            let (a, cu) = (a.clone(), cu.clone());
            tokio::spawn(async move {
                let mut first = true;
                let mut buf = Vec::new();
                let mut b = [0u8; 16 * 1024];
                loop {
                    // A whole request: head, then its length or chunked body.
                    let whole = buf.windows(4).position(|w| w == b"\r\n\r\n").and_then(|end| {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let rest = &buf[end + 4..];
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        match len {
                            Some(n) => rest.get(..n).map(<[u8]>::to_vec),
                            None if head.contains("transfer-encoding: chunked") => dechunk(rest),
                            None => Some(vec![]),
                        }
                    });
                    if let Some(body) = whole {
                        if !first {
                            cu.fetch_add(1, Ordering::SeqCst);
                            return; // closed under the request, unanswered
                        }
                        first = false;
                        buf.clear();
                        a.fetch_add(1, Ordering::SeqCst);
                        let mut resp =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        resp.extend_from_slice(&body);
                        if tcp.write_all(&resp).await.is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
            });
        }
    });
    (addr, answered, closed_under, task)
}

/// A small body on a pooled HTTP/1.1 connection the replica closed under it goes once
/// more, whole, on a fresh connection; a body over the bound is not sent again (502).
#[tokio::test]
async fn stale_pooled_connection_replays_a_small_body() {
    let (addr, answered, _, _task) = closes_second_request(false).await;
    let h = start(config(), doc(&[("a", addr, Protocol::Http1)])).await;
    let body = b"{}";
    for round in 0..4 {
        for (i, (status, got)) in post_all_paths(h.addr(), body).await.into_iter().enumerate() {
            assert_eq!(status, 200, "round {round} path {i}");
            assert_eq!(got, body, "round {round} path {i}");
        }
    }
    assert_eq!(answered.load(Ordering::SeqCst), 16);
    // Not a retry: the replica never took the request on the closed connection.
    assert_eq!(all_retries(&h), 0);

    let large = vec![b'y'; sluice_proxy::REPLAY_BODY_BYTES + 1];
    let mut failed = 0;
    for (status, _) in post_all_paths(h.addr(), &large).await {
        assert!(status == 200 || status == 502, "{status}");
        failed += usize::from(status == 502);
    }
    assert!(failed > 0, "a large body was sent again");
}

/// A pooled connection closed under a request by a replica that has gone away (a fresh
/// connection is refused): the request goes once to another replica with its small
/// body, counted as a retry.
#[tokio::test]
async fn stale_connection_to_a_gone_replica_goes_to_another_with_its_body() {
    let body = b"{\"id\": 7}";
    let mut stale_seen = 0;
    // Each round: a replica that serves one connection, then goes; until the stale path
    // ran (P2C must pick it twice: once to pool a connection, once to find it closed).
    for _ in 0..8 {
        let (gone, _, closed_under, _task) = closes_second_request(true).await;
        let live = echo(Protocol::Http1).await;
        let h = start(
            config(),
            doc(&[("gone", gone, Protocol::Http1), ("live", live.addr, Protocol::Http1)]),
        )
        .await;
        for _ in 0..4 {
            for (i, (status, got)) in post_all_paths(h.addr(), body).await.into_iter().enumerate() {
                assert_eq!(status, 200, "path {i}: {}", String::from_utf8_lossy(&got));
                assert_eq!(got, body, "path {i}");
            }
        }
        stale_seen += closed_under.load(Ordering::SeqCst);
        if closed_under.load(Ordering::SeqCst) > 0 {
            assert!(retries(&h, RetryReason::Connect) > 0, "no retry counted");
        }
        if stale_seen > 0 {
            break;
        }
    }
    assert!(stale_seen > 0, "the gone replica never had a request closed under it");
}

/// A small body that arrives after its head (a second packet, as many clients send a
/// POST) is kept too: on the fast path and the hyper path, a pooled connection closed
/// under it gets the whole request again on a fresh one.
#[tokio::test]
async fn stale_pooled_connection_replays_a_body_sent_after_its_head() {
    let (addr, answered, closed_under, _task) = closes_second_request(false).await;
    let h = start(config(), doc(&[("a", addr, Protocol::Http1)])).await;
    let body = b"{\"late\": true}";
    for round in 0..4 {
        for extra in ["", "te: trailers\r\n"] {
            let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
            let head = format!(
                "POST / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{extra}\
                 content-length: {}\r\n\r\n",
                body.len()
            );
            tcp.write_all(head.as_bytes()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            tcp.write_all(body).await.unwrap();
            let mut resp = Vec::new();
            tokio::time::timeout(T, tcp.read_to_end(&mut resp)).await.unwrap().ok();
            let (status, got) = status_and_body(&resp);
            assert_eq!(status, 200, "round {round} {extra:?}: {}", String::from_utf8_lossy(&got));
            assert_eq!(got, body, "round {round} {extra:?}");
        }
    }
    assert_eq!(answered.load(Ordering::SeqCst), 8);
    assert!(closed_under.load(Ordering::SeqCst) >= 6, "the stale path did not run");
}
