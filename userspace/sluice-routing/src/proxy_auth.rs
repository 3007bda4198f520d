//! Proxy auth: the per-request decision and the header names it uses.
//!
//! A request to a server that is not `unauthenticated` must carry a token id (default
//! header `Sluice-Key`) and its secret (`Sluice-Secret`). The decision is local: one
//! snapshot lookup and one SHA-256, no network call. Order of checks, chosen so a wrong
//! secret never reveals anything about the token's scope:
//!
//! 1. server `unauthenticated` → [`AuthDecision::Allow`];
//! 2. id or secret missing or empty, id unknown, secret wrong → [`AuthDecision::Unauthenticated`] (401);
//! 3. token valid but its environments do not include the server's → [`AuthDecision::Forbidden`] (403);
//! 4. otherwise [`AuthDecision::Allow`].
//!
//! Secrets are compared in constant time ([`crate::verify_secret_bytes`]); an unknown id
//! still hashes the presented secret so the two failure paths cost about the same. Nothing
//! here logs, and [`AuthDecision`] carries no secret material.
//!
//! Before forwarding, the proxy removes the key and secret headers **and their underscore
//! look-alikes** (`Sluice_Secret`): CGI-style servers map `-` and `_` to the same variable,
//! so a look-alike could smuggle a credential past the proxy's own check or leak it to the
//! replica. [`AuthHeaders::is_auth_header`] is the predicate, [`AuthHeaders::strip_names`]
//! the explicit list.

use thiserror::Error;

use crate::snapshot::{Server, Snapshot};

/// Default token id header.
pub const DEFAULT_KEY_HEADER: &str = "Sluice-Key";
/// Default token secret header.
pub const DEFAULT_SECRET_HEADER: &str = "Sluice-Secret";
/// Most `-`/`_` characters a configured header name may contain (the look-alike list has
/// `2^k` entries for `k` of them).
pub const MAX_SEPARATORS: usize = 6;

/// The outcome of proxy auth for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    /// Forward the request.
    Allow,
    /// `401`: credentials missing, unknown token id, or wrong secret.
    Unauthenticated,
    /// `403`: a valid token that is not scoped to the server's environment.
    Forbidden,
}

impl AuthDecision {
    /// The HTTP status to answer with, or `None` for [`AuthDecision::Allow`].
    pub fn status(self) -> Option<u16> {
        match self {
            AuthDecision::Allow => None,
            AuthDecision::Unauthenticated => Some(401),
            AuthDecision::Forbidden => Some(403),
        }
    }

    /// A short response body for a rejection (no detail about which part was wrong).
    pub fn reason(self) -> &'static str {
        match self {
            AuthDecision::Allow => "",
            AuthDecision::Unauthenticated => "missing or invalid credentials\n",
            AuthDecision::Forbidden => "token not allowed for this server\n",
        }
    }
}

/// Decide proxy auth for a request to `server`, given the raw values of the key and
/// secret headers (`None` when absent; the proxy passes `None` too when a header occurs
/// more than once, which is therefore a 401).
pub fn authorize(
    snapshot: &Snapshot,
    server: &Server,
    key_id: Option<&[u8]>,
    secret: Option<&[u8]>,
) -> AuthDecision {
    if server.spec.unauthenticated {
        return AuthDecision::Allow;
    }
    let (Some(key_id), Some(secret)) = (key_id, secret) else {
        return AuthDecision::Unauthenticated;
    };
    if key_id.is_empty() || secret.is_empty() {
        return AuthDecision::Unauthenticated;
    }
    let token = std::str::from_utf8(key_id).ok().and_then(|id| snapshot.token(id));
    let Some(token) = token else {
        // Same work as a wrong secret, so timing does not tell ids apart.
        let _ = crate::verify_secret_bytes(DUMMY_HASH, secret);
        return AuthDecision::Unauthenticated;
    };
    if !crate::verify_secret_bytes(&token.secret_hash, secret) {
        return AuthDecision::Unauthenticated;
    }
    if !token.allows_environment(&server.spec.environment) {
        return AuthDecision::Forbidden;
    }
    AuthDecision::Allow
}

