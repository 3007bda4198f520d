//! The shared handle to the current snapshot: lock-free reads for the request path, a
//! single serialized writer for sources and the health checker.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::cert::ServedCert;
use crate::change::{ApplyError, ApplyErrorKind, Builder, Change, ReplicaEvent};
use crate::model::{NodeConfig, ReplicaSpec, ReplicaState, RoutingDoc};
use crate::snapshot::{Health, Snapshot};
use crate::validate::{self, FieldError, ValidationError};

/// Shared handle to the current routing snapshot (cheap `Clone`; `arc-swap` inside).
///
/// Readers call [`load`](Self::load) and never block. Writers (`apply`, `replace`, health
/// updates) are serialized by a mutex the request path never touches.
#[derive(Clone)]
pub struct RoutingTable {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Snapshot>,
    writer: Mutex<Writer>,
    generation_tx: watch::Sender<u64>,
    /// Bumped on every published snapshot (health changes too), for the few background
    /// tasks that act on a change (drain deadlines, cold-start holds) without polling.
    published_tx: watch::Sender<u64>,
}

#[derive(Default)]
struct Writer {
    /// The health checker's feed of replica changes, when one runs.
    replica_events: Option<mpsc::UnboundedSender<ReplicaEvent>>,
    /// Replicas awaiting their first health check (health gate on), ordered by the
    /// generation that introduced them: the fence may not pass that generation before the
    /// check has answered.
    pending: BTreeSet<(u64, String, String)>,
    pending_gen: HashMap<(String, String), u64>,
    /// Last value sent on the fence channel (never decreases).
    fence: u64,
}

impl Writer {
    fn unpend(&mut self, server: &str, id: &str) {
        if let Some(g) = self.pending_gen.remove(&(server.to_owned(), id.to_owned())) {
            self.pending.remove(&(g, server.to_owned(), id.to_owned()));
        }
    }

    fn pend(&mut self, generation: u64, server: &str, id: &str) {
        self.unpend(server, id);
        self.pending_gen.insert((server.to_owned(), id.to_owned()), generation);
        self.pending.insert((generation, server.to_owned(), id.to_owned()));
    }
}

impl std::fmt::Debug for RoutingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.load();
        f.debug_struct("RoutingTable")
            .field("generation", &snap.generation())
            .field("servers", &snap.server_count())
            .finish()
    }
}

