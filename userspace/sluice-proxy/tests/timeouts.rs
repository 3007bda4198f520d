//! Upstream timeouts through real sockets, on every client path (the HTTP/1.1 fast path,
//! the hyper path, HTTP/2) and both replica protocols: the idle timeout means no bytes in
//! either direction (a slow but steady upload or stream never trips it), the first-byte
//! timeout bounds a replica that never answers, and a replica going quiet mid-response is
//! a failed response, never a truncated success.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Chunks of the paced upload, and the pause between them: 20 x 50 ms = 1 s of upload,
/// well past the 300 ms idle and first-byte timeouts the tests configure, while no gap
/// comes near them.
const CHUNKS: usize = 20;
const PAUSE: Duration = Duration::from_millis(50);
const CHUNK: &[u8] = b"0123456789";
const QUIET: Duration = Duration::from_millis(300);

/// The client paths a request can take.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Plain HTTP/1.1 with `content-length`: the fast path.
    Fast,
    /// HTTP/1.1 with a chunked body, which the fast path declines.
    Hyper,
    /// HTTP/2 prior knowledge.
    H2,
}

const PATHS: [Path; 3] = [Path::Fast, Path::Hyper, Path::H2];

/// A raw HTTP/1.1 replica (its answers say `connection: close`: one request per
/// connection): per connection, reads a request head and then until `END` (the
/// last bytes of every test body; bodiless requests end at the head), and calls `answer`
/// with the socket and the number of bytes read.
fn raw_replica<F, Fut>(answer: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std.set_nonblocking(true).unwrap();
    let addr = std.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let l = TcpListener::from_std(std).unwrap();
        loop {
            let Ok((mut tcp, _)) = l.accept().await else { return };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n");
                    if let Some(end) = head_end {
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let bodiless =
                            !head.contains("content-length") && !head.contains("transfer-encoding");
                        if bodiless || seen[end..].windows(3).any(|w| w == b"END") {
                            break;
                        }
                    }
                    match tcp.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&b[..n]),
                    }
                }
                answer(tcp, seen.len()).await;
            });
        }
    });
    (addr, task)
}

/// A raw replica answering `200` with `ok` once it has read the whole request.
fn ok_replica() -> (SocketAddr, JoinHandle<()>) {
    raw_replica(|mut tcp, _| async move {
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let mut b = [0u8; 1024];
        let _ = tcp.read(&mut b).await;
    })
}

/// An h2c replica that reads the whole body and answers `ok`.
async fn ok_h2c_replica() -> TestReplica {
    replica(Protocol::H2c, |req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        Response::new(text("ok"))
    })
    .await
}

fn config() -> sluice_proxy::ProxyConfig {
    let mut c = cfg();
    c.timeouts.upstream_idle = Some(QUIET);
    c.timeouts.upstream_first_byte = QUIET;
    c
}

/// Sends a request whose body trickles in over about a second on `path`; returns the
/// status and the body (or an error text).
async fn paced_upload(proxy: SocketAddr, path: Path) -> (u16, String) {
    let total = CHUNKS * CHUNK.len() + 3;
    match path {
        Path::Fast | Path::Hyper => {
            let mut tcp = TcpStream::connect(proxy).await.unwrap();
            let framing = match path {
                Path::Fast => format!("content-length: {total}\r\n"),
                _ => "transfer-encoding: chunked\r\n".to_owned(),
            };
            let head =
                format!("POST /up HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{framing}\r\n");
            tcp.write_all(head.as_bytes()).await.unwrap();
            let chunked = matches!(path, Path::Hyper);
            for i in 0..=CHUNKS {
                let data: &[u8] = if i == CHUNKS { b"END" } else { CHUNK };
                if chunked {
                    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
                    framed.extend_from_slice(data);
                    framed.extend_from_slice(b"\r\n");
                    tcp.write_all(&framed).await.unwrap();
                } else {
                    tcp.write_all(data).await.unwrap();
                }
                if i < CHUNKS {
                    tokio::time::sleep(PAUSE).await;
                }
            }
            if chunked {
                tcp.write_all(b"0\r\n\r\n").await.unwrap();
            }
            read_response(tcp).await
        }
        Path::H2 => {
            let stream = futures_util::stream::unfold(0usize, |i| async move {
                if i > CHUNKS {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(PAUSE).await;
                }
                let data = if i == CHUNKS { &b"END"[..] } else { CHUNK };
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from_static(data))), i + 1))
            });
            let req = Request::builder()
                .method("POST")
                .uri(format!("http://{HOST}/up"))
                .body(StreamBody::new(stream).boxed())
                .unwrap();
            h2_request(proxy, req).await
        }
    }
}

