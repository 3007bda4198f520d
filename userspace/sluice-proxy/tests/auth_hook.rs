//! `Proxy::on_auth_rejected` over real sockets: every 401/403 that proxy auth decides
//! is reported once with the socket peer address (never X-Forwarded-For); a replica's
//! own 401 and allowed requests are not reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use sluice_proxy::Proxy;
use sluice_routing::{
    Protocol, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec, TokenSpec, hash_secret,
};
use sluice_tests::proxy_harness::*;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_rejections_are_reported_with_the_socket_peer() {
    // The replica answers 401 itself for /deny: that is not sluice's rejection.
    let rep = replica(Protocol::Http1, |req: Request<hyper::body::Incoming>| async move {
        let status = if req.uri().path() == "/deny" { 401 } else { 200 };
        Response::builder().status(status).body(text("r\n")).unwrap()
    })
    .await;
    let mut prod = ServerSpec::new("prod", "prod");
    prod.environment = "prod".into();
    let tok = |id: &str, secret: &str, env: &str| TokenSpec {
        id: id.into(),
        secret_hash: hash_secret(secret),
        environments: vec![env.into()],
    };
    let doc = RoutingDoc {
        servers: vec![prod],
        replicas: vec![ReplicaSpec::new("prod", "a", rep.addr)],
        tokens: vec![tok("tok-prod", "sec-prod", "prod"), tok("tok-dev", "sec-dev", "dev")],
    };
    let mut server =
        Proxy::bind(cfg(), RoutingTable::from_doc(node(), doc).unwrap()).await.unwrap();
    let seen: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let s = seen.clone();
    server.on_auth_rejected(Arc::new(move |ip| s.lock().unwrap().push(ip)));
    let addr = server.local_addrs()[0];
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));

    let host = "prod.r1.example.test";
    let send = |path: &str, key: Option<&str>, secret: Option<&str>| {
        let mut b = Request::builder()
            .uri(path)
            .header("host", host)
            .header("x-forwarded-for", "203.0.113.9");
        if let Some(k) = key {
            b = b.header("sluice-key", k);
        }
        if let Some(v) = secret {
            b = b.header("sluice-secret", v);
        }
        let req = b.body(Empty::<Bytes>::new()).unwrap();
        async move { h1(addr, req).await.unwrap().status() }
    };
    assert_eq!(send("/", None, None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send("/", Some("tok-dev"), Some("sec-dev")).await, StatusCode::FORBIDDEN);
    assert_eq!(send("/", Some("tok-prod"), Some("sec-prod")).await, StatusCode::OK);
    assert_eq!(
        send("/deny", Some("tok-prod"), Some("sec-prod")).await,
        StatusCode::UNAUTHORIZED,
        "the replica's own 401"
    );
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![local, local]);
    drop(stop);
}