impl RoutingTable {
    /// An empty table (generation 0) for this node. Base domains and regions are lowercased.
    pub fn new(node: NodeConfig) -> Self {
        let node = NodeConfig {
            base_domains: node
                .base_domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            regions: node.regions.iter().map(|r| r.to_ascii_lowercase()).collect(),
        };
        let (generation_tx, _) = watch::channel(0);
        RoutingTable {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(Snapshot::empty(Arc::new(node))),
                writer: Mutex::new(Writer::default()),
                generation_tx,
                published_tx: watch::Sender::new(0),
            }),
        }
    }

    /// A table holding `doc` at generation 1, trusting the document's replica states (no
    /// health gate): for tests and for callers that run no health checker.
    pub fn from_doc(node: NodeConfig, doc: RoutingDoc) -> Result<Self, ValidationError> {
        let table = RoutingTable::new(node);
        table.replace(doc, 1)?;
        Ok(table)
    }

    /// The current snapshot, lock-free: for the request path. Hold it only briefly (it pins
    /// the snapshot); clone what outlives the request (`Arc<Server>`, `Arc<Replica>`).
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.current.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// The generation (store revision) of the current snapshot.
    pub fn generation(&self) -> u64 {
        self.load().generation()
    }

    /// The node configuration.
    pub fn node(&self) -> NodeConfig {
        self.load().node().clone()
    }

    /// The generation fence: the highest generation whose changes are fully routable. It
    /// equals [`generation`](Self::generation) except while a health checker with
    /// `require_initial_check` is still making the first check of a replica introduced at
    /// or before it; then it stays just below that generation until the check answers
    /// (either way), so a scheduler that waits for it knows the proxy has looked.
    pub fn fence_generation(&self) -> u64 {
        *self.inner.generation_tx.borrow()
    }

    /// Resolves `true` once [`fence_generation`](Self::fence_generation) is
    /// `>= generation`, or `false` after `timeout` (the admin API's generation fence).
    pub async fn wait_for_generation(&self, generation: u64, timeout: Duration) -> bool {
        let mut rx = self.inner.generation_tx.subscribe();
        let wait = rx.wait_for(|g| *g >= generation);
        // The sender lives in `self`, so `wait_for` can only end with a match.
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(_)))
    }

    /// A receiver of [`fence_generation`](Self::fence_generation) updates (for metrics,
    /// staleness, fences).
    pub fn subscribe_generation(&self) -> watch::Receiver<u64> {
        self.inner.generation_tx.subscribe()
    }

    /// A receiver that changes whenever a new snapshot is published (any change: store,
    /// health): the value is a count of publications, only its changes mean anything.
    pub fn subscribe_snapshots(&self) -> watch::Receiver<u64> {
        self.inner.published_tx.subscribe()
    }

    /// Apply a batch of changes in order and publish one new snapshot at `generation`.
    /// Invalid changes are skipped and reported; valid ones apply. A generation lower than
    /// the current one is ignored (the published generation never goes backwards).
    pub fn apply(&self, changes: Vec<Change>, generation: u64) -> Result<(), Vec<ApplyError>> {
        let mut w = self.writer();
        let current = self.inner.current.load_full();
        let mut b = Builder::new(&current);
        let mut errors = Vec::new();
        for (index, change) in changes.into_iter().enumerate() {
            let what = change.describe();
            let object = change.object();
            if let Err(reason) = b.apply(change) {
                errors.push(ApplyError { index, what, object, reason });
            }
        }
        self.publish(&mut w, &current, b, generation);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Replace the whole state with `doc` (validated as a whole: on error nothing changes)
    /// and publish it at `generation`. Objects equal to the current ones are kept as they
    /// are (same `Arc`s, same health, same counters); counters survive for every server and
    /// replica that remains.
    pub fn replace(&self, doc: RoutingDoc, generation: u64) -> Result<(), ValidationError> {
        let mut w = self.writer();
        let current = self.inner.current.load_full();
        validate::validate_doc(current.node(), &doc)?;
        let mut b = Builder::trusted(&current);
        let problems = sync_into(&mut b, &current, doc);
        // What `validate_doc` cannot see: a certificate that does not parse, match its key
        // or cover its domains. The builder is dropped unpublished, so nothing changes.
        if !problems.is_empty() {
            let errors = problems
                .into_iter()
                .flat_map(|p| match p.reason {
                    ApplyErrorKind::Invalid(v) => v.errors,
                    other => vec![FieldError::new(p.object, "custom_domains", other.to_string())],
                })
                .collect();
            return Err(ValidationError { errors });
        }
        self.publish(&mut w, &current, b, generation);
        Ok(())
    }

    /// Re-reads every file-referenced certificate whose files changed since they were
    /// read, and publishes the result at the same generation (routes do not change).
    /// A file that fails to load keeps the last good certificate serving, and is tried
    /// again when it changes again. Returns how many certificates were re-read.
    pub fn refresh_certificate_files(&self) -> usize {
        // Looked at without the writer lock first: usually nothing changed.
        let snap = self.load_full();
        let changed: Vec<(Arc<str>, usize)> = snap
            .servers
            .iter()
            .flat_map(|(id, e)| {
                e.certs
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.files_changed())
                    .map(move |(i, _)| (id.clone(), i))
            })
            .collect();
        if changed.is_empty() {
            return 0;
        }
        let mut w = self.writer();
        let current = self.inner.current.load_full();
        let mut b = Builder::new(&current);
        let mut reread = 0;
        for (id, index) in changed {
            let Some(old) = current.servers.get(&id).and_then(|e| e.certs.get(index)).cloned()
            else {
                continue;
            };
            if !old.files_changed() {
                continue;
            }
            let Ok(new) =
                ServedCert::load(old.server.clone(), &old.spec, Some(&old), &current.cert_counters)
            else {
                continue;
            };
            if new.error.is_none()
                && let Some(l) = &new.loaded
            {
                tracing::info!(
                    server = %id,
                    domains = ?new.spec.domains,
                    serial = %l.summary.serial,
                    not_after = %crate::cert::rfc3339(l.summary.not_after),
                    "certificate re-read from its files"
                );
            }
            b.replace_cert(&id, index, new);
            reread += 1;
        }
        let generation = current.generation();
        self.publish(&mut w, &current, b, generation);
        reread
    }

    /// Make the state equal to `doc` object by object, and publish at `generation`: like
    /// [`replace`](Self::replace), but an invalid object (or one whose domain another
    /// server holds) is skipped and reported while everything else applies. As with
    /// [`apply`](Self::apply), a skipped object keeps its last good version, if any. For a
    /// store re-list, where one malformed key must not block the rest.
    pub fn sync(&self, doc: RoutingDoc, generation: u64) -> Result<(), Vec<ApplyError>> {
        let mut w = self.writer();
        let current = self.inner.current.load_full();
        let mut b = Builder::new(&current);
        let problems = sync_into(&mut b, &current, doc);
        self.publish(&mut w, &current, b, generation);
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Record a health-check verdict for a replica and publish if it changed routability.
    /// The generation stays the same (health is not a store revision). Returns whether
    /// anything changed.
    pub fn set_replica_health(&self, server: &str, id: &str, healthy: bool) -> bool {
        let h = if healthy { Health::Healthy } else { Health::Unhealthy };
        self.report_health(server, id, Some(h), None)
    }

    /// Require (or stop requiring) a passing health check before a `ready` replica is
    /// routable. Turned on by the health checker (`sluice_node::health`) when its policy
    /// says so.
    pub fn set_health_gate(&self, on: bool) {
        let mut w = self.writer();
        let current = self.inner.current.load_full();
        if current.health_gated() == on {
            return;
        }
        if !on {
            w.pending.clear();
            w.pending_gen.clear();
        }
        let mut b = Builder::new(&current);
        b.set_health_gate(on);
        let generation = current.generation();
        self.publish(&mut w, &current, b, generation);
    }

    /// Attach a health checker's feed. Returns the replicas (every state) it must start
    /// from: every later replica change is sent on `tx`, with no gap, because both happen
    /// under the writer lock. One feed at a time: attaching replaces the previous one.
    pub fn attach_replica_events(
        &self,
        tx: mpsc::UnboundedSender<ReplicaEvent>,
    ) -> Vec<Arc<ReplicaSpec>> {
        let mut w = self.writer();
        w.replica_events = Some(tx);
        let snap = self.inner.current.load_full();
        if snap.health_gated() {
            for r in snap.all_replicas() {
                if r.spec.state == ReplicaState::Ready && r.health == Health::Unknown {
                    w.pend(snap.generation(), &r.spec.server, &r.spec.id);
                }
            }
        }
        snap.all_replicas().map(|r| r.spec.clone()).collect()
    }

    /// Stop feeding the health checker whose feed is `feed` (if it is still the attached
    /// one) and forget pending first checks. Returns whether it was attached.
    pub fn detach_replica_events(&self, feed: &mpsc::UnboundedSender<ReplicaEvent>) -> bool {
        let mut w = self.writer();
        if !w.replica_events.as_ref().is_some_and(|tx| tx.same_channel(feed)) {
            return false;
        }
        w.replica_events = None;
        w.pending.clear();
        w.pending_gen.clear();
        let generation = self.inner.current.load().generation();
        self.update_fence(&mut w, generation);
        true
    }

    /// A health checker's verdict: `Some` to change the replica's health, `None` for a
    /// first check that failed but has not reached the failure threshold. Either way the
    /// replica's first check is done as far as the fence is concerned. Returns whether the
    /// replica's health changed. With `addr`, the verdict applies only if the replica still
    /// has that address (a check of an old address may finish after the replica moved).
    pub fn report_health(
        &self,
        server: &str,
        id: &str,
        health: Option<Health>,
        addr: Option<SocketAddr>,
    ) -> bool {
        let mut w = self.writer();
        let current = self.inner.current.load_full();
        let entry = current.replicas.get(server).and_then(|m| m.get(id));
        if let Some(addr) = addr
            && entry.is_none_or(|e| e.spec.address != addr)
        {
            return false;
        }
        w.unpend(server, id);
        let generation = current.generation();
        if let Some(h) = health {
            let mut b = Builder::new(&current);
            if b.set_health(server, id, h) {
                self.publish(&mut w, &current, b, generation);
                return true;
            }
        }
        self.update_fence(&mut w, generation);
        false
    }

    fn update_fence(&self, w: &mut Writer, generation: u64) {
        let fence = match w.pending.first() {
            Some((g, _, _)) => generation.min(g.saturating_sub(1)),
            None => generation,
        };
        if fence > w.fence {
            w.fence = fence;
            self.inner.generation_tx.send_replace(fence);
        }
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic in a previous writer leaves the published snapshot intact (it is only
        // swapped at the end), so a poisoned lock is safe to keep using.
        self.inner.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, w: &mut Writer, current: &Snapshot, b: Builder, generation: u64) {
        let generation = if generation < current.generation() {
            tracing::warn!(
                generation,
                current = current.generation(),
                "routing: generation went backwards; keeping the current one"
            );
            current.generation()
        } else {
            generation
        };
        if w.replica_events.as_ref().is_some_and(|tx| tx.is_closed()) {
            // The checker is gone without detaching (its task panicked or was aborted):
            // stop feeding it and holding the fence for it.
            w.replica_events = None;
            w.pending.clear();
            w.pending_gen.clear();
        }
        let (snap, events) = b.finish(generation);
        let snap = Arc::new(snap);
        self.inner.current.store(snap.clone());
        self.inner.published_tx.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(tx) = w.replica_events.clone() {
            for e in events {
                w.unpend(&e.server, &e.id);
                let unchecked = snap
                    .replicas
                    .get(&e.server)
                    .and_then(|m| m.get(&e.id))
                    .is_some_and(|r| r.health == Health::Unknown);
                if snap.health_gated()
                    && unchecked
                    && e.spec.as_ref().is_some_and(|s| s.state == ReplicaState::Ready)
                {
                    w.pend(generation, &e.server, &e.id);
                }
                if tx.send(e).is_err() {
                    // The checker stopped; stop feeding it and holding the fence.
                    w.replica_events = None;
                    w.pending.clear();
                    w.pending_gen.clear();
                    break;
                }
            }
        }
        self.update_fence(w, generation);
    }
}

/// Turn the builder's state into `doc`'s: delete what is gone, put what changed. Changed
/// servers release their domains first, so a domain may move between servers in one go.
fn sync_into(b: &mut Builder, current: &Snapshot, doc: RoutingDoc) -> Vec<ApplyError> {
    let new_servers: HashSet<&str> = doc.servers.iter().map(|s| s.id.as_str()).collect();
    let gone: Vec<Arc<str>> =
        current.servers.keys().filter(|id| !new_servers.contains(&***id)).cloned().collect();
    for id in &gone {
        b.delete_server(id);
    }
    let new_replicas: HashSet<(&str, &str)> =
        doc.replicas.iter().map(|r| (r.server.as_str(), r.id.as_str())).collect();
    let gone: Vec<(String, String)> = current
        .all_replicas()
        .filter(|r| !new_replicas.contains(&(r.spec.server.as_str(), r.spec.id.as_str())))
        .map(|r| (r.spec.server.clone(), r.spec.id.clone()))
        .collect();
    for (server, id) in &gone {
        b.delete_replica(server, id);
    }
    let new_tokens: HashSet<&str> = doc.tokens.iter().map(|t| t.id.as_str()).collect();
    let gone: Vec<Arc<str>> =
        current.tokens.keys().filter(|id| !new_tokens.contains(&***id)).cloned().collect();
    for id in &gone {
        b.delete_token(id);
    }

    let changed: Vec<_> = doc
        .servers
        .into_iter()
        .filter(|s| current.server(&s.id).is_none_or(|old| *old.spec != *s))
        .collect();
    for s in &changed {
        b.unlink_domains(&s.id);
    }
    let mut problems = Vec::new();
    let mut index = 0;
    let mut attempt = |b: &mut Builder, change: Change| {
        let what = change.describe();
        let object = change.object();
        let server_id = match &change {
            Change::PutServer(s) => Some(s.id.clone()),
            _ => None,
        };
        if let Err(reason) = b.apply(change) {
            problems.push(ApplyError { index, what, object, reason });
            // As with `apply`, a rejected object keeps its last good version; a server gets
            // back the domains it released above (unless another server took them).
            if let Some(id) = server_id {
                b.relink_domains(&id);
            }
        }
        index += 1;
    };
    for s in changed {
        attempt(b, Change::PutServer(s));
    }
    for r in doc.replicas {
        attempt(b, Change::PutReplica(r));
    }
    for t in doc.tokens {
        if current.token(&t.id) != Some(&t) {
            attempt(b, Change::PutToken(t));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::model::{ServerSpec, TokenSpec};
    use crate::snapshot::Server;

    fn node() -> NodeConfig {
        NodeConfig {
            base_domains: vec!["Run.Example.com".into(), "x.dev".into()],
            regions: vec!["r1".into(), "r2".into()],
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn doc() -> RoutingDoc {
        let mut a = ServerSpec::new("a", "hello");
        a.regions = vec!["r1".into(), "r9".into()];
        a.custom_domains = vec!["API.Example.org".into()];
        let b = ServerSpec::new("b", "world");
        let mut draining = ReplicaSpec::new("a", "a3", addr(3));
        draining.state = ReplicaState::Draining;
        let mut starting = ReplicaSpec::new("a", "a4", addr(4));
        starting.state = ReplicaState::Starting;
        RoutingDoc {
            servers: vec![a, b],
            replicas: vec![
                ReplicaSpec::new("a", "a2", addr(2)),
                ReplicaSpec::new("a", "a1", addr(1)),
                draining,
                starting,
            ],
            tokens: vec![TokenSpec {
                id: "t1".into(),
                secret_hash: crate::hash_secret("s"),
                environments: vec!["default".into()],
            }],
        }
    }

    fn ids(s: &Server) -> Vec<&str> {
        s.replicas.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn a_vip_taken_by_another_server_is_rejected_per_change() {
        let table = RoutingTable::from_doc(node(), doc()).unwrap();
        let mut a = ServerSpec::new("a", "hello");
        a.vip = Some("198.19.255.1:80".parse().unwrap());
        table.apply(vec![Change::PutServer(a.clone())], 2).unwrap();
        let mut b = ServerSpec::new("b", "world");
        b.vip = a.vip;
        let errs = table.apply(vec![Change::PutServer(b)], 3).unwrap_err();
        assert!(errs[0].reason.to_string().contains("also the VIP of server \"a\""), "{errs:?}");
        assert_eq!(table.load().server("b").unwrap().spec.vip, None);
        // The owner itself may be re-put with its VIP.
        table.apply(vec![Change::PutServer(a)], 4).unwrap();
    }

    #[test]
    fn from_doc_lookups() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        assert_eq!(t.generation(), 1);
        let snap = t.load();
        let a = snap.lookup("hello.r1.run.example.com").unwrap();
        assert_eq!(a.id(), "a");
        assert_eq!(ids(a), ["a1", "a2"], "only ready replicas, ordered by id");
        assert!(snap.lookup("hello.r1.x.dev").is_some());
        assert!(snap.lookup("hello.r2.run.example.com").is_none(), "a is not in r2");
        assert_eq!(snap.lookup("api.example.org").unwrap().id(), "a");
        assert_eq!(snap.lookup("world.r2.x.dev").unwrap().id(), "b");
        assert!(snap.lookup("world.r3.x.dev").is_none());
        assert_eq!(snap.domain_count(), 2 + 1 + 4);
        assert!(snap.server("b").unwrap().replicas.is_empty());
        assert!(snap.token("t1").unwrap().verify("s"));
        assert!(snap.token("nope").is_none());
    }

    #[test]
    fn apply_incremental_and_stats_survive() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        let a1 = t.load().server("a").unwrap().replicas[0].clone();
        let guard = t.load().server("a").unwrap().begin_request(&a1);
        let mut renamed = ServerSpec::new("a", "hola");
        renamed.regions = vec!["r2".into()];
        t.apply(
            vec![
                Change::PutServer(renamed),
                Change::PutReplica(ReplicaSpec::new("a", "a5", addr(5))),
                Change::DeleteReplica { server: "a".into(), id: "a2".into() },
                Change::DeleteToken("t1".into()),
            ],
            7,
        )
        .unwrap();
        let snap = t.load_full();
        assert_eq!(snap.generation(), 7);
        assert!(snap.lookup("hello.r1.run.example.com").is_none());
        assert!(snap.lookup("api.example.org").is_none());
        let a = snap.lookup("hola.r2.run.example.com").unwrap();
        assert_eq!(ids(a), ["a1", "a5"]);
        assert!(Arc::ptr_eq(&a.replicas[0].stats, &a1.stats));
        assert_eq!(a.replicas[0].stats.in_flight.load(Ordering::Relaxed), 1);
        assert_eq!(a.stats.in_flight.load(Ordering::Relaxed), 1);
        drop(guard);
        assert_eq!(a.stats.in_flight.load(Ordering::Relaxed), 0);
        assert!(snap.token("t1").is_none());
    }

    #[test]
    fn invalid_changes_rejected_individually() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        let mut thief = ServerSpec::new("c", "thief");
        thief.custom_domains = vec!["api.example.org".into()];
        let errs = t
            .apply(
                vec![
                    Change::PutServer(ServerSpec::new("bad", "Bad!")),
                    Change::PutServer(thief),
                    Change::PutServer(ServerSpec::new("d", "fine")),
                ],
                2,
            )
            .unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].index, 0);
        assert!(errs[0].to_string().contains(r#"server "bad": label"#), "{}", errs[0]);
        assert_eq!(
            errs[1].to_string(),
            r#"change #1 (put server "c"): domain "api.example.org" is already claimed by server "a""#
        );
        let snap = t.load();
        assert_eq!(snap.generation(), 2);
        assert!(snap.server("d").is_some());
        assert!(snap.server("c").is_none());
    }

    #[test]
    fn orphan_replicas_wait_for_their_server() {
        let t = RoutingTable::new(node());
        t.apply(vec![Change::PutReplica(ReplicaSpec::new("z", "z1", addr(9)))], 1).unwrap();
        assert!(t.load().server("z").is_none());
        assert_eq!(t.load().state_view().orphan_replicas.len(), 1);
        t.apply(vec![Change::PutServer(ServerSpec::new("z", "zed"))], 2).unwrap();
        assert_eq!(ids(t.load().lookup("zed.r1.x.dev").unwrap()), ["z1"]);
        // Deleting the server leaves the replica held; re-creating routes it again.
        t.apply(vec![Change::DeleteServer("z".into())], 3).unwrap();
        assert!(t.load().lookup("zed.r1.x.dev").is_none());
        t.apply(vec![Change::PutServer(ServerSpec::new("z", "zed"))], 4).unwrap();
        assert_eq!(ids(t.load().lookup("zed.r1.x.dev").unwrap()), ["z1"]);
    }

    #[test]
    fn replace_moves_domains_and_keeps_identity() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        let before = t.load_full();
        let mut d = doc();
        // Move the custom domain from a to b, in one document.
        d.servers[0].custom_domains.clear();
        d.servers[1].custom_domains = vec!["api.example.org".into()];
        t.replace(d, 2).unwrap();
        let after = t.load_full();
        assert_eq!(after.lookup("api.example.org").unwrap().id(), "b");
        // Unchanged replicas keep their Arc (and counters).
        let r_before = &before.server("a").unwrap().replicas[0];
        let r_after = &after.server("a").unwrap().replicas[0];
        assert!(Arc::ptr_eq(r_before, r_after));
        // Invalid document: nothing changes.
        let mut bad = doc();
        bad.replicas.push(ReplicaSpec::new("ghost", "g", addr(1)));
        let err = t.replace(bad, 3).unwrap_err();
        assert!(err.to_string().contains("unknown server"), "{err}");
        assert_eq!(t.generation(), 2);
        // Emptying the document removes everything.
        t.replace(RoutingDoc::default(), 4).unwrap();
        let snap = t.load();
        assert_eq!((snap.server_count(), snap.domain_count(), snap.token_count()), (0, 0, 0));
        assert!(snap.state_view().orphan_replicas.is_empty());
    }

    #[test]
    fn sync_skips_bad_objects_and_keeps_last_good() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        let mut d = doc();
        d.servers[0].label = "Bad Label".into(); // update of "a" rejected: a stays as it was
        let mut thief = ServerSpec::new("c", "thief");
        thief.custom_domains = vec!["api.example.org".into()]; // a still owns it
        d.servers.push(thief);
        d.servers.push(ServerSpec::new("d", "fine"));
        d.replicas.push(ReplicaSpec::new("d", "d1", addr(0))); // invalid: port 0
        d.replicas.push(ReplicaSpec::new("d", "d2", addr(7)));
        d.tokens.clear();
        let errs = t.sync(d, 9).unwrap_err();
        let objects: Vec<String> = errs.iter().map(|e| e.object.to_string()).collect();
        assert_eq!(objects, [r#"server "a""#, r#"server "c""#, r#"replica "d/d1""#]);
        let snap = t.load();
        assert_eq!(snap.generation(), 9);
        assert_eq!(snap.lookup("hello.r1.x.dev").unwrap().id(), "a");
        assert_eq!(snap.lookup("api.example.org").unwrap().id(), "a");
        assert_eq!(ids(snap.lookup("fine.r2.x.dev").unwrap()), ["d2"]);
        assert!(snap.server("c").is_none());
        assert!(snap.token("t1").is_none());
    }

    #[test]
    fn health_gate_and_verdicts() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        t.set_health_gate(true);
        assert!(t.load().server("a").unwrap().replicas.is_empty());
        assert!(t.set_replica_health("a", "a1", true));
        assert!(!t.set_replica_health("a", "a1", true), "no change, no publish");
        assert_eq!(ids(t.load().server("a").unwrap()), ["a1"]);
        t.set_health_gate(false);
        assert_eq!(ids(t.load().server("a").unwrap()), ["a1", "a2"]);
        t.apply(
            vec![Change::SetReplicaHealth { server: "a".into(), id: "a2".into(), healthy: false }],
            1,
        )
        .unwrap();
        assert_eq!(ids(t.load().server("a").unwrap()), ["a1"]);
        // Same address, other edit: health is kept. New address: health resets.
        let mut a2 = ReplicaSpec::new("a", "a2", addr(2));
        a2.protocol = crate::Protocol::H2c;
        t.apply(vec![Change::PutReplica(a2)], 2).unwrap();
        assert_eq!(ids(t.load().server("a").unwrap()), ["a1"]);
        t.apply(vec![Change::PutReplica(ReplicaSpec::new("a", "a2", addr(22)))], 3).unwrap();
        assert_eq!(ids(t.load().server("a").unwrap()), ["a1", "a2"]);
    }

    #[test]
    fn mapped_v6_addresses_normalised() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        let r = ReplicaSpec::new("b", "b1", "[::ffff:10.0.0.1]:80".parse().unwrap());
        t.apply(vec![Change::PutReplica(r)], 2).unwrap();
        let snap = t.load();
        assert_eq!(snap.server("b").unwrap().replicas[0].addr, "10.0.0.1:80".parse().unwrap());
    }

    #[test]
    fn generation_never_goes_back() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        t.apply(vec![], 10).unwrap();
        t.apply(vec![], 5).unwrap();
        assert_eq!(t.generation(), 10);
    }

    #[tokio::test]
    async fn wait_for_generation_fence() {
        let t = RoutingTable::new(node());
        assert!(t.wait_for_generation(0, Duration::from_millis(1)).await);
        assert!(!t.wait_for_generation(1, Duration::from_millis(20)).await);
        let t2 = t.clone();
        let waiter =
            tokio::spawn(async move { t2.wait_for_generation(3, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        t.apply(vec![], 2).unwrap();
        t.apply(vec![], 3).unwrap();
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn state_view_redacts_secrets() {
        let t = RoutingTable::from_doc(node(), doc()).unwrap();
        let v = serde_json::to_value(t.load().state_view()).unwrap();
        let text = v.to_string();
        assert!(!text.contains("sha256:"), "{text}");
        assert_eq!(v["tokens"][0]["secret_hash"], "<redacted>");
        assert_eq!(v["servers"][0]["id"], "a");
        assert_eq!(v["servers"][0]["replicas"].as_array().unwrap().len(), 4);
        assert_eq!(v["servers"][0]["routable_replicas"], 2);
        assert_eq!(v["servers"][0]["replicas"][2]["state"], "draining");
        assert_eq!(v["servers"][0]["replicas"][2]["routable"], false);
        let one = serde_json::to_value(t.load().server_view("b").unwrap()).unwrap();
        assert_eq!(one["domains"].as_array().unwrap().len(), 4);
        assert!(t.load().server_view("nope").is_none());
    }
}

#[cfg(test)]
mod from_doc_token_tests {
    use super::*;
    use crate::{RoutingDoc, ServerSpec, TokenSpec, hash_secret};

    #[test]
    fn from_doc_keeps_tokens() {
        let node =
            NodeConfig { base_domains: vec!["example.test".into()], regions: vec!["r1".into()] };
        let doc = RoutingDoc {
            servers: vec![ServerSpec::new("s", "s")],
            replicas: vec![],
            tokens: vec![TokenSpec {
                id: "demo".into(),
                secret_hash: hash_secret("x"),
                environments: vec!["demo".into()],
            }],
        };
        let table = RoutingTable::from_doc(node, doc).unwrap();
        assert!(table.load().token("demo").is_some(), "from_doc dropped the token");
    }
}
