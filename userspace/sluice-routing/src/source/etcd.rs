//! etcd source: list a key prefix, then watch it, and keep a [`RoutingTable`] in step with
//! the store, stamping each snapshot with the etcd revision it reflects.
//!
//! Key layout under the configured prefix (default `/sluice/`; see `docs/etcd.md`):
//!
//! | key                         | value (JSON)      |
//! |-----------------------------|-------------------|
//! | `<prefix>servers/<id>`      | [`ServerSpec`]    |
//! | `<prefix>replicas/<server>/<id>` | [`ReplicaSpec`] |
//! | `<prefix>tokens/<id>`       | [`TokenSpec`]     |
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

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    Txn, TxnOp, WatchOptions, WatchResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::autoscale::DesiredReplicas;
use crate::change::Change;
use crate::model::{ReplicaSpec, RoutingDoc, ServerSpec, TokenSpec, duration_serde};
use crate::source::SourceStatus;
use crate::table::RoutingTable;
use crate::validate::{self, ObjectRef, ValidationError};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/sluice/";
/// Default endpoint (etcd's standard client port on loopback).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// Keys per page when listing: keeps each response well under gRPC's message limit even
/// with 100k servers.
const LIST_PAGE: i64 = 1000;
/// Largest gRPC message we accept (a watch response carrying a big transaction).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How to reach etcd (the `[etcd]` section of the sluice config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix; everything sluice reads and writes lives under it (a missing trailing
    /// `/` is added).
    pub prefix: String,
    /// Bound on establishing a TCP connection to an endpoint.
    #[serde(with = "duration_serde")]
    pub connect_timeout: Duration,
    /// Bound on one request (a list page, a put, creating the watch).
    #[serde(with = "duration_serde")]
    pub request_timeout: Duration,
    /// How often the idle watch is probed (HTTP/2 ping and an etcd progress request). A
    /// silent connection is declared dead after three intervals.
    #[serde(with = "duration_serde")]
    pub keepalive_interval: Duration,
    /// First retry delay after a failure; doubles per failure (with jitter).
    #[serde(with = "duration_serde")]
    pub backoff_initial: Duration,
    /// Cap on the retry delay.
    #[serde(with = "duration_serde")]
    pub backoff_max: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    /// A config for these endpoints with every other setting at its default.
    pub fn with_endpoints<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdConfig::default()
        }
    }

    fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }
}

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

// ---------------------------------------------------------------------------------------
// Key layout
// ---------------------------------------------------------------------------------------

/// What an etcd key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StoreKey {
    /// `servers/<id>`
    Server(String),
    /// `replicas/<server>/<id>`
    Replica {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
    },
    /// `tokens/<id>`
    Token(String),
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Server(id) => write!(f, "servers/{id}"),
            StoreKey::Replica { server, id } => write!(f, "replicas/{server}/{id}"),
            StoreKey::Token(id) => write!(f, "tokens/{id}"),
        }
    }
}

/// The key layout for one prefix.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    /// A prefix without a trailing `/` gets one, so `/sluice` and `/sluice/` agree.
    fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    fn key(&self, k: &StoreKey) -> String {
        format!("{}{k}", self.prefix)
    }

    fn servers(&self) -> String {
        format!("{}servers/", self.prefix)
    }

    fn replicas(&self, server: Option<&str>) -> String {
        match server {
            Some(s) => format!("{}replicas/{s}/", self.prefix),
            None => format!("{}replicas/", self.prefix),
        }
    }

    fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }

    /// `<prefix>desired/` or `<prefix>desired/<server>`: the autoscaler's output
    /// (`sluice autoscale`), next to the routing objects but not part of them.
    fn desired(&self, server: Option<&str>) -> String {
        match server {
            Some(s) => format!("{}desired/{s}", self.prefix),
            None => format!("{}desired/", self.prefix),
        }
    }

    /// Keys under the prefix that are not routing objects and are skipped silently by
    /// the source (the autoscaler's `desired/` keys).
    fn is_ignored(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes()).is_some_and(|rest| rest.starts_with(b"desired/"))
    }

    /// Parse a full key; `None` for keys outside the layout. Ids are validated later with
    /// the object, which must carry the same ids as its key.
    fn parse(&self, key: &[u8]) -> Option<StoreKey> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let mut parts = rest.split('/');
        let kind = parts.next()?;
        let a = parts.next().filter(|s| !s.is_empty())?;
        let b = parts.next();
        if parts.next().is_some() {
            return None;
        }
        match (kind, b) {
            ("servers", None) => Some(StoreKey::Server(a.to_owned())),
            ("tokens", None) => Some(StoreKey::Token(a.to_owned())),
            ("replicas", Some(id)) if !id.is_empty() => {
                Some(StoreKey::Replica { server: a.to_owned(), id: id.to_owned() })
            }
            _ => None,
        }
    }
}

