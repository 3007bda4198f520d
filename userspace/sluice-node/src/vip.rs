//! Server virtual addresses kept in step with the routing snapshot.
//!
//! A server may have a VIP (`vip = "ip:port"` in its spec). The kernel's cgroup
//! connect4/connect6 programs rewrite connects to it, from processes in the `[vip]`
//! cgroup, into one of its replicas, read from a flat map. This module owns that map:
//! on every routing change it diffs the VIPs the snapshot wants (routable replicas
//! only) against what is installed and writes only the difference, in one pass; a
//! replica that leaves has its callers' connections closed (SOCK_DESTROY) so none stays
//! on it. For `least_loaded` it re-picks, every `rebalance_interval`, the replica with
//! the fewest in-flight requests, writing the map only when the choice changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sluice_dataplane::{Dataplane, Feature, MAX_VIP_BACKENDS, VipMode, VipReplica, live::VipView};
use sluice_proxy::Proxy;
use sluice_routing::{RoutingTable, Snapshot, VipBalance, validate::canonical_vip};
use tracing::{debug, info, warn};

/// `[vip]` in the `sluice run` config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VipConfig {
    /// The cgroup v2 directory whose processes' connects to a VIP are rewritten (and
    /// its descendants'). Relative paths are relative to the cgroup v2 mount; the
    /// default is the mount itself (usually `/sys/fs/cgroup`): every process on the node.
    pub cgroup: Option<PathBuf>,
    /// How often `least_loaded` VIPs re-pick their replica (and a failed map write is
    /// retried).
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub rebalance_interval: Duration,
}

impl Default for VipConfig {
    fn default() -> Self {
        VipConfig { cgroup: None, rebalance_interval: Duration::from_millis(100) }
    }
}

/// A replica behind a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Replica id.
    pub id: String,
    /// Where connects go.
    pub addr: SocketAddr,
}

/// One VIP as the kernel should hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipEntry {
    /// The server that owns the VIP.
    pub server: String,
    /// How a connect picks its replica.
    pub balance: VipBalance,
    /// Routable replicas, in the snapshot's order (by replica id).
    pub replicas: Vec<Member>,
}

/// VIP (canonical form) → what it should hold.
pub type VipTable = BTreeMap<SocketAddr, VipEntry>;

/// The VIPs a snapshot wants: every server with a `vip`, with its routable replicas.
/// Should two servers claim one VIP (validation prevents it), the lower id keeps it.
pub fn desired(snap: &Snapshot) -> VipTable {
    let mut servers: Vec<_> = snap.servers().filter(|s| s.spec.vip.is_some()).collect();
    servers.sort_by(|a, b| a.id().cmp(b.id()));
    let mut out = VipTable::new();
    for s in servers {
        let Some(vip) = s.spec.vip.map(canonical_vip) else { continue };
        if let Some(owner) = out.get(&vip) {
            warn!(%vip, server = s.id(), owner = %owner.server, "VIP claimed twice; ignored");
            continue;
        }
        let mut replicas: Vec<Member> =
            s.replicas.iter().map(|r| Member { id: r.id.clone(), addr: r.addr }).collect();
        if replicas.len() > MAX_VIP_BACKENDS as usize {
            warn!(%vip, server = s.id(), replicas = replicas.len(), "VIP keeps only the first {MAX_VIP_BACKENDS} replicas");
            replicas.truncate(MAX_VIP_BACKENDS as usize);
        }
        out.insert(
            vip,
            VipEntry { server: s.id().to_owned(), balance: s.spec.vip_balance, replicas },
        );
    }
    out
}

/// What one sync pass writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipPlan {
    /// VIPs to install or replace (new, or their replicas or mode changed).
    pub set: Vec<SocketAddr>,
    /// VIPs to remove.
    pub remove: Vec<SocketAddr>,
    /// Replica addresses that left a VIP and are behind none now: their callers'
    /// connections are closed once the map no longer sends new ones there.
    pub close: Vec<SocketAddr>,
}

