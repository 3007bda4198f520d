//! What the ACME client (`[acme]` in the node config) keeps in etcd, under
//! `<prefix>acme/`: the ordering lock, the account, issued certificates and the HTTP-01
//! answers every node serves. Issued certificates also go into their server's spec (as
//! ACME-marked [`sluice_routing::model::CertificateSpec`]s), so they reach every node's SNI
//! resolver through the ordinary change stream.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, LockOptions, PutOptions, Txn, TxnOp};
use tokio::sync::watch;

use sluice_routing::model::ServerSpec;
use sluice_routing::validate::{self, ValidationError};

use super::keys::{Object, StoreKey, decode};
use super::store::{EtcdStore, to_json};
use super::watch::list_prefix;
use super::{EtcdConfig, EtcdError, bounded};

/// The name of the lock that makes one node at a time the orderer.
const LOCK: &str = "lock";

/// A server as stored, with the revision of its last change (for a compare-and-swap).
#[derive(Clone, Debug)]
pub struct VersionedServer {
    /// The spec.
    pub spec: ServerSpec,
    /// The key's `mod_revision`.
    pub mod_revision: i64,
}

/// The ordering lock, held while its lease is kept alive. Writes made under it check
/// in the same transaction that the lock key still exists, so a node that lost the lease
/// (a pause longer than the TTL) cannot overwrite what the next holder wrote.
pub struct AcmeLock {
    lease: i64,
    key: Vec<u8>,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
    store: EtcdStore,
}

impl std::fmt::Debug for AcmeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeLock").field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl AcmeLock {
    /// Resolves when the lease is lost (a keep-alive failed or etcd said it expired).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        // An error means the keeper ended: the lease is not kept any more either.
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Whether the lease has been lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// The lease id (keys written with the lease vanish with it).
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Gives the lock up now (revokes the lease), so the next node need not wait for
    /// the TTL.
    pub async fn release(self) {
        self.keeper.abort();
        let _ = self.store.revoke_lease(self.lease).await;
    }

    fn held(&self) -> Compare {
        Compare::version(self.key.clone(), CompareOp::Greater, 0)
    }
}

impl Drop for AcmeLock {
    fn drop(&mut self) {
        // The lease then expires after its TTL; `release` revokes it at once.
        self.keeper.abort();
    }
}

