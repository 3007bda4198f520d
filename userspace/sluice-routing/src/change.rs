//! Incremental changes and the builder that turns the current snapshot plus a batch of
//! changes into the next snapshot, touching only what changed.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::cert::ServedCert;
use crate::model::{ReplicaSpec, ServerSpec, TokenSpec};
use crate::snapshot::{Health, Replica, ReplicaEntry, ReplicaStats, Server, ServerEntry, Snapshot};
use crate::validate::{self, FieldError, ObjectRef, ValidationError};

/// One change to the routing state, as a store's change stream delivers it. Deletes of
/// things that do not exist are no-ops (streams replay).
// Changes are transient and short-lived; boxing the server spec would only add an
// allocation per change.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Create or replace a server.
    PutServer(ServerSpec),
    /// Delete a server by id. Its replicas stay (unrouted) until they are deleted too, so
    /// the result does not depend on the order keys arrive in.
    DeleteServer(String),
    /// Create or replace a replica. A replica whose server does not exist yet is held,
    /// unrouted, until the server appears.
    PutReplica(ReplicaSpec),
    /// Delete a replica.
    DeleteReplica {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
    },
    /// Create or replace a token.
    PutToken(TokenSpec),
    /// Delete a token by id.
    DeleteToken(String),
    /// The health checker's verdict on a replica (ignored if the replica is unknown).
    SetReplicaHealth {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
        /// Whether its port accepts connections.
        healthy: bool,
    },
}

impl Change {
    /// The object this change is about.
    pub fn object(&self) -> ObjectRef {
        match self {
            Change::PutServer(s) => ObjectRef::Server(s.id.clone()),
            Change::DeleteServer(id) => ObjectRef::Server(id.clone()),
            Change::PutReplica(r) => {
                ObjectRef::Replica { server: r.server.clone(), id: r.id.clone() }
            }
            Change::DeleteReplica { server, id } | Change::SetReplicaHealth { server, id, .. } => {
                ObjectRef::Replica { server: server.clone(), id: id.clone() }
            }
            Change::PutToken(t) => ObjectRef::Token(t.id.clone()),
            Change::DeleteToken(id) => ObjectRef::Token(id.clone()),
        }
    }

    /// Short description for logs and errors (never includes secrets).
    pub fn describe(&self) -> String {
        match self {
            Change::PutServer(s) => format!("put server {:?}", s.id),
            Change::DeleteServer(id) => format!("delete server {id:?}"),
            Change::PutReplica(r) => format!("put replica {:?}", format!("{}/{}", r.server, r.id)),
            Change::DeleteReplica { server, id } => {
                format!("delete replica {:?}", format!("{server}/{id}"))
            }
            Change::PutToken(t) => format!("put token {:?}", t.id),
            Change::DeleteToken(id) => format!("delete token {id:?}"),
            Change::SetReplicaHealth { server, id, healthy } => {
                format!("set health of replica {:?} to {healthy}", format!("{server}/{id}"))
            }
        }
    }
}

/// Why one change of a batch was rejected (the others still apply).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("change #{index} ({what}): {reason}")]
pub struct ApplyError {
    /// Position of the change in the batch.
    pub index: usize,
    /// [`Change::describe`] of the change.
    pub what: String,
    /// The object the change was about (e.g. to name the store key in a log).
    pub object: ObjectRef,
    /// What was wrong.
    pub reason: ApplyErrorKind,
}

/// What was wrong with a rejected change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyErrorKind {
    /// The object failed validation.
    #[error("{0}")]
    Invalid(ValidationError),
    /// The server would answer on a domain another server already owns.
    #[error("domain {domain:?} is already claimed by server {owner:?}")]
    DomainConflict {
        /// The contested domain.
        domain: String,
        /// The server that owns it.
        owner: String,
    },
}

/// A replica a health checker should start or stop watching (see
/// [`RoutingTable::attach_replica_events`](crate::RoutingTable::attach_replica_events)).
#[derive(Clone, Debug)]
pub struct ReplicaEvent {
    /// The replica's server.
    pub server: Arc<str>,
    /// The replica's id.
    pub id: Arc<str>,
    /// Its spec now; `None`: the replica is gone.
    pub spec: Option<Arc<ReplicaSpec>>,
}

