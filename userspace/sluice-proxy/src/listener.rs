//! Listening sockets: SO_REUSEPORT (so a new process can bind beside the old one and the
//! kernel can steer), TCP_NODELAY on accepted connections, IPv4 and v6-only IPv6.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Backlog for client listeners: large, because accepts pause at the connection limit.
const BACKLOG: i32 = 4096;

/// Binds a non-blocking listener with SO_REUSEADDR and SO_REUSEPORT.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // Explicit: a `[::]` listener does not silently take the IPv4 port too.
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}
