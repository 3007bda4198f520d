//! The immutable routing snapshot the request path reads, and the live counters that
//! survive from one snapshot to the next.
//!
//! A snapshot's maps are persistent hash maps (`imbl`, a HAMT): cloning one is O(1) and a
//! change copies only the O(log n) path to it, so the single writer can build the next
//! snapshot from the current one without touching the 100k entries that did not change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;

use crate::cert::{CertCounters, CertView, ServedCert};
use crate::model::{NodeConfig, Protocol, ReplicaSpec, ReplicaState, ServerSpec, TokenSpec};

/// Live per-replica counters. The same `Arc` is carried into every snapshot for the same
/// (server id, replica id), so counts survive snapshot swaps.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Requests (and opaque streams) currently in flight to this replica.
    pub in_flight: AtomicU64,
    /// Requests sent to this replica since it appeared.
    pub requests: AtomicU64,
    /// Requests to this replica that failed at the transport level (connect, reset).
    pub failures: AtomicU64,
    /// Passive ejection state (see [`Ejection`]).
    pub ejection: Ejection,
}

/// Passive ejection of one replica: after `threshold` consecutive upstream failures it is
/// skipped by selection for a while, twice as long each time it is ejected again (up to a
/// cap). Plain atomics: a healthy replica costs selection one relaxed load.
#[derive(Debug, Default)]
pub struct Ejection {
    consecutive: AtomicU32,
    /// Process-monotonic milliseconds (see [`now_ms`]) until which it is ejected; 0 = not.
    pub(crate) until_ms: AtomicU64,
    /// Ejections in a row without a success in between; sets the backoff.
    streak: AtomicU32,
    /// Ejections in total.
    pub total: AtomicU64,
}

/// When and for how long to eject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject; 0 turns ejection off.
    pub threshold: u32,
    /// First ejection time.
    pub base_ms: u64,
    /// Longest ejection time.
    pub max_ms: u64,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self { threshold: 5, base_ms: 10_000, max_ms: 300_000 }
    }
}

/// Milliseconds since the first call in this process (monotonic).
pub fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    // +1 so that 0 can mean "not ejected".
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
}

