//! ACME for custom domains (`[acme]`, off by default): sluice obtains and renews
//! certificates for servers' custom domains that carry no certificate of their own.
//!
//! - One node of the region orders at a time: the holder of the etcd lock
//!   `<prefix>acme/lock`, on a lease kept alive while it lives. Every other node with
//!   `[acme]` waits on the lock and takes over when the holder's lease ends.
//! - Challenges are HTTP-01, answered by whichever node the ACME server reaches: the
//!   holder writes each key authorization to `<prefix>acme/challenges/<token>` (on its
//!   lease, so they vanish with it), and every node with `[acme]` answers
//!   `/.well-known/acme-challenge/<token>` from there, before routing.
//! - An issued certificate is kept at `<prefix>acme/certs/<domain>` and written into its
//!   server's spec as an ACME-marked certificate (a compare-and-swap on the server's
//!   revision), so every node's SNI resolver gets it through the routing change stream.
//!   When a writer replaces the spec without it, the next pass attaches the kept one
//!   again instead of ordering anew.
//! - A certificate is renewed when a third of its lifetime is left, but not earlier than
//!   30 days before expiry (a 90-day certificate at 60 days, a 6-day one at 4); a failed
//!   order backs off per domain.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use sluice_proxy::Proxy;
use sluice_routing::RoutingTable;
use sluice_routing::backoff::Backoff;
use sluice_routing::cert::CertSummary;
use sluice_routing::model::{CertificateSpec, duration_serde};
use sluice_store::etcd::{AcmeChallenges, AcmeLock, EtcdConfig, EtcdError, EtcdStore};
use tokio::sync::{Notify, OnceCell};

/// Let's Encrypt's production directory, the default `directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Renew at the latest this long before expiry.
const RENEW_BEFORE_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// The `[acme]` section of the node config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    /// Off by default; on, the node takes part in ordering (one node at a time) and
    /// answers HTTP-01 challenges. Needs `[etcd]`.
    pub enabled: bool,
    /// The ACME directory URL.
    pub directory: String,
    /// Contact address for the account (`ops@example.com`; `mailto:` is added).
    pub email: Option<String>,
    /// A PEM CA certificate to trust for the ACME server's HTTPS instead of the system's
    /// roots (a test CA such as pebble's).
    pub ca_file: Option<PathBuf>,
    /// How often the lock holder looks for domains to order or renew.
    #[serde(with = "duration_serde")]
    pub check_interval: Duration,
    /// TTL of the lock's lease: how long a dead holder blocks the others.
    #[serde(with = "duration_serde")]
    pub lease_ttl: Duration,
    /// First retry delay of a domain whose order failed; doubles per failure.
    #[serde(with = "duration_serde")]
    pub retry_initial: Duration,
    /// Cap on that delay.
    #[serde(with = "duration_serde")]
    pub retry_max: Duration,
    /// Bound on one order (validation, then issuance).
    #[serde(with = "duration_serde")]
    pub order_timeout: Duration,
    /// How long a kept certificate (and its key) stays in etcd after its domain is no
    /// longer any server's: a domain moved between servers in two writes, or detached
    /// and attached again soon, then costs no new order.
    #[serde(with = "duration_serde")]
    pub keep_detached: Duration,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            enabled: false,
            directory: LETS_ENCRYPT.into(),
            email: None,
            ca_file: None,
            check_interval: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(15),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(6 * 3600),
            order_timeout: Duration::from_secs(120),
            keep_detached: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why an order or a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server or the client failed.
    #[error("acme: {0}")]
    Acme(#[from] instant_acme::Error),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The order ended in a state other than ready / valid.
    #[error("order for {domain}: {state}")]
    Order {
        /// The domain.
        domain: String,
        /// What happened.
        state: String,
    },
    /// The lock was lost while ordering.
    #[error("the ACME lock was lost")]
    LockLost,
    /// A stored value could not be encoded or decoded.
    #[error("{0}")]
    Codec(String),
}