/// The changes that turn `installed` into `desired`.
pub fn diff(installed: &VipTable, desired: &VipTable) -> VipPlan {
    let mut plan = VipPlan::default();
    for (vip, want) in desired {
        if installed.get(vip) != Some(want) {
            plan.set.push(*vip);
        }
    }
    let still: BTreeSet<SocketAddr> =
        desired.values().flat_map(|e| e.replicas.iter().map(|m| m.addr)).collect();
    let mut close = BTreeSet::new();
    for (vip, had) in installed {
        if !desired.contains_key(vip) {
            plan.remove.push(*vip);
        }
        // An address still behind some VIP keeps its connections: they are not stuck.
        close.extend(had.replicas.iter().map(|m| m.addr).filter(|a| !still.contains(a)));
    }
    plan.close = close.into_iter().collect();
    plan
}

/// The slot with the fewest in-flight requests; ties go to the lowest slot (replicas
/// are ordered by id, so the choice is deterministic). `None` when there are none.
pub fn least_loaded(loads: &[u64]) -> Option<usize> {
    loads.iter().enumerate().min_by_key(|&(i, l)| (*l, i)).map(|(i, _)| i)
}

/// One VIP in `GET /vips`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatus {
    /// The virtual address.
    pub vip: SocketAddr,
    /// The server it belongs to.
    pub server: String,
    /// `least_loaded` or `hrw`.
    pub balance: VipBalance,
    /// The replica new connects go to (`least_loaded`), if any.
    pub selected: Option<String>,
    /// Its replicas, in map slot order.
    pub replicas: Vec<Member>,
}

/// What is installed now, shared with the admin route.
type Shown = Arc<Mutex<Vec<VipStatus>>>;

/// The sync task's state: what the kernel map holds.
struct VipSync {
    dp: Arc<Mutex<Dataplane>>,
    cgroup: Option<PathBuf>,
    attached: bool,
    /// Attaching failed (said once): no VIPs for this run.
    attach_failed: bool,
    installed: VipTable,
    /// Selected slot per installed `least_loaded` VIP.
    selected: BTreeMap<SocketAddr, usize>,
    /// A write failed: re-diff on the next tick even if the snapshot is the same.
    retry: bool,
    shown: Shown,
}

impl VipSync {
    /// Brings the kernel map in line with `snap`: one pass, only the differences.
    fn reconcile(&mut self, snap: &Snapshot) {
        let want = desired(snap);
        if want.is_empty() && self.installed.is_empty() {
            return;
        }
        if !self.attached && (self.attach_failed || !self.attach()) {
            return;
        }
        let plan = diff(&self.installed, &want);
        let Ok(mut dp) = self.dp.lock() else {
            warn!("data plane lock poisoned; VIPs are no longer synced");
            return;
        };
        let mut failed = false;
        for vip in &plan.set {
            let Some(entry) = want.get(vip) else { continue };
            let (mode, slot) = match entry.balance {
                VipBalance::Hrw => (VipMode::Hrw, 0),
                VipBalance::LeastLoaded => (VipMode::Selected, loaded_slot(snap, entry)),
            };
            let replicas: Vec<VipReplica> = entry
                .replicas
                .iter()
                .map(|m| VipReplica { addr: m.addr, id: m.id.clone() })
                .collect();
            match dp.set_vip(*vip, &replicas, mode, slot) {
                Ok(()) => {
                    debug!(%vip, server = %entry.server, replicas = replicas.len(), "VIP set");
                    self.installed.insert(*vip, entry.clone());
                    self.selected.insert(*vip, slot);
                }
                Err(e) => {
                    warn!(%vip, server = %entry.server, error = %e, "VIP not written; retrying");
                    // Unknown state: forget it, so the next pass writes it whole.
                    self.installed.remove(vip);
                    failed = true;
                }
            }
        }
        for vip in &plan.remove {
            match dp.remove_vip(*vip) {
                Ok(()) => {
                    debug!(%vip, "VIP removed");
                    self.installed.remove(vip);
                    self.selected.remove(vip);
                }
                Err(e) => {
                    warn!(%vip, error = %e, "VIP not removed; retrying");
                    failed = true;
                }
            }
        }
        drop(dp);
        // After the map stops sending new connects there, so a caller that reconnects
        // lands on a live replica; without the lock (the socket walk takes a while).
        for addr in &plan.close {
            match Dataplane::close_client_connections_to(*addr) {
                Ok(n) => {
                    info!(replica = %addr, closed = n, "replica left its VIP; connections closed")
                }
                Err(e) => {
                    warn!(replica = %addr, error = %e, "closing connections to a replica that left failed")
                }
            }
        }
        self.retry = failed;
        self.publish();
    }

