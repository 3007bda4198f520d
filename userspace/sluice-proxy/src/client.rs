//! Client identity: who a connection or request is from when trusted edges (an L4/L7
//! proxy in front of sluice) connect on the clients' behalf, and the userspace ban list
//! that identity is checked against.
//!
//! A connection's client is the socket peer, or the address a trusted peer reported in a
//! PROXY header. A request's client is that, or, when the connection's client is itself
//! trusted, the rightmost untrusted address of its X-Forwarded-For (or `Forwarded`) chain. Bans, logs and
//! the forwarded headers use the request's client; a trusted address is never banned.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::config::Cidr;

/// Whether `ip` is inside one of `trusted` (IPv4-mapped IPv6 matches IPv4 prefixes).
pub fn is_trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// The client a request is from, given the connection's client `conn_client` and, when
/// `conn_client` is trusted, the chain of hops it sent: X-Forwarded-For, or, when the
/// request has none, the `for=` nodes of RFC 7239 `Forwarded`. X-Forwarded-For wins
/// because an edge that maintains only it (Envoy's default) passes a client's own
/// `Forwarded` through unextended, which would let the client name itself. The client is
/// the rightmost address that is not trusted. An entry that is not an IP address
/// (`unknown`, an obfuscated `_node`, an element without `for=`) ends the walk (the hop
/// after it, a trusted one, is then the best the chain tells); with every hop trusted,
/// the leftmost.
pub fn from_forwarded_for(headers: &HeaderMap, conn_client: IpAddr, trusted: &[Cidr]) -> IpAddr {
    if !is_trusted(trusted, conn_client) {
        return conn_client;
    }
    let mut entries: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if !headers.contains_key("x-forwarded-for") {
        entries = headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(forwarded_for_nodes)
            .collect();
    }
    let mut client = conn_client;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else { break };
        client = ip.to_canonical();
        if !is_trusted(trusted, client) {
            break;
        }
    }
    client
}

