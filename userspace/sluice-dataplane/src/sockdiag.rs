//! Closing TCP sockets by destination with netlink sock_diag `SOCK_DESTROY`, so
//! connections that connect-time steering pinned to a replica that has left do not
//! stay stuck on it (docs/design.md, What bites). Needs CAP_NET_ADMIN and a kernel built with
//! CONFIG_INET_DIAG_DESTROY.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `inet_diag_sockid`: sport, dport, src[16], dst[16], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// Every TCP state but LISTEN (bit 10): listeners are never a replica connection.
const STATES_NOT_LISTEN: u32 = 0xfff & !(1 << 10);
const IPPROTO_TCP: u8 = 6;

/// Offset of `idiag_inode` in `inet_diag_msg`: 4 header bytes, the sockid, then
/// expires, rqueue, wqueue and uid (4 bytes each).
const INODE_OFFSET: usize = 4 + SOCKID_LEN + 16;

/// One socket as sock_diag identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SockId {
    family: u8,
    raw: [u8; SOCKID_LEN],
    /// The socket's inode (0 when the kernel did not say).
    inode: u32,
}

impl SockId {
    fn dst(&self) -> SocketAddr {
        let port = u16::from_be_bytes([self.raw[2], self.raw[3]]);
        let d = &self.raw[20..36];
        let ip = if self.family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
        } else {
            let mut b = [0u8; 16];
            b.copy_from_slice(d);
            IpAddr::V6(Ipv6Addr::from(b))
        };
        SocketAddr::new(ip, port)
    }
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned descriptor is owned exactly once.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    states: u32,
    id: &[u8; SOCKID_LEN],
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + 8 + SOCKID_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a valid buffer for its length; the kernel only reads it.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid and writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Walks the netlink messages in `data`, calling `f(type, payload)`; stops at DONE.
/// Returns whether DONE was seen, or the first NLMSG_ERROR as an error.
fn each_message(data: &[u8], mut f: impl FnMut(u16, &[u8])) -> io::Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= data.len() {
        let len =
            u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > data.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
        }
        let payload = &data[off + NLMSG_HDRLEN..off + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            _ => f(kind, payload),
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

fn dump(fd: &OwnedFd, family: u8) -> io::Result<Vec<SockId>> {
    send(
        fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            family,
            STATES_NOT_LISTEN,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = recv(fd, &mut buf)?;
        let done = each_message(&buf[..n], |kind, payload| {
            // inet_diag_msg: family, state, timer, retrans, then the sockid.
            if kind == SOCK_DIAG_BY_FAMILY && payload.len() >= 4 + SOCKID_LEN {
                let mut raw = [0u8; SOCKID_LEN];
                raw.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
                let inode = payload
                    .get(INODE_OFFSET..INODE_OFFSET + 4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                out.push(SockId { family: payload[0], raw, inode });
            }
        })?;
        if done || n == 0 {
            return Ok(out);
        }
    }
}

fn destroy(fd: &OwnedFd, id: &SockId) -> io::Result<()> {
    send(fd, &request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2, id.family, 0xfff, &id.raw))?;
    let mut buf = [0u8; 512];
    let n = recv(fd, &mut buf)?;
    each_message(&buf[..n], |_, _| {}).map(|_| ())
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// Destroys every TCP socket in this network namespace whose peer is `dst` (IPv4 and
/// IPv4-mapped IPv6 match each other). Their owners see ECONNABORTED or EOF and can
/// reconnect, landing on a live replica. Returns how many sockets were destroyed.
pub fn destroy_connections_to(dst: SocketAddr) -> io::Result<usize> {
    destroy_matching(dst, false)
}

/// Like [`destroy_connections_to`], but leaves the sockets this process holds: its own
/// connections to `dst` (the proxy's, to a draining replica) end on its own terms.
pub fn destroy_other_connections_to(dst: SocketAddr) -> io::Result<usize> {
    destroy_matching(dst, true)
}

/// Inodes of the sockets this process has open (`socket:[N]` in /proc/self/fd).
fn own_socket_inodes() -> io::Result<HashSet<u32>> {
    let mut out = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed since the listing
        };
        if let Some(ino) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok())
        {
            out.insert(ino);
        }
    }
    Ok(out)
}

fn destroy_matching(dst: SocketAddr, spare_own: bool) -> io::Result<usize> {
    let fd = open()?;
    let mut targets = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        targets.extend(dump(&fd, family)?.into_iter().filter(|id| same_endpoint(id.dst(), dst)));
    }
    // Listed after the dump, so every own socket the dump saw is known here.
    let own = if spare_own { own_socket_inodes()? } else { HashSet::new() };
    let mut destroyed = 0;
    for id in targets.iter().filter(|id| id.inode == 0 || !own.contains(&id.inode)) {
        match destroy(&fd, id) {
            Ok(()) => destroyed += 1,
            // Already gone between the dump and the destroy.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_mapped_v6_peers_are_the_same_endpoint() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert!(same_endpoint(a, b));
        assert!(!same_endpoint(a, "127.0.0.1:81".parse().unwrap()));
    }

    #[test]
    fn requests_have_the_kernel_layout() {
        let m = request(SOCK_DESTROY, NLM_F_REQUEST, 7, 2, 0xfff, &[0xab; SOCKID_LEN]);
        assert_eq!(m.len(), 16 + 56);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 72);
        assert_eq!(&m[16..18], &[2, 6]);
        assert_eq!(m[24], 0xab);
    }
}
