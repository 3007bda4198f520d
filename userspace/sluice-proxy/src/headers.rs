//! Header hygiene: smuggling checks, hop-by-hop stripping, X-Forwarded-*, request ids.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::error::RequestError;

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Rejects framing that two HTTP/1.1 parsers could read differently (request smuggling):
/// Content-Length together with Transfer-Encoding, any Transfer-Encoding other than exactly
/// `chunked`, Transfer-Encoding outside HTTP/1.1, and `Upgrade: h2c`.
pub fn check_framing(version: Version, headers: &HeaderMap) -> Result<(), RequestError> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if version != Version::HTTP_11 {
            return Err(RequestError::BadRequest("transfer-encoding outside HTTP/1.1"));
        }
        if te.next().is_some() {
            return Err(RequestError::BadRequest("more than one transfer-encoding header"));
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(RequestError::BadRequest("both content-length and transfer-encoding"));
        }
        if first.as_bytes() != b"chunked" {
            return Err(RequestError::BadRequest("transfer-encoding other than chunked"));
        }
    }
    if has_token(headers, &header::UPGRADE, "h2c") || headers.contains_key(&HTTP2_SETTINGS) {
        return Err(RequestError::BadRequest("upgrade to h2c is not supported"));
    }
    Ok(())
}

/// Rejects header names and values that are unsafe to pass on (especially when downgrading
/// HTTP/2 to HTTP/1.1): NUL, CR, LF, leading or trailing whitespace, empty names.
pub fn check_safe(headers: &HeaderMap) -> Result<(), RequestError> {
    for (name, value) in headers {
        if name.as_str().is_empty() {
            return Err(RequestError::BadRequest("empty header name"));
        }
        let v = value.as_bytes();
        if has_line_break_or_nul(v) {
            return Err(RequestError::BadRequest("CR, LF or NUL in a header value"));
        }
        if has_outer_whitespace(v) {
            return Err(RequestError::BadRequest("whitespace around a header value"));
        }
    }
    Ok(())
}

fn has_line_break_or_nul(v: &[u8]) -> bool {
    v.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
}

fn has_outer_whitespace(v: &[u8]) -> bool {
    v.first().is_some_and(u8::is_ascii_whitespace) || v.last().is_some_and(u8::is_ascii_whitespace)
}

/// Whether a raw header value passes [`check_safe`] (for heads sluice parses itself).
pub(crate) fn is_safe_value(v: &[u8]) -> bool {
    !has_line_break_or_nul(v) && !has_outer_whitespace(v)
}

/// A `Content-Length` value: ASCII digits only (no sign, no spaces), within u64.
pub(crate) fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Writes an HTTP/1.1 status line (`HTTP/1.1 200 OK`) onto `out`.
pub(crate) fn put_status_line(out: &mut Vec<u8>, status: http::StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes one HTTP/1.1 header field (`name: value`) onto `out`.
pub(crate) fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether the request asks for an HTTP/1.1 protocol upgrade (e.g. WebSocket).
pub fn is_h1_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && has_token(headers, &header::CONNECTION, "upgrade")
}

