//! The key layout under the prefix, and decoding a stored value into an object.

use std::fmt;

use sluice_routing::change::Change;
use sluice_routing::model::{ReplicaSpec, ServerSpec, TokenSpec};
use sluice_routing::validate::{self, ValidationError};

use super::MalformedValue;

/// What an etcd key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoreKey {
    /// `servers/<id>`
    Server(String),
    /// `replicas/<server>/<id>`
    Replica {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
    },
    /// `tokens/<id>`
    Token(String),
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Server(id) => write!(f, "servers/{id}"),
            StoreKey::Replica { server, id } => write!(f, "replicas/{server}/{id}"),
            StoreKey::Token(id) => write!(f, "tokens/{id}"),
        }
    }
}

/// The key layout for one prefix.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    /// A prefix without a trailing `/` gets one, so `/sluice` and `/sluice/` agree.
    pub(super) fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub(super) fn key(&self, k: &StoreKey) -> String {
        format!("{}{k}", self.prefix)
    }

    pub(super) fn servers(&self) -> String {
        format!("{}servers/", self.prefix)
    }

    pub(super) fn replicas(&self, server: Option<&str>) -> String {
        match server {
            Some(s) => format!("{}replicas/{s}/", self.prefix),
            None => format!("{}replicas/", self.prefix),
        }
    }

    pub(super) fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }

    /// `<prefix>desired/` or `<prefix>desired/<server>`: the autoscaler's output
    /// (`sluice autoscale`), next to the routing objects but not part of them.
    pub(super) fn desired(&self, server: Option<&str>) -> String {
        match server {
            Some(s) => format!("{}desired/{s}", self.prefix),
            None => format!("{}desired/", self.prefix),
        }
    }

    /// `<prefix>acme/<rest>`: the ACME client's state (account, issued certificates,
    /// challenge answers, the ordering lock), next to the routing objects but not part of
    /// them.
    pub(super) fn acme(&self, rest: &str) -> String {
        format!("{}acme/{rest}", self.prefix)
    }

    /// Keys under the prefix that are not routing objects and are skipped silently by
    /// the source (the autoscaler's `desired/` keys, the ACME client's `acme/` keys).
    pub(super) fn is_ignored(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| rest.starts_with(b"desired/") || rest.starts_with(b"acme/"))
    }

    /// Parse a full key; `None` for keys outside the layout. Ids are validated later with
    /// the object, which must carry the same ids as its key.
    pub(super) fn parse(&self, key: &[u8]) -> Option<StoreKey> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let mut parts = rest.split('/');
        let kind = parts.next()?;
        let a = parts.next().filter(|s| !s.is_empty())?;
        let b = parts.next();
        if parts.next().is_some() {
            return None;
        }
        match (kind, b) {
            ("servers", None) => Some(StoreKey::Server(a.to_owned())),
            ("tokens", None) => Some(StoreKey::Token(a.to_owned())),
            ("replicas", Some(id)) if !id.is_empty() => {
                Some(StoreKey::Replica { server: a.to_owned(), id: id.to_owned() })
            }
            _ => None,
        }
    }
}

/// The end of the key range that holds every key starting with `prefix` (etcd's
/// `range_end` convention: the prefix with its last byte below 0xff incremented).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// A decoded, individually valid object.
#[derive(Clone, Debug)]
pub(super) enum Object {
    // Boxed: a server spec is several times larger than the other variants.
    Server(Box<ServerSpec>),
    Replica(ReplicaSpec),
    Token(TokenSpec),
}

impl Object {
    pub(super) fn into_change(self) -> Change {
        match self {
            Object::Server(s) => Change::PutServer(*s),
            Object::Replica(r) => Change::PutReplica(r),
            Object::Token(t) => Change::PutToken(t),
        }
    }
}

pub(super) fn delete_change(k: StoreKey) -> Change {
    match k {
        StoreKey::Server(id) => Change::DeleteServer(id),
        StoreKey::Replica { server, id } => Change::DeleteReplica { server, id },
        StoreKey::Token(id) => Change::DeleteToken(id),
    }
}

