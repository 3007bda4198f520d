//! Request path over real sockets: protocols, routing errors, smuggling, cancellation.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[tokio::test]
async fn h1_client_to_h2c_replica() {
    let r = hello("a", Protocol::H2c).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::H2c)])).await;
    let resp = h1(h.addr(), get("/x", HOST)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(body_string(resp).await, "hello from a over HTTP/2.0\n");
    // Keep-alive / multiplexing: many requests reuse the upstream connection.
    for _ in 0..5 {
        let resp = h1(h.addr(), get("/x", HOST)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_string(resp).await;
    }
}

#[tokio::test]
async fn h2_client_to_h1_replica() {
    let r = hello("b", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("b", r.addr, Protocol::Http1)])).await;
    let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
    for _ in 0..3 {
        let req = Request::builder().uri(format!("http://{HOST}/y")).body(Empty::new()).unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(body_string(resp).await, "hello from b over HTTP/1.1\n");
    }
}

#[tokio::test]
async fn forwarded_headers_and_hop_by_hop() {
    let r = replica(Protocol::Http1, |req: Request<Incoming>| async move {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        Response::new(text(lines.join("\n")))
    })
    .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let req = Request::builder()
        .uri("/")
        .header("host", "Hello.R1.example.test:8080")
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("proxy-authorization", "basic x")
        .header("keep-alive", "timeout=1")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "spoofed")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h1(h.addr(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let b = body_string(resp).await;
    assert!(b.contains("host: Hello.R1.example.test:8080"), "{b}");
    assert!(b.contains("x-forwarded-for: 127.0.0.1"), "{b}");
    assert!(!b.contains("6.6.6.6"), "{b}");
    assert!(b.contains("x-forwarded-proto: http"), "{b}");
    assert!(b.contains("x-forwarded-host: Hello.R1.example.test:8080"), "{b}");
    assert!(!b.contains("x-secret"), "{b}");
    assert!(!b.contains("proxy-authorization"), "{b}");
    assert!(!b.contains("keep-alive"), "{b}");
    assert!(!b.contains("spoofed"), "{b}");
    assert!(b.contains("x-request-id: "), "{b}");
}

#[tokio::test]
async fn unknown_domain_503_or_404() {
    let h = start(cfg(), doc(&[])).await;
    let resp = h1(h.addr(), get("/", "nope.r1.example.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body = body_string(resp).await;
    // Worded as a server without a ready replica: a 503 must not tell which names exist.
    assert!(body.contains("no ready replica") && body.contains(&rid), "{body}");

    let mut c = cfg();
    c.unknown_domain_status = 404;
    let h = start(c, doc(&[])).await;
    let resp = h1(h.addr(), get("/", "nope.r1.example.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn no_ready_replica_503() {
    let h = start(cfg(), doc(&[])).await;
    let resp = h1(h.addr(), get("/", HOST)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(body_string(resp).await.contains("no ready replica"));
}

#[tokio::test]
async fn connect_refused_502() {
    let dead = dead_addr().await;
    for proto in [Protocol::Http1, Protocol::H2c] {
        let h = start(cfg(), doc(&[("a", dead, proto)])).await;
        let resp = h1(h.addr(), get("/", HOST)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = body_string(resp).await;
        assert!(body.contains("refused"), "{body}");
    }
}

#[tokio::test]
async fn smuggling_rejected() {
    let r = hello("a", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let cases: &[&str] = &[
        "POST / HTTP/1.1\r\nHost: hello.r1.example.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: hello.r1.example.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: hello.r1.example.test\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        "GET http://other.r1.example.test/ HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\nHost: other.r1.example.test\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "CONNECT hello.r1.example.test:443 HTTP/1.1\r\nHost: hello.r1.example.test:443\r\n\r\n",
    ];
    for case in cases {
        let out = raw(h.addr(), case.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{case:?} → {out:?}");
    }
    assert_eq!(r.hits(), 0, "a rejected request reached the replica");
    let before = r.hits();
    // CL + TE (hyper's parser hides it; the connection scanner catches it), with a request
    // smuggled behind it that must never be answered.
    for case in [
        "POST / HTTP/1.1\r\nHost: hello.r1.example.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: hello.r1.example.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n",
    ] {
        let out = raw(h.addr(), case.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{case:?} → {out:?}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "smuggled a second request: {out}");
    }
    // The accepted control.
    let ok = raw(
        h.addr(),
        b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(r.hits(), before + 1);
}

#[tokio::test]
async fn h2_host_authority_mismatch_400() {
    let r = hello("a", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
    let req = Request::builder()
        .uri(format!("http://{HOST}/"))
        .header("host", "other.r1.example.test")
        .body(Empty::new())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.hits(), 0);
}

/// Builds one HPACK literal header field without indexing (new name, no Huffman).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn h2_crlf_in_header_value_rejected() {
    let r = hello("a", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    for bad in [&b"a\r\nx-injected: 1"[..], b"a\nb", b"a\0b", b" lead"] {
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(4, 0, 0, &[]));
        let mut block = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
        hpack_literal(&mut block, b":authority", HOST.as_bytes());
        hpack_literal(&mut block, b"x-bad", bad);
        out.extend(frame(1, 0x5, 1, &block));
        tcp.write_all(&out).await.unwrap();
        // Read frames until a response HEADERS, RST_STREAM or GOAWAY for our stream.
        let mut verdict = None;
        let deadline = Instant::now() + T;
        while verdict.is_none() && Instant::now() < deadline {
            let mut head = [0u8; 9];
            if tokio::time::timeout(T, tcp.read_exact(&mut head)).await.is_err() {
                break;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
            match (head[3], stream) {
                // HEADERS with :status 400 (static index 12).
                (1, 1) => verdict = Some(payload.first() == Some(&0x8c)),
                (3, 1) | (7, _) => verdict = Some(true),
                _ => {}
            }
        }
        assert_eq!(verdict, Some(true), "{bad:?} was not rejected");
    }
    assert_eq!(r.hits(), 0);
}

#[tokio::test]
async fn grpc_style_trailers_pass_through() {
    // Replica: echoes the request body and answers with trailers.
    let r = replica(Protocol::H2c, |req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let req_trailer = collected
            .trailers()
            .and_then(|t| t.get("x-req-trailer").cloned())
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let data = collected.to_bytes();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-saw", req_trailer.parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        Response::builder()
            .header("content-type", "application/grpc")
            .body(body.map_err(|e| match e {}).boxed_unsync())
            .unwrap()
    })
    .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::H2c)])).await;
    let mut c = h2_client::<
        http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>,
    >(h.addr())
    .await;
    let mut t = http::HeaderMap::new();
    t.insert("x-req-trailer", "yes".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))),
        Ok(Frame::trailers(t)),
    ];
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{HOST}/pkg.Svc/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-saw"], "yes");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");
}

#[tokio::test]
async fn admin_endpoints() {
    let r = hello("a", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let resp = h1(h.addr(), get("/", HOST)).await.unwrap();
    body_string(resp).await;
    for (path, want) in [
        ("/livez", "ok"),
        ("/readyz", "ready"),
        ("/metrics", "sluice_responses_total{code=\"200\"} 1"),
    ] {
        let resp = h1(h.admin, get(path, "admin")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let b = body_string(resp).await;
        assert!(b.contains(want), "{path}: {b}");
    }
    let b = body_string(h1(h.admin, get("/metrics", "admin")).await.unwrap()).await;
    assert!(b.contains("sluice_upstream_connections_open{protocol=\"http1\"}"), "{b}");
    assert!(b.contains("sluice_replica_in_flight{server=\"hello\",replica=\"a\"} 0"), "{b}");
}

/// A replica whose handler never answers and reports when hyper drops it (cancellation).
async fn hanging_replica(proto: Protocol) -> (TestReplica, mpsc::UnboundedReceiver<Instant>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let r = replica(proto, move |_req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            struct OnDrop(mpsc::UnboundedSender<Instant>);
            impl Drop for OnDrop {
                fn drop(&mut self) {
                    let _ = self.0.send(Instant::now());
                }
            }
            let _guard = OnDrop(tx);
            std::future::pending::<()>().await;
            Response::new(text(""))
        }
    })
    .await;
    (r, rx)
}

#[tokio::test]
async fn client_disconnect_cancels_upstream() {
    for proto in [Protocol::H2c, Protocol::Http1] {
        let (r, mut cancelled) = hanging_replica(proto).await;
        let h = start(cfg(), doc(&[("a", r.addr, proto)])).await;
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n").await.unwrap();
        let t0 = Instant::now() + Duration::from_secs(5);
        while r.hits() == 0 && Instant::now() < t0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(r.hits(), 1);
        let closed = Instant::now();
        drop(tcp);
        let at = tokio::time::timeout(T, cancelled.recv()).await.unwrap().unwrap();
        let took = at.saturating_duration_since(closed);
        assert!(took < Duration::from_millis(100), "{proto:?}: cancellation took {took:?}");

        // h2 client resetting its stream.
        let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
        let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
        let fut = tokio::spawn(async move { c.send_request(req).await });
        let t0 = Instant::now() + Duration::from_secs(5);
        while r.hits() < 2 && Instant::now() < t0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reset = Instant::now();
        fut.abort(); // drops the response future: hyper sends RST_STREAM(CANCEL)
        let at = tokio::time::timeout(T, cancelled.recv()).await.unwrap().unwrap();
        let took = at.saturating_duration_since(reset);
        assert!(
            took < Duration::from_millis(100),
            "{proto:?} h2 reset: cancellation took {took:?}"
        );
    }
}

#[tokio::test]
async fn replica_dies_mid_response_client_sees_error() {
    // A raw HTTP/1.1 replica that sends part of a chunked body and then closes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(s);
            });
        }
    });
    let h = start(cfg(), doc(&[("a", addr, Protocol::Http1)])).await;
    // HTTP/1.1 client: the body must fail, not end cleanly.
    let resp = h1(h.addr(), get("/", HOST)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let res = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
    assert!(res.is_err(), "h1 client saw a clean end");
    // HTTP/2 client: RST_STREAM.
    let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
    let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
    let resp = c.send_request(req).await.unwrap();
    let res = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap();
    assert!(res.is_err(), "h2 client saw a clean end");
}

