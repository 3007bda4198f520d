//! The admin listener: `/livez`, `/readyz`, `/metrics`, plus routes the binary adds
//! (e.g. `/generation`, `/state`, BPF status) through [`AdminHandler`]. `GET /` lists
//! them; a method a route does not answer gets 405 with `Allow`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::BoxFuture;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::body::{ProxyBody, full};
use crate::proxy::ProxyState;

/// Read-only endpoints answer these; HEAD comes for free (hyper sends no body).
pub const READ_ONLY: &[Method] = &[Method::GET, Method::HEAD];

/// An admin endpoint.
pub trait AdminHandler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, req: Request<Incoming>) -> BoxFuture<'static, Response<ProxyBody>>;

    /// The methods it answers; the listener turns away others with 405 and `Allow`.
    fn methods(&self) -> &'static [Method] {
        READ_ONLY
    }

    /// One line for the `GET /` index.
    fn about(&self) -> &'static str {
        ""
    }
}

/// A handler with its methods and index line (see [`endpoint`]).
pub struct Endpoint<H> {
    methods: &'static [Method],
    about: &'static str,
    handler: H,
}

/// Wraps `handler` so the index describes it and only `methods` reach it.
pub fn endpoint<H: AdminHandler>(
    methods: &'static [Method],
    about: &'static str,
    handler: H,
) -> Arc<dyn AdminHandler> {
    Arc::new(Endpoint { methods, about, handler })
}

impl<H: AdminHandler> AdminHandler for Endpoint<H> {
    fn handle(&self, req: Request<Incoming>) -> BoxFuture<'static, Response<ProxyBody>> {
        self.handler.handle(req)
    }

    fn methods(&self) -> &'static [Method] {
        self.methods
    }

    fn about(&self) -> &'static str {
        self.about
    }
}

impl<F, Fut> AdminHandler for F
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    fn handle(&self, req: Request<Incoming>) -> BoxFuture<'static, Response<ProxyBody>> {
        Box::pin(self(req))
    }
}

