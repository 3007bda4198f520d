//! WebSocket echo through sluice: HTTP/1.1 Upgrade and HTTP/2 extended CONNECT (RFC 8441),
//! both becoming an HTTP/1.1 upgrade at the replica.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use sluice_demo::{DemoProtocol, spawn_replica};
use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

async fn echo_round_trip<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..3 {
        let msg = format!("ping {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let got = tokio::time::timeout(T, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), msg);
    }
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = tokio::time::timeout(T, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.into_data().as_ref(), &big[..]);
}

#[tokio::test]
async fn websocket_over_h1_upgrade() {
    for proto in [DemoProtocol::Http1, DemoProtocol::H2c] {
        let r = spawn_replica("ws", proto).await.unwrap();
        let rp = if proto == DemoProtocol::H2c { Protocol::H2c } else { Protocol::Http1 };
        let h = start(cfg(), doc(&[("ws", r.addr, rp)])).await;
        let tcp = TcpStream::connect(h.addr()).await.unwrap();
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("ws://{HOST}/ws"), tcp).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        echo_round_trip(&mut ws).await;
        ws.close(None).await.unwrap();
    }
}

#[tokio::test]
async fn websocket_over_h2_extended_connect() {
    let r = spawn_replica("ws", DemoProtocol::Http1).await.unwrap();
    let h = start(cfg(), doc(&[("ws", r.addr, Protocol::Http1)])).await;
    let mut c = h2_client::<Empty<Bytes>>(h.addr()).await;
    // A first request makes sure the server's SETTINGS (ENABLE_CONNECT_PROTOCOL) arrived.
    let resp = c
        .send_request(Request::builder().uri(format!("http://{HOST}/")).body(Empty::new()).unwrap())
        .await
        .unwrap();
    body_string(resp).await;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{HOST}/ws"))
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    echo_round_trip(&mut ws).await;
}

/// A hand-off that insists on raw sockets (what the kernel splice needs) and relays them
/// itself, proving both plaintext legs are recoverable as `TcpStream`s.
struct RawTcpHandoff(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl sluice_proxy::OpaqueStreamHandoff for RawTcpHandoff {
    fn relay(
        &self,
        s: sluice_proxy::OpaqueStream,
    ) -> futures_util::future::BoxFuture<'static, std::io::Result<(u64, u64)>> {
        let raw = self.0.clone();
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let (Ok((mut client, client_buf)), Ok((mut up, up_buf))) =
                (sluice_proxy::into_tcp(s.client), sluice_proxy::into_tcp(s.upstream))
            else {
                return Err(std::io::Error::other("a leg was not plain TCP"));
            };
            raw.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Bytes read past the upgrade heads go first.
            up.write_all(&client_buf).await?;
            client.write_all(&up_buf).await?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await
        })
    }
}

#[tokio::test]
async fn plaintext_legs_are_raw_sockets_for_the_kernel() {
    let r = spawn_replica("ws", DemoProtocol::Http1).await.unwrap();
    let routing =
        sluice_routing::RoutingTable::from_doc(node(), doc(&[("ws", r.addr, Protocol::Http1)]))
            .unwrap();
    let mut server = sluice_proxy::Proxy::bind(cfg(), routing).await.unwrap();
    let raw = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    server.set_handoff(std::sync::Arc::new(RawTcpHandoff(raw.clone())));
    let addr = server.local_addrs()[0];
    let task = tokio::spawn(server.run(std::future::pending()));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{HOST}/ws"), tcp).await.unwrap();
    echo_round_trip(&mut ws).await;
    assert_eq!(raw.load(std::sync::atomic::Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test]
async fn upgrade_request_body_reaches_the_replica() {
    // The replica reads the body and declines the upgrade: an ordinary answer must come
    // back, not a hang while the replica waits for a body sluice dropped.
    let r = replica(Protocol::Http1, |req: hyper::Request<hyper::body::Incoming>| async move {
        let body = collect(req.into_body()).await.map(|c| c.to_bytes()).unwrap_or_default();
        hyper::Response::new(text(format!("got {}", String::from_utf8_lossy(&body))))
    })
    .await;
    let h = start(cfg(), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/up")
        .header("host", HOST)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(full_body("hello"))
        .unwrap();
    let resp = tokio::time::timeout(T, h1(h.addr(), req)).await.expect("upgrade with a body hung");
    let resp = resp.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_string(resp).await, "got hello");
}