/// A well-formed hash no secret matches in practice (SHA-256 of nothing is all-zero
/// with negligible probability).
const DUMMY_HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A configured header name is not usable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthHeaderError {
    /// Not an HTTP token (`A-Za-z0-9` and ``!#$%&'*+-.^_`|~``), or empty.
    #[error("header name {0:?} is not a valid HTTP header name")]
    Invalid(String),
    /// More than [`MAX_SEPARATORS`] `-`/`_` characters.
    #[error("header name {0:?} has more than {MAX_SEPARATORS} '-'/'_' characters")]
    TooManySeparators(String),
    /// The key and secret headers are the same (after `-`/`_` folding).
    #[error("key and secret headers must differ (got {0:?} for both)")]
    Same(String),
}

/// The proxy-auth header names (configurable; defaults `Sluice-Key`, `Sluice-Secret`),
/// lowercased, with the list of names to strip before forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeaders {
    key: String,
    secret: String,
    strip: Vec<String>,
}

impl Default for AuthHeaders {
    fn default() -> Self {
        // The defaults are valid by construction.
        AuthHeaders::build(
            DEFAULT_KEY_HEADER.to_ascii_lowercase(),
            DEFAULT_SECRET_HEADER.to_ascii_lowercase(),
        )
    }
}

impl AuthHeaders {
    /// Validate and lowercase the two header names.
    pub fn new(key: &str, secret: &str) -> Result<Self, AuthHeaderError> {
        let key = check_name(key)?;
        let secret = check_name(secret)?;
        if fold(&key) == fold(&secret) {
            return Err(AuthHeaderError::Same(key));
        }
        Ok(AuthHeaders::build(key, secret))
    }

    fn build(key: String, secret: String) -> Self {
        let mut strip = lookalikes(&key);
        strip.extend(lookalikes(&secret));
        AuthHeaders { key, secret, strip }
    }

    /// The token id header, lowercase (`sluice-key`): read the credential from this one only.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The secret header, lowercase (`sluice-secret`).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Every lowercase name to remove before forwarding: both headers with each `-`/`_`
    /// replaced by either (`sluice-key`, `sluice_key`, `sluice-secret`, `sluice_secret`).
    /// Header lookups are case-insensitive (the `http` crate stores names lowercase).
    pub fn strip_names(&self) -> &[String] {
        &self.strip
    }

    /// Whether a header name (any case) is the key or secret header or a `-`/`_`
    /// look-alike of one; for stripping by predicate while iterating the headers.
    pub fn is_auth_header(&self, name: &[u8]) -> bool {
        folded_eq(name, self.key.as_bytes()) || folded_eq(name, self.secret.as_bytes())
    }
}

fn check_name(name: &str) -> Result<String, AuthHeaderError> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        return Err(AuthHeaderError::Invalid(name.to_owned()));
    }
    if name.bytes().filter(|&b| b == b'-' || b == b'_').count() > MAX_SEPARATORS {
        return Err(AuthHeaderError::TooManySeparators(name.to_owned()));
    }
    Ok(name.to_ascii_lowercase())
}

/// Lowercase with `_` folded to `-`.
fn fold(name: &str) -> String {
    name.bytes().map(|b| if b == b'_' { '-' } else { b.to_ascii_lowercase() as char }).collect()
}

fn folded_eq(a: &[u8], b: &[u8]) -> bool {
    let norm = |c: u8| if c == b'_' { b'-' } else { c.to_ascii_lowercase() };
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| norm(x) == norm(y))
}