/// `sluice_acme_*` counters.
#[derive(Debug, Default)]
pub struct AcmeMetrics {
    issued: AtomicU64,
    renewed: AtomicU64,
    failed: AtomicU64,
    passes: AtomicU64,
    leader: AtomicU64,
    /// The lease of the lock while held, else 0 (for the release at shutdown).
    lease: AtomicI64,
}

/// The `sluice_acme_*` families on each `/metrics` scrape.
impl prometheus_client::collector::Collector for AcmeMetrics {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use sluice_proxy::metrics::{counter, counters, gauge};
        let results =
            [("issued", &self.issued), ("renewed", &self.renewed), ("failed", &self.failed)];
        counters(
            &mut e,
            "sluice_acme_orders_total",
            "ACME orders this node made, by result.",
            results.map(|(result, c)| ([("result", result)], c.load(Ordering::Relaxed))),
        )?;
        counter(
            &mut e,
            "sluice_acme_passes_total",
            "Looks at every server's domains this node completed as the lock holder.",
            self.passes.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut e,
            "sluice_acme_lock_held",
            "1 while this node holds the ACME ordering lock.",
            self.leader.load(Ordering::Relaxed),
        )
    }
}

/// An issued certificate as kept at `<prefix>acme/certs/<domain>`.
#[derive(Clone, Serialize, Deserialize)]
struct Issued {
    domain: String,
    cert_pem: String,
    key_pem: String,
}

impl Issued {
    fn spec(&self) -> CertificateSpec {
        let mut spec = CertificateSpec::inline([&self.domain], &self.cert_pem, &self.key_pem);
        spec.acme = true;
        spec
    }
}

/// A pending HTTP-01 challenge as kept at `<prefix>acme/challenges/<token>`.
#[derive(Serialize, Deserialize)]
struct Challenge {
    domain: String,
    key_authorization: String,
}

/// The account as kept at `<prefix>acme/account`: shared by every node, per directory.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// When a certificate valid from `not_before` to `not_after` (Unix seconds) is due for
/// renewal: when a third of its lifetime is left, but not earlier than 30 days before
/// expiry.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let lifetime = (not_after - not_before).max(0);
    let max = i64::try_from(RENEW_BEFORE_MAX.as_secs()).unwrap_or(i64::MAX);
    not_after - (lifetime / 3).min(max)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// How long the holder waits for a challenge it wrote to reach its own mirror.
const MIRROR_WAIT: Duration = Duration::from_secs(5);
/// Then how long it allows the other nodes' watches before the CA is told to look.
const MIRROR_GRACE: Duration = Duration::from_millis(200);

/// Waits until `token` is in this node's challenge mirror (bounded by [`MIRROR_WAIT`];
/// the CA is asked either way), then [`MIRROR_GRACE`].
async fn wait_mirrored(challenges: &AcmeChallenges, token: &str) {
    let deadline = Instant::now() + MIRROR_WAIT;
    while challenges.get(token).is_none() {
        if Instant::now() >= deadline {
            tracing::warn!(token, "ACME: the challenge did not reach this node's mirror in time");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(MIRROR_GRACE).await;
}

/// Whether `spec`'s certificate needs renewing now (or does not load at all).
fn due(spec: &CertificateSpec, now: i64) -> bool {
    match sluice_routing::cert::load(spec) {
        Ok(l) => now >= renew_at(l.summary.not_before, l.summary.not_after),
        Err(_) => true,
    }
}

/// Answers HTTP-01 challenges from the in-memory mirror of `<prefix>acme/challenges/`
/// the etcd source keeps: no store round trip on the request path.
struct EtcdChallenges(AcmeChallenges);

impl sluice_proxy::ChallengeAnswers for EtcdChallenges {
    fn answer<'a>(
        &'a self,
        host: &'a str,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(async move {
            if !sluice_proxy::valid_token(token) {
                return None;
            }
            let value = self.0.get(token)?;
            let c: Challenge = serde_json::from_slice(&value).ok()?;
            (c.domain == host).then_some(c.key_authorization)
        })
    }
}

