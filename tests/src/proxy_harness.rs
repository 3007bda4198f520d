//! The proxy tests' harness: a `Proxy` on ephemeral ports, in-process replicas, and
//! HTTP/1.1 and h2 clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_proxy::ProxyBody;
use sluice_proxy::{Proxy, ProxyConfig};
use sluice_routing::{NodeConfig, Protocol, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The host every harness request names: server `hello` in region `r1`.
pub const HOST: &str = "hello.r1.example.test";
/// The bound on any one wait in a proxy test.
pub const T: Duration = Duration::from_secs(10);

/// The node the harness's routing table is built for: base domain `example.test`, region `r1`.
pub fn node() -> NodeConfig {
    NodeConfig { base_domains: vec!["example.test".into()], regions: vec!["r1".into()] }
}

/// The default proxy config with its listener and admin on ephemeral loopback ports.
pub fn cfg() -> ProxyConfig {
    let mut c = ProxyConfig::default();
    c.listeners[0].addr = "127.0.0.1:0".parse().unwrap();
    c.admin.addr = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// One server `hello` (label hello) with the given replicas.
pub fn doc(replicas: &[(&str, SocketAddr, Protocol)]) -> RoutingDoc {
    let mut s = ServerSpec::new("hello", "hello");
    s.unauthenticated = true;
    RoutingDoc {
        servers: vec![s],
        replicas: replicas
            .iter()
            .map(|(id, addr, p)| {
                let mut r = ReplicaSpec::new("hello", *id, *addr);
                r.protocol = *p;
                r
            })
            .collect(),
        tokens: vec![],
    }
}

/// A running proxy; dropping it aborts the proxy's task.
pub struct Harness {
    /// The listeners' bound addresses, in config order.
    pub addrs: Vec<SocketAddr>,
    /// The admin listener's address.
    pub admin: SocketAddr,
    /// The proxy's metrics, read in-process.
    pub metrics: Arc<sluice_proxy::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    /// The proxy's task, until [`Harness::shutdown`] takes it.
    pub done: Option<JoinHandle<Result<(), sluice_proxy::ProxyError>>>,
}

impl Harness {
    /// A harness over a proxy the test started itself (`stop` ends its run).
    pub fn new(
        addrs: Vec<SocketAddr>,
        admin: SocketAddr,
        metrics: Arc<sluice_proxy::Metrics>,
        stop: oneshot::Sender<()>,
        done: JoinHandle<Result<(), sluice_proxy::ProxyError>>,
    ) -> Self {
        Harness { addrs, admin, metrics, stop: Some(stop), done: Some(done) }
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Asks the proxy to stop (drain) and returns its task to await.
    pub fn shutdown(&mut self) -> JoinHandle<Result<(), sluice_proxy::ProxyError>> {
        let _ = self.stop.take().unwrap().send(());
        self.done.take().unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(d) = &self.done {
            d.abort();
        }
    }
}

/// Binds a proxy with `cfg` over `doc` and runs it on the test's runtime.
pub async fn start(cfg: ProxyConfig, doc: RoutingDoc) -> Harness {
    let routing = RoutingTable::from_doc(node(), doc).unwrap();
    let server = Proxy::bind(cfg, routing).await.unwrap();
    let addrs = server.local_addrs();
    let admin = server.admin_addr().unwrap();
    let metrics = server.metrics();
    let (tx, rx) = oneshot::channel();
    let done = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Harness { addrs, admin, metrics, stop: Some(tx), done: Some(done) }
}

/// A replica built from a handler; `hits` counts requests that reached it.
pub struct TestReplica {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests that reached it.
    pub hits: Arc<AtomicUsize>,
    /// TCP connections it accepted.
    pub conns: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TestReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestReplica {
    /// Requests that reached it so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// TCP connections it accepted so far.
    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

/// Serves `handler` over `proto` (h2c, else HTTP/1.1 with upgrades) on an ephemeral port.
pub async fn replica<F, Fut>(proto: Protocol, handler: F) -> TestReplica
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (h, accepted) = (hits.clone(), conns.clone());
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let hits = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let f = handler(req);
                    async move { Ok::<_, Infallible>(f.await) }
                });
                let io = TokioIo::new(tcp);
                let _ = match proto {
                    Protocol::H2c => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    }
                    _ => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await
                    }
                };
            });
        }
    });
    TestReplica { addr, hits, conns, task }
}

/// A whole-text response body.
pub fn text(s: impl Into<Bytes>) -> ProxyBody {
    sluice_proxy::full(s.into())
}

/// A bodiless GET of `uri` naming `host`.
pub fn get(uri: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::builder().uri(uri).header("host", host).body(Empty::new()).unwrap()
}

/// HTTP/1.1 client on a fresh connection.
pub async fn h1<B>(addr: SocketAddr, req: Request<B>) -> hyper::Result<Response<Incoming>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn.with_upgrades());
    send.send_request(req).await
}

/// HTTP/2 prior-knowledge client.
pub async fn h2_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// The response's body as text, read within [`T`].
pub async fn body_string(resp: Response<Incoming>) -> String {
    let b = tokio::time::timeout(T, resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

/// Writes raw bytes and reads until the peer closes (or 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole request body.
pub fn full_body(s: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(s.as_bytes()))
}

/// A hello replica that answers with its id.
pub async fn hello(id: &'static str, proto: Protocol) -> TestReplica {
    replica(proto, move |req: Request<Incoming>| async move {
        let v = format!("{:?}", req.version());
        Response::builder()
            .header("x-replica", id)
            .body(text(format!("hello from {id} over {v}\n")))
            .unwrap()
    })
    .await
}

/// An address nobody listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Reads a request or response body to its end.
pub async fn collect(b: Incoming) -> Result<http_body_util::Collected<Bytes>, hyper::Error> {
    b.collect().await
}