    /// Re-picks the least-loaded replica of each such VIP; writes only changes.
    fn rebalance(&mut self, snap: &Snapshot) {
        let mut changed = false;
        for (vip, entry) in &self.installed {
            if entry.balance != VipBalance::LeastLoaded || entry.replicas.len() < 2 {
                continue;
            }
            let slot = loaded_slot(snap, entry);
            if self.selected.get(vip) == Some(&slot) {
                continue;
            }
            let Ok(mut dp) = self.dp.lock() else { return };
            match dp.select_vip(*vip, slot) {
                Ok(()) => {
                    debug!(%vip, replica = %entry.replicas[slot].id, "VIP selection moved");
                    self.selected.insert(*vip, slot);
                    changed = true;
                }
                Err(e) => warn!(%vip, error = %e, "VIP selection not written"),
            }
        }
        if changed {
            self.publish();
        }
    }

    fn attach(&mut self) -> bool {
        self.attach_failed = true;
        let cgroup = match (sluice_dataplane::sys::cgroup2_mount(), &self.cgroup) {
            (_, Some(p)) if p.is_absolute() => p.clone(),
            (Ok(mount), Some(p)) => mount.join(p),
            (Ok(mount), None) => mount,
            (Err(e), _) => {
                warn!(error = %e, "no cgroup v2 to attach the VIP programs to; no VIPs");
                return false;
            }
        };
        let attached = std::fs::File::open(&cgroup).map_err(|e| e.to_string()).and_then(|dir| {
            match self.dp.lock() {
                Ok(mut dp) => dp.attach_vip(&dir).map_err(|e| e.to_string()),
                Err(_) => Err("data plane lock poisoned".into()),
            }
        });
        match attached {
            Ok(()) => {
                info!(cgroup = %cgroup.display(), "VIP connect programs attached");
                self.attached = true;
                self.attach_failed = false;
                true
            }
            Err(e) => {
                warn!(cgroup = %cgroup.display(), error = %e, "VIP connect programs not attached; no VIPs");
                false
            }
        }
    }

    fn publish(&self) {
        let view = self
            .installed
            .iter()
            .map(|(vip, e)| VipStatus {
                vip: *vip,
                server: e.server.clone(),
                balance: e.balance,
                selected: match e.balance {
                    VipBalance::LeastLoaded => self
                        .selected
                        .get(vip)
                        .and_then(|&i| e.replicas.get(i))
                        .map(|m| m.id.clone()),
                    VipBalance::Hrw => None,
                },
                replicas: e.replicas.clone(),
            })
            .collect();
        if let Ok(mut shown) = self.shown.lock() {
            *shown = view;
        }
    }
}