/// Removes hop-by-hop headers: those named in Connection, Connection itself, Keep-Alive,
/// Proxy-*, TE (except `trailers`, which is kept as `te: trailers`), Transfer-Encoding,
/// Upgrade (unless `keep_upgrade`) and HTTP2-Settings.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names spares the lookups below.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    let te_trailers = has_token(headers, &header::TE, "trailers");
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(&HTTP2_SETTINGS);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    let proxy: Vec<HeaderName> =
        headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy {
        headers.remove(&name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A peer's X-Forwarded-For entry: its IP, with IPv4-mapped IPv6 written as IPv4.
/// Computed once per connection, so requests only clone it.
pub fn forwarded_for(peer: IpAddr) -> HeaderValue {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    // An IP address's text is always a valid header value.
    HeaderValue::from_str(&peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A peer's RFC 7239 `for=` node: `for=192.0.2.1`, or `for="[2001:db8::1]"` (an IPv6
/// node is bracketed and quoted, section 6); IPv4-mapped IPv6 is written as IPv4.
/// Computed once per connection, like [`forwarded_for`].
pub fn forwarded_node(peer: IpAddr) -> HeaderValue {
    let text = match peer.to_canonical() {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

/// Appends sluice's own `Forwarded` element (RFC 7239) to `out`: the hop's `node` (from
/// [`forwarded_node`]), then `host` as a quoted string and `proto`.
pub(crate) fn put_forwarded_element(out: &mut Vec<u8>, node: &[u8], host: &[u8], proto: &[u8]) {
    out.extend_from_slice(node);
    out.extend_from_slice(b";host=\"");
    for &b in host {
        // A quoted-pair for the two bytes a quoted string cannot carry as they are.
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.extend_from_slice(b"\";proto=");
    out.extend_from_slice(proto);
}

/// Whether `name` is one [`strip_hop_by_hop`] may remove or act on.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == KEEP_ALIVE
        || *name == HTTP2_SETTINGS
        || name.as_str().starts_with("proxy-")
}

/// Sets X-Forwarded-For/-Proto/-Host, `Forwarded` (RFC 7239) and X-Real-IP. A trusted
/// edge's X-Forwarded-* and `Forwarded` are extended; anyone else's are replaced, so
/// clients cannot spoof them. `peer` is [`forwarded_for`] of the connection's client (the
/// hop appended to the chain) and `node` its [`forwarded_node`] when sluice sets
/// `Forwarded` (with `None`, a trusted edge's `Forwarded` passes as it is and anyone
/// else's is removed), `real_ip` that of the request's client (`crate::client`), which
/// X-Real-IP always carries (a client's own X-Real-IP is never passed on).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    node: Option<&HeaderValue>,
    real_ip: &HeaderValue,
    trusted: bool,
    proto: &'static str,
    host: &HeaderValue,
) {
    match node {
        Some(node) => {
            let mut forwarded = Vec::with_capacity(64);
            if trusted {
                for v in headers.get_all(&FORWARDED) {
                    forwarded.extend_from_slice(v.as_bytes());
                    forwarded.extend_from_slice(b", ");
                }
            }
            put_forwarded_element(
                &mut forwarded,
                node.as_bytes(),
                host.as_bytes(),
                proto.as_bytes(),
            );
            if let Ok(v) = HeaderValue::from_bytes(&forwarded) {
                headers.insert(&FORWARDED, v);
            }
        }
        None if !trusted => {
            headers.remove(&FORWARDED);
        }
        None => {}
    }
    let prior: Vec<&str> = if trusted {
        headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect()
    } else {
        Vec::new()
    };
    let xff = if prior.is_empty() {
        Some(peer.clone())
    } else {
        let joined = format!("{}, {}", prior.join(", "), peer.to_str().unwrap_or("unknown"));
        HeaderValue::from_str(&joined).ok()
    };
    if let Some(v) = xff {
        headers.insert(&X_FORWARDED_FOR, v);
    }
    headers.insert(&X_REAL_IP, real_ip.clone());
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        headers.insert(&X_FORWARDED_HOST, host.clone());
    }
}

/// Whether `name` is an `_` spelling of a forwarding header (`X_Forwarded_For`,
/// `X_Real_IP`, `Forwarded` variants...). Some replica stacks (CGI, WSGI) fold `_` and `-`
/// together, so a client's look-alike would be read as the value sluice sets: never forward.
pub(crate) fn is_forwarding_lookalike(name: &[u8]) -> bool {
    if !name.contains(&b'_') {
        return false;
    }
    let same = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(&x, &y)| {
                let x = if x == b'_' { b'-' } else { x.to_ascii_lowercase() };
                x == y
            })
    };
    let starts = |p: &[u8]| name.len() >= p.len() && same(&name[..p.len()], p);
    starts(b"x-forwarded") || starts(b"forwarded") || same(name, b"x-real-ip")
}

/// Removes every [`is_forwarding_lookalike`] header.
pub fn strip_forwarding_lookalikes(headers: &mut HeaderMap) {
    // One pass first: most requests carry none, and then nothing is allocated.
    if !headers.keys().any(|k| is_forwarding_lookalike(k.as_str().as_bytes())) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_forwarding_lookalike(k.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// A request id as a header value, marked never-indexed for HPACK. Every id is unique,
/// so indexing it would only churn the HTTP/2 dynamic table: each response would evict
/// an older id and search a chain of dead ones (several thousand instructions a request
/// in h2's encoder). HTTP/1.1 writers ignore the mark.
pub fn request_id_value(rid: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(rid).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Generates request ids: 32 hex digits, unique per process, unpredictable across runs.
#[derive(Debug)]
pub struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RequestIds {
    /// A generator seeded from the process's random hasher keys.
    pub fn new() -> Self {
        let seed = RandomState::new().hash_one(std::process::id());
        Self { seed, counter: AtomicU64::new(0) }
    }

    /// The next id.
    pub fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = splitmix64(self.seed ^ n);
        let b = splitmix64(a ^ self.seed.rotate_left(17));
        // By hand: `format!("{a:016x}{b:016x}")` costs over a thousand instructions per
        // request in the formatting machinery.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let both = (u128::from(a) << 64) | u128::from(b);
        let mut out = [0u8; 32];
        for (i, c) in out.iter_mut().enumerate() {
            *c = HEX[((both >> (124 - 4 * i)) & 0xf) as usize];
        }
        // Hex digits are ASCII, so this never falls back to the empty default.
        std::str::from_utf8(&out).unwrap_or_default().to_owned()
    }

    /// Keeps a request id from a trusted edge if it is sane, else makes a new one.
    pub fn keep_or_new(&self, existing: Option<&HeaderValue>) -> String {
        match existing.and_then(|v| v.to_str().ok()) {
            Some(s)
                if !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                s.to_owned()
            }
            _ => self.next_id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn framing() {
        let v = Version::HTTP_11;
        assert!(check_framing(v, &map(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(
            check_framing(v, &map(&[("transfer-encoding", "chunked"), ("content-length", "3")]))
                .is_err()
        );
        assert!(check_framing(v, &map(&[("transfer-encoding", "gzip, chunked")])).is_err());
        assert!(check_framing(v, &map(&[("transfer-encoding", "Chunked")])).is_err());
        assert!(
            check_framing(
                v,
                &map(&[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")])
            )
            .is_err()
        );
        assert!(check_framing(v, &map(&[("upgrade", "h2c"), ("connection", "upgrade")])).is_err());
        assert!(check_framing(Version::HTTP_2, &map(&[("transfer-encoding", "chunked")])).is_err());
    }

    #[test]
    fn strip() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "x"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn forwarding_lookalikes() {
        assert!(is_forwarding_lookalike(b"X_Forwarded_For"));
        assert!(is_forwarding_lookalike(b"x_forwarded-proto"));
        assert!(is_forwarding_lookalike(b"X-Forwarded_Port"));
        assert!(is_forwarding_lookalike(b"X_Real_IP"));
        assert!(is_forwarding_lookalike(b"X_Forwarded"));
        assert!(!is_forwarding_lookalike(b"X-Forwarded-For"));
        assert!(is_forwarding_lookalike(b"Forwarded_For"));
        assert!(!is_forwarding_lookalike(b"Forwarded"));
        assert!(!is_forwarding_lookalike(b"x_other"));
        let mut h = map(&[("x_forwarded_for", "1.2.3.4"), ("x_real_ip", "1.2.3.4"), ("a_b", "k")]);
        strip_forwarding_lookalikes(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn unsafe_values() {
        assert!(check_safe(&map(&[("a", "b")])).is_ok());
        assert!(check_safe(&map(&[("a", " b")])).is_err());
        assert!(check_safe(&map(&[("a", "b\t")])).is_err());
    }

    #[test]
    fn raw_values() {
        assert!(is_safe_value(b"a b"));
        assert!(!is_safe_value(b" a"));
        assert!(!is_safe_value(b"a\0"));
        assert_eq!(content_length(b"007"), Some(7));
        assert_eq!(content_length(b"+7"), None);
        assert_eq!(content_length(b""), None);
        assert_eq!(content_length(b"99999999999999999999"), None);
    }

    #[test]
    fn ids() {
        let ids = RequestIds::new();
        let a = ids.next_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, ids.next_id());
        assert_eq!(ids.keep_or_new(Some(&HeaderValue::from_static("edge-1"))), "edge-1");
        // The hand-written hex matches the formatter's.
        let fixed = RequestIds { seed: 0x0123_4567_89ab_cdef, counter: AtomicU64::new(41) };
        let a = splitmix64(fixed.seed ^ 41);
        let b = splitmix64(a ^ fixed.seed.rotate_left(17));
        assert_eq!(fixed.next_id(), format!("{a:016x}{b:016x}"));
    }
}

/// When a pooled HTTP/1.1 connection stops being safe to reuse after a response carrying
/// `Keep-Alive: <value>` (`timeout=N`: the replica closes it after N idle seconds).
/// One second earlier than the replica's own limit, so a request is never written into a
/// connection the replica is closing at that moment; `Some(None)`: not reusable at all (a
/// timeout of a second or less). `None`: no timeout stated.
pub(crate) fn keep_alive_deadline(
    value: &[u8],
    now: tokio::time::Instant,
) -> Option<Option<tokio::time::Instant>> {
    let v = std::str::from_utf8(value).ok()?;
    let secs = v.split(',').find_map(|p| {
        let (k, n) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("timeout").then(|| n.trim().parse::<u64>().ok())?
    })?;
    Some((secs > 1).then(|| now + std::time::Duration::from_secs(secs - 1)))
}

#[cfg(test)]
mod keep_alive_tests {
    use super::keep_alive_deadline;
    use std::time::Duration;

    #[test]
    fn keep_alive_timeout() {
        let now = tokio::time::Instant::now();
        assert_eq!(
            keep_alive_deadline(b"timeout=5, max=100", now),
            Some(Some(now + Duration::from_secs(4)))
        );
        assert_eq!(
            keep_alive_deadline(b"max=100,Timeout = 10", now),
            Some(Some(now + Duration::from_secs(9)))
        );
        assert_eq!(keep_alive_deadline(b"timeout=1", now), Some(None));
        assert_eq!(keep_alive_deadline(b"timeout=0", now), Some(None));
        assert_eq!(keep_alive_deadline(b"max=5", now), None);
        assert_eq!(keep_alive_deadline(b"timeout=x", now), None);
    }
}