/// Builds the next snapshot from the current one. Cloning the maps is O(1) (persistent
/// maps); each change costs O(log n) plus the size of the one server it touches.
pub(crate) struct Builder {
    snap: Snapshot,
    /// Servers whose replica list or spec changed: rebuilt once in `finish`.
    dirty: HashSet<Arc<str>>,
    /// The batch was validated as a whole (`replace`): skip per-change domain checks and
    /// interim domain links, which `finish` writes anyway.
    trusted: bool,
    pub(crate) events: Vec<ReplicaEvent>,
}

impl Builder {
    pub(crate) fn new(current: &Snapshot) -> Self {
        Builder { snap: current.clone(), dirty: HashSet::new(), trusted: false, events: Vec::new() }
    }

    /// A builder for a batch validated as a whole (see `trusted`).
    pub(crate) fn trusted(current: &Snapshot) -> Self {
        Builder { trusted: true, ..Builder::new(current) }
    }

    pub(crate) fn set_health_gate(&mut self, on: bool) {
        if self.snap.health_gate != on {
            self.snap.health_gate = on;
            let ids: Vec<Arc<str>> = self.snap.servers.keys().cloned().collect();
            self.dirty.extend(ids);
        }
    }

    pub(crate) fn apply(&mut self, change: Change) -> Result<(), ApplyErrorKind> {
        match change {
            Change::PutServer(s) => self.put_server(s),
            Change::DeleteServer(id) => {
                self.delete_server(&id);
                Ok(())
            }
            Change::PutReplica(r) => self.put_replica(r),
            Change::DeleteReplica { server, id } => {
                self.delete_replica(&server, &id);
                Ok(())
            }
            Change::PutToken(t) => self.put_token(t),
            Change::DeleteToken(id) => {
                self.snap.tokens.remove(id.as_str());
                Ok(())
            }
            Change::SetReplicaHealth { server, id, healthy } => {
                let h = if healthy { Health::Healthy } else { Health::Unhealthy };
                self.set_health(&server, &id, h);
                Ok(())
            }
        }
    }

    pub(crate) fn put_server(&mut self, spec: ServerSpec) -> Result<(), ApplyErrorKind> {
        if !self.trusted {
            ValidationError::check(validate::validate_server(&spec))
                .map_err(ApplyErrorKind::Invalid)?;
        }
        let old = self.snap.servers.get(spec.id.as_str()).cloned();
        if let Some(old) = &old
            && *old.server.spec == spec
        {
            return Ok(());
        }
        let domains: Vec<Arc<str>> =
            validate::server_domains(&self.snap.node, &spec).into_iter().map(Arc::from).collect();
        // A VIP belongs to one server. Scanning is O(servers), paid only by VIP servers.
        if !self.trusted
            && let Some(vip) = spec.vip.map(validate::canonical_vip)
            && let Some(owner) = self.snap.servers.values().find(|e| {
                e.server.spec.id != spec.id
                    && e.server.spec.vip.map(validate::canonical_vip) == Some(vip)
            })
        {
            let e = validate::vip_conflict(&spec.id, vip, owner.server.id());
            return Err(ApplyErrorKind::Invalid(ValidationError { errors: vec![e] }));
        }
        if !self.trusted {
            for d in &domains {
                if let Some(owner) = self.snap.domains.get(d)
                    && owner.spec.id != spec.id
                {
                    return Err(ApplyErrorKind::DomainConflict {
                        domain: d.to_string(),
                        owner: owner.spec.id.clone(),
                    });
                }
            }
        }
        let id: Arc<str> = Arc::from(spec.id.as_str());
        // Parsed here, by the single writer, so the handshake only ever looks one up.
        let old_certs = old.as_ref().map(|o| o.certs.clone()).unwrap_or_else(|| Arc::new([]));
        let certs: Arc<[Arc<ServedCert>]> = self.load_certs(&id, &spec, &old_certs)?.into();
        if let Some(old) = &old {
            for d in old.domains.iter() {
                if domains.binary_search(d).is_err() {
                    self.snap.domains.remove(d);
                }
            }
        }
        self.unlink_certs(&id, &old_certs);
        for d in &domains {
            // A certificate another server left on a domain this one now owns.
            if self.snap.certs.get(d).is_some_and(|c| c.server != id) {
                self.snap.certs.remove(d);
            }
        }
        for c in certs.iter() {
            for d in &c.spec.domains {
                self.snap.certs.insert(Arc::from(d.to_ascii_lowercase()), c.clone());
            }
        }
        let stats = old.map(|o| o.server.stats.clone()).unwrap_or_default();
        let server = Arc::new(Server { spec: Arc::new(spec), replicas: Arc::new([]), stats });
        if !self.trusted {
            // Claim the domains now so later changes in the batch see them; `finish` points
            // them at the final `Server` once its replica list is built.
            for d in &domains {
                self.snap.domains.insert(d.clone(), server.clone());
            }
        }
        self.snap
            .servers
            .insert(id.clone(), ServerEntry { server, domains: domains.into(), certs });
        self.dirty.insert(id);
        Ok(())
    }