/// The end of the key range that holds every key starting with `prefix` (etcd's
/// `range_end` convention: the prefix with its last byte below 0xff incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// A decoded, individually valid object.
#[derive(Clone, Debug)]
enum Object {
    // Boxed: a server spec is several times larger than the other variants.
    Server(Box<ServerSpec>),
    Replica(ReplicaSpec),
    Token(TokenSpec),
}

impl Object {
    fn into_change(self) -> Change {
        match self {
            Object::Server(s) => Change::PutServer(*s),
            Object::Replica(r) => Change::PutReplica(r),
            Object::Token(t) => Change::PutToken(t),
        }
    }
}

fn delete_change(k: StoreKey) -> Change {
    match k {
        StoreKey::Server(id) => Change::DeleteServer(id),
        StoreKey::Replica { server, id } => Change::DeleteReplica { server, id },
        StoreKey::Token(id) => Change::DeleteToken(id),
    }
}

/// Decode and validate the value stored at `key` (named `full_key` in errors).
fn decode(k: &StoreKey, full_key: &str, value: &[u8]) -> Result<Object, MalformedValue> {
    let bad = |reason: String| MalformedValue { key: full_key.to_owned(), reason };
    let json = |e: serde_json::Error| bad(format!("invalid JSON: {e}"));
    let invalid = |errs: Vec<validate::FieldError>| {
        ValidationError::check(errs).map_err(|e| bad(e.to_string()))
    };
    let mismatch = |field: &str, in_key: &str, in_value: &str| {
        bad(format!("{field} {in_value:?} in the value does not match {in_key:?} in the key"))
    };
    match k {
        StoreKey::Server(id) => {
            let s: ServerSpec = serde_json::from_slice(value).map_err(json)?;
            if s.id != *id {
                return Err(mismatch("id", id, &s.id));
            }
            invalid(validate::validate_server(&s))?;
            Ok(Object::Server(Box::new(s)))
        }
        StoreKey::Replica { server, id } => {
            let r: ReplicaSpec = serde_json::from_slice(value).map_err(json)?;
            if r.server != *server {
                return Err(mismatch("server", server, &r.server));
            }
            if r.id != *id {
                return Err(mismatch("id", id, &r.id));
            }
            invalid(validate::validate_replica(&r))?;
            Ok(Object::Replica(r))
        }
        StoreKey::Token(id) => {
            let t: TokenSpec = serde_json::from_slice(value).map_err(json)?;
            if t.id != *id {
                return Err(mismatch("id", id, &t.id));
            }
            invalid(validate::validate_token(&t))?;
            Ok(Object::Token(t))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------

/// The source's view of the store, for `/readyz` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// A watch is established and answering.
    pub connected: bool,
    /// A full listing has been applied at least once (before that the table is empty).
    pub synced: bool,
    /// The etcd revision of the last applied change (the table's generation from etcd).
    pub last_revision: u64,
    /// When etcd last answered anything (response, event, progress notification).
    pub last_contact: Option<Instant>,
    /// Since when the source has been without a working watch (`None` while connected).
    pub disconnected_at: Option<Instant>,
    /// How long the source has been without a working watch, as of this reading.
    pub since_disconnect: Option<Duration>,
    /// The last failure, if any (cleared once connected again).
    pub last_error: Option<String>,
    /// How many times the watch has been (re-)established.
    pub connects: u64,
    /// How many full listings have been applied.
    pub relists: u64,
    /// How many stored values have been ignored as malformed.
    pub malformed_values: u64,
    /// How many sessions ended in a failure (connect, list or watch).
    pub failures: u64,
}

impl StoreStatus {
    /// Whether a failure now would be the start of an outage (worth a warning), rather
    /// than one more failed retry.
    fn is_first_failure(&self) -> bool {
        self.connected || self.failures == 0
    }

    /// True when the routing state may lag the store: never synced, or disconnected.
    pub fn is_stale(&self) -> bool {
        !self.synced || !self.connected
    }

    /// The view every source shares ([`SourceStatus`], as the file source reports it),
    /// for admin code that treats sources alike.
    pub fn to_source_status(&self) -> SourceStatus {
        SourceStatus {
            healthy: !self.is_stale(),
            last_error: self.last_error.clone(),
            last_success: self
                .last_contact
                .and_then(|t| SystemTime::now().checked_sub(t.elapsed())),
            generation: self.last_revision,
            loads: self.relists,
            failures: self.failures,
        }
    }

    /// One line for `/readyz` detail, e.g. `etcd: connected, revision 42` or
    /// `etcd: stale for 3.2s (revision 42): transport error`.
    pub fn summary(&self) -> String {
        if !self.is_stale() {
            return format!("etcd: connected, revision {}", self.last_revision);
        }
        let age = self
            .since_disconnect
            .map(|d| format!(" for {:.1}s", d.as_secs_f64()))
            .unwrap_or_default();
        let what = if self.synced { "stale" } else { "not synced" };
        let err = self.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        format!("etcd: {what}{age} (revision {}){err}", self.last_revision)
    }
}

/// Cheap, cloneable reader of the source's [`StoreStatus`].
#[derive(Clone, Debug)]
pub struct StatusHandle {
    rx: watch::Receiver<StoreStatus>,
}

impl StatusHandle {
    /// The current status, with `since_disconnect` computed now.
    pub fn get(&self) -> StoreStatus {
        let mut s = self.rx.borrow().clone();
        s.since_disconnect = s.disconnected_at.map(|t| t.elapsed());
        s
    }

    /// The underlying channel, for callers that select on changes. Its values carry
    /// `since_disconnect: None`; compute it from `disconnected_at` (or use [`Self::get`]).
    pub fn receiver(&self) -> watch::Receiver<StoreStatus> {
        self.rx.clone()
    }

    /// Wait until the status changes (returns `false` once the source is gone).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Wait (bounded) until `pred` holds for the status; returns the matching status.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&StoreStatus) -> bool,
    ) -> Option<StoreStatus> {
        let fut = self.rx.wait_for(|s| pred(s));
        let matched = matches!(tokio::time::timeout(timeout, fut).await, Ok(Ok(_)));
        matched.then(|| self.get())
    }
}

// ---------------------------------------------------------------------------------------
// The reconciler
// ---------------------------------------------------------------------------------------

/// Keeps a [`RoutingTable`] in step with an etcd prefix. See the module docs.
pub struct EtcdSource {
    cfg: EtcdConfig,
    keys: Keys,
    table: RoutingTable,
    status: watch::Sender<StoreStatus>,
    /// The revision the table reflects; `None` until the first listing, and after a
    /// compaction (both mean: list again).
    revision: Option<i64>,
    backoff: Backoff,
}

impl fmt::Debug for EtcdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSource")
            .field("endpoints", &self.cfg.endpoints)
            .field("prefix", &self.cfg.prefix)
            .field("revision", &self.revision)
            .finish()
    }
}

