//! The access log over real sockets: its fields for the HTTP/1.1 fast path, the hyper
//! path (h2c) and sluice's own answers, per-server overrides, sampling, and a sink that
//! takes no bytes (entries are dropped and counted, requests never wait for it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use serde_json::Value;
use sluice_proxy::ProxyConfig;
use sluice_routing::{Protocol, RoutingDoc};
use sluice_tests::proxy_harness::*;

fn logging(path: &Path) -> ProxyConfig {
    let mut c = cfg();
    c.access_log.enabled = true;
    c.access_log.path = path.to_str().unwrap().to_owned();
    c
}

fn entries(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits (bounded) until the log holds `n` entries.
async fn wait_entries(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let e = entries(path);
        if e.len() >= n || Instant::now() > deadline {
            assert_eq!(e.len(), n, "{e:#?}");
            return e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A replica that reads the whole request body before it answers `hello from <id>`.
async fn reader(id: &'static str, proto: Protocol) -> TestReplica {
    replica(proto, move |req: Request<hyper::body::Incoming>| async move {
        collect(req.into_body()).await.unwrap();
        http::Response::new(text(format!("hello from {id}\n")))
    })
    .await
}

fn log_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("access.log")
}

/// The response's request id header, as the fast path writes it.
fn header_of<'a>(raw: &'a str, name: &str) -> &'a str {
    raw.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
        .unwrap_or_else(|| panic!("no {name} in {raw}"))
        .trim()
}

#[tokio::test]
async fn h1_fast_path_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let r = reader("r1", Protocol::Http1).await;
    let h = start(logging(&path), doc(&[("r1", r.addr, Protocol::Http1)])).await;
    let req = format!(
        "POST /x HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
    );
    let raw = raw(h.addr(), req.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let rid = header_of(&raw, "x-request-id");
    let body = "hello from r1\n";
    let e = &wait_entries(&path, 1).await[0];
    assert_eq!(e["request_id"], rid);
    assert_eq!(e["server"], "hello");
    assert_eq!(e["replica"], "r1");
    assert_eq!(e["replica_addr"], r.addr.to_string());
    assert_eq!(e["status"], 200);
    assert_eq!(e["bytes_in"], 5);
    assert_eq!(e["bytes_out"], body.len());
    assert_eq!(e["protocol_in"], "HTTP/1.1");
    assert_eq!(e["protocol_out"], "HTTP/1.1");
    assert_eq!(e["tls"], false);
    assert_eq!(e["client"], "127.0.0.1");
    assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(e["error"], Value::Null);
    assert_eq!(e["complete"], true);
    let (ttfb, total) = (e["ttfb_ms"].as_f64().unwrap(), e["duration_ms"].as_f64().unwrap());
    assert!(ttfb <= total, "{e}");
    assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
}

#[tokio::test]
async fn h2c_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let r = reader("r2", Protocol::H2c).await;
    let h = start(logging(&path), doc(&[("r2", r.addr, Protocol::H2c)])).await;
    let mut send = h2_client(h.addr()).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{HOST}/y"))
        .body(full_body("abc"))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = body_string(resp).await;
    let e = &wait_entries(&path, 1).await[0];
    assert_eq!(e["request_id"], rid.as_str());
    assert_eq!(e["server"], "hello");
    assert_eq!(e["replica"], "r2");
    assert_eq!(e["status"], 200);
    assert_eq!(e["bytes_in"], 3);
    assert_eq!(e["bytes_out"], body.len());
    assert_eq!(e["protocol_in"], "HTTP/2");
    assert_eq!(e["protocol_out"], "HTTP/2");
    assert_eq!(e["error"], Value::Null);
    assert_eq!(e["complete"], true);
    assert!(e["ttfb_ms"].as_f64().is_some());
}

