//! The writer `sluice ctl` and `sluice autoscale` use.

use std::fmt;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, Txn, TxnOp};
use serde::Serialize;

use sluice_routing::model::{ReplicaSpec, ServerSpec, TokenSpec};
use sluice_routing::scaling::DesiredReplicas;
use sluice_routing::validate::{self, ValidationError};

use super::config::{EtcdConfig, connect};
use super::keys::{Keys, Object, StoreKey, decode};
use super::watch::{list_prefix, revision_u64};
use super::{EtcdError, MalformedValue, bounded};

/// Objects read back from the store, plus the keys whose values did not decode.
#[derive(Clone, Debug)]
pub struct Listing<T> {
    /// The valid objects, in key order.
    pub items: Vec<T>,
    /// Malformed values: key and reason.
    pub malformed: Vec<MalformedValue>,
    /// The revision the listing reflects.
    pub revision: u64,
}

/// A freshly created token: the stored spec and the secret, which exists nowhere else.
#[derive(Clone)]
pub struct CreatedToken {
    /// What was stored (the secret's hash, never the secret).
    pub spec: TokenSpec,
    /// The secret: show it once, then forget it.
    pub secret: String,
    /// The revision of the write.
    pub revision: u64,
}

impl fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedToken")
            .field("spec", &self.spec)
            .field("secret", &"<redacted>")
            .field("revision", &self.revision)
            .finish()
    }
}

/// Validating writer and reader of the sluice key layout (what `sluice ctl` uses).
#[derive(Clone)]
pub struct EtcdStore {
    pub(super) client: Client,
    pub(super) keys: Keys,
    pub(super) timeout: Duration,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.keys.prefix).finish()
    }
}

