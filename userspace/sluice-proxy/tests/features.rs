//! Routing features over real sockets: proxy auth, sticky sessions, P2C, the autoscaler
//! stream and scale-from-zero demand, per-server caps, mirroring.
//!
//! The mirrored upload's size comes from `SLUICE_MIRROR_TEST_BYTES` (default 128 MiB, so CI
//! stays quick; 1 GiB: `SLUICE_MIRROR_TEST_BYTES=1073741824`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use sluice_proxy::ProxyConfig;
use sluice_routing::{
    Change, MirrorSpec, Protocol, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec, TokenSpec,
    hash_secret,
};
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const BASE: &str = "r1.example.test";

fn host(label: &str) -> String {
    format!("{label}.{BASE}")
}

struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    table: RoutingTable,
    _stop: oneshot::Sender<()>,
}

async fn start_proxy(cfg: ProxyConfig, doc: RoutingDoc) -> Proxy {
    let table = RoutingTable::from_doc(node(), doc).unwrap();
    let server = sluice_proxy::Proxy::bind(cfg, table.clone()).await.unwrap();
    let addr = server.local_addrs()[0];
    let admin = server.admin_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Proxy { addr, admin, table, _stop: tx }
}

fn server(id: &str) -> ServerSpec {
    let mut s = ServerSpec::new(id, id);
    s.unauthenticated = true;
    s
}

fn replica_spec(server: &str, id: &str, addr: SocketAddr) -> ReplicaSpec {
    ReplicaSpec::new(server, id, addr)
}

async fn metrics(admin: SocketAddr) -> String {
    let resp = h1(admin, get("/metrics", "admin")).await.unwrap();
    body_string(resp).await
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{text}"))
}