/// A plain-text admin response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<ProxyBody> {
    let mut r = Response::new(full(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A JSON admin response (`body` already serialised).
pub fn json(status: StatusCode, body: impl Into<String>) -> Response<ProxyBody> {
    let mut r = text(status, body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Extra text the binary adds to `/readyz` (e.g. the store's staleness), computed on
/// each request.
pub type AdminExtra = Arc<dyn Fn(&mut String) + Send + Sync>;

/// A collector the binary adds to `/metrics` (e.g. kernel counters), asked to encode its
/// families on each scrape (see [`crate::metrics`]).
pub type MetricsExtra = Box<dyn prometheus_client::collector::Collector>;

/// Admin routes by exact path.
#[derive(Default)]
pub struct AdminRoutes {
    routes: HashMap<String, Arc<dyn AdminHandler>>,
    readyz_extra: Vec<AdminExtra>,
    metrics_extra: Vec<MetricsExtra>,
}

impl AdminRoutes {
    /// Adds or replaces a route.
    pub fn insert(&mut self, path: &str, handler: Arc<dyn AdminHandler>) {
        self.routes.insert(path.to_owned(), handler);
    }

    /// Adds detail lines to `/readyz`. They inform; they do not change readiness, so an
    /// outage of a shared dependency (the store) never takes every node out at once.
    pub fn readyz_detail(&mut self, extra: AdminExtra) {
        self.readyz_extra.push(extra);
    }

    /// Adds a collector to `/metrics`.
    pub fn metrics_extra(&mut self, extra: MetricsExtra) {
        self.metrics_extra.push(extra);
    }

    /// Adds the built-in routes unless the binary replaced them.
    pub(crate) fn with_defaults(mut self, state: Arc<ProxyState>, listeners: usize) -> Self {
        self.routes.entry("/livez".into()).or_insert_with(|| {
            endpoint(READ_ONLY, "liveness: 200 while the process serves", |_req| async {
                text(StatusCode::OK, "ok\n")
            })
        });
        let s = state.clone();
        let extra = Arc::new(std::mem::take(&mut self.readyz_extra));
        self.routes.entry("/readyz".into()).or_insert_with(|| {
            endpoint(READ_ONLY, "readiness: routing loaded and not draining", move |_req| {
                let (s, extra) = (s.clone(), extra.clone());
                async move { readyz(&s, listeners, &extra) }
            })
        });
        let s = state.clone();
        self.routes.entry("/autoscaler/stream".into()).or_insert_with(|| {
            endpoint(READ_ONLY, "per-server load records, newline-delimited JSON", move |_req| {
                let s = s.clone();
                async move { autoscaler_stream(&s) }
            })
        });
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(crate::metrics::ProxyCollector::new(
            state.metrics.clone(),
            state.routing.clone(),
            state.cfg.admin.metrics_max_servers,
        )));
        for c in std::mem::take(&mut self.metrics_extra) {
            registry.register_collector(c);
        }
        let registry = Arc::new(registry);
        self.routes.entry("/metrics".into()).or_insert_with(|| {
            endpoint(
                READ_ONLY,
                "Prometheus text; OpenMetrics if Accept asks for it",
                move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    async move {
                        let accept =
                            req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
                        let format = crate::metrics::Format::negotiate(accept);
                        let mut r = text(StatusCode::OK, format.encode(&registry));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static(format.content_type()),
                        );
                        r
                    }
                },
            )
        });
        self
    }

    /// Dispatches one request: the route, else the index at `/`, else 404; 405 with
    /// `Allow` for a method the route does not answer.
    async fn dispatch(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path();
        let Some(h) = self.routes.get(path) else {
            if path == "/" {
                return match *req.method() {
                    Method::GET | Method::HEAD => text(StatusCode::OK, self.index()),
                    _ => not_allowed(READ_ONLY),
                };
            }
            return text(StatusCode::NOT_FOUND, "not found; GET / lists the endpoints\n");
        };
        if !h.methods().contains(req.method()) {
            return not_allowed(h.methods());
        }
        h.handle(req).await
    }

    /// The `GET /` page: every route with its methods and index line, by path.
    fn index(&self) -> String {
        let mut paths: Vec<_> = self.routes.iter().collect();
        paths.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = String::from("sluice admin endpoints:\n");
        for (path, h) in paths {
            let _ = writeln!(out, "{:<10} {:<22} {}", allow(h.methods()), path, h.about());
        }
        out
    }
}

fn allow(methods: &[Method]) -> String {
    methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
}

fn not_allowed(methods: &[Method]) -> Response<ProxyBody> {
    let allowed = allow(methods);
    let mut r =
        text(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; allowed: {allowed}\n"));
    if let Ok(v) = HeaderValue::from_str(&allowed) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

fn readyz(s: &ProxyState, listeners: usize, extra: &[AdminExtra]) -> Response<ProxyBody> {
    let snap = s.routing.load_full();
    let draining = s.draining.load(Ordering::Relaxed);
    let generation = snap.generation();
    let ready = !draining && generation > 0;
    let mut body = format!(
        "{}\nlisteners: {listeners}\nrouting generation: {generation}\nservers: {}\ndraining: {draining}\n",
        if ready { "ready" } else { "not ready" },
        snap.server_count(),
    );
    for f in extra {
        f(&mut body);
    }
    text(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

/// `GET /autoscaler/stream`: newline-delimited JSON, one record per server per interval,
/// until the client goes away. A subscriber that falls behind skips intervals.
fn autoscaler_stream(s: &ProxyState) -> Response<ProxyBody> {
    use http_body_util::BodyExt as _;
    let rx = s.signal.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(chunk) => {
                    return Some((
                        Ok::<_, crate::body::BoxError>(http_body::Frame::data(chunk)),
                        rx,
                    ));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Following a node's autoscaler stream (or another admin GET, see [`admin_get`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Connecting or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// HTTP failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The endpoint answered something other than 200.
    #[error("autoscaler stream answered {0}")]
    Status(StatusCode),
    /// A line longer than the bound (a broken peer).
    #[error("autoscaler stream line longer than {0} bytes")]
    LineTooLong(usize),
    /// An [`admin_get`] body longer than its bound.
    #[error("admin answer longer than {0} bytes")]
    TooLarge(usize),
}

/// `GET path` on the admin listener at `admin`: the status and the body, read up to
/// `max_body` bytes (more is [`StreamError::TooLarge`]). One connection per call: for
/// background pollers (`sluice supervise --proxy-admin`), never the request path.
pub async fn admin_get(
    admin: std::net::SocketAddr,
    path: &str,
    max_body: usize,
) -> Result<(StatusCode, Vec<u8>), StreamError> {
    use http_body_util::BodyExt as _;
    let (resp, _conn) = open_get(admin, path).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            if out.len() + data.len() > max_body {
                return Err(StreamError::TooLarge(max_body));
            }
            out.extend_from_slice(data);
        }
    }
    Ok((status, out))
}

/// The client connection of an admin GET, closed when dropped.
struct AdminConn(tokio::task::AbortHandle);

impl Drop for AdminConn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `GET path` on a fresh connection to the admin listener at `admin` and returns
/// the response head (its body still to read) with the connection, which must outlive
/// the body.
async fn open_get(
    admin: std::net::SocketAddr,
    path: &str,
) -> Result<(Response<hyper::body::Incoming>, AdminConn), StreamError> {
    use http_body_util::Empty;
    let tcp = tokio::net::TcpStream::connect(admin).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let conn = AdminConn(tokio::spawn(conn).abort_handle());
    let req = Request::builder()
        .uri(path)
        .header(header::HOST, admin.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let resp = send.send_request(req).await?;
    Ok((resp, conn))
}

/// Largest record line accepted from a stream (a server with many replicas stays far
/// below it).
const MAX_RECORD_LINE: usize = 4 << 20;

/// Follow `GET /autoscaler/stream` on the admin listener at `admin`, calling `on_record`
/// for every record, until the stream ends (`Ok`) or fails. Lines that do not parse are
/// skipped with a warning. For `sluice autoscale`.
pub async fn follow_autoscaler_stream(
    admin: std::net::SocketAddr,
    mut on_record: impl FnMut(sluice_routing::ServerRecord),
) -> Result<(), StreamError> {
    use http_body_util::BodyExt as _;
    let (resp, _conn) = open_get(admin, "/autoscaler/stream").await?;
    if resp.status() != StatusCode::OK {
        return Err(StreamError::Status(resp.status()));
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else { continue };
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl];
            start += nl + 1;
            match serde_json::from_slice(line) {
                Ok(rec) => on_record(rec),
                Err(e) => tracing::warn!(%admin, "skipping a bad autoscaler record: {e}"),
            }
        }
        buf.drain(..start);
        if buf.len() > MAX_RECORD_LINE {
            return Err(StreamError::LineTooLong(MAX_RECORD_LINE));
        }
    }
    Ok(())
}

/// Serves the admin routes on `listener` (HTTP/1.1) until aborted.
pub(crate) async fn serve(listener: TcpListener, routes: Arc<AdminRoutes>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let routes = routes.clone();
                async move { Ok::<_, std::convert::Infallible>(routes.dispatch(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
