//! Tenant isolation benchmark: server B's latency with and without a flood on server A.
//!
//! `cargo run --release -p sluice-proxy --example isolation_bench -- [--requests 4000]
//! [--flooders 64]`
//!
//! An in-process proxy fronts two servers on loopback: A (replica answers after 200 ms,
//! `limits.max_in_flight = 16`) and B (replica answers at once). Eight keep-alive HTTP/1.1
//! clients send `--requests` requests to B, first alone, then while `--flooders` clients
//! hammer A (held at its cap, the rest refused with 503). Prints p50/p99 of B for both runs
//! and one JSON line (`{"bench":"isolation",...}`); the goal is B's p99 within 10%.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sluice_proxy::{Proxy, ProxyConfig};
use sluice_routing::{NodeConfig, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec};
use tokio::net::{TcpListener, TcpStream};

async fn replica(delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn client(proxy: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn one(send: &mut Sender, host: &str) -> u16 {
    send.ready().await.unwrap();
    let req = Request::builder().uri("/").header("host", host).body(Empty::new()).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// B's latencies (sorted) for `n` requests over 8 clients.
async fn measure_b(proxy: SocketAddr, n: usize) -> Vec<Duration> {
    let per = n / 8;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut send = client(proxy).await;
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                assert_eq!(one(&mut send, "b.r1.bench.test").await, 200);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let requests = arg("--requests", 4000).max(8);
    let flooders = arg("--flooders", 64);
    let a_addr = replica(Duration::from_millis(200)).await;
    let b_addr = replica(Duration::ZERO).await;
    let mut a = ServerSpec::new("a", "a");
    a.unauthenticated = true;
    a.limits.max_in_flight = Some(16);
    let mut b = ServerSpec::new("b", "b");
    b.unauthenticated = true;
    let doc = RoutingDoc {
        servers: vec![a, b],
        replicas: vec![ReplicaSpec::new("a", "a1", a_addr), ReplicaSpec::new("b", "b1", b_addr)],
        tokens: vec![],
    };
    let node = NodeConfig { base_domains: vec!["bench.test".into()], regions: vec!["r1".into()] };
    let table = RoutingTable::from_doc(node, doc).unwrap();
    let mut cfg = ProxyConfig::default();
    cfg.listeners[0].addr = "127.0.0.1:0".parse().unwrap();
    cfg.admin.addr = None;
    let server = Proxy::bind(cfg, table).await.unwrap();
    let proxy = server.local_addrs()[0];
    tokio::spawn(server.run(std::future::pending()));

    measure_b(proxy, 400).await; // warm-up
    let quiet = measure_b(proxy, requests).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flood = Vec::new();
    for _ in 0..flooders {
        let (stop, ok, refused) = (stop.clone(), ok.clone(), refused.clone());
        flood.push(tokio::spawn(async move {
            let mut send = client(proxy).await;
            while !stop.load(Ordering::Relaxed) {
                match one(&mut send, "a.r1.bench.test").await {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flooded = measure_b(proxy, requests).await;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        let _ = tokio::time::timeout(Duration::from_secs(2), f).await;
    }

    let (q50, q99, f50, f99) =
        (pct(&quiet, 0.5), pct(&quiet, 0.99), pct(&flooded, 0.5), pct(&flooded, 0.99));
    let ratio = f99.as_secs_f64() / q99.as_secs_f64().max(1e-9);
    println!("server B alone:        p50 {q50:?}  p99 {q99:?}");
    println!(
        "server B, A flooded:   p50 {f50:?}  p99 {f99:?}  (A: {} served, {} refused with 503)",
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
    println!("p99 ratio {ratio:.3} (goal <= 1.10)");
    println!(
        "{{\"bench\":\"isolation\",\"requests\":{requests},\"flooders\":{flooders},\"b_p50_us\":{},\"b_p99_us\":{},\"b_flooded_p50_us\":{},\"b_flooded_p99_us\":{},\"p99_ratio\":{ratio:.4}}}",
        q50.as_micros(),
        q99.as_micros(),
        f50.as_micros(),
        f99.as_micros()
    );
}