/// Starts ACME on this node: installs the challenge answers (from `challenges`, which
/// the etcd source mirrors) and the metrics on `server`, and spawns the task that waits
/// for the lock and then orders, looking again whenever `table` (fed by the same etcd)
/// shows a change of custom domains or certificates. The task ends when `stop` is
/// notified, after giving the lock up if it held it.
pub fn start(
    cfg: AcmeConfig,
    etcd: EtcdConfig,
    table: RoutingTable,
    challenges: AcmeChallenges,
    server: &mut Proxy,
    stop: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    let store = Arc::new(OnceCell::new());
    server.set_acme_challenges(Arc::new(EtcdChallenges(challenges.clone())));
    let metrics = Arc::new(AcmeMetrics::default());
    server.metrics_extra(Box::new(metrics.clone()));
    tokio::spawn(async move {
        let stopped = stop.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        tokio::select! {
            _ = &mut stopped => {}
            _ = run(cfg, etcd, table, challenges, store.clone(), metrics.clone()) => {}
        }
        // Shutting down (or handing over in an upgrade): pass the lock on now rather
        // than after its TTL.
        let lease = metrics.lease.load(Ordering::Relaxed);
        if lease != 0
            && let Some(store) = store.get()
            && let Err(e) = store.revoke_lease(lease).await
        {
            tracing::warn!(error = %e, "ACME: releasing the ordering lock at shutdown");
        }
    })
}

