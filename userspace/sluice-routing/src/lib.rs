//! sluice routing state: the model (servers, replicas, tokens), its validation, the
//! immutable snapshot the request path reads lock-free, incremental application of store
//! changes, and the health verdicts that gate replicas. The sources that read a store
//! (file, etcd) live in `sluice-store`; the health checker that dials replicas lives in
//! `sluice-node`.
//!
//! This crate knows nothing of HTTP plumbing or BPF (docs/design.md, Layering) and opens
//! no socket: the proxy reads a [`Snapshot`] from a [`RoutingTable`]; sources
//! (`sluice-store`) and the health checker (`sluice-node`) write to it.
//!
//! ```
//! use sluice_routing::{NodeConfig, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec};
//!
//! let node = NodeConfig { base_domains: vec!["run.example.com".into()], regions: vec!["r1".into()] };
//! let doc = RoutingDoc {
//!     servers: vec![ServerSpec::new("s1", "hello")],
//!     replicas: vec![ReplicaSpec::new("s1", "a", "127.0.0.1:8080".parse().unwrap())],
//!     tokens: vec![],
//! };
//! let table = RoutingTable::from_doc(node, doc).unwrap();
//! let snap = table.load();
//! let server = snap.lookup("hello.r1.run.example.com").unwrap();
//! assert_eq!(server.replicas.len(), 1);
//! ```

pub mod backoff;
pub mod cert;
pub mod change;
pub mod host;
pub mod lb;
pub mod limits;
pub mod mirror;
pub mod model;
pub mod proxy_auth;
pub mod scaling;
pub mod secret_hash;
pub mod signal;
pub mod snapshot;
pub mod supervisor;
pub mod table;
pub mod validate;

pub use change::{ApplyError, ApplyErrorKind, Change, ReplicaEvent};
pub use host::{AuthorityError, canonical_authority, canonical_authority_cow};
pub use lb::{LbPolicy, select};
pub use limits::{BytesPermit, OverLimit};
pub use model::SpliceMode;
pub use model::{
    CertificateSpec, LaunchSpec, MirrorSpec, NodeConfig, Protocol, ReplicaSpec, ReplicaState,
    RoutingDoc, SecretPem, ServerLimits, ServerSpec, ServerTimeouts, TokenSpec, VipBalance,
};
pub use proxy_auth::{AuthDecision, AuthHeaders, authorize};
pub use scaling::{Decision, DesiredReplicas, Recommender, ScalePolicy};
pub use secret_hash::{hash_secret, verify_secret, verify_secret_bytes};
pub use signal::{ReplicaRecord, Sampler, ServerRecord};
pub use snapshot::{
    Health, InFlightGuard, Replica, ReplicaStats, Server, ServerStats, Snapshot, StateView,
};
pub use table::RoutingTable;
pub use validate::{FieldError, ObjectRef, ValidationError};