impl EtcdSource {
    /// A source feeding `table` from the store `cfg` names. Nothing happens until
    /// [`run`](Self::run).
    pub fn new(cfg: EtcdConfig, table: RoutingTable) -> Self {
        let status = StoreStatus {
            connected: false,
            synced: false,
            last_revision: 0,
            last_contact: None,
            disconnected_at: Some(Instant::now()),
            since_disconnect: None,
            last_error: None,
            connects: 0,
            relists: 0,
            malformed_values: 0,
            failures: 0,
        };
        let (status, _) = watch::channel(status);
        let backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
        EtcdSource { keys: cfg.keys(), cfg, table, status, revision: None, backoff }
    }

    /// A handle to the source's status (valid before, during and after `run`).
    pub fn status(&self) -> StatusHandle {
        StatusHandle { rx: self.status.subscribe() }
    }

    /// Reconcile until `shutdown` resolves: list, watch, and on any failure keep the last
    /// snapshot, back off and reconnect.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tracing::info!(endpoints = ?self.cfg.endpoints, prefix = %self.keys.prefix, "etcd source starting");
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let err = tokio::select! {
                biased;
                () = &mut shutdown => break,
                err = self.session() => err,
            };
            let compacted = matches!(err, EtcdError::Compacted(_));
            if compacted {
                tracing::warn!(error = %err, "etcd watch start revision compacted; listing again");
                self.revision = None;
            } else if self.status.borrow().is_first_failure() {
                tracing::warn!(error = %err, "etcd source disconnected; keeping the last snapshot");
            } else {
                // Still down: one line per attempt at debug, the transition was at warn.
                tracing::debug!(error = %err, "etcd still unreachable");
            }
            self.mark_disconnected(err.to_string());
            // A compaction is not a failure of etcd: list again at once.
            let delay = if compacted { Duration::ZERO } else { self.backoff.next_delay() };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.status.send_modify(|s| {
            if s.connected {
                s.connected = false;
                s.disconnected_at = Some(Instant::now());
            }
        });
        tracing::info!("etcd source stopped");
    }

    /// Connect, list if needed, then watch until something fails; returns why.
    async fn session(&mut self) -> EtcdError {
        match self.session_inner().await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn session_inner(&mut self) -> Result<std::convert::Infallible, EtcdError> {
        let client = connect(&self.cfg, true).await?;
        let rev = match self.revision {
            Some(rev) => rev,
            None => {
                let rev = self.list_and_replace(&client).await?;
                self.revision = Some(rev);
                rev
            }
        };
        let opts =
            WatchOptions::new().with_prefix().with_start_revision(rev + 1).with_progress_notify();
        let mut wc = client.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
        let stream =
            self.bounded(wc.watch(self.keys.prefix.as_bytes().to_vec(), Some(opts))).await?;
        let (mut requests, mut responses) = stream.split();

        let keepalive = self.cfg.keepalive_interval.max(Duration::from_millis(10));
        let silence_limit = keepalive * 3;
        let mut ticker = tokio::time::interval(keepalive);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut established = false;
        loop {
            tokio::select! {
                msg = responses.message() => {
                    let resp = msg?.ok_or_else(|| EtcdError::Watch("stream closed by server".into()))?;
                    last_heard = Instant::now();
                    if resp.compact_revision() > 0 {
                        return Err(EtcdError::Compacted(resp.compact_revision()));
                    }
                    if resp.canceled() {
                        return Err(EtcdError::Watch(format!("cancelled: {}", resp.cancel_reason())));
                    }
                    if !established {
                        // The first answer (normally `created`) proves the watch is live
                        // from `rev + 1`: from here on the table is current.
                        established = true;
                        self.backoff.reset();
                        self.mark_connected();
                    } else {
                        self.touch();
                    }
                    if let Some(applied) = self.apply_watch_response(&resp) {
                        self.revision = Some(applied);
                    }
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return Err(EtcdError::Watch(format!(
                            "no answer from etcd for {:?}", last_heard.elapsed()
                        )));
                    }
                    // Keeps `last_contact` fresh on an idle watch and proves the server
                    // still answers on this stream.
                    requests.request_progress().await?;
                }
            }
        }
    }

    /// List the prefix (paged, at one consistent revision) and replace the table's
    /// contents. Returns the listing's revision.
    async fn list_and_replace(&mut self, client: &Client) -> Result<i64, EtcdError> {
        let started = Instant::now();
        let (kvs, revision) = list_prefix(client, &self.cfg, self.keys.prefix.as_bytes()).await?;
        self.touch();
        let snapshot = self.table.load_full();
        let mut servers: Vec<(i64, ServerSpec)> = Vec::new();
        let mut replicas = Vec::new();
        let mut tokens = Vec::new();
        let mut malformed = 0u64;
        for kv in &kvs {
            let Some(k) = self.keys.parse(kv.key()) else {
                if !self.keys.is_ignored(kv.key()) {
                    warn_unknown_key(kv.key());
                }
                continue;
            };
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            let obj = match decode(&k, &full, kv.value()) {
                Ok(obj) => obj,
                Err(e) => {
                    malformed += 1;
                    tracing::error!(key = %full, error = %e.reason, "etcd: ignoring malformed value");
                    // Keep the last good value of this key, as the watch does.
                    match last_good(&snapshot, &k) {
                        Some(obj) => obj,
                        None => continue,
                    }
                }
            };
            match obj {
                Object::Server(s) => servers.push((kv.create_revision(), *s)),
                Object::Replica(r) => replicas.push(r),
                Object::Token(t) => tokens.push(t),
            }
        }
        // Two servers claiming one domain: a server that already holds it keeps it (as
        // under the watch, where the later put is rejected); among new claimants the one
        // created first wins.
        servers.sort_by_key(|(rev, _)| *rev);
        let doc =
            RoutingDoc { servers: servers.into_iter().map(|(_, s)| s).collect(), replicas, tokens };
        let generation = revision_u64(revision);
        let counts = (doc.servers.len(), doc.replicas.len(), doc.tokens.len());
        // Object by object: a rejected object is reported, the rest applies. Replicas of
        // servers not in the store are legal (written before their server, or left
        // behind) and are held unrouted.
        if let Err(errors) = self.table.sync(doc, generation) {
            for e in errors {
                malformed += 1;
                tracing::error!(key = %self.object_key(&e.object), error = %e.reason, "etcd: object rejected");
            }
        }
        self.status.send_modify(|s| {
            s.synced = true;
            s.relists += 1;
            s.last_revision = generation;
            s.malformed_values += malformed;
        });
        tracing::info!(
            revision,
            servers = counts.0,
            replicas = counts.1,
            tokens = counts.2,
            malformed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "etcd: listed prefix and replaced the routing state"
        );
        Ok(revision)
    }

    /// Turn one watch response into a batch and apply it. Returns the revision the table
    /// now reflects, if the response carried events.
    fn apply_watch_response(&mut self, resp: &WatchResponse) -> Option<i64> {
        let events = resp.events();
        if events.is_empty() {
            return None;
        }
        let mut changes = Vec::with_capacity(events.len());
        let mut max_rev = 0i64;
        let mut malformed = 0u64;
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            // A response may span several revisions while the watch catches up; resume
            // after the last one it carries, not after the header's (the store's current
            // revision, possibly beyond what was sent).
            max_rev = max_rev.max(kv.mod_revision());
            let Some(k) = self.keys.parse(kv.key()) else {
                if !self.keys.is_ignored(kv.key()) {
                    warn_unknown_key(kv.key());
                }
                continue;
            };
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            // The raw type, not `Event::event_type()`, which panics on values it does not
            // know: the store is a peer.
            match EventType::try_from(ev.0.r#type) {
                Ok(EventType::Delete) => changes.push(delete_change(k)),
                Ok(EventType::Put) => match decode(&k, &full, kv.value()) {
                    Ok(obj) => changes.push(obj.into_change()),
                    Err(e) => {
                        malformed += 1;
                        tracing::error!(key = %full, error = %e.reason, "etcd: ignoring malformed value; the key's last good value stays in force");
                    }
                },
                Err(_) => {
                    tracing::error!(key = %full, event_type = ev.0.r#type, "etcd: ignoring event of unknown type");
                }
            }
        }
        if max_rev <= 0 {
            return None;
        }
        let generation = revision_u64(max_rev);
        if let Err(errors) = self.table.apply(changes, generation) {
            for e in errors {
                malformed += 1;
                tracing::error!(key = %self.object_key(&e.object), error = %e.reason, "etcd: change rejected");
            }
        }
        self.status.send_modify(|s| {
            s.last_revision = generation;
            s.malformed_values += malformed;
            s.last_contact = Some(Instant::now());
        });
        Some(max_rev)
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        bounded(self.cfg.request_timeout, fut).await
    }

    /// The full store key of an object the table rejected.
    fn object_key(&self, object: &ObjectRef) -> String {
        let k = match object {
            ObjectRef::Server(id) => StoreKey::Server(id.clone()),
            ObjectRef::Replica { server, id } => {
                StoreKey::Replica { server: server.clone(), id: id.clone() }
            }
            ObjectRef::Token(id) => StoreKey::Token(id.clone()),
            ObjectRef::Node => return "(node config)".to_owned(),
        };
        self.keys.key(&k)
    }

    fn touch(&self) {
        self.status.send_modify(|s| s.last_contact = Some(Instant::now()));
    }

    fn mark_connected(&self) {
        let revision = self.revision.map(revision_u64).unwrap_or(0);
        self.status.send_modify(|s| {
            s.connected = true;
            s.disconnected_at = None;
            s.last_error = None;
            s.connects += 1;
            s.last_contact = Some(Instant::now());
            s.last_revision = s.last_revision.max(revision);
        });
        tracing::info!(revision, "etcd: watching");
    }

    fn mark_disconnected(&self, error: String) {
        self.status.send_modify(|s| {
            if s.connected || s.disconnected_at.is_none() {
                s.disconnected_at = Some(Instant::now());
            }
            s.connected = false;
            s.failures += 1;
            s.last_error = Some(error);
        });
    }
}

