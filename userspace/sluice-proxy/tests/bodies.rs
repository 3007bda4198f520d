//! Request and response bodies through the HTTP/1.1 upstream paths (the fast path and the
//! hyper path's wire client): framing kept, malformed bodies blamed on the client,
//! connections reused on both sides.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A replica that answers with what it received: `method|te=..|cl=..|body=..`.
async fn echo_replica() -> TestReplica {
    replica(Protocol::Http1, |req: Request<Incoming>| async move {
        let h = |k: &str| {
            req.headers()
                .get_all(k)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (method, te, cl) = (req.method().clone(), h("transfer-encoding"), h("content-length"));
        let body = match req.into_body().collect().await {
            Ok(c) => String::from_utf8_lossy(&c.to_bytes()).into_owned(),
            Err(e) => format!("<body error: {e}>"),
        };
        Response::new(text(format!("{method}|te={te}|cl={cl}|body={body}")))
    })
    .await
}

/// Asserts an echo: the method, the body, and exactly one framing header for it.
fn assert_echo(echo: &str, method: &str, body: &str) {
    let parts: Vec<&str> = echo.splitn(4, '|').collect();
    assert_eq!(parts.len(), 4, "{echo}");
    assert_eq!(parts[0], method, "{echo}");
    let te = parts[1].strip_prefix("te=").unwrap();
    let cl = parts[2].strip_prefix("cl=").unwrap();
    let framed =
        (te == "chunked" && cl.is_empty()) || (te.is_empty() && cl == body.len().to_string());
    assert!(framed, "replica saw no (or ambiguous) framing: {echo}");
    assert_eq!(parts[3], format!("body={body}"), "{echo}");
}

/// One response as read off a raw client connection.
#[derive(Debug)]
struct RawResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection that reads responses one at a time, by their framing.
struct RawConn {
    tcp: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> Self {
        RawConn { tcp: TcpStream::connect(addr).await.unwrap(), buf: Vec::new(), eof: false }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// Reads more; false at EOF (or a reset). Panics after `T` without progress.
    async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, self.tcp.read(&mut chunk))
            .await
            .expect("no bytes from sluice within the timeout")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        self.eof = n == 0;
        n > 0
    }

    /// Bytes up to and including the next CRLF.
    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return self.buf.drain(..i + 2).collect();
            }
            assert!(self.fill().await, "closed inside a line: {:?}", self.buf);
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "closed inside a body");
        }
        self.buf.drain(..n).collect()
    }

    /// The next response, or `None` if the connection closed before a whole head.
    async fn response(&mut self) -> Option<RawResp> {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_len).collect();
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut slots);
        assert!(parsed.parse(&head).unwrap().is_complete());
        let status = parsed.code.unwrap();
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
            .collect();
        let mut resp = RawResp { status, headers, body: Vec::new() };
        if status == 204 || status == 304 {
            return Some(resp);
        }
        if resp.header("transfer-encoding").is_some() {
            assert_eq!(resp.header("transfer-encoding"), Some("chunked"), "{resp:?}");
            assert!(resp.header("content-length").is_none(), "TE and CL: {resp:?}");
            loop {
                let line = self.line().await;
                let size = std::str::from_utf8(&line[..line.len() - 2]).unwrap();
                let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
                if size == 0 {
                    // Trailers, up to the empty line.
                    while self.line().await != b"\r\n" {}
                    break;
                }
                let data = self.exact(size).await;
                resp.body.extend_from_slice(&data);
                assert_eq!(self.exact(2).await, b"\r\n");
            }
        } else if let Some(n) = resp.header("content-length") {
            let n: usize = n.parse().unwrap();
            resp.body = self.exact(n).await;
        } else {
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Some(resp)
    }
}

/// The value of a per-replica metric of replica `a` of server `hello`.
async fn replica_metric(admin: SocketAddr, family: &str) -> u64 {
    let b = body_string(h1(admin, get("/metrics", "admin")).await.unwrap()).await;
    let key = format!("{family}{{server=\"hello\",replica=\"a\"}} ");
    let line = b.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("no {key}: {b}"));
    line[key.len()..].trim().parse().unwrap()
}

