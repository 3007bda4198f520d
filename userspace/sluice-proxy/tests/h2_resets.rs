//! An h2c replica that keeps sending on streams sluice considers closed makes sluice's h2
//! client reset each of them itself. h2 counts those resets for the life of a connection
//! and, by default, tears the connection down at 1024 with every stream on it; a pooled
//! upstream connection must outlive that.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Empty};
use sluice_routing::Protocol;
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
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

async fn serve(mut tcp: TcpStream) -> Option<()> {
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
            1 => {
                out.extend(frame(1, 0x5, stream, &[0x88]));
                out.extend(frame(0, 0, stream, b"x"));
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
