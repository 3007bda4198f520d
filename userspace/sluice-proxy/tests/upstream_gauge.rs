//! `sluice_upstream_connections_open` against the replica's own count of open sockets,
//! after exchanges that end badly: client gone mid-response, replica reset, replica
//! silent past the idle timeout, connect refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw HTTP/1.1 replica that counts the sockets it holds open. The path picks the
/// behaviour: `/ok` answers (keep-alive), `/reset` resets the connection, `/hang` never
/// answers, `/partial` sends half a body and then nothing.
struct RawReplica {
    addr: SocketAddr,
    open: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Live(Arc<AtomicI64>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn raw_replica() -> RawReplica {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicI64::new(0));
    let o = open.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            o.fetch_add(1, Ordering::SeqCst);
            let live = Live(o.clone());
            tokio::spawn(async move {
                let _live = live;
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    match path.as_str() {
                        "/reset" => {
                            // A zero linger never blocks on drop: it sends RST at once.
                            #[allow(deprecated)]
                            let _ = s.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        "/hang" => {
                            // Hold the socket until sluice closes it.
                            let _ = s.read(&mut chunk).await;
                            return;
                        }
                        "/partial" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
                                .await;
                            let _ = s.read(&mut chunk).await;
                            return;
                        }
                        _ => {
                            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    RawReplica { addr, open, task }
}

/// Waits until the replica holds `want` sockets and the gauge says the same; returns
/// (gauge, real).
async fn settle(h: &Harness, r: &RawReplica, want: i64) -> (i64, i64) {
    let t0 = Instant::now();
    loop {
        let g = h.metrics.upstream_h1_open.get();
        let real = r.open.load(Ordering::SeqCst);
        if (g == want && real == want) || t0.elapsed() > T {
            return (g, real);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn send(addr: SocketAddr, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.unwrap();
    tcp
}

async fn read_all(mut tcp: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http1_gauge_follows_real_sockets() {
    let r = raw_replica().await;
    let mut c = cfg();
    c.timeouts.upstream_idle = Some(Duration::from_millis(300));
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;

    // Clean exchanges: the pooled connection stays open and counted.
    for _ in 0..3 {
        let mut tcp = send(h.addr(), "/ok").await;
        let mut b = [0u8; 256];
        let n = tcp.read(&mut b).await.unwrap();
        assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
    }
    assert_eq!(settle(&h, &r, 1).await, (1, 1), "after clean exchanges");

    // Client disconnects mid-response, several times at once.
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut tcp = send(h.addr(), "/partial").await;
        let mut b = [0u8; 256];
        let _ = tcp.read(&mut b).await;
        clients.push(tcp);
    }
    drop(clients);
    let (g, real) = settle(&h, &r, 0).await;
    assert_eq!((g, real), (0, 0), "after aborted responses");

    // Replica resets the connection.
    for _ in 0..5 {
        let out = read_all(send(h.addr(), "/reset").await).await;
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    }
    let (g, real) = settle(&h, &r, 0).await;
    assert_eq!((g, real), (0, 0), "after resets");

    // Replica silent past the idle timeout.
    for _ in 0..3 {
        let out = read_all(send(h.addr(), "/hang").await).await;
        assert!(out.starts_with("HTTP/1.1 50"), "{out}");
    }
    let (g, real) = settle(&h, &r, 0).await;
    assert_eq!((g, real), (0, 0), "after timeouts");

    // Client disconnects while the replica has not answered yet.
    let tcp = send(h.addr(), "/hang").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(tcp);
    let (g, real) = settle(&h, &r, 0).await;
    assert_eq!((g, real), (0, 0), "after a client gave up waiting");
    let m = body_string(h1(h.admin, get("/metrics", "admin")).await.unwrap()).await;
    let line = format!("sluice_upstream_connections_open{{protocol=\"http1\"}} {g}");
    assert!(m.contains(&line), "{line} not in {m}");
}

#[tokio::test]
async fn http1_gauge_unchanged_by_failed_connects() {
    let dead = dead_addr().await;
    let h = start(cfg(), doc(&[("a", dead, Protocol::Http1)])).await;
    for _ in 0..5 {
        let out = read_all(send(h.addr(), "/").await).await;
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    }
    assert_eq!(h.metrics.upstream_h1_open.get(), 0);
    assert_eq!(h.metrics.upstream_h2_open.get(), 0);
}