/// A replica that records which headers it saw.
async fn header_recorder(
    id: &'static str,
) -> (TestReplica, Arc<std::sync::Mutex<Vec<Vec<String>>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let r = replica(Protocol::Http1, move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            let names: Vec<String> = req.headers().keys().map(|k| k.as_str().to_owned()).collect();
            s.lock().unwrap().push(names);
            let _ = req.into_body().collect().await;
            Response::builder().header("x-replica", id).body(text("ok\n")).unwrap()
        }
    })
    .await;
    (r, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_and_rejected_requests_never_reach_the_replica() {
    let (rep, seen) = header_recorder("a").await;
    let mut prod = ServerSpec::new("prod", "prod");
    prod.environment = "prod".into();
    let tok = |id: &str, secret: &str, env: &str| TokenSpec {
        id: id.into(),
        secret_hash: hash_secret(secret),
        environments: vec![env.into()],
    };
    let doc = RoutingDoc {
        servers: vec![prod],
        replicas: vec![replica_spec("prod", "a", rep.addr)],
        tokens: vec![tok("tok-prod", "sec-prod", "prod"), tok("tok-dev", "sec-dev", "dev")],
    };
    let p = start_proxy(cfg(), doc).await;
    let h = host("prod");
    let req = |key: Option<&str>, secret: Option<&str>| {
        let mut b = Request::builder().uri("/").header("host", &h);
        if let Some(k) = key {
            b = b.header("sluice-key", k);
        }
        if let Some(s) = secret {
            b = b.header("Sluice-Secret", s);
        }
        b.body(Empty::<Bytes>::new()).unwrap()
    };
    let cases = [
        (None, None, StatusCode::UNAUTHORIZED),
        (Some("tok-prod"), None, StatusCode::UNAUTHORIZED),
        (Some("tok-prod"), Some("wrong"), StatusCode::UNAUTHORIZED),
        (Some("nope"), Some("sec-prod"), StatusCode::UNAUTHORIZED),
        (Some("tok-dev"), Some("wrong"), StatusCode::UNAUTHORIZED),
        (Some("tok-dev"), Some("sec-dev"), StatusCode::FORBIDDEN),
    ];
    for (k, s, want) in cases {
        let resp = h1(p.addr, req(k, s)).await.unwrap();
        assert_eq!(resp.status(), want, "{k:?} {s:?}");
        if want == StatusCode::UNAUTHORIZED {
            assert!(resp.headers().contains_key("www-authenticate"));
        }
        let body = body_string(resp).await;
        assert!(!body.contains("sec-"), "a secret leaked into the answer: {body}");
    }
    assert_eq!(rep.hits(), 0, "a rejected request reached the replica");

    // Allowed, with underscore look-alikes that must be stripped too.
    let mut ok = req(Some("tok-prod"), Some("sec-prod"));
    ok.headers_mut().insert("sluice_secret", "smuggled".parse().unwrap());
    ok.headers_mut().insert("SLUICE_KEY", "smuggled".parse().unwrap());
    let resp = h1(p.addr, ok).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(rep.hits(), 1);
    let names = seen.lock().unwrap()[0].clone();
    for n in &names {
        assert!(
            !n.replace('_', "-").starts_with("sluice-key")
                && !n.replace('_', "-").starts_with("sluice-secret"),
            "auth header {n} forwarded: {names:?}"
        );
    }

    // A rejected POST with a small body on a keep-alive connection: the body is drained,
    // the connection stays usable, the replica sees nothing.
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let rejected = format!(
        "POST / HTTP/1.1\r\nhost: {h}\r\ncontent-length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nhost: {h}\r\nsluice-key: tok-prod\r\nsluice-secret: sec-prod\r\n\r\n"
    );
    tcp.write_all(rejected.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200") {
        let mut chunk = [0u8; 4096];
        let n =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), tcp.read(&mut chunk))
                .await
                .expect("no answer to the second request")
                .unwrap();
        assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert_eq!(rep.hits(), 2);

    // A large rejected body is not read: the connection closes.
    let big = format!("POST / HTTP/1.1\r\nhost: {h}\r\ncontent-length: 10000000\r\n\r\n");
    let answer = raw(p.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert_eq!(rep.hits(), 2);

    // A rejected chunked body (no declared length) is drained the same way, within the
    // bound: no close, and the next request on the connection is served.
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let rejected = format!(
        "POST / HTTP/1.1\r\nhost: {h}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nhost: {h}\r\nsluice-key: tok-prod\r\nsluice-secret: sec-prod\r\n\r\n"
    );
    tcp.write_all(rejected.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, tcp.read(&mut chunk))
            .await
            .expect("no answer to the request after a chunked rejection")
            .unwrap();
        assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 401"), "{text}");
    assert!(!text.contains("connection: close"), "{text}");
    assert_eq!(rep.hits(), 3);

    // Rejections are counted as such, never as requests.
    let m = metrics(p.admin).await;
    assert_eq!(metric(&m, "sluice_server_auth_rejected_total{server=\"prod\"}"), 9);
    assert_eq!(metric(&m, "sluice_requests_total{server=\"prod\"}"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_stick_and_only_a_removed_replicas_sessions_move() {
    let ids: Vec<&'static str> = vec!["r0", "r1", "r2", "r3"];
    let mut reps = Vec::new();
    for id in &ids {
        reps.push(hello(id, Protocol::H2c).await);
    }
    let mut s = server("sticky");
    s.session_header = Some("X-Session".into());
    let doc = RoutingDoc {
        servers: vec![s],
        replicas: ids
            .iter()
            .zip(&reps)
            .map(|(id, r)| {
                let mut spec = replica_spec("sticky", id, r.addr);
                spec.protocol = Protocol::H2c;
                spec
            })
            .collect(),
        tokens: vec![],
    };
    let p = start_proxy(cfg(), doc).await;
    let mut client = h2_client::<Empty<Bytes>>(p.addr).await;
    let h = host("sticky");
    async fn ask(
        client: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        h: &str,
        session: &str,
    ) -> String {
        let req = Request::builder()
            .uri(format!("http://{h}/"))
            .header("x-session", session)
            .body(Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(T, client.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let id = resp.headers()["x-replica"].to_str().unwrap().to_owned();
        let _ = resp.into_body().collect().await;
        id
    }
    // 1,000 requests with one session id land on one replica.
    let first = ask(&mut client, &h, "user-42").await;
    for _ in 0..999 {
        assert_eq!(ask(&mut client, &h, "user-42").await, first);
    }
    // Many sessions: remember where each went, remove one replica, compare.
    let sessions: Vec<String> = (0..300).map(|i| format!("session-{i}")).collect();
    let mut before = HashMap::new();
    for s in &sessions {
        before.insert(s.clone(), ask(&mut client, &h, s).await);
    }
    let spread: std::collections::HashSet<&String> = before.values().collect();
    assert_eq!(spread.len(), 4, "sessions should use every replica");
    p.table
        .apply(vec![Change::DeleteReplica { server: "sticky".into(), id: "r2".into() }], 2)
        .unwrap();
    let mut moved = 0;
    for s in &sessions {
        let now = ask(&mut client, &h, s).await;
        if before[s] == "r2" {
            assert_ne!(now, "r2");
            moved += 1;
        } else {
            assert_eq!(now, before[s], "session {s} moved though its replica stayed");
        }
    }
    assert!(moved > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_load_to_the_less_busy_replica() {
    // `busy` never answers; `free` answers at once.
    let busy = replica(Protocol::Http1, |_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Response::new(text("late"))
    })
    .await;
    let free = hello("free", Protocol::Http1).await;
    let doc = RoutingDoc {
        servers: vec![server("p2c")],
        replicas: vec![
            replica_spec("p2c", "busy", busy.addr),
            replica_spec("p2c", "free", free.addr),
        ],
        tokens: vec![],
    };
    let p = start_proxy(cfg(), doc).await;
    let h = host("p2c");
    let mut stuck = Vec::new();
    for _ in 0..50 {
        let (addr, h2) = (p.addr, h.clone());
        let (busy_before, free_before) = (busy.hits(), free.hits());
        let task = tokio::spawn(async move { h1(addr, get("/", &h2)).await });
        // Wait until this request either reached `busy` (and hangs) or got its answer.
        let deadline = Instant::now() + T;
        loop {
            if busy.hits() > busy_before {
                stuck.push(task);
                break;
            }
            if free.hits() > free_before && task.is_finished() {
                let resp = task.await.unwrap().unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                let _ = body_string(resp).await;
                // The proxy may release the request a moment after the client has the
                // whole answer; wait for it, so every pick sees the settled loads.
                let free_stats = {
                    let snap = p.table.load();
                    let server = snap.server("p2c").unwrap();
                    server.replicas.iter().find(|r| r.id == "free").unwrap().stats.clone()
                };
                while free_stats.in_flight.load(Ordering::Relaxed) > 0 {
                    assert!(Instant::now() < deadline, "request never released");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                break;
            }
            assert!(Instant::now() < deadline, "request neither answered nor stuck");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Once `busy` holds one request, every later one goes to the idle replica.
    assert!(busy.hits() <= 1, "busy got {} requests", busy.hits());
    assert!(free.hits() >= 49);
    for t in stuck {
        t.abort();
    }
}

/// Reads the NDJSON stream until `pred` holds for a record, or panics after `within`.
async fn wait_for_record(
    body: &mut Incoming,
    buf: &mut Vec<u8>,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if pred(&v) {
                return v;
            }
        }
        let frame = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), body.frame())
            .await
            .expect("no matching record in time")
            .expect("stream ended")
            .unwrap();
        if let Some(d) = frame.data_ref() {
            buf.extend_from_slice(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_replicas_answer_503_and_the_stream_shows_the_demand() {
    let mut c = cfg();
    c.autoscaler.interval = Duration::from_millis(200);
    let mut cold = server("cold");
    cold.target_concurrency = 10;
    let doc = RoutingDoc { servers: vec![cold], replicas: vec![], tokens: vec![] };
    let p = start_proxy(c, doc).await;
    let resp = h1(p.admin, get("/autoscaler/stream", "admin")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    // The stream is live: an idle record first.
    let idle = wait_for_record(&mut body, &mut buf, T, |v| v["server"] == "cold").await;
    assert_eq!(idle["in_flight"], 0);
    assert_eq!(idle["scale"]["target_concurrency"], 10);

    let started = Instant::now();
    let resp = h1(p.addr, get("/", &host("cold"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(body_string(resp).await.contains("no ready replica"));
    let demand = wait_for_record(&mut body, &mut buf, T, |v| {
        v["server"] == "cold" && v["no_replica_503"] == 1
    })
    .await;
    // Within one interval (plus scheduling slack on a busy machine).
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(demand["replicas"].as_array().unwrap().len(), 0);
    // The scaling rule turns it into a scale-from-zero recommendation.
    let rec: sluice_routing::ServerRecord = serde_json::from_value(demand).unwrap();
    assert_eq!(rec.scale.as_ref().unwrap().recommend(rec.in_flight, rec.no_replica_503), 1);
    // Next interval: the demand was counted once.
    let next = wait_for_record(&mut body, &mut buf, T, |v| v["server"] == "cold").await;
    assert_eq!(next["no_replica_503"], 0);
    let m = metrics(p.admin).await;
    assert_eq!(metric(&m, "sluice_server_no_replica_total{server=\"cold\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_server_leaves_another_serving() {
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let slow = replica(Protocol::Http1, move |_req: Request<Incoming>| {
        let r = r.clone();
        async move {
            r.notified().await;
            Response::new(text("slow"))
        }
    })
    .await;
    let fast = hello("b", Protocol::Http1).await;
    let mut a = server("a");
    a.limits.max_in_flight = Some(10);
    let doc = RoutingDoc {
        servers: vec![a, server("b")],
        replicas: vec![replica_spec("a", "slow", slow.addr), replica_spec("b", "fast", fast.addr)],
        tokens: vec![],
    };
    let p = start_proxy(cfg(), doc).await;
    // Flood A with 60 concurrent requests that never finish.
    let mut flood = Vec::new();
    for _ in 0..60 {
        let (addr, h) = (p.addr, host("a"));
        flood.push(tokio::spawn(async move { h1(addr, get("/", &h)).await.map(|r| r.status()) }));
    }
    // 10 reach the replica; 50 are refused at once with 503 + Retry-After.
    let mut refused = 0;
    let deadline = Instant::now() + T;
    while refused < 50 {
        assert!(Instant::now() < deadline, "refused only {refused}");
        let mut rest = Vec::new();
        for t in flood {
            if t.is_finished() {
                assert_eq!(t.await.unwrap().unwrap(), StatusCode::SERVICE_UNAVAILABLE);
                refused += 1;
            } else {
                rest.push(t);
            }
        }
        flood = rest;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(flood.len(), 10);
    // B is unaffected.
    for _ in 0..20 {
        let resp =
            tokio::time::timeout(T, h1(p.addr, get("/", &host("b")))).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let m = metrics(p.admin).await;
    assert_eq!(metric(&m, "sluice_server_over_limit_total{server=\"a\"}"), 50);
    assert_eq!(metric(&m, "sluice_server_in_flight{server=\"a\"}"), 10);
    release.notify_waiters();
    for t in flood {
        let _ = tokio::time::timeout(T, t).await;
    }
}

/// A replica that counts the body bytes it receives, reading at most `rate` bytes/s
/// (`None`: as fast as possible), and records whether the body completed.
async fn sink(
    rate: Option<u64>,
) -> (TestReplica, Arc<AtomicU64>, Arc<std::sync::Mutex<Vec<Result<u64, String>>>>) {
    let bytes = Arc::new(AtomicU64::new(0));
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (b, d) = (bytes.clone(), done.clone());
    let r = replica(Protocol::Http1, move |req: Request<Incoming>| {
        let (b, d) = (b.clone(), d.clone());
        async move {
            let auth_seen = req.headers().contains_key("sluice-secret");
            let mut body = req.into_body();
            let mut total = 0u64;
            let result = loop {
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Some(data) = f.data_ref() {
                            total += data.len() as u64;
                            b.fetch_add(data.len() as u64, Ordering::Relaxed);
                            if let Some(rate) = rate {
                                let pause =
                                    Duration::from_secs_f64(data.len() as f64 / rate as f64);
                                tokio::time::sleep(pause).await;
                            }
                        }
                    }
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Ok(total),
                }
            };
            d.lock().unwrap().push(if auth_seen { Err("auth header".into()) } else { result });
            Response::new(text(format!("{total}")))
        }
    })
    .await;
    (r, bytes, done)
}

fn upload(
    h: String,
    size: u64,
) -> Request<StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>>> {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= size {
                return None;
            }
            let n = (size - sent).min(chunk.len() as u64) as usize;
            Some((Ok(Frame::data(chunk.slice(..n))), sent + n as u64))
        }
    });
    Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", h)
        .header("content-length", size.to_string())
        .body(StreamBody::new(stream))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_small_requests_and_drops_a_slow_mirror_without_slowing_the_primary() {
    let size: u64 = std::env::var("SLUICE_MIRROR_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128 * 1024 * 1024);
    let (primary, primary_bytes, _) = sink(None).await;
    let (fast_mirror, _, fast_done) = sink(None).await;
    let (slow_mirror, slow_bytes, _) = sink(Some(1_000_000)).await;
    let mirrored = |id: &str, to: SocketAddr| {
        let mut s = server(id);
        s.mirror = Some(MirrorSpec {
            address: to,
            protocol: Protocol::Http1,
            fraction: 1.0,
            max_buffer_bytes: 1024 * 1024,
        });
        s
    };
    let doc = RoutingDoc {
        servers: vec![
            server("plain"),
            mirrored("copied", fast_mirror.addr),
            mirrored("big", slow_mirror.addr),
        ],
        replicas: vec![
            replica_spec("plain", "p", primary.addr),
            replica_spec("copied", "p", primary.addr),
            replica_spec("big", "p", primary.addr),
        ],
        tokens: vec![],
    };
    let p = start_proxy(cfg(), doc).await;

    // A small mirrored request reaches the mirror whole (auth headers stripped).
    let body = Full::new(Bytes::from(vec![b'y'; 100_000]));
    let req = Request::builder()
        .method("POST")
        .uri("/x")
        .header("host", host("copied"))
        .header("sluice-secret", "not-for-replicas")
        .body(body)
        .unwrap();
    let resp = h1(p.addr, req).await.unwrap();
    assert_eq!(body_string(resp).await, "100000");
    let deadline = Instant::now() + T;
    while fast_done.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "mirror never finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fast_done.lock().unwrap()[0], Ok(100_000));

    // Baseline: the same upload without a mirror.
    let t0 = Instant::now();
    let resp = h1(p.addr, upload(host("plain"), size)).await.unwrap();
    assert_eq!(body_string(resp).await, size.to_string());
    let baseline = t0.elapsed();

    // Mirrored to a mirror reading at 1 MB/s.
    let before = primary_bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let resp = h1(p.addr, upload(host("big"), size)).await.unwrap();
    assert_eq!(body_string(resp).await, size.to_string());
    let mirrored_time = t0.elapsed();
    assert_eq!(primary_bytes.load(Ordering::Relaxed) - before, size);
    eprintln!(
        "{size} bytes: baseline {baseline:?}, with a 1 MB/s mirror {mirrored_time:?}; mirror got {} bytes",
        slow_bytes.load(Ordering::Relaxed)
    );
    // The mirror alone would need size / 1 MB/s; the primary is nowhere near that.
    assert!(
        mirrored_time < baseline * 3 + Duration::from_secs(5),
        "primary slowed: {mirrored_time:?} vs {baseline:?}"
    );
    let m = metrics(p.admin).await;
    assert_eq!(metric(&m, "sluice_server_mirror_dropped_total{server=\"big\"}"), 1);
    assert_eq!(metric(&m, "sluice_server_mirror_dropped_total{server=\"copied\"}"), 0);
    assert_eq!(metric(&m, "sluice_server_mirrored_total{server=\"copied\"}"), 1);
    // Dropping released the buffer budget.
    assert_eq!(metric(&m, "sluice_server_buffered_bytes{server=\"big\"}"), 0);
    assert!(slow_bytes.load(Ordering::Relaxed) < size);
}