#[tokio::test]
async fn slowloris_closed_at_header_timeout() {
    let mut c = cfg();
    c.timeouts.header_read = Duration::from_millis(500);
    let h = start(c, doc(&[])).await;
    let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
    let start = Instant::now();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n").await.unwrap();
    let mut out = Vec::new();
    // Keep dribbling header bytes; the proxy must still close at the deadline.
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tcp.write_all(b"X-a: b\r\n").await.is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(res.is_ok(), "connection not closed within 5s");
    assert!(start.elapsed() < Duration::from_secs(3), "closed after {:?}", start.elapsed());
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_finish() {
    let r = replica(Protocol::Http1, |_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Response::new(text("slow but done\n"))
    })
    .await;
    let mut h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let addr = h.addr();
    let req = tokio::spawn(async move {
        let resp = h1(addr, get("/", HOST)).await.unwrap();
        (resp.status(), body_string(resp).await)
    });
    let t0 = Instant::now() + Duration::from_secs(5);
    while r.hits() == 0 && Instant::now() < t0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = h.shutdown();
    let (status, body) = tokio::time::timeout(T, req).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "slow but done\n");
    tokio::time::timeout(T, done).await.unwrap().unwrap().unwrap();
    // No longer accepting.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn body_limit_413() {
    let r = replica(Protocol::H2c, |req: Request<Incoming>| async move {
        let n = req.into_body().collect().await.map(|c| c.to_bytes().len()).unwrap_or(0);
        Response::new(text(format!("{n}")))
    })
    .await;
    let mut c = cfg();
    c.limits.max_body_bytes = Some(10);
    let h = start(c, doc(&[("a", r.addr, Protocol::H2c)])).await;
    // Declared length over the limit: rejected before forwarding.
    let req = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", HOST)
        .body(full_body("01234567890123"))
        .unwrap();
    let resp = h1(h.addr(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Chunked, no length: enforced while streaming.
    let chunks = vec![
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"012345"))),
        Ok(Frame::data(Bytes::from_static(b"6789abcdef"))),
    ];
    let req = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", HOST)
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let resp = h1(h.addr(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Under the limit.
    let req = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", HOST)
        .body(full_body("0123"))
        .unwrap();
    let resp = h1(h.addr(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp).await, "4");
}

#[tokio::test]
async fn h2_upstream_opens_more_connections_when_saturated() {
    // The replica allows 2 concurrent streams per connection; 6 concurrent requests must all
    // be served at once (3 connections), not queued behind each other.
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cn = conns.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            cn.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (tx, g) = (tx.clone(), g.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let (tx, g) = (tx.clone(), g.clone());
                    async move {
                        let _ = tx.send(());
                        g.notified().await;
                        Ok::<_, std::convert::Infallible>(Response::new(text("ok")))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(2)
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    let h = start(cfg(), doc(&[("a", addr, Protocol::H2c)])).await;
    // Warm one connection so the replica's SETTINGS are known.
    let paddr = h.addr();
    let mut reqs = Vec::new();
    for _ in 0..6 {
        reqs.push(tokio::spawn(async move {
            let resp = h1(paddr, get("/", HOST)).await.unwrap();
            resp.status()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..6 {
        tokio::time::timeout(T, rx.recv()).await.expect("requests were queued, not multiplexed");
    }
    assert!(conns.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    loop {
        gate.notify_waiters();
        if reqs.iter().all(|r| r.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in reqs {
        assert_eq!(r.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn header_and_uri_limits() {
    let r = hello("a", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let big = "x".repeat(70 * 1024);
    let out = raw(
        h.addr(),
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nX-Big: {big}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{}", &out[..out.len().min(200)]);
    let long = "a".repeat(9 * 1024);
    let out = raw(
        h.addr(),
        format!("GET /{long} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 414"), "{}", &out[..out.len().min(200)]);
    assert_eq!(r.hits(), 0);
}

/// The HTTP/1.1 idle timer is armed once per connection: a connection kept busy for
/// longer than `connection_idle` in total must stay open (the early firing re-arms), and
/// still close once it really goes quiet.
#[tokio::test]
async fn busy_connection_outlives_its_first_idle_deadline() {
    let r = hello("a", Protocol::Http1).await;
    let mut c = cfg();
    c.timeouts.connection_idle = Duration::from_secs(1);
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let t0 = Instant::now();
    let mut sent = 0;
    while t0.elapsed() < Duration::from_millis(1600) {
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n").await.unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "request {sent}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle h1 connection not closed");
    assert!(quiet.elapsed() >= Duration::from_millis(800), "closed early: {:?}", quiet.elapsed());
}

#[tokio::test]
async fn idle_connection_closed() {
    let r = hello("a", Protocol::Http1).await;
    let mut c = cfg();
    c.timeouts.connection_idle = Duration::from_millis(300);
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    // HTTP/1.1 keep-alive and HTTP/2 connections both close once idle.
    let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t0 = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle h1 connection not closed");
    assert!(t0.elapsed() >= Duration::from_millis(250));

    let mut c2 = h2_client::<Empty<Bytes>>(h.addr()).await;
    let resp = c2
        .send_request(Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap())
        .await
        .unwrap();
    body_string(resp).await;
    let t0 = Instant::now();
    while !c2.is_closed() && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c2.is_closed(), "idle h2 connection not closed");
}

/// The drain closes idle HTTP/1.1 keep-alive connections once they have been quiet for a
/// moment (the idle sweep, not a timer per connection), so the drain completes long
/// before its deadline, and the open-connections gauge returns to zero.
#[tokio::test]
async fn drain_closes_idle_keep_alive_connections() {
    let r = hello("a", Protocol::Http1).await;
    let mut h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        conns.push(tcp);
    }
    assert_eq!(h.metrics.client_connections_open.get(), 3);
    let t0 = Instant::now();
    let done = h.shutdown();
    for mut tcp in conns {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "idle connection not closed by the drain");
    }
    // Quiet for the drain's grace first: a request racing the drain start is served.
    assert!(t0.elapsed() >= Duration::from_millis(450), "closed after {:?}", t0.elapsed());
    tokio::time::timeout(Duration::from_secs(10), done).await.unwrap().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.metrics.client_connections_open.get() != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.metrics.client_connections_open.get(), 0);
}

#[tokio::test]
async fn ipv6_listener() {
    let mut c = cfg();
    c.listeners[0].addr = "[::1]:0".parse().unwrap();
    let routing = sluice_routing::RoutingTable::from_doc(node(), doc(&[])).unwrap();
    let Ok(server) = sluice_proxy::Proxy::bind(c, routing).await else {
        eprintln!("no IPv6 loopback here: skipping");
        return;
    };
    let addr = server.local_addrs()[0];
    assert!(addr.is_ipv6());
    let task = tokio::spawn(server.run(std::future::pending()));
    let out =
        raw(addr, b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\nConnection: close\r\n\r\n")
            .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    task.abort();
}

#[tokio::test]
async fn in_flight_accounting_returns_to_zero() {
    let (r, mut cancelled) = hanging_replica(Protocol::H2c).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::H2c)])).await;
    let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n").await.unwrap();
    let gauge = "sluice_replica_in_flight{server=\"hello\",replica=\"a\"}";
    let metric = |admin| async move {
        let b = body_string(h1(admin, get("/metrics", "admin")).await.unwrap()).await;
        b.lines().find(|l| l.starts_with(gauge)).map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    let t0 = Instant::now();
    while metric(h.admin).await.as_deref() != Some("1") && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(h.admin).await.as_deref(), Some("1"));
    drop(tcp);
    tokio::time::timeout(T, cancelled.recv()).await.unwrap();
    let t0 = Instant::now();
    while metric(h.admin).await.as_deref() != Some("0") && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(h.admin).await.as_deref(), Some("0"));
}

#[tokio::test]
async fn trusted_edge_keeps_request_id_and_extends_xff() {
    let r = replica(Protocol::Http1, |req: Request<Incoming>| async move {
        let h = req.headers();
        let get = |k: &str| h.get(k).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        Response::new(text(format!(
            "{}|{}|{}",
            get("x-request-id"),
            get("x-forwarded-for"),
            get("x-forwarded-proto")
        )))
    })
    .await;
    let mut c = cfg();
    c.request_id.trusted_edges = vec!["127.0.0.0/8".into()];
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    let req = Request::builder()
        .uri("/")
        .header("host", HOST)
        .header("x-request-id", "edge-123")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h1(h.addr(), req).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "edge-123");
    assert_eq!(body_string(resp).await, "edge-123|203.0.113.9, 127.0.0.1|https");
}

#[tokio::test]
async fn server_max_in_flight_503() {
    let (r, _cancelled) = hanging_replica(Protocol::H2c).await;
    let mut d = doc(&[("a", r.addr, Protocol::H2c)]);
    d.servers[0].limits.max_in_flight = Some(1);
    let h = start(cfg(), d).await;
    let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\n\r\n").await.unwrap();
    let t0 = Instant::now();
    while r.hits() == 0 && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resp = h1(h.addr(), get("/", HOST)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_string(resp).await.contains("in-flight limit"));
    assert_eq!(r.hits(), 1);
}

/// Regression: hyper's HTTP/1.1 server drops a Content-Length body right after its last
/// byte without polling for the end, which used to close the pooled upstream
/// connection after every request (one upstream connection per request).
#[tokio::test]
async fn h1_upstream_connection_is_reused_across_requests() {
    let r = replica(Protocol::Http1, |_req: Request<Incoming>| async { Response::new(text("ok")) })
        .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    for _ in 0..20 {
        let resp = h1(h.addr(), get("/x", HOST)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_string(resp).await, "ok");
    }
    assert_eq!(r.conns(), 1, "each request opened its own upstream connection");
}

#[tokio::test]
async fn bad_h2_preface_is_goaway_protocol_error() {
    let r = hello("a", Protocol::Http1).await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    // Every byte sluice sends here is ASCII, so the text helper's answer is exact.
    let answer = raw(h.addr(), b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").await.into_bytes();
    assert!(!answer.starts_with(b"HTTP/1.1"), "{}", String::from_utf8_lossy(&answer));
    // Frames: a SETTINGS first (the server preface), then GOAWAY with PROTOCOL_ERROR.
    let mut frames = Vec::new();
    let mut rest = &answer[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        assert!(rest.len() >= 9 + len, "truncated frame: {answer:?}");
        frames.push((rest[3], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    assert_eq!(frames.first().map(|f| f.0), Some(0x4), "{answer:?}");
    let goaway = frames.iter().find(|f| f.0 == 0x7).expect("no GOAWAY");
    assert_eq!(&goaway.1[4..8], &[0, 0, 0, 1], "not PROTOCOL_ERROR: {answer:?}");
    // A request line that merely starts like the preface is still HTTP/1.1.
    let answer = raw(h.addr(), b"PRI /x HTTP/1.1\r\nHost: nope\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1"), "{answer}");
}

#[tokio::test]
async fn deny_at_accept_closes_denied_sources_only() {
    let serve = |deny: &'static str| async move {
        let routing = sluice_routing::RoutingTable::from_doc(node(), doc(&[])).unwrap();
        let mut server = sluice_proxy::Proxy::bind(cfg(), routing).await.unwrap();
        server.deny_at_accept(vec![sluice_proxy::config::Cidr::parse(deny).unwrap()]);
        let addr = server.local_addrs()[0];
        let metrics = server.metrics();
        (addr, metrics, tokio::spawn(server.run(std::future::pending())))
    };
    let req = b"GET / HTTP/1.1\r\nHost: hello.r1.example.test\r\nConnection: close\r\n\r\n";

    let (addr, metrics, task) = serve("127.0.0.1/32").await;
    for _ in 0..3 {
        let out = raw(addr, req).await;
        assert_eq!(out, "", "a denied source got an answer");
    }
    assert_eq!(metrics.client_connections_denied_total.get(), 3);
    assert_eq!(metrics.client_connections_total.get(), 0);
    task.abort();

    let (addr, metrics, task) = serve("10.0.0.0/8").await;
    let out = raw(addr, req).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert_eq!(metrics.client_connections_denied_total.get(), 0);
    task.abort();
}

/// A per-replica metric line's value, if the line is there.
async fn replica_value(admin: std::net::SocketAddr, family: &str, replica: &str) -> Option<u64> {
    let b = body_string(h1(admin, get("/metrics", "admin")).await.unwrap()).await;
    let key = format!("{family}{{server=\"hello\",replica=\"{replica}\"}} ");
    b.lines().find(|l| l.starts_with(&key)).and_then(|l| l[key.len()..].trim().parse().ok())
}

#[tokio::test]
async fn failing_replica_is_passively_ejected_but_never_the_last() {
    let good = hello("good", Protocol::Http1).await;
    let dead = dead_addr().await;
    let mut c = cfg();
    c.lb.consecutive_failures = 2;
    c.lb.base_ejection = Duration::from_secs(60);
    let h = start(
        c.clone(),
        doc(&[("bad", dead, Protocol::Http1), ("good", good.addr, Protocol::Http1)]),
    )
    .await;
    let mut client = h2_client::<Empty<Bytes>>(h.addr()).await;
    let mut failed = 0;
    for _ in 0..60 {
        let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
        let resp = client.send_request(req).await.unwrap();
        if resp.status() == StatusCode::BAD_GATEWAY {
            failed += 1;
        }
    }
    // Two failures eject it; nothing after that reaches it. Each failed connect was
    // retried once on the good replica, so the client saw no 502 at all.
    assert_eq!(failed, 0, "502s");
    assert_eq!(h.metrics.upstream_retries[0].get(), 2, "retries");
    assert_eq!(replica_value(h.admin, "sluice_replica_ejected", "bad").await, Some(1));
    assert_eq!(replica_value(h.admin, "sluice_replica_ejections_total", "bad").await, Some(1));
    assert_eq!(replica_value(h.admin, "sluice_replica_ejected", "good").await, Some(0));

    // The only replica of a server is never ejected: every request still tries it.
    let h = start(c, doc(&[("bad", dead, Protocol::Http1)])).await;
    let mut client = h2_client::<Empty<Bytes>>(h.addr()).await;
    for _ in 0..6 {
        let req = Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap();
        assert_eq!(client.send_request(req).await.unwrap().status(), StatusCode::BAD_GATEWAY);
    }
    assert_eq!(replica_value(h.admin, "sluice_replica_ejected", "bad").await, Some(0));
    assert_eq!(replica_value(h.admin, "sluice_replica_ejections_total", "bad").await, Some(0));
}