    /// The certificates of `spec`, parsed and checked. An unchanged certificate keeps its
    /// parsed form (files are re-read by the watcher, not by unrelated edits).
    fn load_certs(
        &self,
        id: &Arc<str>,
        spec: &ServerSpec,
        old: &[Arc<ServedCert>],
    ) -> Result<Vec<Arc<ServedCert>>, ApplyErrorKind> {
        spec.certificates
            .iter()
            .map(|cs| {
                if let Some(same) = old.iter().find(|o| o.spec == *cs) {
                    return Ok(same.clone());
                }
                let previous = old.iter().find(|o| o.spec.domains == cs.domains);
                ServedCert::load(id.clone(), cs, previous.map(|p| &**p), &self.snap.cert_counters)
                    .map(Arc::new)
                    .map_err(|e| {
                        let message = format!("certificate for {}: {e}", cs.domains.join(", "));
                        let e = FieldError::new(
                            ObjectRef::Server(spec.id.clone()),
                            "certificates",
                            message,
                        );
                        ApplyErrorKind::Invalid(ValidationError { errors: vec![e] })
                    })
            })
            .collect()
    }

    /// Removes the domain links of `certs` that still point at server `id`'s.
    fn unlink_certs(&mut self, id: &str, certs: &[Arc<ServedCert>]) {
        for c in certs {
            for d in &c.spec.domains {
                let d = d.to_ascii_lowercase();
                if self.snap.certs.get(d.as_str()).is_some_and(|c| &*c.server == id) {
                    self.snap.certs.remove(d.as_str());
                }
            }
        }
    }

    /// Swaps one certificate of server `id` (its file watcher re-read it); the server's
    /// spec and routes stay.
    pub(crate) fn replace_cert(&mut self, id: &str, index: usize, cert: ServedCert) {
        let Some(mut e) = self.snap.servers.get(id).cloned() else {
            return;
        };
        let cert = Arc::new(cert);
        let mut certs = e.certs.to_vec();
        let Some(slot) = certs.get_mut(index) else {
            return;
        };
        *slot = cert.clone();
        for d in &cert.spec.domains {
            let d = d.to_ascii_lowercase();
            if self.snap.certs.get(d.as_str()).is_some_and(|c| &*c.server == id) {
                self.snap.certs.insert(Arc::from(d), cert.clone());
            }
        }
        e.certs = certs.into();
        self.snap.servers.insert(Arc::from(id), e);
    }

    /// Release a server's domains ahead of a batch that moves domains between servers
    /// (used by `replace`, whose document was validated as a whole).
    pub(crate) fn unlink_domains(&mut self, id: &str) {
        if let Some(mut e) = self.snap.servers.get(id).cloned() {
            for d in e.domains.iter() {
                self.snap.domains.remove(d);
            }
            e.domains = Arc::new([]);
            self.snap.servers.insert(Arc::from(id), e);
        }
    }

    /// Undo [`unlink_domains`](Self::unlink_domains) for a server whose update was
    /// rejected. Domains another server claimed meanwhile stay with that server.
    pub(crate) fn relink_domains(&mut self, id: &str) {
        let Some(mut e) = self.snap.servers.get(id).cloned() else {
            return;
        };
        if !e.domains.is_empty() {
            return;
        }
        let domains: Vec<Arc<str>> = validate::server_domains(&self.snap.node, &e.server.spec)
            .into_iter()
            .map(Arc::from)
            .filter(|d| self.snap.domains.get(d).is_none_or(|owner| owner.spec.id == id))
            .collect();
        for d in &domains {
            self.snap.domains.insert(d.clone(), e.server.clone());
        }
        e.domains = domains.into();
        let id: Arc<str> = Arc::from(id);
        self.snap.servers.insert(id.clone(), e);
        self.dirty.insert(id);
    }

    pub(crate) fn delete_server(&mut self, id: &str) {
        if let Some(e) = self.snap.servers.remove(id) {
            for d in e.domains.iter() {
                self.snap.domains.remove(d);
            }
            self.unlink_certs(id, &e.certs);
        }
        self.dirty.remove(id);
    }

