//! The PROXY protocol header (v1 text, v2 binary) an L4/L7 edge sends before the client's
//! bytes, reporting the client's address.
//!
//! Hand-rolled rather than taken from a crate: sluice needs to consume exactly the
//! header's bytes from the socket and nothing more (TLS, the h2c sniff and the HTTP/1.1
//! fast path read the same `TcpStream` afterwards), so it peeks, parses what it peeked and
//! then reads exactly the header's length. Parsing only the source address of the two
//! formats is small; TLVs are skipped, not interpreted.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// Largest v2 header accepted (16-byte fixed part plus addresses and TLVs). Edges add a
/// few small TLVs; a larger header is refused rather than buffered.
pub const V2_MAX: usize = 4096;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The first bytes are not a PROXY header of an accepted version.
    #[error("no PROXY {0} header")]
    Missing(&'static str),
    /// It starts like one but does not parse.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// Larger than [`V2_MAX`].
    #[error("PROXY v2 header larger than {V2_MAX} bytes")]
    TooLarge,
    /// The header did not arrive within the header-read timeout.
    #[error("PROXY header not received in time")]
    Timeout,
    /// The connection failed or closed before the header was complete.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// A complete header at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes.
    pub len: usize,
    /// The client's address; `None` for v2 LOCAL, UNSPEC or non-IP families and v1
    /// `UNKNOWN` (the edge's own connection, e.g. a health check: the peer is the client).
    pub source: Option<SocketAddr>,
}

/// Whether `buf` (the first bytes of a connection) is or may become a PROXY header of
/// any version: `Some(true)` yes, `Some(false)` no, `None` too few bytes to tell.
pub fn starts_like_header(buf: &[u8]) -> Option<bool> {
    let could = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    let (v1, v2) = (could(V1_PREFIX), could(V2_SIG));
    if (v1 && buf.len() >= V1_PREFIX.len()) || (v2 && buf.len() >= V2_SIG.len()) {
        Some(true)
    } else if v1 || v2 {
        None
    } else {
        Some(false)
    }
}

