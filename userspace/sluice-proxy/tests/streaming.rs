//! Large bodies stream through sluice with bounded memory, both directions.
//!
//! Size: `SLUICE_STREAM_BYTES` (default 256 MiB so debug-build CI stays fast; a
//! 2 GiB run is `SLUICE_STREAM_BYTES=2147483648 cargo test --release -p sluice-proxy --test
//! streaming`). Memory: peak VmRSS of this test process (proxy, replica and client are all
//! in it) must grow less than 64 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;

const CHUNK: usize = 64 * 1024;
const MAX_GROWTH: u64 = 64 * 1024 * 1024;

fn total() -> u64 {
    std::env::var("SLUICE_STREAM_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(256 << 20)
}

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Samples peak RSS until stopped.
fn rss_sampler() -> (Arc<AtomicBool>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss()));
    let (s, p) = (stop.clone(), peak.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            p.fetch_max(rss(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (stop, peak)
}

type Gen = StreamBody<
    futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>,
>;

fn generated(n: u64) -> Gen {
    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let s = stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64) as usize;
            Some((Ok(Frame::data(chunk.slice(..take))), left - take as u64))
        }
    });
    StreamBody::new(Box::pin(s) as futures_util::stream::BoxStream<'static, _>)
}

async fn count(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

async fn warm_up(addr: std::net::SocketAddr) {
    let resp = h1(addr, get("/warm", HOST)).await.unwrap();
    let _ = count(resp.into_body()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_streams_with_bounded_memory() {
    let n = total();
    // The replica counts what it receives and never stores it.
    let r = replica(Protocol::H2c, |req: Request<Incoming>| async move {
        if req.uri().path() == "/warm" {
            return Response::new(text("warm"));
        }
        let got = count(req.into_body()).await.unwrap_or(0);
        Response::new(text(got.to_string()))
    })
    .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::H2c)])).await;
    warm_up(h.addr()).await;
    let base = rss();
    let (stop, peak) = rss_sampler();
    let req = Request::builder()
        .method("POST")
        .uri("/up")
        .header("host", HOST)
        .body(generated(n))
        .unwrap();
    let resp =
        tokio::time::timeout(Duration::from_secs(600), h1(h.addr(), req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp).await, n.to_string());
    stop.store(true, Ordering::Relaxed);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!("upload {n} bytes: peak RSS growth {} KiB", growth / 1024);
    assert!(growth < MAX_GROWTH, "RSS grew {growth} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_streams_with_bounded_memory() {
    let n = total();
    let r = replica(Protocol::Http1, move |req: Request<Incoming>| async move {
        if req.uri().path() == "/warm" {
            return Response::new(text("warm"));
        }
        Response::new(generated(n).map_err(|e| match e {}).boxed_unsync())
    })
    .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    warm_up(h.addr()).await;
    let base = rss();
    let (stop, peak) = rss_sampler();
    let mut c = h2_client::<http_body_util::Empty<Bytes>>(h.addr()).await;
    let req = Request::builder()
        .uri(format!("http://{HOST}/down"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body();
    assert!(!body.is_end_stream());
    let got = tokio::time::timeout(Duration::from_secs(600), count(body)).await.unwrap().unwrap();
    assert_eq!(got, n);
    stop.store(true, Ordering::Relaxed);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!("download {n} bytes: peak RSS growth {} KiB", growth / 1024);
    assert!(growth < MAX_GROWTH, "RSS grew {growth} bytes");
}

/// A response body of 16 KiB chunks that counts what the replica's HTTP/2 stack took from
/// it (about what it sent: hyper takes the next chunk once the window has room), and
/// counts itself dropped.
struct Counted {
    left: usize,
    taken: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = sluice_proxy::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        const PIECE: usize = 16 * 1024;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(PIECE);
        self.left -= n;
        self.taken.fetch_add(n as u64, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'r'; n])))))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// h2c clients of an h2c replica that stop reading: what the replica manages to send per
/// stream stays bounded by the windows on the way (the client's stream window, sluice's
/// send buffer, sluice's window towards the replica), not the response's size, so the
/// response waits in the replica; and when the clients leave, the replica's streams end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_slow_readers_of_h2c_replica_leave_the_response_in_the_replica() {
    const STREAMS: u64 = 4;
    const RESPONSE: usize = 16 << 20;
    // Client stream window 64 KiB + sluice's send buffer (32 KiB) + its upstream stream
    // window (256 KiB) + a chunk or two in flight: well under this.
    const PER_STREAM: u64 = 512 * 1024;
    let taken = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let (t, d) = (taken.clone(), dropped.clone());
    let r = replica(Protocol::H2c, move |_req: Request<Incoming>| {
        let body = Counted { left: RESPONSE, taken: t.clone(), dropped: d.clone() };
        async move { Response::new(body.boxed_unsync()) }
    })
    .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::H2c)])).await;

    let tcp = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, http_body_util::Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..STREAMS {
        let req = Request::builder()
            .uri(format!("http://{HOST}/"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(resp); // never read
    }
    // Until nothing more leaves the replica for half a second (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = u64::MAX;
    loop {
        let now = taken.load(Ordering::SeqCst);
        if now == last || tokio::time::Instant::now() > deadline {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let per_stream = last / STREAMS;
    eprintln!("{} KiB per non-reading stream left the replica", per_stream / 1024);
    assert!(per_stream >= 64 * 1024, "nothing flowed: {per_stream} bytes per stream");
    assert!(
        per_stream < PER_STREAM,
        "{} KiB per stream left the replica for clients that do not read",
        per_stream / 1024
    );
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "a response ended early");

    // The clients leave: every stream to the replica ends (cancelled) within a bound.
    drop(held);
    drop(send);
    conn.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dropped.load(Ordering::SeqCst) < STREAMS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {STREAMS} replica streams still open after the clients left",
            STREAMS - dropped.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