/// The least-loaded slot of `entry`, from the snapshot's live replica counters.
fn loaded_slot(snap: &Snapshot, entry: &VipEntry) -> usize {
    let Some(server) = snap.server(&entry.server) else { return 0 };
    let loads: Vec<u64> = entry
        .replicas
        .iter()
        .map(|m| {
            server
                .replicas
                .iter()
                .find(|r| r.id == m.id)
                .map(|r| r.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(u64::MAX)
        })
        .collect();
    least_loaded(&loads).unwrap_or(0)
}

/// Starts the VIP sync when the data plane is loaded and the kernel has cgroup connect
/// programs (else says once why there are no VIPs), and serves `GET /vips` on the admin
/// listener. Call inside the runtime.
pub fn start(
    kernel: &crate::kernel::Kernel,
    table: &RoutingTable,
    cfg: VipConfig,
    server: &mut Proxy,
) {
    let shown: Shown = Arc::default();
    let s = shown.clone();
    server.admin_route(
        "/vips",
        sluice_proxy::admin::endpoint(
            sluice_proxy::admin::READ_ONLY,
            "server virtual addresses in the kernel, JSON",
            move |_req| {
                let body = s
                    .lock()
                    .map(|v| serde_json::to_string_pretty(&*v).unwrap_or_default())
                    .unwrap_or_default();
                async move { sluice_proxy::admin::json(http::StatusCode::OK, format!("{body}\n")) }
            },
        ),
    );
    let dp = match &kernel.dataplane {
        Some(dp) if kernel.report.has(Feature::CgroupSockAddr) => dp.clone(),
        _ => {
            // VIPs need the kernel. Say so once, when a server first asks for one.
            let table = table.clone();
            tokio::spawn(async move {
                let mut generations = table.subscribe_generation();
                loop {
                    if table.load().servers().any(|s| s.spec.vip.is_some()) {
                        warn!(
                            "kernel cgroup connect programs unavailable: server VIPs are not served"
                        );
                        return;
                    }
                    if generations.changed().await.is_err() {
                        return;
                    }
                }
            });
            return;
        }
    };
    let table = table.clone();
    let mut sync = VipSync {
        dp,
        cgroup: cfg.cgroup,
        attached: false,
        attach_failed: false,
        installed: VipTable::new(),
        selected: BTreeMap::new(),
        retry: false,
        shown,
    };
    let interval = cfg.rebalance_interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut generations = table.subscribe_generation();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            tokio::select! {
                r = generations.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let snap = table.load_full();
            // Health verdicts publish snapshots without a new generation: the pointer
            // says whether anything changed.
            let fresh = !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &snap));
            // Map writes and the sock_diag walk are syscalls: off the async workers.
            let done = tokio::task::spawn_blocking({
                let snap = snap.clone();
                move || {
                    if fresh || sync.retry {
                        sync.reconcile(&snap);
                    }
                    sync.rebalance(&snap);
                    sync
                }
            })
            .await;
            match done {
                Ok(s) => sync = s,
                Err(e) => {
                    warn!(error = %e, "VIP sync stopped");
                    return;
                }
            }
            last = Some(snap);
        }
    });
}

/// Names the owning server of each VIP from a running sluice's `GET /vips` (for
/// `sluice bpf status`). Leaves them unnamed when the admin listener does not answer:
/// the kernel maps alone do not know server ids.
pub fn name_servers(vips: &mut [VipView], admin: SocketAddr) {
    if vips.is_empty() {
        return;
    }
    let Some(status) = fetch_vips(admin) else { return };
    let owners: BTreeMap<SocketAddr, String> =
        status.into_iter().map(|s| (s.vip, s.server)).collect();
    for v in vips {
        v.server = owners.get(&canonical_vip(v.vip)).cloned();
    }
}