/// The object currently in force for `k`, if the snapshot has one.
fn last_good(snap: &crate::snapshot::Snapshot, k: &StoreKey) -> Option<Object> {
    match k {
        StoreKey::Server(id) => {
            snap.server(id).map(|s| Object::Server(Box::new((*s.spec).clone())))
        }
        StoreKey::Token(id) => snap.token(id).map(|t| Object::Token(t.clone())),
        StoreKey::Replica { server, id } => snap
            .replica_specs(server)
            .into_iter()
            .find(|(r, _)| r.id == *id)
            .map(|(r, _)| Object::Replica((*r).clone())),
    }
}

fn warn_unknown_key(key: &[u8]) {
    tracing::warn!(key = %String::from_utf8_lossy(key), "etcd: ignoring key outside the sluice layout");
}

/// etcd revisions are positive `i64`s; generations are `u64`.
fn revision_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
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

/// A client for `cfg`'s endpoints. With `keepalive`, HTTP/2 pings detect a dead peer on an
/// idle connection (the watch); one-shot callers (`sluice ctl`) do without, so a slow ping
/// answer on a loaded machine cannot fail their request.
async fn connect(cfg: &EtcdConfig, keepalive: bool) -> Result<Client, EtcdError> {
    let mut opts = ConnectOptions::new().with_connect_timeout(cfg.connect_timeout);
    if keepalive {
        let interval = cfg.keepalive_interval.max(Duration::from_millis(10));
        let timeout = (interval * 2).max(Duration::from_secs(1));
        opts = opts.with_keep_alive(interval, timeout).with_keep_alive_while_idle(true);
    }
    bounded(cfg.connect_timeout + cfg.request_timeout, Client::connect(&cfg.endpoints, Some(opts)))
        .await
}

