//! The drain deadline through real sockets: a replica marked `draining` keeps its
//! in-flight exchanges until its `drain_deadline`, and then sluice ends them: a stream
//! still running is cut (the HTTP/1.1 client sees its connection close before the body's
//! end, the HTTP/2 client a reset stream), one still waiting for its head gets 502, never
//! a clean (truncated) success; an upgraded stream (WebSocket) relayed in userspace is
//! ended on both legs; each is counted in `sluice_replica_drain_deadline_cancelled_total`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use sluice_routing::{Protocol, ReplicaState, RoutingDoc, RoutingTable};
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The deadline set once a request is in flight; the replicas stream for far longer.
const GRACE: Duration = Duration::from_millis(300);
const PAUSE: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug)]
enum Path {
    /// Plain HTTP/1.1: the fast path.
    Fast,
    /// HTTP/1.1 the fast path declines (`te: trailers`): the hyper path.
    Hyper,
    /// HTTP/2 prior knowledge.
    H2,
}

const PATHS: [Path; 3] = [Path::Fast, Path::Hyper, Path::H2];

/// What the replica does with a request.
#[derive(Clone, Copy)]
enum Replica {
    /// Answers 200 at once and streams a chunk every 50 ms for a minute.
    Streams,
    /// Never answers.
    Silent,
}

/// An HTTP/1.1 replica; `arrived` counts the requests that reached it.
fn h1_replica(kind: Replica, arrived: Arc<AtomicUsize>) -> SocketAddr {
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std.set_nonblocking(true).unwrap();
    let addr = std.local_addr().unwrap();
    tokio::spawn(async move {
        let l = TcpListener::from_std(std).unwrap();
        loop {
            let Ok((mut tcp, _)) = l.accept().await else { return };
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut b = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&b[..n]),
                    }
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                if let Replica::Silent = kind {
                    let _ = tcp.read(&mut b).await;
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if tcp.write_all(head).await.is_err() {
                    return;
                }
                for _ in 0..1200 {
                    if tcp.write_all(b"1\r\nx\r\n").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(PAUSE).await;
                }
                let _ = tcp.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

/// The same as an h2c replica.
async fn h2c_replica(kind: Replica, arrived: Arc<AtomicUsize>) -> TestReplica {
    replica(Protocol::H2c, move |_req: Request<Incoming>| {
        let arrived = arrived.clone();
        async move {
            arrived.fetch_add(1, Ordering::SeqCst);
            if let Replica::Silent = kind {
                std::future::pending::<()>().await;
            }
            let chunks = futures_util::stream::unfold(0usize, |i| async move {
                if i > 0 {
                    tokio::time::sleep(PAUSE).await;
                }
                (i < 1200)
                    .then(|| (Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"x"))), i + 1))
            });
            Response::new(
                StreamBody::new(chunks).map_err(|n: Infallible| match n {}).boxed_unsync(),
            )
        }
    })
    .await
}

/// A proxy whose routing table the test keeps, to mark the replica draining.
struct Proxy {
    addr: SocketAddr,
    table: RoutingTable,
    metrics: Arc<sluice_proxy::Metrics>,
    _stop: oneshot::Sender<()>,
}

async fn proxy(replica: SocketAddr, proto: Protocol) -> Proxy {
    let table = RoutingTable::from_doc(node(), doc(&[("a", replica, proto)])).unwrap();
    let server = sluice_proxy::Proxy::bind(cfg(), table.clone()).await.unwrap();
    let addr = server.local_addrs()[0];
    let metrics = server.metrics();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Proxy { addr, table, metrics, _stop: tx }
}

/// Marks the only replica draining, its deadline `GRACE` from now.
fn drain(p: &Proxy, replica: SocketAddr, proto: Protocol, generation: u64) {
    let mut d: RoutingDoc = doc(&[("a", replica, proto)]);
    d.replicas[0].state = ReplicaState::Draining;
    d.replicas[0].drain_deadline = Some(SystemTime::now() + GRACE);
    p.table.replace(d, generation).unwrap();
}

