//! Demo replicas and a self-signed certificate for `sluice demo` (and the tests).
//!
//! A demo replica listens on a loopback port and answers every request with its replica
//! id; `/echo` streams the request body back (trailers included), and a WebSocket upgrade
//! (on any path; `/ws` in the demo's examples) is an echo. An `h2c` replica also speaks HTTP/1.1 on the same port, because sluice always
//! upgrades (WebSocket) over HTTP/1.1 at the replica.
//!
//! Apart from the proxy on purpose: a replica is what the proxy talks to, so this crate
//! depends on no sluice crate, and the proxy library carries neither a WebSocket server
//! nor a certificate generator.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Boxed error of a demo replica's response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a demo replica's responses.
pub type DemoBody = UnsyncBoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> DemoBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Why [`write_self_signed`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The certificate could not be generated.
    #[error("generating a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Which protocol a demo replica serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoProtocol {
    /// HTTP/2 prior knowledge (and HTTP/1.1 on the same port).
    H2c,
    /// HTTP/1.1 only.
    Http1,
}

/// A running demo replica; stops when dropped.
#[derive(Debug)]
pub struct DemoReplica {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for DemoReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a demo replica on `127.0.0.1:0`.
pub async fn spawn_replica(id: &str, protocol: DemoProtocol) -> io::Result<DemoReplica> {
    spawn_replica_at(id, protocol, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Starts a demo replica listening on `addr`.
pub async fn spawn_replica_at(
    id: &str,
    protocol: DemoProtocol,
    addr: SocketAddr,
) -> io::Result<DemoReplica> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let id: Arc<str> = Arc::from(id);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let id = id.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 3];
                let h2 = protocol == DemoProtocol::H2c
                    && matches!(tcp.peek(&mut preface).await, Ok(3) if &preface == b"PRI");
                let svc = service_fn(move |req| {
                    let id = id.clone();
                    async move { Ok::<_, Infallible>(answer(&id, protocol, req).await) }
                });
                let io = TokioIo::new(tcp);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await
                };
            });
        }
    });
    Ok(DemoReplica { addr, task })
}

async fn answer(
    id: &str,
    protocol: DemoProtocol,
    mut req: Request<Incoming>,
) -> Response<DemoBody> {
    let websocket = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let path = if websocket { "/ws" } else { req.uri().path() };
    match path {
        "/echo" => {
            let body = req.into_body().map_err(Into::into).boxed_unsync();
            Response::new(body)
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                let mut r = Response::new(full("expected a WebSocket upgrade\n"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            };
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                h.insert("sec-websocket-accept", v);
            }
            r
        }
        _ => {
            let proto = match (protocol, req.version()) {
                (_, http::Version::HTTP_2) => "h2c",
                _ => "http/1.1",
            };
            let mut r = Response::new(full(format!("hello from replica {id} ({proto})\n")));
            if let Ok(v) = HeaderValue::from_str(id) {
                r.headers_mut().insert("x-replica-id", v);
            }
            r
        }
    }
}

/// A self-signed certificate for `names`, written as `cert.pem` and `key.pem` into `dir`.
pub fn write_self_signed(names: &[&str], dir: &Path) -> Result<(PathBuf, PathBuf), DemoError> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let cert = rcgen::generate_simple_self_signed(names)?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let write = |p: &Path, s: String| {
        std::fs::write(p, s).map_err(|source| DemoError::Write { path: p.to_owned(), source })
    };
    write(&cert_path, cert.cert.pem())?;
    write(&key_path, cert.key_pair.serialize_pem())?;
    Ok((cert_path, key_path))
}
