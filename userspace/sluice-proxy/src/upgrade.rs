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

/// Recovers the raw TCP socket of a plaintext leg, with any bytes hyper had already read
/// past the upgrade (they must be delivered to the peer first). Returns the `Upgraded`
/// unchanged if the leg is not plain TCP (TLS, or an HTTP/2 stream).
pub fn into_tcp(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Ok((parts.io.into_inner(), parts.read_buf)),
        Err(u) => u,
    };
    let upgraded = match upgraded.downcast::<TokioIo<H1Scan<ConnIo<TcpStream>>>>() {
        Ok(parts) => {
            let (tcp, prefix) = parts.io.into_inner().into_inner().into_parts();
            return Ok((tcp, joined(parts.read_buf, prefix)));
        }
        Err(u) => u,
    };
    match upgraded.downcast::<TokioIo<ConnIo<TcpStream>>>() {
        Ok(parts) => {
            let (tcp, prefix) = parts.io.into_inner().into_parts();
            Ok((tcp, joined(parts.read_buf, prefix)))
        }
        Err(u) => Err(u),
    }
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