/// The `for=` node of each element of one `Forwarded` value (RFC 7239 section 4),
/// unquoted (`192.0.2.1`, `[2001:db8::1]:4711`, `unknown`); an element without one gives
/// an empty node. Commas and semicolons inside quoted strings do not split.
fn forwarded_for_nodes(value: &str) -> Vec<String> {
    let mut nodes = Vec::new();
    let mut node: Option<String> = None;
    let mut pair = String::new();
    let mut quoted = false;
    let mut escaped = false;
    let end_pair = |pair: &mut String, node: &mut Option<String>| {
        let p = std::mem::take(pair);
        if let Some((k, v)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("for")
            && node.is_none()
        {
            *node = Some(v.trim().to_owned());
        }
    };
    for c in value.chars() {
        if quoted {
            match c {
                _ if escaped => {
                    escaped = false;
                    pair.push(c);
                }
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => pair.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ';' => end_pair(&mut pair, &mut node),
            ',' => {
                end_pair(&mut pair, &mut node);
                nodes.push(node.take().unwrap_or_default());
            }
            _ => pair.push(c),
        }
    }
    end_pair(&mut pair, &mut node);
    if node.is_some() || !nodes.is_empty() || !value.trim().is_empty() {
        nodes.push(node.unwrap_or_default());
    }
    nodes
}

/// One X-Forwarded-For entry or `Forwarded` node: an IP, `[v6]`, or `ip:port` /
/// `[v6]:port` as some edges write it.
fn parse_entry(e: &str) -> Option<IpAddr> {
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Some(v6) = e.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    e.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

/// Sources banned in userspace (after repeated proxy-auth failures): checked at accept
/// against the socket peer, after a PROXY header against the reported client, and on
/// every request against the request's client. The XDP guard, when attached, drops a
/// banned socket peer's packets earlier; this list is what catches clients behind a
/// trusted edge (XDP only sees the edge) and everyone when XDP is not attached.
#[derive(Debug, Default)]
pub struct BanList {
    bans: RwLock<HashMap<IpAddr, Instant>>,
    /// Entries in `bans`: lets the common case (nobody banned) skip the lock.
    len: AtomicUsize,
}

impl BanList {
    /// Bans `ip` (IPv4-mapped IPv6 is banned as IPv4) for `ban` from now.
    pub fn ban(&self, ip: IpAddr, ban: Duration) {
        let until = Instant::now() + ban;
        if let Ok(mut b) = self.bans.write() {
            b.insert(ip.to_canonical(), until);
            self.len.store(b.len(), Ordering::Relaxed);
        }
    }

    /// Whether `ip` is banned now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = Instant::now();
        self.bans
            .read()
            .map(|b| b.get(&ip.to_canonical()).is_some_and(|until| *until > now))
            .unwrap_or(false)
    }

    /// Forgets expired bans.
    pub fn sweep(&self) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = Instant::now();
        if let Ok(mut b) = self.bans.write() {
            b.retain(|_, until| *until > now);
            self.len.store(b.len(), Ordering::Relaxed);
        }
    }

    /// Bans in force (expired ones count until the next [`BanList::sweep`]).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether nobody is banned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rightmost_untrusted() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        assert_eq!(from_forwarded_for(&h, ip("10.0.0.2"), &trusted), ip("203.0.113.9"));
        // From an untrusted peer the chain is not read at all.
        assert_eq!(from_forwarded_for(&h, ip("198.51.100.1"), &trusted), ip("198.51.100.1"));
        let mut all = HeaderMap::new();
        all.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9, 10.1.1.1"));
        assert_eq!(from_forwarded_for(&all, ip("10.0.0.2"), &trusted), ip("10.9.9.9"));
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9, unknown, 10.1.1.1"));
        assert_eq!(from_forwarded_for(&junk, ip("10.0.0.2"), &trusted), ip("10.1.1.1"));
        let mut ports = HeaderMap::new();
        ports.insert("x-forwarded-for", HeaderValue::from_static("[2001:db8::1]:443, 1.2.3.4:5"));
        assert_eq!(from_forwarded_for(&ports, ip("10.0.0.2"), &trusted), ip("1.2.3.4"));
        assert_eq!(from_forwarded_for(&HeaderMap::new(), ip("10.0.0.2"), &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn forwarded_header() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let fwd = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("forwarded", HeaderValue::from_static(v));
            h
        };
        let edge = ip("10.0.0.2");
        let h = fwd("for=6.6.6.6;proto=http, for=203.0.113.9;by=10.0.0.1, for=10.1.1.1");
        assert_eq!(from_forwarded_for(&h, edge, &trusted), ip("203.0.113.9"));
        assert_eq!(from_forwarded_for(&h, ip("198.51.100.1"), &trusted), ip("198.51.100.1"));
        let v6 = fwd("For=\"[2001:db8:cafe::17]:4711\";host=\"a,b;c\"");
        assert_eq!(from_forwarded_for(&v6, edge, &trusted), ip("2001:db8:cafe::17"));
        let bare = fwd("for=\"[2001:db8::1]\", for=\"192.0.2.43:47011\"");
        assert_eq!(from_forwarded_for(&bare, edge, &trusted), ip("192.0.2.43"));
        let hidden = fwd("for=203.0.113.9, for=_hidden, for=10.1.1.1");
        assert_eq!(from_forwarded_for(&hidden, edge, &trusted), ip("10.1.1.1"));
        let no_for = fwd("for=203.0.113.9, proto=https, for=10.1.1.1");
        assert_eq!(from_forwarded_for(&no_for, edge, &trusted), ip("10.1.1.1"));
        // X-Forwarded-For, when present, is the chain.
        let mut both = fwd("for=198.51.100.7");
        both.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        assert_eq!(from_forwarded_for(&both, edge, &trusted), ip("203.0.113.9"));
    }

    #[test]
    fn bans_expire() {
        let b = BanList::default();
        assert!(!b.is_banned(ip("1.2.3.4")));
        b.ban(ip("::ffff:1.2.3.4"), Duration::from_secs(60));
        assert!(b.is_banned(ip("1.2.3.4")));
        assert!(b.is_banned(ip("::ffff:1.2.3.4")));
        assert!(!b.is_banned(ip("1.2.3.5")));
        b.ban(ip("1.2.3.5"), Duration::ZERO);
        assert!(!b.is_banned(ip("1.2.3.5")));
        b.sweep();
        assert_eq!(b.len(), 1);
    }
}