/// sluice's own answers carry their reason: an unknown domain (404 and 503), a server
/// without a replica (503), and a replica that cannot be reached on the fast path (502).
#[tokio::test]
async fn sluice_answers_carry_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let mut c = logging(&path);
    c.unknown_domain_status = 404;
    let dead = dead_addr().await;
    let mut d = doc(&[("gone", dead, Protocol::Http1)]);
    let mut empty = sluice_routing::ServerSpec::new("empty", "empty");
    empty.unauthenticated = true;
    d.servers.push(empty);
    let h = start(c, d).await;

    let resp = h1(h.addr(), get("/", "nobody.r1.example.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let e = wait_entries(&path, 1).await.remove(0);
    assert_eq!((e["status"].clone(), e["error"].clone()), (404.into(), "unknown_domain".into()));
    assert_eq!(e["server"], Value::Null);
    assert_eq!(e["replica"], Value::Null);
    assert_eq!(e["protocol_out"], Value::Null);
    assert!(e["bytes_out"].as_u64().unwrap() > 0, "{e}");

    let resp = h1(h.addr(), get("/", "empty.r1.example.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e = wait_entries(&path, 2).await.remove(1);
    assert_eq!((e["status"].clone(), e["error"].clone()), (503.into(), "no_replica".into()));
    assert_eq!(e["server"], "empty");

    let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    let raw = raw(h.addr(), req.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    let e = wait_entries(&path, 3).await.remove(2);
    assert_eq!((e["status"].clone(), e["error"].clone()), (502.into(), "upstream".into()));
    assert_eq!(e["server"], "hello");
    assert_eq!(e["replica"], "gone");
    assert_eq!(e["request_id"], header_of(&raw, "x-request-id"));
}

/// A server's own `access_log` wins over the node's `all_servers`.
#[tokio::test]
async fn per_server_override() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let r = hello("r1", Protocol::Http1).await;
    let mut d: RoutingDoc = doc(&[("r1", r.addr, Protocol::Http1)]);
    let mut quiet = sluice_routing::ServerSpec::new("quiet", "quiet");
    quiet.unauthenticated = true;
    quiet.access_log = Some(false);
    d.servers.push(quiet);
    let mut rq = sluice_routing::ReplicaSpec::new("quiet", "q1", r.addr);
    rq.protocol = Protocol::Http1;
    d.replicas.push(rq);
    let mut c = logging(&path);
    c.access_log.all_servers = false;
    d.servers[0].access_log = Some(true);
    let h = start(c, d).await;
    for host in ["quiet.r1.example.test", HOST, "quiet.r1.example.test"] {
        let resp = h1(h.addr(), get("/", host)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_string(resp).await;
    }
    let e = wait_entries(&path, 1).await;
    assert_eq!(e[0]["server"], "hello");
}

/// A client that leaves before the response head is logged too, on both paths: status
/// 0, incomplete, with the replica the request went to.
#[tokio::test]
async fn client_gone_before_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let r = replica(Protocol::Http1, |_req| std::future::pending()).await;
    let h = start(logging(&path), doc(&[("stuck", r.addr, Protocol::Http1)])).await;
    // HTTP/2: the stream is reset.
    let mut send = h2_client(h.addr()).await;
    let req = get(&format!("http://{HOST}/"), HOST);
    let waiting = tokio::time::timeout(Duration::from_millis(300), send.send_request(req));
    assert!(waiting.await.is_err());
    drop(send);
    // HTTP/1.1 on the fast path: the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes()).await.unwrap();
    let deadline = Instant::now() + T;
    while r.hits() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tcp);
    let mut e = wait_entries(&path, 2).await;
    e.sort_by_key(|e| e["protocol_in"].as_str().unwrap().to_owned());
    for (e, proto) in e.iter().zip(["HTTP/1.1", "HTTP/2"]) {
        assert_eq!(e["protocol_in"], proto, "{e}");
        assert_eq!(e["status"], 0, "{e}");
        assert_eq!(e["complete"], false, "{e}");
        assert_eq!(e["replica"], "stuck", "{e}");
        assert_eq!(e["ttfb_ms"], Value::Null, "{e}");
        assert_eq!(e["request_id"].as_str().unwrap().len(), 32, "{e}");
    }
}

#[tokio::test]
async fn sample_zero_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let r = hello("r1", Protocol::Http1).await;
    let mut c = logging(&path);
    c.access_log.sample = 0.0;
    let mut h = start(c, doc(&[("r1", r.addr, Protocol::Http1)])).await;
    for _ in 0..20 {
        let resp = h1(h.addr(), get("/", HOST)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_string(resp).await;
    }
    let mut send = h2_client(h.addr()).await;
    let resp = send.send_request(get(&format!("http://{HOST}/"), HOST)).await.unwrap();
    body_string(resp).await;
    // Shutdown flushes the writer: whatever it had would be in the file now.
    tokio::time::timeout(T, h.shutdown()).await.unwrap().unwrap().unwrap();
    assert!(path.exists());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
}

/// A FIFO that is open but never read: the writer blocks on it once the pipe is full.
/// Requests keep completing, each within a bound; the entries that do not fit the queue
/// are dropped and counted, on `/metrics` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_sink_drops_and_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // Read and write: opening never blocks, and the pipe then has a reader that never
    // reads.
    let _held = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    let r = hello("r1", Protocol::Http1).await;
    let mut c = logging(&fifo);
    c.access_log.queue = 16;
    let h = start(c, doc(&[("r1", r.addr, Protocol::Http1)])).await;
    const CONNS: usize = 8;
    const PER_CONN: usize = 250;
    let addr = h.addr();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNS)
        .map(|i| {
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                if i % 2 == 0 {
                    // The fast path: keep-alive HTTP/1.1 on one connection.
                    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let (mut send, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    for _ in 0..PER_CONN {
                        let t = Instant::now();
                        let resp = tokio::time::timeout(T, send.send_request(get("/", HOST))).await;
                        let resp = resp.unwrap().unwrap();
                        assert_eq!(resp.status(), StatusCode::OK);
                        body_string(resp).await;
                        slowest = slowest.max(t.elapsed());
                    }
                } else {
                    // The hyper path: h2c streams on one connection.
                    let mut send = h2_client(addr).await;
                    for _ in 0..PER_CONN {
                        let t = Instant::now();
                        let req = get(&format!("http://{HOST}/"), HOST);
                        let resp = tokio::time::timeout(T, send.send_request(req)).await;
                        let resp = resp.unwrap().unwrap();
                        assert_eq!(resp.status(), StatusCode::OK);
                        body_string(resp).await;
                        slowest = slowest.max(t.elapsed());
                    }
                }
                slowest
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    let total = CONNS * PER_CONN;
    // Generous bounds: a blocked writer would hold every request up indefinitely.
    assert!(slowest < Duration::from_secs(5), "slowest request took {slowest:?}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    assert_eq!(h.metrics.status_count(200), total as u64);
    let dropped = h.metrics.access_log_dropped_total.get();
    // The pipe and the writer's buffer hold some hundreds of lines, the queue 16.
    assert!(dropped > (total / 2) as u64, "dropped {dropped} of {total}");
    assert!(dropped < total as u64, "dropped {dropped} of {total}");
    let resp = h1(h.admin, get("/metrics", "admin")).await.unwrap();
    let metrics = body_string(resp).await;
    assert!(metrics.contains("# TYPE sluice_access_log_dropped_total counter"), "{metrics}");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sluice_access_log_dropped_total "))
        .unwrap_or_else(|| panic!("{metrics}"));
    let scraped: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(scraped >= dropped, "{line} vs {dropped}");
}

#[tokio::test]
async fn bad_path_fails_at_bind() {
    let mut c = logging(Path::new("/nonexistent-dir/access.log"));
    c.access_log.sample = 0.5;
    let table = sluice_routing::RoutingTable::from_doc(node(), RoutingDoc::default()).unwrap();
    assert!(sluice_proxy::Proxy::bind(c, table).await.is_err());
}