impl Ejection {
    /// Whether selection should skip the replica now.
    pub fn is_ejected(&self) -> bool {
        let until = self.until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// A request to the replica succeeded: the failure run and the backoff reset.
    pub fn record_success(&self) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.streak.load(Ordering::Relaxed) != 0 && !self.is_ejected() {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    /// An upstream failure (connect error, reset, timeout; never a client error). Returns
    /// whether this failure ejected the replica. `may_eject` is false when it is the last
    /// ready replica of its server, which is never ejected.
    pub fn record_failure(&self, policy: &EjectionPolicy, may_eject: bool) -> bool {
        if policy.threshold == 0 {
            return false;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n < policy.threshold || !may_eject || self.is_ejected() {
            return false;
        }
        self.consecutive.store(0, Ordering::Relaxed);
        let streak = self.streak.fetch_add(1, Ordering::Relaxed).min(20);
        let ms = policy.base_ms.saturating_mul(1u64 << streak).min(policy.max_ms.max(1));
        self.until_ms.store(now_ms().saturating_add(ms), Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Milliseconds of ejection left (0 = not ejected).
    pub fn remaining_ms(&self) -> u64 {
        let until = self.until_ms.load(Ordering::Relaxed);
        until.saturating_sub(now_ms())
    }
}

/// Live per-server counters, carried across snapshots like [`ReplicaStats`].
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests currently in flight to any replica of this server.
    pub in_flight: AtomicU64,
    /// Requests routed to this server since it appeared.
    pub requests: AtomicU64,
    /// Requests answered `503` because no replica was ready: demand for scale-from-zero.
    pub no_replica: AtomicU64,
    /// Requests waiting now in the server's cold-start hold.
    pub cold_start_held: AtomicU32,
    /// Requests answered `503` because the server was at `limits.max_in_flight`.
    pub over_limit: AtomicU64,
    /// Requests rejected by proxy auth (`401` and `403`); they never reach a replica and
    /// are not counted in `requests` or `in_flight`.
    pub auth_rejected: AtomicU64,
    /// Requests copied to the mirror (the copy started).
    pub mirrored: AtomicU64,
    /// Mirror copies dropped because the mirror fell behind (tee buffer full), failed, or
    /// no buffer space was left under `limits.max_buffered_bytes`.
    pub mirror_dropped: AtomicU64,
    /// Bytes currently held in proxy buffers for this server (see
    /// [`crate::limits::BytesPermit`]).
    pub buffered_bytes: AtomicU64,
}

/// A routable replica in a snapshot.
#[derive(Debug)]
pub struct Replica {
    /// Replica id, unique within its server.
    pub id: String,
    /// Id of the server it belongs to.
    pub server: String,
    /// Where to connect (IPv4-mapped IPv6 addresses are normalised to IPv4).
    pub addr: SocketAddr,
    /// How to speak to it.
    pub protocol: Protocol,
    /// `sluice_abi::hrw::fnv1a64(id)`: the replica's rendezvous-hashing key (see
    /// [`crate::lb`]), computed once here instead of per request.
    pub id_hash: u64,
    /// Live counters (shared across snapshots).
    pub stats: Arc<ReplicaStats>,
}

/// A server in a snapshot, with only its routable replicas: state `ready`, and healthy when
/// a health checker gates readiness. Starting, draining and unhealthy replicas are excluded.
#[derive(Debug)]
pub struct Server {
    /// The server's configuration.
    pub spec: Arc<ServerSpec>,
    /// Routable replicas, ordered by replica id (stable for rendezvous hashing).
    pub replicas: Arc<[Arc<Replica>]>,
    /// Live counters (shared across snapshots).
    pub stats: Arc<ServerStats>,
}

impl Server {
    /// The server's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Count a request routed to `replica` until the returned guard drops. The guard owns
    /// `Arc`s, so it may outlive this snapshot (it usually does: responses stream).
    pub fn begin_request(&self, replica: &Arc<Replica>) -> InFlightGuard {
        InFlightGuard::new(self.stats.clone(), replica.stats.clone())
    }
}

/// Counts one in-flight request on a server and a replica; decrements both on drop.
#[derive(Debug)]
pub struct InFlightGuard {
    server: Arc<ServerStats>,
    replica: Arc<ReplicaStats>,
}

impl InFlightGuard {
    /// Start counting (increments `in_flight` and `requests` on both).
    pub fn new(server: Arc<ServerStats>, replica: Arc<ReplicaStats>) -> Self {
        server.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard::server_already_counted(server, replica)
    }

    /// For callers that already incremented `server.in_flight` (the capped path in
    /// [`crate::limits`]): counts the rest.
    pub(crate) fn server_already_counted(
        server: Arc<ServerStats>,
        replica: Arc<ReplicaStats>,
    ) -> Self {
        server.requests.fetch_add(1, Ordering::Relaxed);
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        replica.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard { server, replica }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the health checker last concluded about a replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet (routable unless the table requires an initial check).
    #[default]
    Unknown,
    /// Its port accepts connections.
    Healthy,
    /// Failed `failure_threshold` consecutive checks: out of rotation.
    Unhealthy,
}

/// Every replica the store knows of (any state), with its health and its routable form.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaEntry {
    pub(crate) spec: Arc<ReplicaSpec>,
    pub(crate) health: Health,
    pub(crate) replica: Arc<Replica>,
}

impl ReplicaEntry {
    pub(crate) fn routable(&self, health_gate: bool) -> bool {
        self.spec.state == ReplicaState::Ready
            && match self.health {
                Health::Healthy => true,
                Health::Unhealthy => false,
                Health::Unknown => !health_gate,
            }
    }
}

/// A server plus the domains it currently owns in the domain map.
#[derive(Clone, Debug)]
pub(crate) struct ServerEntry {
    pub(crate) server: Arc<Server>,
    pub(crate) domains: Arc<[Arc<str>]>,
    /// Its certificates, in spec order.
    pub(crate) certs: Arc<[Arc<ServedCert>]>,
}

/// The snapshot's persistent maps. foldhash instead of the default SipHash: a request
/// looks a domain up (and its server's entries) on every request, and SipHash cost about
/// 300 instructions of it. Keys come only from the routing document, so a client cannot
/// fill the map with colliding keys; its lookups only cost its own request.
pub(crate) type Map<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

/// Immutable routing snapshot: what the request path reads, lock-free, via
/// [`crate::RoutingTable::load`].
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) node: Arc<NodeConfig>,
    /// When true, a replica must pass a health check before it is routable.
    pub(crate) health_gate: bool,
    // Keys are `Arc<str>` so the path copying of a persistent-map update bumps refcounts
    // instead of cloning strings.
    pub(crate) domains: Map<Arc<str>, Arc<Server>>,
    pub(crate) servers: Map<Arc<str>, ServerEntry>,
    pub(crate) tokens: Map<Arc<str>, Arc<TokenSpec>>,
    /// server id → replica id → entry. Holds replicas whose server does not exist (yet):
    /// they are kept, not routed, so the result does not depend on the order a store
    /// delivers keys in.
    pub(crate) replicas: Map<Arc<str>, imbl::OrdMap<Arc<str>, ReplicaEntry>>,
    /// Lowercase custom domain → the certificate its server carries for it.
    pub(crate) certs: Map<Arc<str>, Arc<ServedCert>>,
    /// Shared by every snapshot of the table.
    pub(crate) cert_counters: Arc<CertCounters>,
}

impl Snapshot {
    /// An empty snapshot at generation 0.
    pub(crate) fn empty(node: Arc<NodeConfig>) -> Self {
        Snapshot {
            generation: 0,
            node,
            health_gate: false,
            domains: Map::default(),
            servers: Map::default(),
            tokens: Map::default(),
            replicas: Map::default(),
            certs: Map::default(),
            cert_counters: Arc::default(),
        }
    }

    /// The signing key a server's certificate provides for an SNI name (lowercase, no
    /// trailing dot): one hash lookup, for the TLS handshake. `None` when no server carries
    /// a (loaded) certificate for exactly that name.
    pub fn certificate(&self, sni: &str) -> Option<&Arc<rustls::sign::CertifiedKey>> {
        self.certs.get(sni)?.loaded.as_ref().map(|l| &l.key)
    }

    /// Every server's certificates (arbitrary order).
    pub fn certificates(&self) -> impl Iterator<Item = &Arc<ServedCert>> {
        self.servers.values().flat_map(|e| e.certs.iter())
    }

    /// Certificate loads and refusals so far (shared by every snapshot of the table).
    pub fn certificate_counters(&self) -> &CertCounters {
        &self.cert_counters
    }

    /// The store revision this snapshot reflects.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The node configuration the domains were computed for.
    pub fn node(&self) -> &NodeConfig {
        &self.node
    }

    /// Resolve a canonical authority (lowercase ASCII, no port, no trailing dot; see
    /// [`crate::canonical_authority`]) to its server: `<label>.<region>.<base>` or a custom
    /// domain. One hash lookup.
    pub fn lookup(&self, authority: &str) -> Option<&Arc<Server>> {
        self.domains.get(authority)
    }

    /// A server by id.
    pub fn server(&self, id: &str) -> Option<&Arc<Server>> {
        self.servers.get(id).map(|e| &e.server)
    }

    /// A token by id.
    pub fn token(&self, id: &str) -> Option<&TokenSpec> {
        self.tokens.get(id).map(|t| &**t)
    }

    /// Number of servers.
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// Number of domains in the domain map.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Number of tokens.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Whether replicas must pass a health check before they are routable.
    pub fn health_gated(&self) -> bool {
        self.health_gate
    }

    /// The domains a server answers on (sorted), if it exists.
    pub fn domains_of(&self, server_id: &str) -> Option<&[Arc<str>]> {
        self.servers.get(server_id).map(|e| &*e.domains)
    }

    /// Every replica of a server the store knows of, in any state, with its health.
    pub fn replica_specs(&self, server_id: &str) -> Vec<(Arc<ReplicaSpec>, Health)> {
        self.replicas
            .get(server_id)
            .map(|m| m.values().map(|e| (e.spec.clone(), e.health)).collect())
            .unwrap_or_default()
    }

    /// All servers (arbitrary order).
    pub fn servers(&self) -> impl Iterator<Item = &Arc<Server>> {
        self.servers.values().map(|e| &e.server)
    }

    /// Replicas the store marks `draining`, with their drain deadline if they have one:
    /// they take no new requests; their in-flight ones may run until the deadline.
    pub fn draining(&self) -> impl Iterator<Item = (&Arc<Replica>, Option<SystemTime>)> {
        self.all_replicas()
            .filter(|e| e.spec.state == ReplicaState::Draining)
            .map(|e| (&e.replica, e.spec.drain_deadline))
    }

    /// Every replica the store knows of (any state, including replicas of unknown servers).
    pub(crate) fn all_replicas(&self) -> impl Iterator<Item = &ReplicaEntry> {
        self.replicas.values().flat_map(|m| m.values())
    }

    /// A serializable view for `GET /state`: servers, domains, replicas with state, health
    /// and counters, tokens with their secret hashes redacted. Sorted by id.
    pub fn state_view(&self) -> StateView {
        let mut servers: Vec<ServerView> =
            self.servers.values().map(|e| self.server_view_of(e)).collect();
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        let mut orphan_replicas: Vec<ReplicaView> = self
            .replicas
            .iter()
            .filter(|(server, _)| !self.servers.contains_key(&**server))
            .flat_map(|(_, m)| m.values().map(|r| self.replica_view(r)))
            .collect();
        orphan_replicas.sort_by(|a, b| (&a.server, &a.id).cmp(&(&b.server, &b.id)));
        let mut tokens: Vec<TokenView> = self
            .tokens
            .values()
            .map(|t| TokenView {
                id: t.id.clone(),
                secret_hash: "<redacted>",
                environments: t.environments.clone(),
            })
            .collect();
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        StateView {
            generation: self.generation,
            node: (*self.node).clone(),
            health_gated: self.health_gate,
            servers,
            orphan_replicas,
            tokens,
        }
    }

    /// The [`StateView`] entry of one server (for `GET /state?server=<id>`, which stays
    /// small when the node holds many servers).
    pub fn server_view(&self, id: &str) -> Option<ServerView> {
        self.servers.get(id).map(|e| self.server_view_of(e))
    }

    fn server_view_of(&self, e: &ServerEntry) -> ServerView {
        let s = &e.server;
        let replicas = self
            .replicas
            .get(s.id())
            .map(|m| m.values().map(|r| self.replica_view(r)).collect())
            .unwrap_or_default();
        ServerView {
            id: s.spec.id.clone(),
            domains: e.domains.iter().map(|d| d.to_string()).collect(),
            routable_replicas: s.replicas.len(),
            in_flight: s.stats.in_flight.load(Ordering::Relaxed),
            requests: s.stats.requests.load(Ordering::Relaxed),
            no_replica: s.stats.no_replica.load(Ordering::Relaxed),
            spec: ServerSpec {
                // Shown below as names, issuer, serial and expiry only.
                certificates: Vec::new(),
                ..(*s.spec).clone()
            },
            certificates: e.certs.iter().map(|c| CertView::from(&**c)).collect(),
            replicas,
        }
    }

    fn replica_view(&self, r: &ReplicaEntry) -> ReplicaView {
        ReplicaView {
            server: r.spec.server.clone(),
            id: r.spec.id.clone(),
            address: r.replica.addr,
            protocol: r.spec.protocol,
            state: r.spec.state,
            health: r.health,
            routable: self.servers.contains_key(r.spec.server.as_str())
                && r.routable(self.health_gate),
            drain_deadline: r
                .spec
                .drain_deadline
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            in_flight: r.replica.stats.in_flight.load(Ordering::Relaxed),
            requests: r.replica.stats.requests.load(Ordering::Relaxed),
            failures: r.replica.stats.failures.load(Ordering::Relaxed),
            ejected_ms: r.replica.stats.ejection.remaining_ms(),
            ejections: r.replica.stats.ejection.total.load(Ordering::Relaxed),
        }
    }
}

/// `GET /state` body.
#[derive(Debug, Serialize)]
pub struct StateView {
    /// Applied store revision.
    pub generation: u64,
    /// Node configuration.
    pub node: NodeConfig,
    /// Whether replicas need a passing health check to be routable.
    pub health_gated: bool,
    /// Servers, sorted by id.
    pub servers: Vec<ServerView>,
    /// Replicas whose server does not exist (held, not routed).
    pub orphan_replicas: Vec<ReplicaView>,
    /// Tokens with the secret hash redacted.
    pub tokens: Vec<TokenView>,
}

/// One server in [`StateView`].
#[derive(Debug, Serialize)]
pub struct ServerView {
    /// Server id.
    pub id: String,
    /// Domains it answers on.
    pub domains: Vec<String>,
    /// How many replicas are in rotation.
    pub routable_replicas: usize,
    /// In-flight requests.
    pub in_flight: u64,
    /// Requests routed.
    pub requests: u64,
    /// `503`s for lack of a ready replica.
    pub no_replica: u64,
    /// Full configuration, without its certificates (see `certificates`).
    pub spec: ServerSpec,
    /// Its certificates: names, issuer, serial, expiry and the last error; no key material.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertView>,
    /// All its replicas, any state.
    pub replicas: Vec<ReplicaView>,
}

/// One replica in [`StateView`].
#[derive(Debug, Serialize)]
pub struct ReplicaView {
    /// Server id.
    pub server: String,
    /// Replica id.
    pub id: String,
    /// Address.
    pub address: SocketAddr,
    /// Upstream protocol.
    pub protocol: Protocol,
    /// Lifecycle state from the store.
    pub state: ReplicaState,
    /// Health-check result.
    pub health: Health,
    /// Whether it is in rotation.
    pub routable: bool,
    /// Drain deadline (RFC 3339), if any.
    pub drain_deadline: Option<String>,
    /// In-flight requests.
    pub in_flight: u64,
    /// Requests sent.
    pub requests: u64,
    /// Transport failures.
    pub failures: u64,
    /// Milliseconds of passive ejection left; 0 = in selection.
    pub ejected_ms: u64,
    /// Passive ejections so far.
    pub ejections: u64,
}

/// One token in [`StateView`].
#[derive(Debug, Serialize)]
pub struct TokenView {
    /// Token id.
    pub id: String,
    /// Always `"<redacted>"`.
    pub secret_hash: &'static str,
    /// Environments it grants.
    pub environments: Vec<String>,
}