/// A bodiless GET on `path`.
async fn get_on(proxy: SocketAddr, path: Path) -> (u16, String) {
    match path {
        Path::Fast | Path::Hyper => {
            let mut tcp = TcpStream::connect(proxy).await.unwrap();
            // `te: trailers` is a request the fast path leaves to the hyper path.
            let extra = if matches!(path, Path::Hyper) { "te: trailers\r\n" } else { "" };
            let head =
                format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n{extra}\r\n");
            tcp.write_all(head.as_bytes()).await.unwrap();
            read_response(tcp).await
        }
        Path::H2 => {
            let req = Request::builder()
                .uri(format!("http://{HOST}/"))
                .body(http_body_util::Empty::<Bytes>::new().map_err(|n| match n {}).boxed())
                .unwrap();
            h2_request(proxy, req).await
        }
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn h2_request(proxy: SocketAddr, req: Request<TestBody>) -> (u16, String) {
    let mut send = h2_client::<TestBody>(proxy).await;
    let resp = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    match tokio::time::timeout(T, resp.into_body().collect()).await.unwrap() {
        Ok(b) => (status, String::from_utf8_lossy(&b.to_bytes()).into_owned()),
        Err(e) => (status, format!("<body error: {e}>")),
    }
}

/// Reads an HTTP/1.1 response to the end of the connection (bounded by `T`); the body is
/// decoded by its framing, and a body cut short reads as `<truncated>`.
async fn read_response(mut tcp: TcpStream) -> (u16, String) {
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out)).await.unwrap().ok();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return (status, text) };
    let head = head.to_ascii_lowercase();
    if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length: ")) {
        let n: usize = cl.trim().parse().unwrap();
        return if body.len() == n {
            (status, body.to_owned())
        } else {
            (status, "<truncated>".into())
        };
    }
    if head.contains("transfer-encoding: chunked") {
        let mut rest = body;
        let mut decoded = String::new();
        loop {
            let Some((size, after)) = rest.split_once("\r\n") else {
                return (status, "<truncated>".into());
            };
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(usize::MAX);
            if n == 0 {
                return (status, decoded);
            }
            if after.len() < n + 2 {
                return (status, "<truncated>".into());
            }
            decoded.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
    }
    (status, body.to_owned())
}

#[tokio::test]
async fn slow_steady_upload_is_not_idle_http1_replica() {
    let (addr, _task) = ok_replica();
    let h = start(config(), doc(&[("a", addr, Protocol::Http1)])).await;
    for path in PATHS {
        let (status, body) = paced_upload(h.addr(), path).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "{path:?}");
    }
}

#[tokio::test]
async fn slow_steady_upload_is_not_idle_h2c_replica() {
    let r = ok_h2c_replica().await;
    let h = start(config(), doc(&[("a", r.addr, Protocol::H2c)])).await;
    for path in PATHS {
        let (status, body) = paced_upload(h.addr(), path).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "{path:?}");
    }
}

/// A replica that reads the request and never answers: the first-byte timeout (no idle
/// timeout set) answers 504.
#[tokio::test]
async fn replica_that_never_answers_gets_504_by_first_byte_timeout() {
    let (addr, _task) = raw_replica(|tcp, _| async move {
        let _hold = tcp;
        std::future::pending::<()>().await;
    });
    let silent_h2 = replica(Protocol::H2c, |_req: Request<Incoming>| async move {
        std::future::pending::<Response<sluice_proxy::ProxyBody>>().await
    })
    .await;
    for (replica_addr, proto) in [(addr, Protocol::Http1), (silent_h2.addr, Protocol::H2c)] {
        let mut c = cfg();
        c.timeouts.upstream_idle = None;
        c.timeouts.upstream_first_byte = QUIET;
        let h = start(c, doc(&[("a", replica_addr, proto)])).await;
        for path in PATHS {
            let (status, _) = get_on(h.addr(), path).await;
            assert_eq!(status, 504, "{proto:?} {path:?}");
        }
    }
}

/// The server's own `timeouts.first_byte` wins over the proxy default.
#[tokio::test]
async fn per_server_first_byte_timeout() {
    let (addr, _task) = raw_replica(|tcp, _| async move {
        let _hold = tcp;
        std::future::pending::<()>().await;
    });
    let mut c = cfg();
    c.timeouts.upstream_first_byte = Duration::from_secs(3600);
    let mut d = doc(&[("a", addr, Protocol::Http1)]);
    d.servers[0].timeouts.first_byte = Some(QUIET);
    let h = start(c, d).await;
    for path in PATHS {
        let (status, _) = get_on(h.addr(), path).await;
        assert_eq!(status, 504, "{path:?}");
    }
}

/// A replica that streams its answer slowly but steadily is not idle; one that goes quiet
/// mid-body fails the response (cut off, or the stream reset), never a clean short one.
#[tokio::test]
async fn streamed_answer_idle_only_when_quiet() {
    let (addr, _task) = raw_replica(|mut tcp, _| async move {
        let _ = tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await;
        for _ in 0..CHUNKS {
            tokio::time::sleep(PAUSE).await;
            let _ = tcp.write_all(b"1\r\nx\r\n").await;
        }
        let _ = tcp.write_all(b"0\r\n\r\n").await;
        let mut b = [0u8; 64];
        let _ = tcp.read(&mut b).await;
    });
    let (stalls, _task2) = raw_replica(|mut tcp, _| async move {
        let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial").await;
        std::future::pending::<()>().await;
    });
    let h = start(config(), doc(&[("a", addr, Protocol::Http1)])).await;
    let want = "x".repeat(CHUNKS);
    for path in PATHS {
        let (status, body) = get_on(h.addr(), path).await;
        assert_eq!((status, body.as_str()), (200, want.as_str()), "{path:?}");
    }
    let h = start(config(), doc(&[("a", stalls, Protocol::Http1)])).await;
    for path in PATHS {
        let (status, body) = get_on(h.addr(), path).await;
        assert_eq!(status, 200, "{path:?}");
        assert!(body == "<truncated>" || body.starts_with("<body error"), "{path:?}: {body}");
    }
}