/// Every key-value under `prefix`, paged, all at the revision of the first page. Returns
/// the pairs and that revision.
async fn list_prefix(
    client: &Client,
    cfg: &EtcdConfig,
    prefix: &[u8],
) -> Result<(Vec<KeyValue>, i64), EtcdError> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
    let end = prefix_end(prefix);
    let mut out = Vec::new();
    let mut from = prefix.to_vec();
    let mut revision = 0i64;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut resp = bounded(cfg.request_timeout, kv.get(from.clone(), Some(opts))).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        match kvs.last() {
            Some(last) if more => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => {
                out.extend(kvs);
                return Ok((out, revision));
            }
        }
        out.extend(kvs);
    }
}

// ---------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------

/// Capped exponential backoff with jitter (each delay is drawn from [d/2, d]), so a fleet
/// of nodes does not reconnect in lockstep after an etcd outage.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: RandomState,
    draws: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            rng: RandomState::new(),
            draws: 0,
        }
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        // Randomly keyed hasher over a counter: enough randomness for jitter, no RNG dep.
        let mut h = self.rng.build_hasher();
        h.write_u64(self.draws);
        self.draws += 1;
        let frac = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }
}

// ---------------------------------------------------------------------------------------
// The writer (`sluice ctl`)
// ---------------------------------------------------------------------------------------

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
    client: Client,
    keys: Keys,
    timeout: Duration,
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
        let spec =
            TokenSpec { id: id.to_owned(), secret_hash: crate::hash_secret(&secret), environments };
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

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, EtcdError> {
    serde_json::to_vec(value).map_err(|e| {
        EtcdError::Malformed(MalformedValue {
            key: String::new(),
            reason: format!("cannot encode as JSON: {e}"),
        })
    })
}

