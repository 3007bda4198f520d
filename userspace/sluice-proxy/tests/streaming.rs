//! Large bodies stream through sluice with bounded memory, both directions.
//!
//! Size: `SLUICE_STREAM_BYTES` (default 256 MiB so debug-build CI stays fast; a
//! 2 GiB run is `SLUICE_STREAM_BYTES=2147483648 cargo test --release -p sluice-proxy --test
//! streaming`). Memory: peak VmRSS of this test process (proxy, replica and client are all
//! in it) must grow less than 64 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use sluice_routing::Protocol;

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