impl EtcdStore {
    /// Waits until this node holds the ACME ordering lock (`<prefix>acme/lock`), on a
    /// lease of `ttl` kept alive in the background. Waiting has no bound: another node
    /// may hold the lock for as long as it lives.
    pub async fn acme_lock(&self, ttl: Duration) -> Result<AcmeLock, EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let mut lease_client = self.client.lease_client();
        let grant = bounded(self.timeout, lease_client.grant(secs, None)).await?;
        let lease = grant.id();
        let (mut keeper, mut stream) =
            bounded(self.timeout, lease_client.keep_alive(lease)).await?;
        let (tx, lost) = watch::channel(false);
        let timeout = self.timeout;
        let every = Duration::from_secs(u64::try_from(secs).unwrap_or(2)) / 3;
        let keeper = tokio::spawn(async move {
            loop {
                let alive = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(timeout, alive).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    other => {
                        tracing::warn!(lease, result = ?other.map(|r| r.map(|m| m.map(|m| m.ttl()))), "ACME lock lease lost");
                        let _ = tx.send(true);
                        return;
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        let name = self.keys.acme(LOCK);
        let mut lock_client = self.client.lock_client();
        // No timeout: this waits for the current holder, as long as the lease lives (a
        // dead connection shows as a failed keep-alive).
        let mut lost_rx = lost.clone();
        let key = tokio::select! {
            r = lock_client.lock(name, Some(LockOptions::new().with_lease(lease))) => match r {
                Ok(r) => r.key().to_vec(),
                Err(e) => {
                    keeper.abort();
                    return Err(e.into());
                }
            },
            _ = lost_rx.wait_for(|lost| *lost) => {
                keeper.abort();
                return Err(EtcdError::LeaseLost);
            }
        };
        Ok(AcmeLock { lease, key, lost, keeper, store: self.clone() })
    }

    /// Revokes a lease: keys attached to it go, and a lock held on it passes on (e.g. the
    /// ACME lock of a process that is shutting down, see [`AcmeLock::lease`]).
    pub async fn revoke_lease(&self, lease: i64) -> Result<(), EtcdError> {
        let mut client = self.client.lease_client();
        bounded(self.timeout, client.revoke(lease)).await?;
        Ok(())
    }

    /// Every stored server with the revision of its key (malformed values are skipped:
    /// the source ignores them too).
    pub async fn list_servers_versioned(&self) -> Result<Vec<VersionedServer>, EtcdError> {
        let cfg = EtcdConfig { request_timeout: self.timeout, ..EtcdConfig::default() };
        let (kvs, _) = list_prefix(&self.client, &cfg, self.keys.servers().as_bytes()).await?;
        let mut out = Vec::new();
        for kv in kvs {
            let Some(k @ StoreKey::Server(_)) = self.keys.parse(kv.key()) else { continue };
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            if let Ok(Object::Server(s)) = decode(&k, &full, kv.value()) {
                out.push(VersionedServer { spec: *s, mod_revision: kv.mod_revision() });
            }
        }
        Ok(out)
    }

    /// Replaces a server only if it is unchanged since `mod_revision` and `lock` is still
    /// held (validated first). `false`: someone else wrote it, or the lock is gone.
    pub async fn put_server_if(
        &self,
        spec: &ServerSpec,
        mod_revision: i64,
        lock: &AcmeLock,
    ) -> Result<bool, EtcdError> {
        ValidationError::check(validate::validate_server(spec))?;
        let key = self.keys.key(&StoreKey::Server(spec.id.clone()));
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision), lock.held()])
            .and_then([TxnOp::put(key, to_json(spec)?, None)]);
        let resp = bounded(self.timeout, self.client.kv_client().txn(txn)).await?;
        Ok(resp.succeeded())
    }

    /// The value at `<prefix>acme/<rest>`, if any.
    pub async fn acme_get(&self, rest: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let key = self.keys.acme(rest);
        let resp = bounded(self.timeout, self.client.kv_client().get(key, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes `<prefix>acme/<rest>` while `lock` is held; `with_lease` ties the key to the
    /// lock's lease, so it vanishes if the holder dies (challenge answers). `false`: the
    /// lock is gone and nothing was written.
    pub async fn acme_put(
        &self,
        rest: &str,
        value: Vec<u8>,
        lock: &AcmeLock,
        with_lease: bool,
    ) -> Result<bool, EtcdError> {
        let opts = with_lease.then(|| PutOptions::new().with_lease(lock.lease));
        let txn = Txn::new().when([lock.held()]).and_then([TxnOp::put(
            self.keys.acme(rest),
            value,
            opts,
        )]);
        let resp = bounded(self.timeout, self.client.kv_client().txn(txn)).await?;
        Ok(resp.succeeded())
    }

    /// The keys under `<prefix>acme/<rest>` (a prefix such as `certs/`), as the part
    /// after it.
    pub async fn acme_list(&self, rest: &str) -> Result<Vec<String>, EtcdError> {
        let cfg = EtcdConfig { request_timeout: self.timeout, ..EtcdConfig::default() };
        let prefix = self.keys.acme(rest);
        let (kvs, _) = list_prefix(&self.client, &cfg, prefix.as_bytes()).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| kv.key().strip_prefix(prefix.as_bytes()))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect())
    }

    /// Deletes `<prefix>acme/<rest>`.
    pub async fn acme_delete(&self, rest: &str) -> Result<(), EtcdError> {
        bounded(self.timeout, self.client.kv_client().delete(self.keys.acme(rest), None)).await?;
        Ok(())
    }
}