/// Connects, then forever: wait for the lock, order while it is held.
async fn run(
    cfg: AcmeConfig,
    etcd: EtcdConfig,
    table: RoutingTable,
    challenges: AcmeChallenges,
    cell: Arc<OnceCell<EtcdStore>>,
    metrics: Arc<AcmeMetrics>,
) {
    let mut backoff = Backoff::new(etcd.backoff_initial, etcd.backoff_max);
    let store = loop {
        match EtcdStore::connect(&etcd).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "ACME: cannot reach etcd; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    let _ = cell.set(store.clone());
    let mut orderer = Orderer {
        cfg: cfg.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        retry: HashMap::new(),
        passes: 0,
        detached: HashMap::new(),
        table,
        challenges,
    };
    loop {
        let lock = match store.acme_lock(cfg.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "ACME: cannot take the ordering lock; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        tracing::info!(lease = lock.lease(), "ACME: this node orders certificates");
        metrics.leader.store(1, Ordering::Relaxed);
        metrics.lease.store(lock.lease(), Ordering::Relaxed);
        let reason = tokio::select! {
            _ = lock.lost() => "lease lost".to_owned(),
            e = orderer.lead(&lock) => e.to_string(),
        };
        metrics.leader.store(0, Ordering::Relaxed);
        metrics.lease.store(0, Ordering::Relaxed);
        tracing::warn!(reason, "ACME: giving up the ordering lock");
        lock.release().await;
        // A holder that got work done starts over from the short delay; one that never
        // got a pass through (the ACME server is down) backs off further each time.
        if std::mem::take(&mut orderer.passes) > 0 {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// The lock holder's work.
struct Orderer {
    cfg: AcmeConfig,
    store: EtcdStore,
    metrics: Arc<AcmeMetrics>,
    /// Domains whose last order failed: their backoff and when to try again.
    retry: HashMap<String, (Backoff, Instant)>,
    /// Passes completed under the current lock.
    passes: u64,
    /// Kept certificates whose domain no server has, since when (this term's view).
    detached: HashMap<String, Instant>,
    /// This node's routing state: a change of domains there starts a pass early.
    table: RoutingTable,
    /// This node's mirror of the pending challenges (what its listeners answer from).
    challenges: AcmeChallenges,
}

impl Orderer {
    /// Passes every `check_interval` while the lock is held; returns on an error that
    /// needs the lock retaken (etcd or the account).
    async fn lead(&mut self, lock: &AcmeLock) -> AcmeError {
        let account = match self.account(lock).await {
            Ok(a) => a,
            Err(e) => return e,
        };
        let mut snapshots = self.table.subscribe_snapshots();
        loop {
            let seen = domains_fingerprint(&self.table);
            if let Err(e) = self.pass(&account, lock).await {
                return e;
            }
            self.passes += 1;
            self.metrics.passes.fetch_add(1, Ordering::Relaxed);
            // The next pass: at `check_interval`, when a failed domain may retry, or as
            // soon as a server's domains or certificates change (not on every replica
            // or health change: those publish snapshots too).
            let mut next = Instant::now() + self.cfg.check_interval;
            if let Some(at) = self.retry.values().map(|(_, at)| *at).min() {
                next = next.min(at);
            }
            let deadline = tokio::time::Instant::from_std(next);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    r = snapshots.changed() => {
                        if r.is_err() {
                            // The table is gone (shutting down): only the clock is left.
                            tokio::time::sleep_until(deadline).await;
                            break;
                        }
                        if domains_fingerprint(&self.table) != seen {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The shared account: loaded from etcd, or created and stored.
    async fn account(&self, lock: &AcmeLock) -> Result<Account, AcmeError> {
        let builder = || match &self.cfg.ca_file {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        if let Some(v) = self.store.acme_get("account").await?
            && let Ok(stored) = serde_json::from_slice::<StoredAccount>(&v)
            && stored.directory == self.cfg.directory
        {
            return Ok(builder()?.from_credentials(stored.credentials).await?);
        }
        let contact = self.cfg.email.as_ref().map(|e| format!("mailto:{e}"));
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.cfg.directory.clone(),
                None,
            )
            .await?;
        let stored = StoredAccount { directory: self.cfg.directory.clone(), credentials };
        let value = serde_json::to_vec(&stored).map_err(|e| AcmeError::Codec(e.to_string()))?;
        if !self.store.acme_put("account", value, lock, false).await? {
            return Err(AcmeError::LockLost);
        }
        tracing::info!(directory = %self.cfg.directory, "ACME: account created");
        Ok(account)
    }

    /// One look at every server: attach kept certificates, order missing and due ones,
    /// and forget kept certificates of domains detached for `keep_detached`.
    async fn pass(&mut self, account: &Account, lock: &AcmeLock) -> Result<(), AcmeError> {
        let now = unix_now();
        let servers = self.store.list_servers_versioned().await?;
        let attached: std::collections::HashSet<String> = servers
            .iter()
            .flat_map(|s| s.spec.custom_domains.iter().map(|d| d.to_ascii_lowercase()))
            .collect();
        self.forget_detached(&attached).await?;
        for vs in servers {
            let mut spec = vs.spec;
            let mut changed = false;
            let domains: Vec<String> =
                spec.custom_domains.iter().map(|d| d.to_ascii_lowercase()).collect();
            for d in domains {
                // HTTP-01 cannot prove a wildcard.
                if d.starts_with("*.") {
                    continue;
                }
                let covering = spec
                    .certificates
                    .iter()
                    .find(|c| c.domains.iter().any(|x| x.eq_ignore_ascii_case(&d)));
                let renewal = match covering {
                    // The server's own certificate: not ours to manage.
                    Some(c) if !c.acme => continue,
                    Some(c) if !due(c, now) => continue,
                    Some(_) => true,
                    None => {
                        if let Some(kept) = self.kept(&d).await?
                            && !due(&kept.spec(), now)
                        {
                            attach(&mut spec.certificates, kept.spec());
                            changed = true;
                            continue;
                        }
                        false
                    }
                };
                if self.retry.get(&d).is_some_and(|(_, at)| Instant::now() < *at) {
                    continue;
                }
                if lock.is_lost() {
                    return Err(AcmeError::LockLost);
                }
                let ordered =
                    tokio::time::timeout(self.cfg.order_timeout, self.order(account, &d, lock))
                        .await
                        .unwrap_or_else(|_| {
                            Err(AcmeError::Order {
                                domain: d.clone(),
                                state: format!("not done within {:?}", self.cfg.order_timeout),
                            })
                        });
                match ordered {
                    Ok(issued) => {
                        self.retry.remove(&d);
                        let c = if renewal { &self.metrics.renewed } else { &self.metrics.issued };
                        c.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(server = %spec.id, domain = %d, renewal, "ACME: certificate issued");
                        attach(&mut spec.certificates, issued.spec());
                        changed = true;
                    }
                    Err(AcmeError::Etcd(e)) => return Err(AcmeError::Etcd(e)),
                    Err(AcmeError::LockLost) => return Err(AcmeError::LockLost),
                    Err(e) if unknown_account(&e) => {
                        // The CA forgot the account (reset, deactivated): drop the stored
                        // one, so the next holder's term starts with a new account.
                        self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                        self.store.acme_delete("account").await?;
                        return Err(e);
                    }
                    Err(e) => {
                        self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                        let (b, at) = self.retry.entry(d.clone()).or_insert_with(|| {
                            (
                                Backoff::new(self.cfg.retry_initial, self.cfg.retry_max),
                                Instant::now(),
                            )
                        });
                        let delay = b.next_delay();
                        *at = Instant::now() + delay;
                        tracing::warn!(server = %spec.id, domain = %d, error = %e, retry_in = ?delay, "ACME: order failed");
                    }
                }
            }
            if changed && !self.store.put_server_if(&spec, vs.mod_revision, lock).await? {
                // Someone wrote the server meanwhile: the kept certificate is attached
                // on the next pass.
                tracing::info!(server = %spec.id, "ACME: server changed meanwhile; next pass");
            }
        }
        Ok(())
    }

    /// Deletes kept certificates whose domain has been attached to no server for
    /// `keep_detached`.
    async fn forget_detached(
        &mut self,
        attached: &std::collections::HashSet<String>,
    ) -> Result<(), AcmeError> {
        let kept = self.store.acme_list("certs/").await?;
        self.detached.retain(|d, _| kept.contains(d) && !attached.contains(d));
        for d in kept.into_iter().filter(|d| !attached.contains(d)) {
            let since = *self.detached.entry(d.clone()).or_insert_with(Instant::now);
            if since.elapsed() >= self.cfg.keep_detached {
                self.store.acme_delete(&format!("certs/{d}")).await?;
                self.detached.remove(&d);
                tracing::info!(domain = %d, "ACME: forgot the certificate of a detached domain");
            }
        }
        Ok(())
    }

    /// The certificate kept for `domain`, if any.
    async fn kept(&self, domain: &str) -> Result<Option<Issued>, AcmeError> {
        Ok(self
            .store
            .acme_get(&format!("certs/{domain}"))
            .await?
            .and_then(|v| serde_json::from_slice::<Issued>(&v).ok())
            .filter(|i| i.domain == domain))
    }

    /// Orders a certificate for `domain` (HTTP-01) and keeps it in etcd.
    async fn order(
        &self,
        account: &Account,
        domain: &str,
        lock: &AcmeLock,
    ) -> Result<Issued, AcmeError> {
        let failed = |state: String| AcmeError::Order { domain: domain.to_owned(), state };
        let ids = [Identifier::Dns(domain.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut tokens = Vec::new();
        let mut result = async {
            let mut authorizations = order.authorizations();
            while let Some(a) = authorizations.next().await {
                let mut a = a?;
                match a.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    s => return Err(failed(format!("authorization {s:?}"))),
                }
                let mut ch = a
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| failed("no http-01 challenge offered".into()))?;
                let answer = Challenge {
                    domain: domain.to_owned(),
                    key_authorization: ch.key_authorization().as_str().to_owned(),
                };
                let value =
                    serde_json::to_vec(&answer).map_err(|e| AcmeError::Codec(e.to_string()))?;
                let token = ch.token.clone();
                if !self.store.acme_put(&format!("challenges/{token}"), value, lock, true).await? {
                    return Err(AcmeError::LockLost);
                }
                // Every node answers from its watch-fed mirror: the CA is told to look
                // only once the write has reached this node's, plus a moment for the
                // other nodes' watches (they see the same revision within milliseconds).
                wait_mirrored(&self.challenges, &token).await;
                tokens.push(token);
                ch.set_ready().await?;
            }
            Ok(())
        }
        .await;
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(self.cfg.order_timeout);
        if result.is_ok() {
            result = match order.poll_ready(&retries).await {
                Ok(OrderStatus::Ready) => Ok(()),
                Ok(s) => Err(failed(format!("order {s:?}"))),
                Err(e) => Err(e.into()),
            };
        }
        for t in &tokens {
            if let Err(e) = self.store.acme_delete(&format!("challenges/{t}")).await {
                tracing::warn!(error = %e, "ACME: removing a challenge answer failed");
            }
        }
        result?;
        let key_pem = order.finalize().await?;
        let cert_pem = order.poll_certificate(&retries).await?;
        let issued = Issued { domain: domain.to_owned(), cert_pem, key_pem };
        // Checked as every node will check it before it is written anywhere.
        let loaded = sluice_routing::cert::load(&issued.spec())
            .map_err(|e| failed(format!("issued certificate refused: {e}")))?;
        log_issued(&loaded.summary);
        let value = serde_json::to_vec(&issued).map_err(|e| AcmeError::Codec(e.to_string()))?;
        if !self.store.acme_put(&format!("certs/{domain}"), value, lock, false).await? {
            return Err(AcmeError::LockLost);
        }
        Ok(issued)
    }
}

fn log_issued(s: &CertSummary) {
    tracing::info!(names = ?s.names, issuer = %s.issuer, serial = %s.serial, not_after = %sluice_routing::cert::rfc3339(s.not_after), "ACME: certificate obtained");
}

/// Whether the CA answered that the account does not exist.
fn unknown_account(e: &AcmeError) -> bool {
    matches!(e, AcmeError::Acme(instant_acme::Error::Api(p))
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"))
}

/// A digest of every server's custom domains and certificate domains in `table`'s
/// snapshot, independent of their order: what decides whether ACME has work to look at.
fn domains_fingerprint(table: &RoutingTable) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    // Fixed keys: the digest is only compared within this process.
    let state =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    let snap = table.load();
    snap.servers().fold(0u64, |acc, s| {
        let mut h = state.build_hasher();
        s.spec.id.hash(&mut h);
        s.spec.custom_domains.hash(&mut h);
        for c in &s.spec.certificates {
            (&c.domains, c.acme).hash(&mut h);
        }
        acc ^ h.finish()
    })
}

/// Puts `cert` in place of the ACME certificates that cover any of its domains.
fn attach(certs: &mut Vec<CertificateSpec>, cert: CertificateSpec) {
    certs.retain(|c| {
        !(c.acme
            && c.domains.iter().any(|d| cert.domains.iter().any(|n| n.eq_ignore_ascii_case(d))))
    });
    certs.push(cert);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    #[test]
    fn renewal_is_due_a_third_of_the_lifetime_or_30_days_before_expiry() {
        // 90 days: 30 days before.
        assert_eq!(renew_at(0, 90 * DAY), 60 * DAY);
        // A year: 30 days before, not a third.
        assert_eq!(renew_at(0, 366 * DAY), 336 * DAY);
        // 6 days: a third of it before.
        assert_eq!(renew_at(0, 6 * DAY), 4 * DAY);
        // A certificate whose dates are inverted is due at its expiry.
        assert_eq!(renew_at(10, 5), 5);
    }

    #[test]
    fn config_defaults_and_parse() {
        let c: AcmeConfig = toml::from_str("").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.directory, LETS_ENCRYPT);
        let c: AcmeConfig = toml::from_str(
            "enabled = true\ndirectory = \"https://127.0.0.1:14000/dir\"\nemail = \"ops@example.org\"\ncheck_interval = \"1s\"\n",
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.check_interval, Duration::from_secs(1));
        assert!(toml::from_str::<AcmeConfig>("enable = true").is_err());
    }

    #[test]
    fn attach_replaces_only_acme_certificates_of_the_domain() {
        let own = CertificateSpec::inline(["a.example.org"], "c", "k");
        let mut old = CertificateSpec::inline(["b.example.org"], "c", "k");
        old.acme = true;
        let mut new = CertificateSpec::inline(["b.example.org"], "c2", "k2");
        new.acme = true;
        let mut certs = vec![own.clone(), old];
        attach(&mut certs, new.clone());
        assert_eq!(certs, vec![own, new]);
    }
}