/// 32 random bytes from the OS, as 64 lowercase hex digits.
fn generate_secret() -> Result<String, EtcdError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| EtcdError::Random(e.to_string()))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_roundtrip() {
        let keys = Keys::new("/sluice/");
        for k in [
            StoreKey::Server("s1".into()),
            StoreKey::Replica { server: "s1".into(), id: "r.1".into() },
            StoreKey::Token("t_1".into()),
        ] {
            assert_eq!(keys.parse(keys.key(&k).as_bytes()), Some(k));
        }
        for bad in [
            "/sluice/servers/",
            "/sluice/servers/a/b",
            "/sluice/replicas/a",
            "/sluice/replicas/a/",
            "/sluice/other/a",
            "/other/servers/a",
        ] {
            assert_eq!(keys.parse(bad.as_bytes()), None, "{bad}");
        }
        // The autoscaler's keys are under the prefix but skipped without a warning.
        assert_eq!(keys.desired(Some("s1")), format!("{}desired/s1", keys.prefix));
        assert!(keys.is_ignored(keys.desired(Some("s1")).as_bytes()));
        assert_eq!(keys.parse(keys.desired(Some("s1")).as_bytes()), None);
        assert!(!keys.is_ignored(keys.key(&StoreKey::Server("s1".into())).as_bytes()));
        assert!(!keys.is_ignored(b"/elsewhere/desired/s1"));
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/sluice/"), b"/sluice0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn decode_checks_key_ids_and_validation() {
        let k = StoreKey::Server("s1".into());
        let ok = serde_json::to_vec(&ServerSpec::new("s1", "hello")).unwrap();
        assert!(matches!(decode(&k, "/sluice/servers/s1", &ok), Ok(Object::Server(_))));
        let other = serde_json::to_vec(&ServerSpec::new("s2", "hello")).unwrap();
        let e = decode(&k, "/sluice/servers/s1", &other).unwrap_err();
        assert!(e.to_string().contains("/sluice/servers/s1"), "{e}");
        assert!(e.reason.contains("does not match"), "{e}");
        let e = decode(&k, "/sluice/servers/s1", b"{not json").unwrap_err();
        assert!(e.reason.contains("invalid JSON"), "{e}");
        let bad = serde_json::to_vec(&ServerSpec::new("s1", "Bad_Label")).unwrap();
        let e = decode(&k, "/sluice/servers/s1", &bad).unwrap_err();
        assert!(e.reason.contains("label"), "{e}");
    }

    #[test]
    fn backoff_grows_capped_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        let caps = [100, 200, 400, 800, 800, 800];
        for (d, cap) in delays.iter().zip(caps) {
            let cap = Duration::from_millis(cap);
            assert!(*d <= cap && *d >= cap / 2, "{d:?} vs {cap:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn config_defaults_and_durations() {
        let cfg: EtcdConfig =
            toml::from_str("endpoints = [\"http://10.0.0.1:2379\"]\nbackoff_max = \"10s\"\n")
                .unwrap();
        assert_eq!(cfg.prefix, DEFAULT_PREFIX);
        assert_eq!(cfg.backoff_max, Duration::from_secs(10));
        assert_eq!(cfg.request_timeout, EtcdConfig::default().request_timeout);
        assert!(toml::from_str::<EtcdConfig>("endpoint = []").is_err());
    }

    #[test]
    fn status_summary() {
        let mut s = StoreStatus {
            connected: true,
            synced: true,
            last_revision: 42,
            last_contact: None,
            disconnected_at: None,
            since_disconnect: None,
            last_error: None,
            connects: 1,
            relists: 1,
            malformed_values: 0,
            failures: 0,
        };
        assert!(!s.is_stale());
        assert_eq!(s.summary(), "etcd: connected, revision 42");
        s.connected = false;
        s.since_disconnect = Some(Duration::from_millis(3200));
        s.last_error = Some("transport error".into());
        assert!(s.is_stale());
        assert_eq!(s.summary(), "etcd: stale for 3.2s (revision 42): transport error");
        let common = s.to_source_status();
        assert!(!common.healthy);
        assert_eq!(common.generation, 42);
        assert_eq!(common.last_error.as_deref(), Some("transport error"));
    }
}