/// One GET on `path`: the status (0 when there was no response head) and the body, or
/// `<cut>` when it did not end cleanly (connection closed before the body's end, reset
/// stream).
async fn get_on(proxy: SocketAddr, path: Path) -> (u16, String) {
    match path {
        Path::Fast | Path::Hyper => {
            let mut tcp = TcpStream::connect(proxy).await.unwrap();
            let extra = if matches!(path, Path::Hyper) { "te: trailers\r\n" } else { "" };
            let head =
                format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{extra}\r\n");
            tcp.write_all(head.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(T, tcp.read_to_end(&mut out)).await.unwrap().ok();
            let text = String::from_utf8_lossy(&out).into_owned();
            let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let Some((head, body)) = text.split_once("\r\n\r\n") else { return (status, text) };
            let head = head.to_ascii_lowercase();
            if let Some(n) = head.lines().find_map(|l| l.strip_prefix("content-length: ")) {
                let n: usize = n.trim().parse().unwrap();
                let body = if body.len() == n { body.to_owned() } else { "<cut>".into() };
                return (status, body);
            }
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let clean = body.ends_with("0\r\n\r\n");
            (status, if clean { body.to_owned() } else { "<cut>".into() })
        }
        Path::H2 => {
            let mut send = h2_client::<http_body_util::Empty<Bytes>>(proxy).await;
            let req = Request::builder()
                .uri(format!("http://{HOST}/"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = tokio::time::timeout(T, send.send_request(req)).await.unwrap();
            let Ok(resp) = resp else { return (0, "<cut>".into()) };
            let status = resp.status().as_u16();
            match tokio::time::timeout(T, resp.into_body().collect()).await.unwrap() {
                Ok(b) => (status, String::from_utf8_lossy(&b.to_bytes()).into_owned()),
                Err(_) => (status, "<cut>".into()),
            }
        }
    }
}

/// Runs one GET on every path against a replica of `proto` doing `kind`, marks the
/// replica draining once the request reached it, and returns each outcome and how long
/// after the drain started it came.
async fn cut_on_every_path(proto: Protocol, kind: Replica) -> Vec<(Path, (u16, String))> {
    let mut out = Vec::new();
    for (i, path) in PATHS.into_iter().enumerate() {
        let arrived = Arc::new(AtomicUsize::new(0));
        let (addr, _keep) = match proto {
            Protocol::H2c => {
                let r = h2c_replica(kind, arrived.clone()).await;
                (r.addr, Some(r))
            }
            _ => (h1_replica(kind, arrived.clone()), None),
        };
        let p = proxy(addr, proto).await;
        let client = tokio::spawn(get_on(p.addr, path));
        let t0 = Instant::now();
        while arrived.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < T, "the request never reached the replica");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = p.metrics.replica_drain_deadline_cancelled_total.get();
        let drained = Instant::now();
        drain(&p, addr, proto, 2 + i as u64);
        let answer = client.await.unwrap();
        let took = drained.elapsed();
        assert!(took >= GRACE, "{path:?}: ended after {took:?}, before the deadline");
        assert!(took < GRACE + Duration::from_secs(5), "{path:?}: ended only after {took:?}");
        let after = p.metrics.replica_drain_deadline_cancelled_total.get();
        assert_eq!(after - before, 1, "{path:?}: one exchange counted as cut");
        out.push((path, answer));
    }
    out
}

#[tokio::test]
async fn streaming_exchange_is_cut_at_the_deadline_http1_replica() {
    for (path, (status, body)) in cut_on_every_path(Protocol::Http1, Replica::Streams).await {
        assert_eq!(status, 200, "{path:?}");
        assert_eq!(body, "<cut>", "{path:?}: the stream must not end cleanly");
    }
}

#[tokio::test]
async fn streaming_exchange_is_cut_at_the_deadline_h2c_replica() {
    for (path, (status, body)) in cut_on_every_path(Protocol::H2c, Replica::Streams).await {
        assert_eq!(status, 200, "{path:?}");
        assert_eq!(body, "<cut>", "{path:?}: the stream must not end cleanly");
    }
}

#[tokio::test]
async fn exchange_without_a_head_gets_502_at_the_deadline() {
    for proto in [Protocol::Http1, Protocol::H2c] {
        for (path, (status, _)) in cut_on_every_path(proto, Replica::Silent).await {
            assert_eq!(status, 502, "{proto:?} {path:?}");
        }
    }
}

/// Before the deadline a draining replica's stream goes on; a replica back to ready (or a
/// new one at the address) is not cut afterwards.
#[tokio::test]
async fn nothing_is_cut_before_the_deadline() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let addr = h1_replica(Replica::Streams, arrived.clone());
    let p = proxy(addr, Protocol::Http1).await;
    let mut d: RoutingDoc = doc(&[("a", addr, Protocol::Http1)]);
    d.replicas[0].state = ReplicaState::Draining;
    d.replicas[0].drain_deadline = Some(SystemTime::now() + Duration::from_secs(3600));
    let client = tokio::spawn(get_on(p.addr, Path::Fast));
    while arrived.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.table.replace(d, 2).unwrap();
    tokio::time::sleep(GRACE * 2).await;
    assert!(!client.is_finished(), "cut before its deadline");
    assert_eq!(p.metrics.replica_drain_deadline_cancelled_total.get(), 0);
    client.abort();
}

/// An HTTP/1.1 replica that accepts an upgrade (101) and then pushes a byte every 50 ms
/// for a minute, as a WebSocket server pushing messages would; `ended` is set when its
/// leg sees the proxy's side go away (read EOF or a failed write).
fn upgrading_replica(arrived: Arc<AtomicUsize>, ended: Arc<AtomicUsize>) -> SocketAddr {
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std.set_nonblocking(true).unwrap();
    let addr = std.local_addr().unwrap();
    tokio::spawn(async move {
        let l = TcpListener::from_std(std).unwrap();
        loop {
            let Ok((tcp, _)) = l.accept().await else { return };
            let (arrived, ended) = (arrived.clone(), ended.clone());
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.into_split();
                let mut seen = Vec::new();
                let mut b = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match rd.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&b[..n]),
                    }
                }
                let head = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                if wr.write_all(head).await.is_err() {
                    return;
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                let push = async {
                    for _ in 0..1200 {
                        if wr.write_all(b"x").await.is_err() {
                            return;
                        }
                        tokio::time::sleep(PAUSE).await;
                    }
                };
                let eof = async { while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {} };
                tokio::select! { () = push => {}, () = eof => {} }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    addr
}

/// A WebSocket to a draining replica runs until the deadline, then both legs are ended
/// (the client's connection closes, the replica's leg sees the proxy go) and it is
/// counted like any exchange cut at the deadline.
#[tokio::test]
async fn upgraded_stream_is_ended_at_the_deadline() {
    let (arrived, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let addr = upgrading_replica(arrived.clone(), ended.clone());
    let p = proxy(addr, Protocol::Http1).await;
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nhost: {HOST}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The 101, then the replica's pushes.
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"x") {
        let n = tokio::time::timeout(T, tcp.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the upgrade: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(arrived.load(Ordering::SeqCst), 1);

    let before = p.metrics.replica_drain_deadline_cancelled_total.get();
    let drained = Instant::now();
    drain(&p, addr, Protocol::Http1, 2);
    // Still flowing until the deadline, then closed (EOF or a reset).
    let mut pushed_after_drain = 0usize;
    loop {
        match tokio::time::timeout(T, tcp.read(&mut b)).await.unwrap() {
            Ok(0) | Err(_) => break,
            Ok(n) => pushed_after_drain += n,
        }
    }
    let took = drained.elapsed();
    assert!(took >= GRACE, "ended after {took:?}, before the deadline");
    assert!(took < GRACE + Duration::from_secs(5), "ended only after {took:?}");
    assert!(pushed_after_drain > 0, "the stream went on until the deadline");
    let t0 = Instant::now();
    while ended.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < T, "the replica's leg was never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = p.metrics.replica_drain_deadline_cancelled_total.get();
    assert_eq!(after - before, 1, "one stream counted as cut");
}
