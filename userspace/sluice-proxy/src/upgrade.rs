//! Opaque byte streams after an upgrade (WebSocket over HTTP/1.1 Upgrade or HTTP/2
//! extended CONNECT). Every one passes through a single hand-off point,
//! [`OpaqueStreamHandoff`], which the kernel data plane can implement (sockmap splice when
//! both legs are plaintext TCP); the default relays in userspace.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::h1scan::H1Scan;
use crate::io::ConnIo;

/// Both legs of an upgraded exchange, ready to be relayed.
pub struct OpaqueStream {
    /// The client leg (an HTTP/1.1 connection or an HTTP/2 stream).
    pub client: Upgraded,
    /// The replica leg (always an HTTP/1.1 connection; see [`into_tcp`]).
    pub upstream: Upgraded,
    /// Server id, for accounting.
    pub server: String,
    /// Replica id, for accounting.
    pub replica: String,
    /// Replica address.
    pub replica_addr: SocketAddr,
    /// The server's kernel splice setting (`auto`, `always`, `never`).
    pub splice: sluice_routing::SpliceMode,
}

/// The one place opaque streams go. Implementations must relay until either side closes
/// and return the bytes moved (client→replica, replica→client).
pub trait OpaqueStreamHandoff: Send + Sync + 'static {
    /// Relays `stream` to completion.
    fn relay(&self, stream: OpaqueStream) -> BoxFuture<'static, io::Result<(u64, u64)>>;
}

/// The userspace relay: `tokio::io::copy_bidirectional`.
#[derive(Debug, Default, Clone, Copy)]
pub struct UserspaceRelay;

impl OpaqueStreamHandoff for UserspaceRelay {
    fn relay(&self, stream: OpaqueStream) -> BoxFuture<'static, io::Result<(u64, u64)>> {
        Box::pin(async move {
            let mut client = TokioIo::new(stream.client);
            let mut upstream = TokioIo::new(stream.upstream);
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
        })
    }
}

/// The I/O stack of a plaintext HTTP/1.1 client connection on the hyper path, as
/// [`plain_client_io`] builds it. [`into_tcp`] downcasts to this same alias, so a
/// wrapper added to the stack changes both at once, and the compiler then asks for its
/// [`UnwrapTcp`] (a downcast to a stale type would silently stop splicing instead).
pub(crate) type PlainClientIo = TokioIo<H1Scan<ConnIo<TcpStream>>>;

/// The I/O of an upstream HTTP/1.1 connection (`upstream/http1.rs`), under the same rule.
pub(crate) type PlainUpstreamIo = TokioIo<TcpStream>;

/// Builds [`PlainClientIo`] around a plaintext client socket: `read` holds bytes the fast
/// path had already taken from it, `max_head` and `verdicts` are [`H1Scan`]'s.
pub(crate) fn plain_client_io(
    tcp: TcpStream,
    activity: std::sync::Arc<crate::io::Activity>,
    read: Bytes,
    max_head: usize,
    verdicts: std::sync::Arc<crate::h1scan::Verdicts>,
) -> PlainClientIo {
    TokioIo::new(H1Scan::new(ConnIo::with_prefix(tcp, activity, read), max_head, verdicts))
}

/// The plaintext I/O layers an upgraded connection may be wrapped in, each able to give
/// back the socket and the bytes it holds that its reader has not seen yet.
pub(crate) trait UnwrapTcp {
    /// The socket, and bytes read from it but not yet passed on.
    fn unwrap_tcp(self) -> (TcpStream, Bytes);
}

impl UnwrapTcp for TcpStream {
    fn unwrap_tcp(self) -> (TcpStream, Bytes) {
        (self, Bytes::new())
    }
}

impl<T: UnwrapTcp> UnwrapTcp for ConnIo<T> {
    fn unwrap_tcp(self) -> (TcpStream, Bytes) {
        let (inner, prefix) = self.into_parts();
        let (tcp, deeper) = inner.unwrap_tcp();
        (tcp, joined(deeper, prefix))
    }
}

impl<T: UnwrapTcp> UnwrapTcp for H1Scan<T> {
    fn unwrap_tcp(self) -> (TcpStream, Bytes) {
        self.into_inner().unwrap_tcp()
    }
}

impl<T: UnwrapTcp> UnwrapTcp for TokioIo<T> {
    fn unwrap_tcp(self) -> (TcpStream, Bytes) {
        self.into_inner().unwrap_tcp()
    }
}

/// `upgraded` as the plaintext stack `T`, unwrapped to its socket: bytes hyper had read
/// past the upgrade first, then what the wrappers held.
fn take<T>(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded>
where
    T: UnwrapTcp + hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let parts = upgraded.downcast::<T>()?;
    let (tcp, held) = parts.io.unwrap_tcp();
    Ok((tcp, joined(parts.read_buf, held)))
}

/// Recovers the raw TCP socket of a plaintext leg, with any bytes hyper had already read
/// past the upgrade (they must be delivered to the peer first). Returns the `Upgraded`
/// unchanged if the leg is not plain TCP (TLS, or an HTTP/2 stream).
pub fn into_tcp(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    take::<PlainUpstreamIo>(upgraded).or_else(take::<PlainClientIo>)
}

/// Bytes hyper had read past the upgrade, then the wrapper's prefix it had not read yet.
fn joined(read: Bytes, prefix: Bytes) -> Bytes {
    if prefix.is_empty() {
        return read;
    }
    if read.is_empty() {
        return prefix;
    }
    let mut all = bytes::BytesMut::with_capacity(read.len() + prefix.len());
    all.extend_from_slice(&read);
    all.extend_from_slice(&prefix);
    all.freeze()
}
