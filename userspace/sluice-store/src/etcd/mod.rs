//! etcd source: list a key prefix, then watch it, and keep a [`sluice_routing::RoutingTable`] in step with
//! the store, stamping each snapshot with the etcd revision it reflects.
//!
//! Key layout under the configured prefix (default `/sluice/`; see `docs/etcd.md`):
//!
//! | key                         | value (JSON)      |
//! |-----------------------------|-------------------|
//! | `<prefix>servers/<id>`      | [`sluice_routing::ServerSpec`] |
//! | `<prefix>replicas/<server>/<id>` | [`sluice_routing::ReplicaSpec`] |
//! | `<prefix>tokens/<id>`       | [`sluice_routing::TokenSpec`] |
//!
//! The reconciler ([`EtcdSource::run`]) lists the prefix and syncs the table to it at the
//! listing's revision, then watches from the next revision and applies each watch response
//! as one batch. After a disconnect it resumes the watch from the last applied revision;
//! if that revision has been compacted it lists again. While etcd is unreachable the table
//! keeps its last snapshot (it is never cleared) and [`StatusHandle`] reports the store as
//! disconnected, so `/readyz` and `/metrics` can say the routing state is stale.
//!
//! A value that does not parse or validate is ignored: the error (naming the key) is
//! logged, the previous good value of that key (if any) stays in force, and everything
//! else keeps working.
//!
//! [`EtcdStore`] is the writer `sluice ctl` uses: it validates objects before writing them,
//! and creates tokens with a random secret of which only the hash is stored.
//!
//! `<prefix>acme/` holds the ACME client's state (see `docs/operations.md`, ACME); the
//! source skips it like `desired/`.
//!
//! Modules: `config` (how to reach etcd, TLS and authentication), `keys` (the key
//! layout and value codec), `status`, the reconciler (`watch`), and the
//! writer (`store`).

use std::future::Future;
use std::time::Duration;

mod acme;
mod config;
mod keys;
mod status;
mod store;
mod watch;

pub use acme::{AcmeLock, VersionedServer};
pub use config::{DEFAULT_ENDPOINT, DEFAULT_PREFIX, EtcdAuth, EtcdConfig, EtcdTls};
pub use keys::StoreKey;
pub use status::{StatusHandle, StoreStatus};
pub use store::{CreatedToken, EtcdStore, Listing};
pub use watch::{AcmeChallenges, EtcdSource};

use sluice_routing::validate::ValidationError;

/// Largest gRPC message we accept (a watch response carrying a big transaction).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Errors of the etcd source and store.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The etcd client failed (connection, gRPC status). Not a `source`: the message
    /// already carries it, and error chains would print it twice.
    #[error("etcd: {0}")]
    Client(etcd_client::Error),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// An object failed validation (nothing was written).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A replica names a server that is not in the store.
    #[error("server {0:?} does not exist (create it first)")]
    UnknownServer(String),
    /// Create-only write of a key that exists.
    #[error("{0} already exists")]
    Exists(String),
    /// A stored value could not be decoded.
    #[error(transparent)]
    Malformed(#[from] MalformedValue),
    /// The watch was cancelled or ended by the server.
    #[error("watch ended: {0}")]
    Watch(String),
    /// The OS random source failed (creating a token secret).
    #[error("cannot read random bytes for a token secret: {0}")]
    Random(String),
    /// A TLS or authentication file could not be read, or the settings are incomplete.
    #[error("{0}")]
    Credentials(String),
    /// A lease (the ACME lock's) was not kept alive: etcd let it expire.
    #[error("the etcd lease was lost")]
    LeaseLost,
    /// The watch start revision has been compacted away: list again.
    #[error("revision {0} has been compacted")]
    Compacted(i64),
}

/// A stored value that is not a valid object for its key.
#[derive(Clone, Debug, thiserror::Error)]
#[error("ignoring malformed value at key {key:?}: {reason}")]
pub struct MalformedValue {
    /// The full etcd key.
    pub key: String,
    /// Why it was rejected (JSON error with line/column, or the validation error).
    pub reason: String,
}

impl From<etcd_client::Error> for EtcdError {
    fn from(e: etcd_client::Error) -> Self {
        EtcdError::Client(e)
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(EtcdError::from),
        Err(_) => Err(EtcdError::Timeout(timeout)),
    }
}