/// Every spelling of a lowercase name with each `-`/`_` as either.
fn lookalikes(name: &str) -> Vec<String> {
    let seps: Vec<usize> =
        name.bytes().enumerate().filter(|&(_, b)| b == b'-' || b == b'_').map(|(i, _)| i).collect();
    (0u32..1 << seps.len())
        .map(|mask| {
            let mut b = name.as_bytes().to_vec();
            for (bit, &i) in seps.iter().enumerate() {
                b[i] = if mask & (1 << bit) != 0 { b'_' } else { b'-' };
            }
            String::from_utf8_lossy(&b).into_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeConfig, ReplicaSpec, RoutingDoc, ServerSpec, TokenSpec};
    use crate::{RoutingTable, hash_secret};

    fn table() -> RoutingTable {
        let mut prod = ServerSpec::new("prod-srv", "prod");
        prod.environment = "prod".into();
        let mut open = ServerSpec::new("open-srv", "open");
        open.unauthenticated = true;
        let tok = |id: &str, secret: &str, envs: &[&str]| TokenSpec {
            id: id.into(),
            secret_hash: hash_secret(secret),
            environments: envs.iter().map(|e| e.to_string()).collect(),
        };
        let doc = RoutingDoc {
            servers: vec![prod, open],
            replicas: vec![ReplicaSpec::new("prod-srv", "r", "127.0.0.1:9".parse().unwrap())],
            tokens: vec![
                tok("tok-prod", "s3cret-prod", &["prod"]),
                tok("tok-dev", "s3cret-dev", &["dev"]),
                tok("tok-all", "s3cret-all", &["*"]),
            ],
        };
        RoutingTable::from_doc(NodeConfig::default(), doc).unwrap()
    }

    #[test]
    fn decision_matrix() {
        use AuthDecision::*;
        let t = table();
        let snap = t.load();
        let prod = snap.server("prod-srv").unwrap();
        let open = snap.server("open-srv").unwrap();
        type Case<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, AuthDecision);
        let cases: &[Case] = &[
            (None, None, Unauthenticated),
            (Some(b"tok-prod"), None, Unauthenticated),
            (None, Some(b"s3cret-prod"), Unauthenticated),
            (Some(b""), Some(b""), Unauthenticated),
            (Some(b"tok-prod"), Some(b""), Unauthenticated),
            (Some(b"tok-prod"), Some(b"wrong"), Unauthenticated),
            (Some(b"tok-nope"), Some(b"s3cret-prod"), Unauthenticated),
            (Some(b"\xff\xfe"), Some(b"s3cret-prod"), Unauthenticated),
            // Another token's secret.
            (Some(b"tok-prod"), Some(b"s3cret-dev"), Unauthenticated),
            // Wrong secret for an out-of-scope token: 401, not 403 (scope is not revealed).
            (Some(b"tok-dev"), Some(b"wrong"), Unauthenticated),
            (Some(b"tok-dev"), Some(b"s3cret-dev"), Forbidden),
            (Some(b"tok-prod"), Some(b"s3cret-prod"), Allow),
            (Some(b"tok-all"), Some(b"s3cret-all"), Allow),
        ];
        for (key, secret, want) in cases {
            assert_eq!(authorize(&snap, prod, *key, *secret), *want, "{key:?} {secret:?}");
            // Unauthenticated servers skip every check.
            assert_eq!(authorize(&snap, open, *key, *secret), Allow);
        }
        assert_eq!(Unauthenticated.status(), Some(401));
        assert_eq!(Forbidden.status(), Some(403));
        assert_eq!(Allow.status(), None);
        assert!(!Unauthenticated.reason().is_empty());
    }

    #[test]
    fn header_names_and_lookalikes() {
        let h = AuthHeaders::default();
        assert_eq!(h.key(), "sluice-key");
        assert_eq!(h.secret(), "sluice-secret");
        let mut names = h.strip_names().to_vec();
        names.sort();
        assert_eq!(names, ["sluice-key", "sluice-secret", "sluice_key", "sluice_secret"]);
        for n in ["Sluice-Key", "SLUICE_SECRET", "sluice_Key", "sluice-secret"] {
            assert!(h.is_auth_header(n.as_bytes()), "{n}");
        }
        for n in ["sluice-keys", "sluice", "x-sluice-key", "sluice-session-id", ""] {
            assert!(!h.is_auth_header(n.as_bytes()), "{n}");
        }
        let c = AuthHeaders::new("X-Api-Key", "X_Api_Secret").unwrap();
        assert_eq!(c.key(), "x-api-key");
        assert_eq!(c.strip_names().len(), 8);
        assert!(c.strip_names().contains(&"x_api-secret".to_string()));
        assert!(c.is_auth_header(b"X-API-SECRET"));
    }

    #[test]
    fn bad_header_names() {
        assert!(matches!(AuthHeaders::new("", "s"), Err(AuthHeaderError::Invalid(_))));
        assert!(matches!(AuthHeaders::new("a b", "s"), Err(AuthHeaderError::Invalid(_))));
        assert!(matches!(AuthHeaders::new("k:", "s"), Err(AuthHeaderError::Invalid(_))));
        assert!(matches!(
            AuthHeaders::new("a-b-c-d-e-f-g-h", "s"),
            Err(AuthHeaderError::TooManySeparators(_))
        ));
        assert!(matches!(AuthHeaders::new("X-Key", "x_key"), Err(AuthHeaderError::Same(_))));
    }
}
