//! sluice's routing-state sources and store: the I/O side of the routing state, kept out
//! of `sluice-routing` (model, validation, snapshots: no I/O).
//!
//! Sources turn a store's contents into [`sluice_routing::Change`]s or whole
//! [`sluice_routing::RoutingDoc`]s and apply them to a [`sluice_routing::RoutingTable`],
//! stamping the store revision as the generation:
//!
//! - [`file`](mod@file): a TOML file or directory, reloaded on change;
//! - [`cert_files`]: the certificate files servers name, re-read when they change;
//! - [`etcd`]: list and watch a key prefix; [`etcd::EtcdStore`] is the writer `sluice ctl`,
//!   the autoscaler and the supervisor use.

use std::time::SystemTime;

use serde::Serialize;

pub mod cert_files;
pub mod etcd;
pub mod file;

/// How a source is doing, for `/readyz` detail and metrics. Sources publish it on a
/// `tokio::sync::watch` channel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// Whether the last attempt to load or sync succeeded (false before the first success).
    pub healthy: bool,
    /// The last error, if the last attempt failed (never contains secrets).
    pub last_error: Option<String>,
    /// When state was last loaded or confirmed current.
    pub last_success: Option<SystemTime>,
    /// Generation published by the last successful load.
    pub generation: u64,
    /// Successful loads so far.
    pub loads: u64,
    /// Failed attempts so far.
    pub failures: u64,
}
