//! What a replica learns of the client: `X-Forwarded-*` set by sluice, and never an `_`
//! look-alike a client sent (`X_Forwarded_For`), which frameworks that fold `_` into
//! `-` would read as the real header. On the HTTP/1.1 fast path and the hyper path.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use sluice_routing::Protocol;

#[tokio::test]
async fn forwarding_lookalikes_are_dropped() {
    // Answers with every header it got, one `name: value` per line.
    let rep = replica(Protocol::Http1, |req: Request<Incoming>| async move {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        Response::new(text(lines.join("\n")))
    })
    .await;
    let proxy = start(cfg(), doc(&[("a", rep.addr, Protocol::Http1)])).await;
    // Plain requests take the fast path; `expect` sends one to the hyper path.
    for extra in ["", "expect: 100-continue\r\n"] {
        let req = format!(
            "GET / HTTP/1.1\r\nhost: hello.r1.example.test\r\n{extra}\
             X_Forwarded_For: 6.6.6.6\r\nx-forwarded_proto: gopher\r\nX_Real_IP: 6.6.6.6\r\n\
             x_forwarded_host: evil.test\r\nconnection: close\r\n\r\n"
        );
        let resp = raw(proxy.addr(), req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let body = resp.split_once("\r\n\r\n").unwrap().1.to_ascii_lowercase();
        assert!(!body.contains('_'), "a look-alike reached the replica ({extra:?}):\n{body}");
        assert!(!body.contains("6.6.6.6") && !body.contains("gopher"), "{body}");
        assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");
    }
}
