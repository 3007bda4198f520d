//! Proxy ↔ local-replica acceleration (`[local_replicas]`).
//!
//! When a replica runs on this node (on loopback, or in its own network namespace over
//! a veth), the bytes between sluice's upstream socket and the replica's socket need
//! not cross the TCP/IP stack twice: sock_ops records both ends of each such connection
//! in a sockhash and sk_msg hands every message straight to the peer socket's ingress.
//!
//! Two things keep this scoped to sockets that are ours to touch: the programs attach
//! to one cgroup the operator names (covering sluice and the node's replicas, never by
//! default), and only connections to or from addresses in the `local_replicas` map are
//! recorded. That map is kept in step with the routing snapshot: every replica address
//! inside the configured prefixes is in it, and nothing else.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::Deserialize;
use sluice_dataplane::{Cidr, Dataplane};
use sluice_routing::{RoutingTable, Snapshot};
use tracing::{debug, info, warn};

use crate::{NodeError, Result};

/// `[local_replicas]`: which cgroup the redirect programs attach to and which replica
/// addresses are on this node. Absent (no `cgroup`) means off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalReplicasConfig {
    /// A cgroup v2 directory that covers sluice and the local replicas (on Kubernetes,
    /// a common ancestor of sluice's pod and the replicas' pods). `None` turns the
    /// redirect off: attaching wider than needed would catch sockets sluice does not own.
    pub cgroup: Option<PathBuf>,
    /// Replica addresses inside these prefixes are on this node (e.g. the node's pod
    /// CIDR). Default: loopback only.
    pub prefixes: Vec<String>,
}

impl Default for LocalReplicasConfig {
    fn default() -> Self {
        LocalReplicasConfig { cgroup: None, prefixes: vec!["127.0.0.0/8".into(), "::1/128".into()] }
    }
}

impl LocalReplicasConfig {
    /// The prefixes, parsed (a typo fails start-up with the offending entry named).
    pub fn parsed_prefixes(&self) -> Result<Vec<Cidr>> {
        self.prefixes
            .iter()
            .map(|p| {
                p.parse::<Cidr>().map_err(|e| {
                    NodeError::Config(format!("[local_replicas] prefixes: {p:?}: {e}"))
                })
            })
            .collect()
    }
}

/// Every replica address of the snapshot (any state: locality, not health, decides
/// eligibility) that lies in one of `prefixes`.
pub fn local_addrs(snapshot: &Snapshot, prefixes: &[Cidr]) -> BTreeSet<SocketAddr> {
    snapshot
        .servers()
        .flat_map(|s| snapshot.replica_specs(s.id()))
        .map(|(spec, _)| spec.address)
        .filter(|a| prefixes.iter().any(|p| p.contains(a.ip())))
        .collect()
}

/// Attaches the redirect to the configured cgroup and keeps `local_replicas` in step
/// with the routing table until the table is dropped. Returns `Ok(false)` when the
/// config leaves it off.
pub fn start(
    cfg: &LocalReplicasConfig,
    dp: &Arc<Mutex<Dataplane>>,
    table: &RoutingTable,
) -> Result<bool> {
    let Some(cgroup) = &cfg.cgroup else { return Ok(false) };
    let prefixes = cfg.parsed_prefixes()?;
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| NodeError::io(format!("[local_replicas] cgroup {}", cgroup.display()), e))?;
    dp.lock().map_err(|_| NodeError::Poisoned)?.attach_local_redirect(&dir).map_err(|e| {
        NodeError::dataplane(
            format!("attaching the local-replica redirect to {}", cgroup.display()),
            e,
        )
    })?;
    info!(cgroup = %cgroup.display(), prefixes = ?cfg.prefixes, "local-replica redirect attached");
    let (dp, table) = (dp.clone(), table.clone());
    tokio::spawn(async move {
        let mut generations = table.subscribe_generation();
        let mut installed = BTreeSet::new();
        loop {
            let desired = local_addrs(&table.load(), &prefixes);
            if desired != installed {
                installed = sync(&dp, &installed, &desired);
            }
            if generations.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(true)
}

/// Applies the difference between `installed` and `desired` under one lock; returns
/// what is installed afterwards (a failed insert is retried on the next generation).
fn sync(
    dp: &Mutex<Dataplane>,
    installed: &BTreeSet<SocketAddr>,
    desired: &BTreeSet<SocketAddr>,
) -> BTreeSet<SocketAddr> {
    let Ok(mut dp) = dp.lock() else {
        warn!("data plane lock poisoned; local replicas left as they were");
        return installed.clone();
    };
    let mut now = installed.clone();
    for gone in installed.difference(desired) {
        match dp.remove_local_replica(*gone) {
            Ok(()) => {
                now.remove(gone);
            }
            Err(e) => warn!(replica = %gone, error = %e, "removing a local replica failed"),
        }
    }
    for new in desired.difference(installed) {
        match dp.add_local_replica(*new) {
            Ok(()) => {
                now.insert(*new);
            }
            Err(e) => warn!(replica = %new, error = %e, "adding a local replica failed"),
        }
    }
    debug!(local_replicas = now.len(), "local replicas synced");
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_v4_v6_and_mapped_addresses() {
        let p: Cidr = "198.18.7.0/24".parse().unwrap();
        assert!(p.contains("198.18.7.200".parse().unwrap()));
        assert!(p.contains("::ffff:198.18.7.1".parse().unwrap()));
        assert!(!p.contains("198.18.8.1".parse().unwrap()));
        assert!(!p.contains("2001:db8::1".parse().unwrap()));
        let v6: Cidr = "2001:db8:5::/48".parse().unwrap();
        assert!(v6.contains("2001:db8:5:1::2".parse().unwrap()));
        assert!(!v6.contains("2001:db8:6::2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn only_replicas_inside_the_prefixes_are_local() {
        let doc: sluice_routing::model::RoutingDoc = toml::from_str(
            r#"
[[servers]]
id = "a"
label = "a"
[[replicas]]
server = "a"
id = "near"
address = "127.0.0.1:9001"
[[replicas]]
server = "a"
id = "far"
address = "10.9.9.9:9001"
"#,
        )
        .unwrap();
        let node = sluice_routing::NodeConfig {
            base_domains: vec!["example.test".into()],
            regions: vec!["r1".into()],
        };
        let table = RoutingTable::from_doc(node, doc).unwrap();
        let prefixes = LocalReplicasConfig::default().parsed_prefixes().unwrap();
        let local = local_addrs(&table.load(), &prefixes);
        assert_eq!(local.into_iter().collect::<Vec<_>>(), vec!["127.0.0.1:9001".parse().unwrap()]);
    }
}
