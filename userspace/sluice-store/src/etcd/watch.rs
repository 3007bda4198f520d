//! The reconciler: list the prefix, then watch it, applying each response as one batch.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse};
use tokio::sync::watch;

use sluice_routing::backoff::Backoff;
use sluice_routing::model::{RoutingDoc, ServerSpec};
use sluice_routing::table::RoutingTable;
use sluice_routing::validate::ObjectRef;

use super::config::{EtcdConfig, connect};
use super::keys::{Keys, Object, StoreKey, decode, delete_change, prefix_end};
use super::status::{StatusHandle, StoreStatus};
use super::{EtcdError, MAX_MESSAGE_BYTES, bounded};

/// Keys per page when listing: keeps each response well under gRPC's message limit even
/// with 100k servers.
pub(super) const LIST_PAGE: i64 = 1000;
/// Largest gRPC message we accept (a watch response carrying a big transaction).
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
    /// `<prefix>acme/challenges/`, and where the values under it are mirrored, when
    /// ACME is on.
    challenges: Option<(String, AcmeChallenges)>,
}

/// The pending ACME HTTP-01 challenges of the store (`<prefix>acme/challenges/<token>`,
/// raw values by token), mirrored in memory by the same list-and-watch that feeds the
/// routing table: a challenge request is answered from here, never by asking etcd on
/// the request path.
#[derive(Clone, Debug, Default)]
pub struct AcmeChallenges(Arc<RwLock<HashMap<String, Vec<u8>>>>);

impl AcmeChallenges {
    /// The stored value for `token`, if a challenge is pending under it.
    pub fn get(&self, token: &str) -> Option<Vec<u8>> {
        self.0.read().ok()?.get(token).cloned()
    }

    fn replace(&self, all: HashMap<String, Vec<u8>>) {
        if let Ok(mut m) = self.0.write() {
            *m = all;
        }
    }

    fn put(&self, token: String, value: Vec<u8>) {
        if let Ok(mut m) = self.0.write() {
            m.insert(token, value);
        }
    }

    fn remove(&self, token: &str) {
        if let Ok(mut m) = self.0.write() {
            m.remove(token);
        }
    }
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
        EtcdSource {
            keys: cfg.keys(),
            cfg,
            table,
            status,
            revision: None,
            backoff,
            challenges: None,
        }
    }

    /// Also mirrors the store's pending ACME challenges into `challenges`.
    pub fn with_acme_challenges(mut self, challenges: AcmeChallenges) -> Self {
        self.challenges = Some((self.keys.acme("challenges/"), challenges));
        self
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

    /// The token of a key under `<prefix>acme/challenges/`, when challenges are mirrored.
    fn challenge_token(&self, key: &[u8]) -> Option<String> {
        let (prefix, _) = self.challenges.as_ref()?;
        let rest = key.strip_prefix(prefix.as_bytes())?;
        std::str::from_utf8(rest).ok().filter(|t| !t.is_empty()).map(str::to_owned)
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
        let mut challenges = HashMap::new();
        for kv in &kvs {
            if let Some(token) = self.challenge_token(kv.key()) {
                challenges.insert(token, kv.value().to_vec());
                continue;
            }
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
        if let Some((_, c)) = &self.challenges {
            c.replace(challenges);
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
            if let (Some(token), Some((_, c))) = (self.challenge_token(kv.key()), &self.challenges)
            {
                match EventType::try_from(ev.0.r#type) {
                    Ok(EventType::Put) => c.put(token, kv.value().to_vec()),
                    Ok(EventType::Delete) => c.remove(&token),
                    Err(_) => {}
                }
                continue;
            }
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
pub(super) fn last_good(snap: &sluice_routing::snapshot::Snapshot, k: &StoreKey) -> Option<Object> {
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

pub(super) fn warn_unknown_key(key: &[u8]) {
    tracing::warn!(key = %String::from_utf8_lossy(key), "etcd: ignoring key outside the sluice layout");
}

/// etcd revisions are positive `i64`s; generations are `u64`.
pub(super) fn revision_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

pub(super) async fn list_prefix(
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