    pub(crate) fn put_replica(&mut self, mut spec: ReplicaSpec) -> Result<(), ApplyErrorKind> {
        if !self.trusted {
            ValidationError::check(validate::validate_replica(&spec))
                .map_err(ApplyErrorKind::Invalid)?;
        }
        spec.address = normalize_addr(spec.address);
        let mut map = self.snap.replicas.get(spec.server.as_str()).cloned().unwrap_or_default();
        let old = map.get(spec.id.as_str());
        if old.is_some_and(|o| *o.spec == spec) {
            return Ok(());
        }
        // Health belongs to an address: keep it across other edits (e.g. ready → draining).
        let health =
            old.filter(|o| o.spec.address == spec.address).map(|o| o.health).unwrap_or_default();
        let stats: Arc<ReplicaStats> = old.map(|o| o.replica.stats.clone()).unwrap_or_default();
        let server: Arc<str> = Arc::from(spec.server.as_str());
        let id: Arc<str> = Arc::from(spec.id.as_str());
        let spec = Arc::new(spec);
        let entry = ReplicaEntry {
            replica: Arc::new(Replica {
                id: spec.id.clone(),
                server: spec.server.clone(),
                addr: spec.address,
                protocol: spec.protocol,
                id_hash: sluice_abi::hrw::fnv1a64(spec.id.as_bytes()),
                stats,
            }),
            spec: spec.clone(),
            health,
        };
        map.insert(id.clone(), entry);
        self.snap.replicas.insert(server.clone(), map);
        self.mark_dirty(&server);
        self.events.push(ReplicaEvent { server, id, spec: Some(spec) });
        Ok(())
    }

    pub(crate) fn delete_replica(&mut self, server: &str, id: &str) {
        let Some(mut map) = self.snap.replicas.get(server).cloned() else {
            return;
        };
        let Some(old) = map.remove(id) else {
            return;
        };
        let server: Arc<str> = Arc::from(server);
        if map.is_empty() {
            self.snap.replicas.remove(&server);
        } else {
            self.snap.replicas.insert(server.clone(), map);
        }
        self.mark_dirty(&server);
        self.events.push(ReplicaEvent { server, id: Arc::from(old.spec.id.as_str()), spec: None });
    }

    pub(crate) fn set_health(&mut self, server: &str, id: &str, health: Health) -> bool {
        let Some(mut map) = self.snap.replicas.get(server).cloned() else {
            return false;
        };
        let Some(entry) = map.get(id) else {
            return false;
        };
        if entry.health == health {
            return false;
        }
        let mut entry = entry.clone();
        entry.health = health;
        let server: Arc<str> = Arc::from(server);
        map.insert(Arc::from(id), entry);
        self.snap.replicas.insert(server.clone(), map);
        self.mark_dirty(&server);
        true
    }

    pub(crate) fn delete_token(&mut self, id: &str) {
        self.snap.tokens.remove(id);
    }

    pub(crate) fn put_token(&mut self, t: TokenSpec) -> Result<(), ApplyErrorKind> {
        if !self.trusted {
            ValidationError::check(validate::validate_token(&t))
                .map_err(ApplyErrorKind::Invalid)?;
        }
        self.snap.tokens.insert(Arc::from(t.id.as_str()), Arc::new(t));
        Ok(())
    }

    fn mark_dirty(&mut self, server: &Arc<str>) {
        if self.snap.servers.contains_key(server) && !self.dirty.contains(server) {
            self.dirty.insert(server.clone());
        }
    }

    /// Rebuild the replica lists of the servers that changed and stamp the generation.
    pub(crate) fn finish(mut self, generation: u64) -> (Snapshot, Vec<ReplicaEvent>) {
        let gate = self.snap.health_gate;
        for id in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.snap.servers.get(&id).cloned() else {
                continue;
            };
            let replicas: Arc<[Arc<Replica>]> = self
                .snap
                .replicas
                .get(&id)
                .map(|m| {
                    m.values()
                        .filter(|r| r.routable(gate))
                        .map(|r| r.replica.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into();
            let server = Arc::new(Server {
                spec: entry.server.spec.clone(),
                replicas,
                stats: entry.server.stats.clone(),
            });
            for d in entry.domains.iter() {
                self.snap.domains.insert(d.clone(), server.clone());
            }
            self.snap
                .servers
                .insert(id, ServerEntry { server, domains: entry.domains, certs: entry.certs });
        }
        self.snap.generation = generation;
        (self.snap, self.events)
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes plain IPv4, so the same replica has one key
/// everywhere (docs/design.md, What bites).
pub fn normalize_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}
