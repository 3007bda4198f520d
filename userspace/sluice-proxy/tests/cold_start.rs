//! The cold-start hold through real sockets: with `cold_start_hold` set, a request to a
//! server with no ready replica waits for the first one (released by the snapshot that
//! brings it) and gets the replica's answer; when the hold passes it gets the same 503 as
//! an unknown domain; beyond `cold_start_max_held` waiting requests the 503 is
//! immediate. Off by default: the 503 is immediate.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_routing::{Protocol, RoutingDoc, RoutingTable};
use sluice_tests::proxy_harness::*;
use tokio::sync::oneshot;

struct Proxy {
    addr: SocketAddr,
    table: RoutingTable,
    metrics: Arc<sluice_proxy::Metrics>,
    _stop: oneshot::Sender<()>,
}

/// The `hello` server with no replica, holding for `hold` and at most `max` requests.
fn cold(hold: Option<Duration>, max: u32) -> RoutingDoc {
    let mut d = doc(&[]);
    d.servers[0].cold_start_hold = hold;
    d.servers[0].cold_start_max_held = max;
    d
}

async fn proxy(d: RoutingDoc) -> Proxy {
    let table = RoutingTable::from_doc(node(), d).unwrap();
    let server = sluice_proxy::Proxy::bind(cfg(), table.clone()).await.unwrap();
    let addr = server.local_addrs()[0];
    let metrics = server.metrics();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Proxy { addr, table, metrics, _stop: tx }
}

fn ask(host: &str) -> String {
    format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
}

/// The response with its request id masked (the one part that differs per request).
fn masked(resp: &str) -> String {
    let id = resp
        .lines()
        .find_map(|l| l.strip_prefix("request id: "))
        .unwrap_or_else(|| panic!("no request id in {resp:?}"))
        .trim()
        .to_owned();
    resp.replace(&id, "<id>")
}

/// Waits (bounded) until `n` requests are held.
async fn until_held(p: &Proxy, n: i64) {
    let t0 = Instant::now();
    while p.metrics.cold_start_held.get() != n {
        assert!(t0.elapsed() < T, "never {n} held (now {})", p.metrics.cold_start_held.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn held_request_is_released_when_a_replica_becomes_ready() {
    let r = hello("a", Protocol::Http1).await;
    let p = proxy(cold(Some(Duration::from_secs(30)), 64)).await;
    let addr = p.addr;
    let t0 = Instant::now();
    let client = tokio::spawn(async move { raw(addr, ask(HOST).as_bytes()).await });
    until_held(&p, 1).await;
    p.table.replace(doc(&[("a", r.addr, Protocol::Http1)]), 2).unwrap();
    let answer = client.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hello from a"), "{answer}");
    assert!(t0.elapsed() < Duration::from_secs(10), "released late: {:?}", t0.elapsed());
    assert_eq!(p.metrics.cold_start_released_total.get(), 1);
    assert_eq!(p.metrics.cold_start_held.get(), 0);
    assert_eq!(r.hits(), 1);
}

#[tokio::test]
async fn hold_passes_with_the_unknown_domain_503() {
    let hold = Duration::from_millis(300);
    let p = proxy(cold(Some(hold), 64)).await;
    let t0 = Instant::now();
    let no_replica = raw(p.addr, ask(HOST).as_bytes()).await;
    assert!(t0.elapsed() >= hold, "answered before the hold passed: {:?}", t0.elapsed());
    let unknown = raw(p.addr, ask("nosuch.r1.example.test").as_bytes()).await;
    assert!(no_replica.starts_with("HTTP/1.1 503"), "{no_replica}");
    assert!(no_replica.to_ascii_lowercase().contains("retry-after: 1"), "{no_replica}");
    assert_eq!(masked(&no_replica), masked(&unknown));
    assert_eq!(p.metrics.cold_start_timed_out_total.get(), 1);
    assert_eq!(p.metrics.cold_start_held.get(), 0);
}

#[tokio::test]
async fn beyond_the_bound_the_503_is_immediate() {
    let r = hello("a", Protocol::Http1).await;
    let p = proxy(cold(Some(Duration::from_secs(30)), 2)).await;
    let addr = p.addr;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { raw(addr, ask(HOST).as_bytes()).await }))
        .collect();
    until_held(&p, 2).await;
    let t0 = Instant::now();
    let third = raw(p.addr, ask(HOST).as_bytes()).await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(t0.elapsed() < Duration::from_secs(10), "the third waited: {:?}", t0.elapsed());
    assert_eq!(p.metrics.cold_start_hold_full_total.get(), 1);
    // The two held ones still get the replica.
    p.table.replace(doc(&[("a", r.addr, Protocol::Http1)]), 2).unwrap();
    for h in held {
        let answer = h.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(p.metrics.cold_start_released_total.get(), 2);
}

#[tokio::test]
async fn without_a_hold_the_503_is_immediate() {
    let p = proxy(cold(None, 64)).await;
    let answer = raw(p.addr, ask(HOST).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(p.metrics.cold_start_held.get(), 0);
    assert_eq!(p.metrics.cold_start_timed_out_total.get(), 0);
}
