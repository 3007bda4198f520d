//! The admin listener over real sockets: the index, 405 with `Allow`, content types.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use http::{Method, StatusCode, header};
use sluice_proxy::Proxy;
use sluice_proxy::admin::{endpoint, json, text};
use sluice_routing::{RoutingDoc, RoutingTable};
use sluice_tests::proxy_harness::*;

/// A proxy with its built-in admin routes plus a JSON one and a PUT one, as the binary
/// adds them; the admin address and the stop sender.
async fn admin() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let table = RoutingTable::from_doc(node(), RoutingDoc::default()).unwrap();
    let mut server = Proxy::bind(cfg(), table).await.unwrap();
    server.admin_route(
        "/thing",
        endpoint(sluice_proxy::admin::READ_ONLY, "a JSON thing", |_req| async {
            json(StatusCode::OK, "{}\n")
        }),
    );
    const PUT: &[Method] = &[Method::GET, Method::PUT];
    server.admin_route(
        "/knob",
        endpoint(PUT, "a settable knob", |req: http::Request<hyper::body::Incoming>| {
            let m = req.method().clone();
            async move { text(StatusCode::OK, format!("{m}\n")) }
        }),
    );
    let addr = server.admin_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

fn request(method: Method, path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut r = get(path, "admin");
    *r.method_mut() = method;
    r
}

fn content_type(r: &http::Response<hyper::body::Incoming>) -> String {
    r.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn index_lists_every_endpoint_with_its_methods() {
    let (addr, _stop) = admin().await;
    let resp = h1(addr, get("/", "admin")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(content_type(&resp).starts_with("text/plain"));
    let body = body_string(resp).await;
    for path in ["/livez", "/readyz", "/metrics", "/autoscaler/stream", "/thing", "/knob"] {
        assert!(body.lines().any(|l| l.contains(path)), "{path} missing from\n{body}");
    }
    assert!(body.lines().any(|l| l.contains("/knob") && l.contains("PUT")), "{body}");
    assert!(body.contains("a JSON thing"), "{body}");
}

#[tokio::test]
async fn wrong_methods_get_405_with_allow() {
    let (addr, _stop) = admin().await;
    let resp = h1(addr, request(Method::POST, "/metrics")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
    let resp = h1(addr, request(Method::DELETE, "/knob")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()[header::ALLOW], "GET, PUT");
    let resp = h1(addr, request(Method::PUT, "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    // The allowed method reaches the handler; an unknown path stays 404.
    let resp = h1(addr, request(Method::PUT, "/knob")).await.unwrap();
    assert_eq!(body_string(resp).await, "PUT\n");
    let resp = h1(addr, get("/nope", "admin")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // HEAD answers where GET does, without a body.
    let resp = h1(addr, request(Method::HEAD, "/livez")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp).await, "");
}

#[tokio::test]
async fn content_types() {
    let (addr, _stop) = admin().await;
    let resp = h1(addr, get("/metrics", "admin")).await.unwrap();
    assert!(content_type(&resp).starts_with("text/plain; version=0.0.4"), "{resp:?}");
    let resp = h1(addr, get("/thing", "admin")).await.unwrap();
    assert_eq!(content_type(&resp), "application/json");
    let resp = h1(addr, get("/autoscaler/stream", "admin")).await.unwrap();
    assert_eq!(content_type(&resp), "application/x-ndjson");
}

/// `/metrics` carries the build and the standard process metrics, with their types, read
/// from this very process.
#[tokio::test]
async fn metrics_include_build_info_and_process_metrics() {
    let (addr, _stop) = admin().await;
    let resp = h1(addr, get("/metrics", "admin")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = body_string(resp).await;
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    for (name, kind) in [
        ("sluice_build_info", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name}: {text}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(text.contains(&format!("sluice_build_info{{version=\"{version}\"")), "{text}");
    assert_eq!(value("sluice_build_info{"), 1.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = value("process_start_time_seconds");
    // This test process started before the scrape, and not long before.
    assert!(started <= now + 1.0 && started > now - 3600.0, "{started} vs {now}");
}
