//! sluice's own answers as a prober sees them: a 503 for a domain no server claims is the
//! same, status, headers and body, as one for a server with no ready replica, on the
//! HTTP/1.1 fast path, the hyper path and HTTP/2.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use sluice_routing::{RoutingDoc, ServerSpec};
use sluice_tests::proxy_harness::*;

/// The response with its request id (the one part that differs per request) masked.
fn masked(resp: &str) -> String {
    let id = resp
        .lines()
        .find_map(|l| l.strip_prefix("request id: "))
        .unwrap_or_else(|| panic!("no request id in {resp:?}"))
        .trim()
        .to_owned();
    resp.replace(&id, "<id>")
}

#[tokio::test]
async fn unknown_domain_and_no_replica_503s_are_identical() {
    let mut empty = ServerSpec::new("empty", "empty");
    empty.unauthenticated = true;
    let doc = RoutingDoc { servers: vec![empty], ..RoutingDoc::default() };
    let proxy = start(cfg(), doc).await;
    let ask = |host: &str, extra: &str| {
        format!(
            "GET / HTTP/1.1\r\nhost: {host}.r1.example.test\r\n{extra}connection: close\r\n\r\n"
        )
    };
    // Plain requests take the fast path; an `expect` header sends one to the hyper path.
    for extra in ["", "expect: 100-continue\r\n"] {
        let no_replica = raw(proxy.addr(), ask("empty", extra).as_bytes()).await;
        let unknown = raw(proxy.addr(), ask("nosuch", extra).as_bytes()).await;
        assert!(no_replica.starts_with("HTTP/1.1 503"), "{no_replica}");
        assert!(no_replica.to_ascii_lowercase().contains("retry-after: 1"), "{no_replica}");
        assert_eq!(masked(&no_replica), masked(&unknown), "extra header {extra:?}");
    }
    let mut h2 = h2_client(proxy.addr()).await;
    let mut answer = |host: &'static str| {
        let req = get("/", host);
        let fut = h2.send_request(req);
        async move {
            let resp = fut.await.unwrap();
            let status = resp.status();
            let mut headers: Vec<String> = resp
                .headers()
                .iter()
                .filter(|(k, _)| *k != "x-request-id" && *k != "date")
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
                .collect();
            headers.sort();
            (status, headers, masked(&body_string(resp).await))
        }
    };
    let no_replica = answer("empty.r1.example.test").await;
    let unknown = answer("nosuch.r1.example.test").await;
    assert_eq!(no_replica.0, 503);
    assert_eq!(no_replica, unknown);
}

/// A request refused for its credentials: a small body, declared or chunked, is drained
/// and the keep-alive connection answers the next request; one behind
/// `Expect: 100-continue` is not read, and the answer says `connection: close`.
#[tokio::test]
async fn rejected_bodies_are_drained_or_the_close_is_announced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let private = ServerSpec::new("private", "private");
    let doc = RoutingDoc { servers: vec![private], ..RoutingDoc::default() };
    let proxy = start(cfg(), doc).await;
    let head = "POST / HTTP/1.1\r\nhost: private.r1.example.test\r\n";
    let bodies = [
        format!("{head}content-length: 5\r\n\r\nhello"),
        format!("{head}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ];
    for first in bodies {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        tcp.write_all(first.as_bytes()).await.unwrap();
        tcp.write_all(
            b"GET / HTTP/1.1\r\nhost: nosuch.r1.example.test\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        let read = tcp.read_to_string(&mut out);
        tokio::time::timeout(std::time::Duration::from_secs(5), read).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 2, "the next request was answered: {out}");
        assert!(out.contains("HTTP/1.1 503"), "{out}");
    }
    let expect = format!("{head}content-length: 5\r\nexpect: 100-continue\r\n\r\n");
    let out = raw(proxy.addr(), expect.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.to_ascii_lowercase().contains("connection: close"), "{out}");
}