/// Decode and validate the value stored at `key` (named `full_key` in errors).
pub(super) fn decode(k: &StoreKey, full_key: &str, value: &[u8]) -> Result<Object, MalformedValue> {
    let bad = |reason: String| MalformedValue { key: full_key.to_owned(), reason };
    let json = |e: serde_json::Error| bad(format!("invalid JSON: {e}"));
    let invalid = |errs: Vec<validate::FieldError>| {
        ValidationError::check(errs).map_err(|e| bad(e.to_string()))
    };
    let mismatch = |field: &str, in_key: &str, in_value: &str| {
        bad(format!("{field} {in_value:?} in the value does not match {in_key:?} in the key"))
    };
    match k {
        StoreKey::Server(id) => {
            let s: ServerSpec = serde_json::from_slice(value).map_err(json)?;
            if s.id != *id {
                return Err(mismatch("id", id, &s.id));
            }
            invalid(validate::validate_server(&s))?;
            Ok(Object::Server(Box::new(s)))
        }
        StoreKey::Replica { server, id } => {
            let r: ReplicaSpec = serde_json::from_slice(value).map_err(json)?;
            if r.server != *server {
                return Err(mismatch("server", server, &r.server));
            }
            if r.id != *id {
                return Err(mismatch("id", id, &r.id));
            }
            invalid(validate::validate_replica(&r))?;
            Ok(Object::Replica(r))
        }
        StoreKey::Token(id) => {
            let t: TokenSpec = serde_json::from_slice(value).map_err(json)?;
            if t.id != *id {
                return Err(mismatch("id", id, &t.id));
            }
            invalid(validate::validate_token(&t))?;
            Ok(Object::Token(t))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_roundtrip() {
        let keys = Keys::new("/sluice/");
        for k in [
            StoreKey::Server("s1".into()),
            StoreKey::Replica { server: "s1".into(), id: "r.1".into() },
            StoreKey::Token("t_1".into()),
        ] {
            assert_eq!(keys.parse(keys.key(&k).as_bytes()), Some(k));
        }
        for bad in [
            "/sluice/servers/",
            "/sluice/servers/a/b",
            "/sluice/replicas/a",
            "/sluice/replicas/a/",
            "/sluice/other/a",
            "/other/servers/a",
        ] {
            assert_eq!(keys.parse(bad.as_bytes()), None, "{bad}");
        }
        // The autoscaler's keys are under the prefix but skipped without a warning.
        assert_eq!(keys.desired(Some("s1")), format!("{}desired/s1", keys.prefix));
        assert!(keys.is_ignored(keys.desired(Some("s1")).as_bytes()));
        assert_eq!(keys.parse(keys.desired(Some("s1")).as_bytes()), None);
        assert!(!keys.is_ignored(keys.key(&StoreKey::Server("s1".into())).as_bytes()));
        assert!(!keys.is_ignored(b"/elsewhere/desired/s1"));
        assert!(keys.is_ignored(keys.acme("certs/shop.example.org").as_bytes()));
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/sluice/"), b"/sluice0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn decode_checks_key_ids_and_validation() {
        let k = StoreKey::Server("s1".into());
        let ok = serde_json::to_vec(&ServerSpec::new("s1", "hello")).unwrap();
        assert!(matches!(decode(&k, "/sluice/servers/s1", &ok), Ok(Object::Server(_))));
        let other = serde_json::to_vec(&ServerSpec::new("s2", "hello")).unwrap();
        let e = decode(&k, "/sluice/servers/s1", &other).unwrap_err();
        assert!(e.to_string().contains("/sluice/servers/s1"), "{e}");
        assert!(e.reason.contains("does not match"), "{e}");
        let e = decode(&k, "/sluice/servers/s1", b"{not json").unwrap_err();
        assert!(e.reason.contains("invalid JSON"), "{e}");
        let bad = serde_json::to_vec(&ServerSpec::new("s1", "Bad_Label")).unwrap();
        let e = decode(&k, "/sluice/servers/s1", &bad).unwrap_err();
        assert!(e.reason.contains("label"), "{e}");
    }
}