fn fetch_vips(admin: SocketAddr) -> Option<Vec<VipStatus>> {
    let timeout = Duration::from_millis(500);
    let mut s = TcpStream::connect_timeout(&admin, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /vips HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.take(4 << 20).read_to_end(&mut out).ok()?;
    let text = String::from_utf8(out).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(server: &str, replicas: &[(&str, u16)]) -> VipEntry {
        VipEntry {
            server: server.into(),
            balance: VipBalance::LeastLoaded,
            replicas: replicas
                .iter()
                .map(|(id, port)| Member { id: (*id).into(), addr: ([127, 0, 0, 1], *port).into() })
                .collect(),
        }
    }

    fn vip(n: u8) -> SocketAddr {
        ([198, 19, 255, n], 80).into()
    }

    fn addr(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    #[test]
    fn diff_writes_only_changes_and_closes_replicas_that_left() {
        let installed: VipTable = [
            (vip(1), entry("a", &[("r1", 1), ("r2", 2)])),
            (vip(2), entry("b", &[("x", 10)])),
            (vip(3), entry("c", &[("y", 20), ("z", 21)])),
        ]
        .into();
        let mut desired = installed.clone();
        // Unchanged VIP 2: nothing written.
        // VIP 1 loses r1; VIP 3 goes away, but z moved to VIP 4 (its address stays).
        desired.insert(vip(1), entry("a", &[("r2", 2)]));
        desired.remove(&vip(3));
        desired.insert(vip(4), entry("d", &[("z", 21)]));
        let plan = diff(&installed, &desired);
        assert_eq!(plan.set, [vip(1), vip(4)]);
        assert_eq!(plan.remove, [vip(3)]);
        assert_eq!(plan.close, [addr(1), addr(20)]);
        // A converged table plans nothing.
        assert_eq!(diff(&desired, &desired), VipPlan::default());
        // A mode change rewrites the VIP but closes nothing.
        let mut hrw = desired.clone();
        hrw.get_mut(&vip(2)).unwrap().balance = VipBalance::Hrw;
        assert_eq!(diff(&desired, &hrw), VipPlan { set: vec![vip(2)], ..VipPlan::default() });
    }

    #[test]
    fn least_loaded_prefers_fewest_in_flight_then_lowest_slot() {
        assert_eq!(least_loaded(&[]), None);
        assert_eq!(least_loaded(&[0, 0, 0]), Some(0));
        assert_eq!(least_loaded(&[3, 1, 1]), Some(1));
        assert_eq!(least_loaded(&[5, 4, u64::MAX]), Some(1));
    }

    #[test]
    fn desired_takes_routable_replicas_of_servers_with_a_vip() {
        let doc: sluice_routing::RoutingDoc = toml::from_str(
            r#"
            [[servers]]
            id = "a"
            label = "a"
            vip = "[::ffff:198.19.255.1]:80"
            vip_balance = "hrw"
            [[servers]]
            id = "b"
            label = "b"
            [[replicas]]
            server = "a"
            id = "r2"
            address = "127.0.0.1:2"
            [[replicas]]
            server = "a"
            id = "r1"
            address = "127.0.0.1:1"
            [[replicas]]
            server = "a"
            id = "r3"
            address = "127.0.0.1:3"
            state = "draining"
            "#,
        )
        .unwrap();
        let table = RoutingTable::from_doc(Default::default(), doc).unwrap();
        let want = desired(&table.load());
        let mut expected = entry("a", &[("r1", 1), ("r2", 2)]);
        expected.balance = VipBalance::Hrw;
        assert_eq!(want, [(vip(1), expected)].into());
    }

    #[test]
    fn config_defaults_and_parses() {
        let c: VipConfig = toml::from_str("").unwrap();
        assert_eq!(c.cgroup, None);
        assert_eq!(c.rebalance_interval, Duration::from_millis(100));
        let c: VipConfig =
            toml::from_str("cgroup = \"/sys/fs/cgroup/t\"\nrebalance_interval = \"250ms\"")
                .unwrap();
        assert_eq!(c.rebalance_interval, Duration::from_millis(250));
        assert_eq!(c.cgroup.as_deref(), Some(std::path::Path::new("/sys/fs/cgroup/t")));
        assert!(toml::from_str::<VipConfig>("cgrup = \"/\"").is_err());
    }
}