impl EtcdStore {
    /// Connect to the store `cfg` names.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, EtcdError> {
        Ok(EtcdStore {
            client: connect(cfg, false).await?,
            keys: cfg.keys(),
            timeout: cfg.request_timeout,
        })
    }

    /// The full key an object lives at.
    pub fn key(&self, k: &StoreKey) -> String {
        self.keys.key(k)
    }

    /// Create or replace a server (validated first). Returns the write's revision.
    pub async fn put_server(&self, spec: &ServerSpec) -> Result<u64, EtcdError> {
        ValidationError::check(validate::validate_server(spec))?;
        let key = self.keys.key(&StoreKey::Server(spec.id.clone()));
        self.put_json(key, spec).await
    }

    /// A server, if stored.
    pub async fn get_server(&self, id: &str) -> Result<Option<ServerSpec>, EtcdError> {
        self.get_object(StoreKey::Server(id.to_owned())).await.map(|o| match o {
            Some(Object::Server(s)) => Some(*s),
            _ => None,
        })
    }

    /// Delete a server and, in the same transaction, all its replicas. Returns the
    /// revision of the delete, or `None` if the server did not exist (then nothing is
    /// deleted).
    pub async fn delete_server(&self, id: &str) -> Result<Option<u64>, EtcdError> {
        let key = self.keys.key(&StoreKey::Server(id.to_owned()));
        let replicas = self.keys.replicas(Some(id));
        let txn =
            Txn::new().when([Compare::version(key.clone(), CompareOp::Greater, 0)]).and_then([
                TxnOp::delete(key, None),
                TxnOp::delete(replicas, Some(DeleteOptions::new().with_prefix())),
            ]);
        let resp = bounded(self.timeout, self.client.kv_client().txn(txn)).await?;
        Ok(resp.succeeded().then(|| resp.header().map(|h| revision_u64(h.revision())).unwrap_or(0)))
    }

    /// Every stored server.
    pub async fn list_servers(&self) -> Result<Listing<ServerSpec>, EtcdError> {
        self.list(self.keys.servers(), |o| match o {
            Object::Server(s) => Some(*s),
            _ => None,
        })
        .await
    }

    /// Create or replace a replica (validated first; its server must exist, checked in the
    /// same transaction). Returns the write's revision.
    pub async fn put_replica(&self, spec: &ReplicaSpec) -> Result<u64, EtcdError> {
        ValidationError::check(validate::validate_replica(spec))?;
        let server_key = self.keys.key(&StoreKey::Server(spec.server.clone()));
        let key =
            self.keys.key(&StoreKey::Replica { server: spec.server.clone(), id: spec.id.clone() });
        let value = to_json(spec)?;
        let txn = Txn::new()
            .when([Compare::version(server_key, CompareOp::Greater, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = bounded(self.timeout, self.client.kv_client().txn(txn)).await?;
        if !resp.succeeded() {
            return Err(EtcdError::UnknownServer(spec.server.clone()));
        }
        Ok(resp.header().map(|h| revision_u64(h.revision())).unwrap_or(0))
    }

    /// A replica, if stored.
    pub async fn get_replica(
        &self,
        server: &str,
        id: &str,
    ) -> Result<Option<ReplicaSpec>, EtcdError> {
        let k = StoreKey::Replica { server: server.to_owned(), id: id.to_owned() };
        self.get_object(k).await.map(|o| match o {
            Some(Object::Replica(r)) => Some(r),
            _ => None,
        })
    }

    /// Delete a replica. Returns the revision, or `None` if it did not exist.
    pub async fn delete_replica(&self, server: &str, id: &str) -> Result<Option<u64>, EtcdError> {
        self.delete_key(
            self.keys.key(&StoreKey::Replica { server: server.to_owned(), id: id.to_owned() }),
        )
        .await
    }

    /// Every stored replica, or those of one server.
    pub async fn list_replicas(
        &self,
        server: Option<&str>,
    ) -> Result<Listing<ReplicaSpec>, EtcdError> {
        self.list(self.keys.replicas(server), |o| match o {
            Object::Replica(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Create a token with a fresh random secret; only the secret's hash is stored. Fails
    /// with [`EtcdError::Exists`] if the id is taken (a secret is never overwritten
    /// silently).
    pub async fn create_token(
        &self,
        id: &str,
        environments: Vec<String>,
    ) -> Result<CreatedToken, EtcdError> {
        let secret = generate_secret()?;
        let spec = TokenSpec {
            id: id.to_owned(),
            secret_hash: sluice_routing::hash_secret(&secret),
            environments,
        };
        ValidationError::check(validate::validate_token(&spec))?;
        let key = self.keys.key(&StoreKey::Token(spec.id.clone()));
        let value = to_json(&spec)?;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = bounded(self.timeout, self.client.kv_client().txn(txn)).await?;
        if !resp.succeeded() {
            return Err(EtcdError::Exists(format!("token {id:?}")));
        }
        let revision = resp.header().map(|h| revision_u64(h.revision())).unwrap_or(0);
        Ok(CreatedToken { spec, secret, revision })
    }

    /// Store a token whose secret hash is already known (validated first).
    pub async fn put_token(&self, spec: &TokenSpec) -> Result<u64, EtcdError> {
        ValidationError::check(validate::validate_token(spec))?;
        let key = self.keys.key(&StoreKey::Token(spec.id.clone()));
        self.put_json(key, spec).await
    }

    /// A token, if stored.
    pub async fn get_token(&self, id: &str) -> Result<Option<TokenSpec>, EtcdError> {
        self.get_object(StoreKey::Token(id.to_owned())).await.map(|o| match o {
            Some(Object::Token(t)) => Some(t),
            _ => None,
        })
    }

    /// Delete a token. Returns the revision, or `None` if it did not exist.
    pub async fn delete_token(&self, id: &str) -> Result<Option<u64>, EtcdError> {
        self.delete_key(self.keys.key(&StoreKey::Token(id.to_owned()))).await
    }

    /// Every stored token.
    pub async fn list_tokens(&self) -> Result<Listing<TokenSpec>, EtcdError> {
        self.list(self.keys.tokens(), |o| match o {
            Object::Token(t) => Some(t),
            _ => None,
        })
        .await
    }

    /// Record the autoscaler's desired replica count for a server at
    /// `<prefix>desired/<server>` (JSON [`DesiredReplicas`]). The routing source ignores
    /// these keys; an orchestrator watches them. Returns the write's revision.
    pub async fn put_desired(&self, desired: &DesiredReplicas) -> Result<u64, EtcdError> {
        let key = self.keys.desired(Some(&desired.server));
        self.put_json(key, desired).await
    }

    /// The desired count stored for a server, if any.
    pub async fn get_desired(&self, server: &str) -> Result<Option<DesiredReplicas>, EtcdError> {
        let key = self.keys.desired(Some(server));
        let resp = bounded(self.timeout, self.client.kv_client().get(key.clone(), None)).await?;
        match resp.kvs().first() {
            Some(kv) => serde_json::from_slice(kv.value()).map(Some).map_err(|e| {
                EtcdError::Malformed(MalformedValue { key, reason: format!("invalid JSON: {e}") })
            }),
            None => Ok(None),
        }
    }

    /// Every stored desired count (to seed a restarted autoscaler), with the keys whose
    /// values did not decode.
    pub async fn list_desired(&self) -> Result<Listing<DesiredReplicas>, EtcdError> {
        let cfg = EtcdConfig { request_timeout: self.timeout, ..EtcdConfig::default() };
        let prefix = self.keys.desired(None);
        let (kvs, revision) = list_prefix(&self.client, &cfg, prefix.as_bytes()).await?;
        let mut items = Vec::new();
        let mut malformed = Vec::new();
        for kv in kvs {
            match serde_json::from_slice::<DesiredReplicas>(kv.value()) {
                Ok(d) => items.push(d),
                Err(e) => malformed.push(MalformedValue {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    reason: format!("invalid JSON: {e}"),
                }),
            }
        }
        Ok(Listing { items, malformed, revision: revision_u64(revision) })
    }

    async fn put_json<T: Serialize>(&self, key: String, value: &T) -> Result<u64, EtcdError> {
        let value = to_json(value)?;
        let resp = bounded(self.timeout, self.client.kv_client().put(key, value, None)).await?;
        Ok(resp.header().map(|h| revision_u64(h.revision())).unwrap_or(0))
    }

    async fn get_object(&self, k: StoreKey) -> Result<Option<Object>, EtcdError> {
        let key = self.keys.key(&k);
        let resp = bounded(self.timeout, self.client.kv_client().get(key.clone(), None)).await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(decode(&k, &key, kv.value())?)),
            None => Ok(None),
        }
    }

    async fn delete_key(&self, key: String) -> Result<Option<u64>, EtcdError> {
        let resp = bounded(self.timeout, self.client.kv_client().delete(key, None)).await?;
        Ok((resp.deleted() > 0)
            .then(|| resp.header().map(|h| revision_u64(h.revision())).unwrap_or(0)))
    }

    async fn list<T>(
        &self,
        prefix: String,
        pick: impl Fn(Object) -> Option<T>,
    ) -> Result<Listing<T>, EtcdError> {
        let cfg = EtcdConfig { request_timeout: self.timeout, ..EtcdConfig::default() };
        let (kvs, revision) = list_prefix(&self.client, &cfg, prefix.as_bytes()).await?;
        let mut items = Vec::new();
        let mut malformed = Vec::new();
        for kv in kvs {
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(k) = self.keys.parse(kv.key()) else {
                malformed.push(MalformedValue {
                    key: full,
                    reason: "key outside the sluice layout".into(),
                });
                continue;
            };
            match decode(&k, &full, kv.value()) {
                Ok(obj) => items.extend(pick(obj)),
                Err(e) => malformed.push(e),
            }
        }
        Ok(Listing { items, malformed, revision: revision_u64(revision) })
    }
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, EtcdError> {
    serde_json::to_vec(value).map_err(|e| {
        EtcdError::Malformed(MalformedValue {
            key: String::new(),
            reason: format!("cannot encode as JSON: {e}"),
        })
    })
}

/// 32 random bytes from the OS, as 64 lowercase hex digits.
pub(super) fn generate_secret() -> Result<String, EtcdError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| EtcdError::Random(e.to_string()))?;
    Ok(hex::encode(bytes))
}
