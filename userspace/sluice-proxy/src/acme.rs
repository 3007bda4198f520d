//! HTTP-01 answers: `GET /.well-known/acme-challenge/<token>` on any listener is answered
//! by the installed [`ChallengeAnswers`] before routing, when one is installed (the
//! node's `[acme]` section) and knows the token; otherwise the path is routed like any
//! other (a server may answer challenges of its own).

use std::future::Future;
use std::pin::Pin;

/// The path prefix of an HTTP-01 challenge (RFC 8555, 8.3).
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Where the key authorizations of pending HTTP-01 challenges are looked up.
pub trait ChallengeAnswers: Send + Sync + 'static {
    /// The key authorization to answer for `token` asked under `host` (canonical), or
    /// `None` to route the request. `token` is not validated yet: implementations must
    /// check it.
    fn answer<'a>(
        &'a self,
        host: &'a str,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;
}

/// Whether `token` may be an ACME token: base64url, 1 to 256 characters (so a lookup key
/// never carries a `/` or anything else a store would read as structure).
pub fn valid_token(token: &str) -> bool {
    (1..=256).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(valid_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        for bad in ["", "a/b", "..", "a b", "a%2f"] {
            assert!(!valid_token(bad), "{bad}");
        }
        assert!(!valid_token(&"a".repeat(257)));
    }
}