/// Parses a header of an accepted version at the start of `buf`; `Ok(None)` means more
/// bytes are needed.
pub fn parse(buf: &[u8], accept: ProxyProtocol) -> Result<Option<Header>, ProxyHeaderError> {
    let v1 = matches!(accept, ProxyProtocol::V1 | ProxyProtocol::Any);
    let v2 = matches!(accept, ProxyProtocol::V2 | ProxyProtocol::Any);
    let n = buf.len();
    if v2 && buf[..n.min(12)] == V2_SIG[..n.min(12)] {
        return if n < 16 { Ok(None) } else { parse_v2(buf) };
    }
    if v1 && buf[..n.min(6)] == V1_PREFIX[..n.min(6)] {
        return if n < 6 { Ok(None) } else { parse_v1(buf) };
    }
    Err(ProxyHeaderError::Missing(accept.as_str()))
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let len = end + 2;
    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or_default();
    if proto == "UNKNOWN" {
        // The rest of the line is to be ignored (spec 2.1).
        return Ok(Some(Header { len, source: None }));
    }
    let bad = ProxyHeaderError::Malformed;
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(bad("v1 line needs exactly four fields after the protocol"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        match proto {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad("v1 bad IPv4")),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad("v1 bad IPv6")),
            _ => Err(bad("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    // Ports are decimal without a sign or leading zeros beyond "0" itself.
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(bad("v1 bad port"));
        }
        s.parse().map_err(|_| bad("v1 bad port"))
    };
    let src = ip(src)?;
    ip(dst)?;
    let sport = port(sport)?;
    port(dport)?;
    Ok(Some(Header { len, source: Some(SocketAddr::new(src, sport)) }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ProxyHeaderError> {
    let bad = ProxyHeaderError::Malformed;
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(bad("v2 version is not 2"));
    }
    let family = buf[13];
    let addr_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + addr_len;
    if len > V2_MAX {
        return Err(ProxyHeaderError::TooLarge);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[16..len];
    let source = match ver_cmd & 0x0f {
        // LOCAL: the edge's own connection; the addresses (if any) are to be ignored.
        0 => None,
        1 => match family {
            0x00 => None,
            // TCP over IPv4: src(4) dst(4) sport(2) dport(2).
            0x11 => {
                let a = body.get(..12).ok_or(bad("v2 IPv4 addresses truncated"))?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
            }
            // TCP over IPv6: src(16) dst(16) sport(2) dport(2).
            0x21 => {
                let a = body.get(..36).ok_or(bad("v2 IPv6 addresses truncated"))?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[..16]);
                let ip = Ipv6Addr::from(octets);
                Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([a[32], a[33]])))
            }
            _ => return Err(bad("v2 family is not TCP over IPv4 or IPv6")),
        },
        _ => return Err(bad("v2 command is not LOCAL or PROXY")),
    };
    Ok(Some(Header { len, source }))
}

/// Reads and consumes a header of an accepted version from `tcp` within `timeout`,
/// leaving every byte after it unread.
pub async fn read(
    tcp: &mut TcpStream,
    accept: ProxyProtocol,
    timeout: Duration,
) -> Result<Header, ProxyHeaderError> {
    let work = async {
        let mut buf = vec![0u8; 512];
        loop {
            let n = tcp.peek(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            if let Some(h) = parse(&buf[..n], accept)? {
                let mut sink = vec![0u8; h.len];
                tcp.read_exact(&mut sink).await?;
                return Ok(h);
            }
            if n == buf.len() {
                // A v2 header with TLVs past the first peek: room for its whole length.
                buf.resize(V2_MAX, 0);
                if n == V2_MAX {
                    return Err(ProxyHeaderError::TooLarge);
                }
                continue;
            }
            // A header split over segments is rare; peek would return at once with the
            // same bytes, so wait a little (bounded by the timeout) for more.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(Err(ProxyHeaderError::Timeout))
}

/// Whether an untrusted peer opens with a PROXY header (of any version), which it must
/// not; waits (within `timeout`) only while its first bytes could still be one.
pub async fn untrusted_sends_header(tcp: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let work = async {
        let mut buf = [0u8; 12];
        loop {
            let n = tcp.peek(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(verdict) = starts_like_header(&buf[..n]) {
                return Ok(verdict);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // Undecided in time: the connection's own header-read timeout will close it.
    tokio::time::timeout(timeout, work).await.unwrap_or(Ok(false))
}

/// A v2 PROXY header for `source` → `dest` (tests and tools).
pub fn encode_v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIG.to_vec();
    out.push(0x21);
    match (source, dest) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(source).octets());
            out.extend_from_slice(&v6(dest).octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&dest.port().to_be_bytes());
        }
    }
    out
}

/// A v1 PROXY line for `source` → `dest` (tests and tools).
pub fn encode_v1(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let proto = if source.is_ipv4() && dest.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {proto} {} {} {} {}\r\n", source.ip(), dest.ip(), source.port(), dest.port())
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1() {
        let line = encode_v1(sa("203.0.113.7:4000"), sa("10.0.0.1:443"));
        let mut buf = line.clone();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let h = parse(&buf, ProxyProtocol::V1).unwrap().unwrap();
        assert_eq!(h, Header { len: line.len(), source: Some(sa("203.0.113.7:4000")) });
        let h6 = encode_v1(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
        assert_eq!(
            parse(&h6, ProxyProtocol::Any).unwrap().unwrap().source,
            Some(sa("[2001:db8::1]:1"))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n", ProxyProtocol::V1).unwrap().unwrap().source, None);
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4", ProxyProtocol::V1).unwrap(), None);
        assert_eq!(parse(b"PRO", ProxyProtocol::V1).unwrap(), None);
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            &[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20),
        ] {
            assert!(parse(bad, ProxyProtocol::V1).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n", ProxyProtocol::V1),
            Err(ProxyHeaderError::Missing(_))
        ));
        // v1 is not accepted on a v2 listener.
        assert!(parse(&line, ProxyProtocol::V2).is_err());
    }

    #[test]
    fn v2() {
        let h = encode_v2(sa("203.0.113.7:4000"), sa("10.0.0.1:443"));
        assert_eq!(h.len(), 28);
        let p = parse(&h, ProxyProtocol::V2).unwrap().unwrap();
        assert_eq!(p, Header { len: 28, source: Some(sa("203.0.113.7:4000")) });
        assert_eq!(parse(&h[..20], ProxyProtocol::Any).unwrap(), None);
        assert_eq!(parse(&h[..5], ProxyProtocol::Any).unwrap(), None);
        let h6 = encode_v2(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
        assert_eq!(
            parse(&h6, ProxyProtocol::Any).unwrap().unwrap().source,
            Some(sa("[2001:db8::1]:1"))
        );
        // LOCAL (a health check from the edge itself): no client address.
        let mut local = h.clone();
        local[12] = 0x20;
        assert_eq!(parse(&local, ProxyProtocol::V2).unwrap().unwrap().source, None);
        // TLVs after the addresses are skipped.
        let mut tlv = h.clone();
        tlv[15] = 12 + 5;
        tlv.extend_from_slice(&[0x04, 0, 2, b'h', b'i']);
        assert_eq!(parse(&tlv, ProxyProtocol::V2).unwrap().unwrap().len, 33);
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert!(parse(&bad, ProxyProtocol::V2).is_err(), "version 1 in the v2 format");
        let mut bad = h.clone();
        bad[15] = 4;
        assert!(parse(&bad, ProxyProtocol::V2).is_err(), "addresses truncated");
        let mut huge = h.clone();
        huge[14] = 0xff;
        assert!(matches!(parse(&huge, ProxyProtocol::V2), Err(ProxyHeaderError::TooLarge)));
        assert!(parse(&h, ProxyProtocol::V1).is_err());
    }

    #[test]
    fn sniffing() {
        assert_eq!(starts_like_header(b"PRO"), None);
        assert_eq!(starts_like_header(b"PROXY "), Some(true));
        assert_eq!(starts_like_header(b"\r\n\r\n"), None);
        assert_eq!(starts_like_header(V2_SIG), Some(true));
        assert_eq!(starts_like_header(b"GET /"), Some(false));
        assert_eq!(starts_like_header(b"\x16\x03\x01"), Some(false));
        assert_eq!(starts_like_header(b"PRI * HTTP/2.0"), Some(false));
    }
}
