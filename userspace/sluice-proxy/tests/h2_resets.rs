//! Pooled h2c upstream connections through hand-framed replicas. A replica that keeps
//! sending on streams sluice considers closed makes sluice's h2 client reset each of them
//! itself; h2 counts those resets for the life of a connection and, by default, tears the
//! connection down at 1024 with every stream on it: a pooled upstream connection must
//! outlive that. And a connection the replica sent GOAWAY on takes no new requests.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// More requests than h2's default limit of locally reset streams (1024).
const REQUESTS: usize = 1100;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A hand-framed h2c replica: answers every request with `:status 200` and END_STREAM,
/// then sends one more DATA frame on the closed stream (a protocol error the client
/// answers with its own RST_STREAM). Counts connections.
async fn trailing_data_replica(conns: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(tcp, Mode::TrailingData));
        }
    });
    addr
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answer, then one more DATA frame on the closed stream.
    TrailingData,
    /// Answer cleanly.
    Clean,
    /// On the first request: GOAWAY (last stream id 0, NO_ERROR), then read and ignore
    /// everything without closing (a replica slow to finish its shutdown).
    GoAwayAndLinger,
}

async fn serve(mut tcp: TcpStream, mode: Mode) -> Option<()> {
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface).await.ok()?;
    tcp.write_all(&frame(4, 0, 0, &[])).await.ok()?;
    loop {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.ok()?;
        let mut out = Vec::new();
        match kind {
            // SETTINGS (not an ACK): acknowledge.
            4 if flags & 1 == 0 => out.extend(frame(4, 1, 0, &[])),
            // PING: answer.
            6 if flags & 1 == 0 => out.extend(frame(6, 1, 0, &payload)),
            // HEADERS: `:status 200` (HPACK static index 8), END_HEADERS | END_STREAM,
            // then a DATA frame the stream no longer allows.
            1 if mode == Mode::GoAwayAndLinger => {
                let mut goaway = 0u32.to_be_bytes().to_vec();
                goaway.extend_from_slice(&0u32.to_be_bytes());
                tcp.write_all(&frame(7, 0, 0, &goaway)).await.ok()?;
                let mut sink = [0u8; 4096];
                while tcp.read(&mut sink).await.ok()? > 0 {}
                return Some(());
            }
            1 => {
                out.extend(frame(1, 0x5, stream, &[0x88]));
                if mode == Mode::TrailingData {
                    out.extend(frame(0, 0, stream, b"x"));
                }
            }
            _ => {}
        }
        if !out.is_empty() {
            tcp.write_all(&out).await.ok()?;
        }
    }
}

#[tokio::test]
async fn replica_provoked_resets_do_not_tear_down_the_pooled_connection() {
    let conns = Arc::new(AtomicUsize::new(0));
    let addr = trailing_data_replica(conns.clone()).await;
    let h = start(cfg(), doc(&[("a", addr, Protocol::H2c)])).await;
    let mut client = h2_client::<Empty<Bytes>>(h.addr()).await;
    for i in 0..REQUESTS {
        let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
        let resp = tokio::time::timeout(T, client.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        // The body may end cleanly or with the stream's error; the status is the answer.
        let _ = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "the upstream connection was torn down");
}

/// After a GOAWAY the connection is out of the pool even while the replica keeps it open:
/// the next request opens a new connection instead of a stream the replica ignores.
#[tokio::test]
async fn connection_after_goaway_takes_no_new_requests() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let first = c2.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(serve(tcp, if first { Mode::GoAwayAndLinger } else { Mode::Clean }));
        }
    });
    let mut c = cfg();
    // Were the second request put on the GOAWAY'd connection, it would wait this long
    // on a stream the replica ignores, and get 504.
    c.timeouts.upstream_first_byte = std::time::Duration::from_secs(2);
    let h = start(c, doc(&[("a", addr, Protocol::H2c)])).await;
    let mut client = h2_client::<Empty<Bytes>>(h.addr()).await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
        let resp = tokio::time::timeout(T, client.send_request(req)).await.unwrap().unwrap();
        statuses.push(resp.status().as_u16());
        let _ = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
    }
    // The first stream was above the GOAWAY's last stream id, and there is no other
    // replica to retry it on (never the same one): 502.
    assert_eq!(statuses, [502, 200]);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}
