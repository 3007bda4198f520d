//! Canonical form of a request's authority (`Host` header or `:authority`), the key of the
//! snapshot's domain map: lowercase ASCII, no port, no trailing dot.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Why an authority was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// Nothing left after removing the port.
    #[error("empty host")]
    Empty,
    /// Longer than a DNS name may be.
    #[error("host longer than 253 characters")]
    TooLong,
    /// A byte outside `A-Za-z0-9-_.`.
    #[error("invalid character in host")]
    InvalidChar,
    /// An empty label (`a..b`, leading dot) or one over 63 characters.
    #[error("invalid label in host")]
    InvalidLabel,
    /// Port not a decimal number in 0..=65535.
    #[error("invalid port")]
    InvalidPort,
    /// A bracketed IPv6 literal that does not parse.
    #[error("invalid IPv6 literal")]
    InvalidIpv6,
}

/// Canonicalize a raw authority: strip the port (also from `[v6]:port`), strip one trailing
/// dot, lowercase, and validate the characters and labels. An IPv6 literal comes back in
/// brackets in its canonical textual form (`[::1]`), which no domain ever matches.
pub fn canonical_authority(raw: &str) -> Result<String, AuthorityError> {
    canonical_authority_cow(raw).map(Cow::into_owned)
}

/// [`canonical_authority`] without allocating when the host is already lowercase (the
/// common case): the result borrows from `raw`.
pub fn canonical_authority_cow(raw: &str) -> Result<Cow<'_, str>, AuthorityError> {
    if let Some(rest) = raw.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or(AuthorityError::InvalidIpv6)?;
        if !after.is_empty() {
            let port = after.strip_prefix(':').ok_or(AuthorityError::InvalidPort)?;
            check_port(port)?;
        }
        let ip: Ipv6Addr = addr.parse().map_err(|_| AuthorityError::InvalidIpv6)?;
        return Ok(Cow::Owned(format!("[{ip}]")));
    }
    let host = match raw.rsplit_once(':') {
        Some((host, port)) => {
            check_port(port)?;
            host
        }
        None => raw,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    check_hostname(host)?;
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(host))
    }
}

/// Validate a host name (no port, no trailing dot; any case): labels of `A-Za-z0-9-_`,
/// 1..=63 characters each, 253 in total. Underscores are accepted because real `Host`
/// headers carry them; the model's own labels are stricter.
pub fn check_hostname(host: &str) -> Result<(), AuthorityError> {
    if host.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if host.len() > 253 {
        return Err(AuthorityError::TooLong);
    }
    // One pass over the bytes: this runs on every request, and `split('.')` with a
    // per-label `all` cost about 40 instructions a byte.
    let mut label = 0usize;
    for &b in host.as_bytes() {
        if b == b'.' {
            if label == 0 {
                return Err(AuthorityError::InvalidLabel);
            }
            label = 0;
        } else if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            label += 1;
            if label > 63 {
                return Err(AuthorityError::InvalidLabel);
            }
        } else {
            return Err(AuthorityError::InvalidChar);
        }
    }
    if label == 0 {
        return Err(AuthorityError::InvalidLabel);
    }
    Ok(())
}

fn check_port(port: &str) -> Result<(), AuthorityError> {
    // An empty port (`host:`) is allowed by RFC 3986; treat it as absent.
    if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthorityError::InvalidPort);
    }
    if !port.is_empty() && port.parse::<u32>().map_or(true, |p| p > 65535) {
        return Err(AuthorityError::InvalidPort);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalizes() {
        let ok = |raw: &str, want: &str| assert_eq!(canonical_authority(raw).unwrap(), want);
        ok("Hello.US-East1.Run.Example.COM", "hello.us-east1.run.example.com");
        ok("hello.r.example.com:8443", "hello.r.example.com");
        ok("hello.r.example.com.", "hello.r.example.com");
        ok("hello.r.example.com.:443", "hello.r.example.com");
        ok("localhost:", "localhost");
        ok("[::1]:8080", "[::1]");
        ok("[0:0:0:0:0:0:0:1]", "[::1]");
        ok("127.0.0.1:80", "127.0.0.1");
        ok("a_b.example.com", "a_b.example.com");
    }

    #[test]
    fn borrows_when_already_canonical() {
        assert!(matches!(canonical_authority_cow("a.b.c:443"), Ok(Cow::Borrowed("a.b.c"))));
        assert!(matches!(canonical_authority_cow("a.b.c."), Ok(Cow::Borrowed("a.b.c"))));
        assert!(matches!(canonical_authority_cow("A.b.c"), Ok(Cow::Owned(_))));
    }

    #[test]
    fn rejects() {
        let bad = |raw: &str, e: AuthorityError| assert_eq!(canonical_authority(raw), Err(e));
        bad("", AuthorityError::Empty);
        bad(":80", AuthorityError::Empty);
        bad(".", AuthorityError::Empty);
        bad("a..b", AuthorityError::InvalidLabel);
        bad(".a", AuthorityError::InvalidLabel);
        bad("a b", AuthorityError::InvalidChar);
        bad("a/b", AuthorityError::InvalidChar);
        bad("a@b", AuthorityError::InvalidChar);
        bad("h:99999", AuthorityError::InvalidPort);
        bad("h:8o", AuthorityError::InvalidPort);
        bad("[::1", AuthorityError::InvalidIpv6);
        bad("[zz]:1", AuthorityError::InvalidIpv6);
        bad("[::1]x", AuthorityError::InvalidPort);
        bad(&"a".repeat(64), AuthorityError::InvalidLabel);
        bad(&["a"; 128].join("."), AuthorityError::TooLong);
        bad("é.com", AuthorityError::InvalidChar);
    }
}