#[tokio::test]
async fn h1_request_bodies_reach_h1_replica_framed() {
    let r = echo_replica().await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    for method in ["GET", "DELETE", "OPTIONS", "POST"] {
        let mut c = RawConn::connect(h.addr()).await;
        c.send(
            format!(
                "{method} /b HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let resp = c.response().await.expect("no answer");
        assert_eq!(resp.status, 200, "{method} chunked: {resp:?}");
        assert_echo(&resp.text(), method, "hello");
        // Chunks split across writes, with an extension and a trailer, on the same
        // (now hyper-path) connection.
        c.send(
            format!("{method} /b HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n2")
                .as_bytes(),
        )
        .await;
        c.send(b";ext=1\r\nhe\r\n").await;
        c.send(b"3\r\nllo\r\n0\r\nx-trailer: 1\r\n\r\n").await;
        let resp = c.response().await.expect("no answer to the second request");
        assert_eq!(resp.status, 200, "{method} split chunked: {resp:?}");
        assert_echo(&resp.text(), method, "hello");

        // Content-Length, on a fresh (fast-path) connection.
        let mut c = RawConn::connect(h.addr()).await;
        c.send(
            format!("{method} /b HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello")
                .as_bytes(),
        )
        .await;
        let resp = c.response().await.expect("no answer");
        assert_eq!(resp.status, 200, "{method} content-length: {resp:?}");
        assert_echo(&resp.text(), method, "hello");
    }
    assert_eq!(replica_metric(h.admin, "sluice_replica_failures_total").await, 0);
}

#[tokio::test]
async fn h2_get_with_data_and_no_length_reaches_h1_replica() {
    let r = echo_replica().await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let mut c = h2_client::<UnsyncBoxBody<Bytes, Infallible>>(h.addr()).await;
    for method in ["GET", "DELETE", "POST"] {
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hel"))),
            Ok(Frame::data(Bytes::from_static(b"lo"))),
        ];
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{HOST}/b"))
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
            .unwrap();
        assert!(!req.headers().contains_key("content-length"));
        let resp = tokio::time::timeout(T, c.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method}");
        assert_echo(&body_string(resp).await, method, "hello");
    }
    // A bodiless GET stays bodiless.
    let req = Request::builder()
        .uri(format!("http://{HOST}/b"))
        .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
        .unwrap();
    let resp = tokio::time::timeout(T, c.send_request(req)).await.unwrap().unwrap();
    assert_eq!(body_string(resp).await, "GET|te=|cl=|body=");
    assert_eq!(replica_metric(h.admin, "sluice_replica_failures_total").await, 0);
}

#[tokio::test]
async fn malformed_chunked_request_body_is_400_not_replica_failure() {
    let r = echo_replica().await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let bodies: &[(&str, &str)] = &[
        ("0x prefix", "0x5\r\nhello\r\n0\r\n\r\n"),
        ("leading space", " 5\r\nhello\r\n0\r\n\r\n"),
        ("u64 overflow", "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("bare LF after size", "5\nhello\r\n0\r\n\r\n"),
        ("bare LF everywhere", "5\nhello\n0\n\n"),
        ("not hex", "zz\r\nhello\r\n0\r\n\r\n"),
    ];
    let mut failures = Vec::new();
    for method in ["POST", "GET"] {
        for (what, body) in bodies {
            let mut c = RawConn::connect(h.addr()).await;
            c.send(
                format!(
                    "{method} / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
                )
                .as_bytes(),
            )
            .await;
            match c.response().await {
                Some(resp) if resp.status == 400 => {}
                Some(resp) => {
                    failures.push(format!("{method} {what}: {} {}", resp.status, resp.text()))
                }
                None => failures.push(format!("{method} {what}: closed without an answer")),
            }
        }
    }
    let replica_failures = replica_metric(h.admin, "sluice_replica_failures_total").await;
    assert!(
        failures.is_empty() && replica_failures == 0,
        "{failures:#?}, replica failures {replica_failures}"
    );
    // The replica is still fine.
    let mut c = RawConn::connect(h.addr()).await;
    c.send(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await;
    assert_eq!(c.response().await.unwrap().status, 200);
}

/// A replica (HTTP/1.1) that reads each request's body and answers `ok <path>`.
async fn ok_replica() -> TestReplica {
    replica(Protocol::Http1, |req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let _ = req.into_body().collect().await;
        Response::new(text(format!("ok {path}")))
    })
    .await
}

#[tokio::test]
async fn keep_alive_client_reuses_one_upstream_connection() {
    // `first` is sent before the three GETs: nothing (the fast path serves the whole
    // connection), or a chunked request, which the fast path hands to the hyper path.
    let firsts = [
        ("fast path", String::new()),
        (
            "hyper path",
            format!(
                "POST /first HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
    ];
    for (path, first) in firsts {
        let r = ok_replica().await;
        let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
        let mut c = RawConn::connect(h.addr()).await;
        if !first.is_empty() {
            c.send(first.as_bytes()).await;
            let resp = c.response().await.expect("no answer to the first request");
            assert_eq!((resp.status, resp.text().as_str()), (200, "ok /first"), "{path}");
        }
        for i in 0..3 {
            c.send(format!("GET /{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await;
            let resp =
                c.response().await.unwrap_or_else(|| panic!("{path}: closed before GET {i}"));
            assert_eq!(resp.status, 200, "{path}: {resp:?}");
            assert_eq!(resp.text(), format!("ok /{i}"), "{path}");
        }
        assert_eq!(r.conns(), 1, "{path}: upstream connections");
    }
}

/// A raw replica: `/chunked` answers a chunked body on a kept-alive connection, `/close`
/// a body with no length, ended by closing the connection. Requests carry no body, or an
/// empty chunked one.
async fn raw_framing_replica() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One bodiless request head.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head: Vec<u8> = buf.drain(..end).collect();
                    if head
                        .to_ascii_lowercase()
                        .windows(26)
                        .any(|w| w == b"transfer-encoding: chunked")
                    {
                        // Only empty chunked bodies are sent to this replica.
                        while buf.len() < 5 {
                            let mut chunk = [0u8; 64];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        assert_eq!(&buf[..5], b"0\r\n\r\n");
                        buf.drain(..5);
                    }
                    if head.starts_with(b"GET /close ") {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited ",
                            )
                            .await;
                        let _ = s.write_all(b"body").await;
                        let _ = s.shutdown().await;
                        return;
                    }
                    let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                                 6\r\nchunk \r\n4\r\nbody\r\n0\r\n\r\n";
                    if s.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// The two HTTP/1.1 paths a client connection can be on.
const PATHS: [&str; 2] = ["fast path", "hyper path"];

/// A client connection on `path`: as connected for the fast path; for the hyper path,
/// after a first chunked `method target` request, which the fast path declines (the
/// connection then stays on the hyper path). Returns the first answer, if there was one.
async fn conn_on(addr: SocketAddr, path: &str, method_target: &str) -> (RawConn, Option<RawResp>) {
    let mut c = RawConn::connect(addr).await;
    if path == PATHS[0] {
        return (c, None);
    }
    let first = format!(
        "{method_target} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    c.send(first.as_bytes()).await;
    let resp = c.response().await.expect("no answer to the first request");
    (c, Some(resp))
}

#[tokio::test]
async fn chunked_and_close_delimited_responses_keep_client_connection_usable() {
    let (addr, task) = raw_framing_replica().await;
    let h = start(cfg(), doc(&[("a", addr, Protocol::Http1)])).await;
    for path in PATHS {
        let (mut c, first) = conn_on(h.addr(), path, "GET /chunked").await;
        if let Some(resp) = first {
            assert_eq!((resp.status, resp.text().as_str()), (200, "chunk body"), "{path}");
        }
        for target in ["/chunked", "/close", "/chunked", "/close", "/close", "/chunked"] {
            c.send(format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await;
            let resp =
                c.response().await.unwrap_or_else(|| panic!("{path}: closed before {target}"));
            assert_eq!(resp.status, 200, "{path} {target}: {resp:?}");
            // Framed for the client (a close-delimited body is re-framed), so the
            // connection goes on.
            assert!(
                resp.header("transfer-encoding").is_some()
                    || resp.header("content-length").is_some(),
                "{path} {target}: unframed response {resp:?}"
            );
            assert!(
                resp.header("connection").is_none_or(|v| !v.eq_ignore_ascii_case("close")),
                "{path} {target}: {resp:?}"
            );
            let want = if target == "/close" { "close-delimited body" } else { "chunk body" };
            assert_eq!(resp.text(), want, "{path} {target}");
        }
    }
    // And to an HTTP/2 client, on one connection.
    let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
    for target in ["/close", "/chunked", "/close"] {
        let req =
            Request::builder().uri(format!("http://{HOST}{target}")).body(Empty::new()).unwrap();
        let resp = tokio::time::timeout(T, c.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "h2 {target}");
        let want = if target == "/close" { "close-delimited body" } else { "chunk body" };
        assert_eq!(body_string(resp).await, want, "h2 {target}");
    }
    assert_eq!(replica_metric(h.admin, "sluice_replica_failures_total").await, 0);
    task.abort();
}

/// A replica that answers with the request's header names, one a line.
async fn names_replica() -> TestReplica {
    replica(Protocol::Http1, |req: Request<Incoming>| async move {
        let names: Vec<String> = req.headers().keys().map(|k| k.as_str().to_owned()).collect();
        let _ = req.into_body().collect().await;
        Response::new(text(names.join("\n")))
    })
    .await
}

#[tokio::test]
async fn forwarding_header_lookalikes_are_stripped_on_both_paths() {
    let r = names_replica().await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    // The fast path takes a plain GET; chunked framing sends it to the hyper path.
    for (path, framing) in [("fast path", ""), ("hyper path", "Transfer-Encoding: chunked\r\n")] {
        let mut c = RawConn::connect(h.addr()).await;
        let tail = if framing.is_empty() { "" } else { "0\r\n\r\n" };
        c.send(
            format!(
                "GET / HTTP/1.1\r\nHost: {HOST}\r\n{framing}X_Forwarded_For: 6.6.6.6\r\n\
                 x_forwarded-proto: https\r\nX-Forwarded_Host: evil\r\nX_Real_IP: 6.6.6.6\r\n\
                 X_Forwarded: for=6.6.6.6\r\nForwarded_For: 6.6.6.6\r\nx_kept: yes\r\n\r\n{tail}"
            )
            .as_bytes(),
        )
        .await;
        let resp = c.response().await.expect("no answer");
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
        let text = resp.text();
        let names: Vec<&str> = text.lines().collect();
        assert!(names.contains(&"x-forwarded-for"), "{path}: {names:?}");
        assert!(names.contains(&"x_kept"), "{path}: {names:?}");
        let smuggled: Vec<&&str> = names
            .iter()
            .filter(|n| {
                n.contains('_')
                    && (n.starts_with("x_forwarded")
                        || n.starts_with("x-forwarded_")
                        || n.starts_with("x_real")
                        || n.starts_with("forwarded_"))
            })
            .collect();
        assert!(smuggled.is_empty(), "{path}: look-alikes forwarded: {names:?}");
    }
}

#[tokio::test]
async fn header_count_limit_is_one_number_on_every_path() {
    let max = sluice_proxy::config::Limits::default().max_headers;
    let r = names_replica().await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    for (path, framing) in [("fast path", ""), ("hyper path", "Transfer-Encoding: chunked\r\n")] {
        let fixed = if framing.is_empty() { 1 } else { 2 };
        // Under the limit with room for the fields sluice adds (the test replica is hyper,
        // held to the same default); over it, sluice answers without asking the replica.
        for (total, want) in [(max - 8, 200), (max + 1, 431)] {
            let hits = r.hits();
            let mut head = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n{framing}");
            for i in 0..total - fixed {
                head.push_str(&format!("x-h-{i}: v\r\n"));
            }
            head.push_str("\r\n");
            if !framing.is_empty() {
                head.push_str("0\r\n\r\n");
            }
            let mut c = RawConn::connect(h.addr()).await;
            c.send(head.as_bytes()).await;
            let resp = c.response().await.expect("no answer");
            assert_eq!(resp.status, want, "{path}, {total} fields");
            assert_eq!(r.hits() - hits, usize::from(want == 200), "{path}, {total} fields");
        }
    }
    let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
    for (n, want) in
        [(max - 8, StatusCode::OK), (max + 1, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)]
    {
        let hits = r.hits();
        let mut b = Request::builder().uri(format!("http://{HOST}/"));
        for i in 0..n {
            b = b.header(format!("x-h-{i}"), "v");
        }
        let resp = tokio::time::timeout(T, c.send_request(b.body(Empty::new()).unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), want, "h2, {n} fields");
        assert_eq!(r.hits() - hits, usize::from(want == StatusCode::OK), "h2, {n} fields");
    }
}

#[tokio::test]
async fn early_answer_keeps_keep_alive_connection() {
    // The replica answers at once, never reading the body.
    let r =
        replica(
            Protocol::Http1,
            |_req: Request<Incoming>| async move { Response::new(text("early")) },
        )
        .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    for path in PATHS {
        let (mut c, first) = conn_on(h.addr(), path, "POST /first").await;
        if let Some(resp) = first {
            assert_eq!(resp.status, 200, "{path}");
        }
        // The head first, the small body in a second write once the replica has answered.
        c.send(format!("POST /p HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\n").as_bytes())
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        c.send(b"hello").await;
        let resp = c.response().await.unwrap_or_else(|| panic!("{path}: no answer"));
        assert_eq!((resp.status, resp.text().as_str()), (200, "early"), "{path}");
        let close = resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        assert!(!close, "{path}: connection not kept: {resp:?}");
        c.send(format!("GET /again HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await;
        let resp = c.response().await.unwrap_or_else(|| panic!("{path}: closed silently"));
        assert_eq!((resp.status, resp.text().as_str()), (200, "early"), "{path}");

        // Far more body due than is drained: the connection may close, but the answer says so.
        c.send(
            format!("POST /big HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000000\r\n\r\nabc")
                .as_bytes(),
        )
        .await;
        let resp = c.response().await.unwrap_or_else(|| panic!("{path}: no answer (big)"));
        assert_eq!(resp.status, 200, "{path}");
        let close = resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        assert!(close, "{path}: closing without saying so: {resp:?}");
    }
}

/// The hyper path with a chunked body (its length unknown) the replica answered before
/// reading: a small rest in a second write is drained and the connection kept; a rest
/// over the drain bound, or one that does not come within the drain time, gets its
/// answer with `Connection: close`. Never a silent close.
#[tokio::test]
async fn early_answer_with_a_chunked_rest_never_closes_silently() {
    let r =
        replica(
            Protocol::Http1,
            |_req: Request<Incoming>| async move { Response::new(text("early")) },
        )
        .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let is_close =
        |resp: &RawResp| resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let head = format!("POST /p HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n");

    // Small rest, second write: drained, kept.
    let (mut c, _) = conn_on(h.addr(), PATHS[1], "POST /first").await;
    c.send(format!("{head}2\r\n{{}}\r\n").as_bytes()).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    c.send(b"3\r\nabc\r\n0\r\n\r\n").await;
    let resp = c.response().await.expect("no answer");
    assert_eq!((resp.status, resp.text().as_str()), (200, "early"));
    assert!(!is_close(&resp), "connection not kept: {resp:?}");
    c.send(format!("GET /again HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await;
    let resp = c.response().await.expect("closed silently after a small rest");
    assert_eq!(resp.status, 200);

    // A rest over the bound: the answer says close.
    let (mut c, _) = conn_on(h.addr(), PATHS[1], "POST /first").await;
    let big = 80 * 1024;
    let mut req = format!("{head}2\r\n{{}}\r\n{big:x}\r\n").into_bytes();
    req.extend(std::iter::repeat_n(b'x', big));
    req.extend_from_slice(b"\r\n");
    c.send(&req).await;
    let resp = c.response().await.expect("no answer (big rest)");
    assert_eq!(resp.status, 200);
    assert!(is_close(&resp), "closing without saying so: {resp:?}");

    // A rest that never comes within the drain time: the answer says close.
    let (mut c, _) = conn_on(h.addr(), PATHS[1], "POST /first").await;
    c.send(format!("{head}2\r\n{{}}\r\n").as_bytes()).await;
    let resp = c.response().await.expect("no answer (late rest)");
    assert_eq!(resp.status, 200);
    assert!(is_close(&resp), "closing without saying so: {resp:?}");
}

/// The same over an HTTP/2 replica, which may answer while the request body is still
/// streaming to it and then refuse the rest: a chunked body still open when the answer
/// starts gets `Connection: close` on it (its rest could not be drained in time), and a
/// body that ended first keeps the connection.
#[tokio::test]
async fn early_answer_from_h2_replica_with_a_chunked_body_open_says_close() {
    let r =
        replica(
            Protocol::H2c,
            |_req: Request<Incoming>| async move { Response::new(text("early")) },
        )
        .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::H2c)])).await;
    let is_close =
        |resp: &RawResp| resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let head = format!("POST /p HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let (mut c, _) = conn_on(h.addr(), PATHS[1], "POST /first").await;
    c.send(format!("{head}2\r\n{{}}\r\n").as_bytes()).await;
    let resp = c.response().await.expect("no answer (rest still open)");
    assert_eq!((resp.status, resp.text().as_str()), (200, "early"));
    assert!(is_close(&resp), "closing without saying so: {resp:?}");

    let (mut c, _) = conn_on(h.addr(), PATHS[1], "POST /first").await;
    c.send(format!("{head}2\r\n{{}}\r\n0\r\n\r\n").as_bytes()).await;
    let resp = c.response().await.expect("no answer (whole body)");
    assert_eq!(resp.status, 200);
    assert!(!is_close(&resp), "connection not kept: {resp:?}");
    c.send(format!("GET /again HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await;
    let resp = c.response().await.expect("closed silently after a whole body");
    assert_eq!(resp.status, 200);
}
