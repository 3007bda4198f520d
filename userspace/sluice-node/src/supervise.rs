//! `sluice supervise`: the reference compute side for one node. It reads the desired
//! replica counts `sluice autoscale` writes, starts replica processes of the servers that
//! carry a `launch` spec on free loopback ports, and registers them in the routing state
//! the proxy watches: `starting`, then `ready` once the port accepts (the proxy's own
//! health check then admits it), and `draining` on scale-down, after which the process
//! gets SIGTERM as soon as the proxy shows it draining with nothing in flight, or at the
//! end of `exit_grace_period` at the latest, and SIGKILL `--kill-after` later. A
//! replica that exits on its own is deregistered and replaced.
//!
//! The in-flight count is the proxy's ([`InFlightSource`]): polled from its admin API
//! over loopback (`--proxy-admin`, `GET /state?server=`) by `sluice supervise`, read
//! from the shared routing table by `sluice demo`, which runs the proxy in-process.
//! Without one, a draining replica gets its whole grace period.
//!
//! The decisions themselves are [`sluice_routing::supervisor`]; this module runs them
//! against real processes and a real store ([`run_on_files`], [`run_on_etcd`]); the
//! command line is the binary's.
//!
//! Two stores, as for the proxy (docs/operations.md, "Replica supervisor"):
//! - files: server specs from the proxy's routing file or directory (`--routes`), desired
//!   counts from `sluice autoscale --file` (`--desired-file`), and the replicas written
//!   to a file of their own (`--replicas-file`, a `*.toml` in the directory the proxy
//!   watches), so the supervisor never rewrites a file a person edits;
//! - etcd: servers from `<prefix>servers/`, desired counts from `<prefix>desired/`, and
//!   replicas written to `<prefix>replicas/<server>/<id>` with the same writer as
//!   `sluice ctl`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use crate::autoscaler::{DesiredSink, SinkError};
use sluice_routing::DesiredReplicas;
use sluice_routing::model::{
    LaunchSpec, Protocol, ReplicaSpec, ReplicaState, RoutingDoc, ServerSpec,
};
use sluice_routing::supervisor::{Managed, Phase, plan, targets};
use sluice_store::etcd::{EtcdError, EtcdStore};
use sluice_store::file::SourceError;
use tokio::process::{Child, Command};

/// What can go wrong reading or writing the store (each retried on the next round).
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The routing file(s) did not load.
    #[error("routes: {0}")]
    Routes(#[from] SourceError),
    /// The desired-counts file did not load.
    #[error("desired counts: {0}")]
    Desired(#[from] SinkError),
    /// etcd failed.
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
    /// Writing the replicas file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The replicas did not serialize (a bug, not a peer's doing).
    #[error("serializing replicas: {0}")]
    Serialize(#[from] toml::ser::Error),
    /// The arguments or a launch spec cannot work.
    #[error("{0}")]
    Config(String),
    /// A store operation failed, with what was being done.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The etcd error.
        #[source]
        source: EtcdError,
    },
    /// A replica process could not be started (logged, tried again next round).
    #[error("{what}: {cause}")]
    Spawn {
        /// What was being done.
        what: String,
        /// The cause.
        cause: std::io::Error,
    },
}

/// Results of the supervisor.
type Result<T, E = SuperviseError> = std::result::Result<T, E>;

/// The file store's paths (`sluice supervise --routes --replicas-file --desired-file`).
pub struct FileStore {
    /// The proxy's routing file or directory.
    pub routes: PathBuf,
    /// This supervisor's replicas, a `*.toml` inside `routes`.
    pub replicas_file: PathBuf,
    /// The autoscaler's desired counts.
    pub desired_file: PathBuf,
}

/// Supervises on the file store until `shutdown` resolves, then deregisters and stops
/// every replica: what `sluice demo` runs in-process beside the proxy and the
/// autoscaler, so its scale-from-zero server has a compute side.
pub async fn run_on_files(
    files: FileStore,
    proxy: impl InFlightSource,
    id_prefix: String,
    kill_after: Duration,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let store = Store::files(files)?;
    supervise(store, Supervisor::new(id_prefix, kill_after), proxy, interval, shutdown).await
}

/// Supervises on etcd until `shutdown` resolves, then deregisters and stops every
/// replica. Replicas with this `id_prefix` that an earlier run registered are deleted
/// first: their processes are gone.
pub async fn run_on_etcd(
    etcd: EtcdStore,
    proxy: impl InFlightSource,
    id_prefix: String,
    kill_after: Duration,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let store = Store::Etcd { store: Box::new(etcd), published: BTreeMap::new() };
    store.forget_leftovers(&id_prefix).await?;
    supervise(store, Supervisor::new(id_prefix, kill_after), proxy, interval, shutdown).await
}

async fn supervise(
    mut store: Store,
    mut sup: Supervisor,
    proxy: impl InFlightSource,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if interval.is_zero() {
        return Err(SuperviseError::Config("--interval must be positive".into()));
    }
    // Registers nothing yet, but truncates a replicas file an earlier run left: its
    // processes died with it (kill_on_drop), so its entries would only be dead ports.
    store.publish(&[]).await?;
    tracing::info!("supervisor running");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => sup.round(&mut store, &proxy).await,
        }
    }
    sup.stop_all(&mut store).await;
    Ok(())
}

/// Where server specs and desired counts come from and replicas go.
enum Store {
    Files {
        routes: PathBuf,
        replicas_file: PathBuf,
        desired_file: PathBuf,
    },
    Etcd {
        store: Box<EtcdStore>,
        /// What is in etcd now, by (server, id), so a round writes only the changes.
        published: BTreeMap<(String, String), ReplicaSpec>,
    },
}

impl Store {
    fn files(f: FileStore) -> Result<Store> {
        if f.replicas_file.extension().is_none_or(|e| e != "toml") {
            return Err(SuperviseError::Config(
                "--replicas-file must end in .toml, or the proxy's file source skips it".into(),
            ));
        }
        let FileStore { routes, replicas_file, desired_file } = f;
        Ok(Store::Files { routes, replicas_file, desired_file })
    }

    async fn inputs(&self) -> Result<(Vec<ServerSpec>, Vec<DesiredReplicas>), SuperviseError> {
        match self {
            Store::Files { routes, desired_file, .. } => {
                let doc = sluice_store::file::load_doc(routes)?;
                let desired = DesiredSink::File(desired_file.clone()).load().await?;
                Ok((doc.servers, desired))
            }
            Store::Etcd { store, .. } => {
                let servers = store.list_servers().await?;
                let desired = store.list_desired().await?;
                for m in servers.malformed.iter().chain(&desired.malformed) {
                    tracing::warn!(key = %m.key, "ignoring a malformed value: {}", m.reason);
                }
                Ok((servers.items, desired.items))
            }
        }
    }

    /// Make the store hold exactly `replicas` as this supervisor's.
    async fn publish(&mut self, replicas: &[ReplicaSpec]) -> Result<(), SuperviseError> {
        match self {
            Store::Files { replicas_file, .. } => {
                write_replicas_file(replicas_file, replicas).await
            }
            Store::Etcd { store, published } => {
                let want: BTreeMap<_, _> = replicas
                    .iter()
                    .map(|r| ((r.server.clone(), r.id.clone()), r.clone()))
                    .collect();
                // `published` follows each successful write, so a failure part-way is
                // resumed on the next round without rewriting what already landed.
                for (key, r) in &want {
                    if published.get(key) != Some(r) {
                        store.put_replica(r).await?;
                        published.insert(key.clone(), r.clone());
                    }
                }
                let gone: Vec<_> =
                    published.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
                for key in gone {
                    store.delete_replica(&key.0, &key.1).await?;
                    published.remove(&key);
                }
                Ok(())
            }
        }
    }

    /// etcd: delete replicas an earlier run of this supervisor registered (same id
    /// prefix); their processes are gone.
    async fn forget_leftovers(&self, prefix: &str) -> Result<()> {
        let Store::Etcd { store, .. } = self else { return Ok(()) };
        let own = format!("{prefix}-");
        let listing = store
            .list_replicas(None)
            .await
            .map_err(|source| SuperviseError::Store { what: "listing replicas", source })?;
        for r in listing.items.iter().filter(|r| r.id.starts_with(&own)) {
            tracing::info!(server = %r.server, replica = %r.id, "deleting a leftover registration");
            store
                .delete_replica(&r.server, &r.id)
                .await
                .map_err(|source| SuperviseError::Store { what: "deleting a replica", source })?;
        }
        Ok(())
    }
}

/// Rewrite the replicas file atomically (hidden temporary file + rename: the proxy's
/// file source skips hidden files, and never sees a half-written one).
async fn write_replicas_file(path: &Path, replicas: &[ReplicaSpec]) -> Result<(), SuperviseError> {
    let doc = RoutingDoc { replicas: replicas.to_vec(), ..RoutingDoc::default() };
    let text = format!(
        "# Written by `sluice supervise`; rewritten on every change, do not edit.\n{}",
        toml::to_string(&doc)?
    );
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let io = |source| SuperviseError::Io { path: path.to_owned(), source };
    tokio::fs::write(&tmp, text).await.map_err(io)?;
    tokio::fs::rename(&tmp, path).await.map_err(io)
}

/// One replica as this node's proxy sees it: the part of `GET /state?server=`'s
/// replica entries the supervisor reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct ProxyReplica {
    /// Replica id.
    pub id: String,
    /// Its address (told apart from an earlier run's replica of the same id).
    pub address: SocketAddr,
    /// The state the proxy applied (it lags the store by its watch).
    pub state: ReplicaState,
    /// Requests and streams the proxy has in flight to it.
    pub in_flight: u64,
}

/// Why the proxy's view could not be had (the supervisor then falls back to the grace
/// period).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No proxy to ask (`sluice supervise` without `--proxy-admin`).
    #[error("no --proxy-admin given")]
    NotConfigured,
    /// The admin listener failed, timed out or answered something unexpected.
    #[error("{0}")]
    Admin(String),
}

/// Where the supervisor learns what the proxy has in flight to its draining replicas:
/// the proxy's admin API over loopback ([`AdminApi`]) or, in-process, its routing
/// table ([`SharedState`]). Asked once per round per server with a replica waiting for
/// its SIGTERM, never on the request path.
pub trait InFlightSource {
    /// The proxy's replicas of `server`, any state (empty: it knows no such server).
    fn replicas(
        &self,
        server: &str,
    ) -> impl std::future::Future<Output = Result<Vec<ProxyReplica>, ProbeError>>;
}

/// No proxy to ask: every draining replica gets its whole grace period.
pub struct NoProxy;

impl InFlightSource for NoProxy {
    async fn replicas(&self, _server: &str) -> Result<Vec<ProxyReplica>, ProbeError> {
        Err(ProbeError::NotConfigured)
    }
}

/// The local proxy's admin listener (`GET /state?server=<id>`).
pub struct AdminApi {
    /// Its address.
    pub admin: SocketAddr,
}

/// How long one `/state` answer may take: the round waits for it.
const ADMIN_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on one `/state?server=` answer (a server's entry with its replicas).
const ADMIN_MAX_BODY: usize = 4 << 20;

impl InFlightSource for AdminApi {
    async fn replicas(&self, server: &str) -> Result<Vec<ProxyReplica>, ProbeError> {
        #[derive(serde::Deserialize)]
        struct View {
            replicas: Vec<ProxyReplica>,
        }
        // Server ids are `[A-Za-z0-9._-]` (validated): nothing to escape in a query.
        let path = format!("/state?server={server}");
        let get = sluice_proxy::admin_get(self.admin, &path, ADMIN_MAX_BODY);
        let (status, body) = tokio::time::timeout(ADMIN_TIMEOUT, get)
            .await
            .map_err(|_| {
                ProbeError::Admin(format!("{} did not answer in {ADMIN_TIMEOUT:?}", self.admin))
            })?
            .map_err(|e| ProbeError::Admin(format!("{}: {e}", self.admin)))?;
        match status {
            http::StatusCode::OK => serde_json::from_slice::<View>(&body)
                .map(|v| v.replicas)
                .map_err(|e| ProbeError::Admin(format!("{}{path}: {e}", self.admin))),
            http::StatusCode::NOT_FOUND => Ok(Vec::new()),
            other => Err(ProbeError::Admin(format!("{}{path} answered {other}", self.admin))),
        }
    }
}

/// The routing table of a proxy in the same process (`sluice demo`): the same view
/// `GET /state?server=` serves, without the loopback round trip.
pub struct SharedState(pub sluice_routing::RoutingTable);

impl InFlightSource for SharedState {
    async fn replicas(&self, server: &str) -> Result<Vec<ProxyReplica>, ProbeError> {
        let Some(view) = self.0.load_full().server_view(server) else { return Ok(Vec::new()) };
        Ok(view
            .replicas
            .into_iter()
            .map(|r| ProxyReplica {
                id: r.id,
                address: r.address,
                state: r.state,
                in_flight: r.in_flight,
            })
            .collect())
    }
}

/// Whether the proxy's view says a draining replica may be stopped now: it lists the
/// replica (same id and address) as draining, so routes it nothing new, with nothing
/// in flight. A replica it does not list, or still lists as ready (its watch has not
/// caught up), is not idle: it may yet carry requests.
fn idle_in(view: &[ProxyReplica], id: &str, address: SocketAddr) -> bool {
    view.iter().any(|p| {
        p.id == id && p.address == address && p.state == ReplicaState::Draining && p.in_flight == 0
    })
}

/// Rounds in a row the proxy must show a draining replica idle before SIGTERM: one more
/// than needed to see the state, so a request that picked the replica from the snapshot
/// just before it went draining has been counted by the second look.
const IDLE_ROUNDS: u32 = 2;

/// One replica process this supervisor started.
struct Replica {
    server: String,
    id: String,
    seq: u64,
    port: u16,
    protocol: Protocol,
    child: Child,
    /// The child's pid, which is also its process group (it leads one, so a signal
    /// reaches whatever it forks too).
    pgid: Option<rustix::process::Pid>,
    phase: Phase,
    started: Instant,
    startup_timeout: Duration,
    grace: Duration,
    drain: Option<Drain>,
    span: tracing::Span,
}

struct Drain {
    since: Instant,
    /// Advertised to the proxy: in-flight requests may run until then.
    deadline: SystemTime,
    /// When SIGTERM was sent.
    terminated: Option<Instant>,
    killed: bool,
    /// Rounds in a row the proxy has shown it idle (see [`IDLE_ROUNDS`]).
    idle_rounds: u32,
}

impl Replica {
    fn address(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    fn spec(&self) -> ReplicaSpec {
        let mut r = ReplicaSpec::new(&self.server, &self.id, self.address());
        r.protocol = self.protocol;
        r.state = match self.phase {
            Phase::Starting => ReplicaState::Starting,
            Phase::Ready => ReplicaState::Ready,
            Phase::Draining => ReplicaState::Draining,
        };
        r.drain_deadline = self.drain.as_ref().map(|d| d.deadline);
        r
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pgid) = self.pgid
            && let Err(e) = rustix::process::kill_process_group(pgid, sig)
        {
            // ESRCH: the group is already gone, which is what we wanted.
            self.span.in_scope(|| tracing::debug!("signal {sig:?}: {e}"));
        }
    }

    fn start_draining(&mut self, grace: Duration) {
        self.phase = Phase::Draining;
        self.drain = Some(Drain {
            since: Instant::now(),
            deadline: whole_second_after(SystemTime::now() + grace),
            terminated: None,
            killed: false,
            idle_rounds: 0,
        });
    }
}

/// `t` rounded up to a whole second: the store keeps drain deadlines to the second
/// (RFC 3339), and a deadline truncated down would let the proxy end requests before
/// the grace period this supervisor waits is over.
fn whole_second_after(t: SystemTime) -> SystemTime {
    let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH) else { return t };
    let up = u64::from(since.subsec_nanos() != 0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs().saturating_add(up))
}

/// The per-node state: every replica started and not yet reaped.
struct Supervisor {
    prefix: String,
    kill_after: Duration,
    next_seq: u64,
    replicas: Vec<Replica>,
    /// Last list written to the store, to write only on change.
    published: Option<Vec<ReplicaSpec>>,
    /// Server ids in the last specs read. Replicas of a server not among them are not
    /// registered (while they drain): a replica naming an unknown server would make the
    /// proxy reject the whole routing document.
    known: std::collections::HashSet<String>,
    /// Whether "no in-flight counts from the proxy" was logged since they were last had,
    /// so a missing proxy is said once, not every round.
    probe_failed: bool,
}

impl Supervisor {
    fn new(prefix: String, kill_after: Duration) -> Self {
        Supervisor {
            prefix,
            kill_after,
            next_seq: 1,
            replicas: Vec::new(),
            published: None,
            known: Default::default(),
            probe_failed: false,
        }
    }

    /// One round: reap, promote, stop, plan against the store's desired counts, publish.
    async fn round(&mut self, store: &mut Store, proxy: &impl InFlightSource) {
        self.reap();
        self.check_starting().await;
        let idle = self.idle_draining(proxy).await;
        self.advance_drains(&idle);
        match store.inputs().await {
            Ok((servers, desired)) => self.reconcile(&servers, &desired),
            // Nothing is started or stopped on a view we could not read.
            Err(e) => tracing::warn!("reading the store: {e}"),
        }
        self.publish(store).await;
    }

    /// Drop replicas whose process has exited; one that was not draining crashed, and
    /// is replaced by this round's plan.
    fn reap(&mut self) {
        self.replicas.retain_mut(|r| match r.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                r.span.in_scope(|| {
                    if r.phase == Phase::Draining {
                        tracing::info!(%status, "replica stopped");
                    } else {
                        tracing::warn!(%status, "replica exited unexpectedly; replacing it");
                    }
                });
                false
            }
            Err(e) => {
                r.span.in_scope(|| tracing::warn!("waiting for the replica: {e}"));
                true
            }
        });
    }

    /// Starting replicas whose port accepts become ready; those past their startup
    /// timeout are killed (and replaced once reaped).
    async fn check_starting(&mut self) {
        for r in self.replicas.iter_mut().filter(|r| r.phase == Phase::Starting) {
            let connect = tokio::net::TcpStream::connect(r.address());
            let accepted = matches!(
                tokio::time::timeout(Duration::from_millis(200), connect).await,
                Ok(Ok(_))
            );
            if accepted {
                r.span.in_scope(|| tracing::info!("replica accepts connections: ready"));
                r.phase = Phase::Ready;
            } else if r.started.elapsed() > r.startup_timeout {
                r.span.in_scope(|| tracing::warn!(timeout = ?r.startup_timeout, "replica did not start in time; killing it"));
                r.start_draining(Duration::ZERO);
                r.signal(rustix::process::Signal::KILL);
                if let Some(d) = &mut r.drain {
                    d.killed = true;
                }
            }
        }
    }

    /// The draining replicas (not yet sent SIGTERM) the proxy shows idle, by index into
    /// `replicas`: one question per server that has any. A proxy that cannot be asked
    /// makes none idle, and is logged once until it answers again.
    async fn idle_draining(&mut self, proxy: &impl InFlightSource) -> Vec<usize> {
        let waiting = |r: &Replica| r.drain.as_ref().is_some_and(|d| d.terminated.is_none());
        let mut servers: Vec<&str> =
            self.replicas.iter().filter(|r| waiting(r)).map(|r| r.server.as_str()).collect();
        servers.sort_unstable();
        servers.dedup();
        let mut idle = Vec::new();
        for server in servers {
            let view = match proxy.replicas(server).await {
                Ok(view) => {
                    if std::mem::take(&mut self.probe_failed) {
                        tracing::info!(
                            "in-flight counts from the proxy again: draining replicas stop once idle"
                        );
                    }
                    view
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.probe_failed, true) {
                        let msg = "draining replicas get their whole exit_grace_period";
                        match e {
                            // Chosen by the operator: no warning.
                            ProbeError::NotConfigured => tracing::info!("{e}: {msg}"),
                            ProbeError::Admin(_) => {
                                tracing::warn!("no in-flight counts from the proxy ({e}): {msg}")
                            }
                        }
                    }
                    // The other servers' answers would fail alike.
                    break;
                }
            };
            idle.extend(self.replicas.iter().enumerate().filter_map(|(i, r)| {
                (r.server == server && waiting(r) && idle_in(&view, &r.id, r.address()))
                    .then_some(i)
            }));
        }
        idle
    }

    /// Draining replicas: SIGTERM once the proxy has shown them idle for [`IDLE_ROUNDS`]
    /// rounds (`idle`: this round's, see [`Self::idle_draining`]), or at the end of the
    /// grace period; SIGKILL `kill_after` later.
    fn advance_drains(&mut self, idle: &[usize]) {
        let now = Instant::now();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            let grace = r.grace;
            let Some(d) = &mut r.drain else { continue };
            if d.terminated.is_none() {
                d.idle_rounds = if idle.contains(&i) { d.idle_rounds + 1 } else { 0 };
            }
            match d.terminated {
                None if d.idle_rounds >= IDLE_ROUNDS => {
                    d.terminated = Some(now);
                    let after = now.duration_since(d.since);
                    r.span.in_scope(|| tracing::info!(?after, "nothing in flight: SIGTERM"));
                    r.signal(rustix::process::Signal::TERM);
                }
                None if now.duration_since(d.since) >= grace => {
                    d.terminated = Some(now);
                    r.span.in_scope(|| tracing::info!("grace period over: SIGTERM"));
                    r.signal(rustix::process::Signal::TERM);
                }
                Some(at) if !d.killed && now.duration_since(at) >= self.kill_after => {
                    d.killed = true;
                    r.span.in_scope(|| tracing::warn!("still running after SIGTERM: SIGKILL"));
                    r.signal(rustix::process::Signal::KILL);
                }
                _ => {}
            }
        }
    }

    fn reconcile(&mut self, servers: &[ServerSpec], desired: &[DesiredReplicas]) {
        let want = targets(servers, desired);
        self.known = servers.iter().map(|s| s.id.clone()).collect();
        // Servers deleted (or their launch spec removed) go to zero: their replicas drain.
        let mut names: Vec<String> = want.keys().cloned().collect();
        names.extend(self.replicas.iter().map(|r| r.server.clone()));
        names.sort();
        names.dedup();
        for server in names {
            let count = want.get(&server).map_or(0, |(_, c)| *c);
            let managed: Vec<Managed> = self
                .replicas
                .iter()
                .filter(|r| r.server == server)
                .map(|r| Managed { id: r.id.clone(), phase: r.phase, seq: r.seq })
                .collect();
            let p = plan(count, &managed);
            for id in &p.drain {
                if let Some(r) =
                    self.replicas.iter_mut().find(|r| r.server == server && r.id == *id)
                {
                    let grace = r.grace;
                    r.span.in_scope(|| tracing::info!(?grace, "scaling down: draining"));
                    r.start_draining(grace);
                }
            }
            // A start is planned only for a server in `want`, which has a launch spec.
            let Some((launch, _)) = want.get(&server) else { continue };
            for _ in 0..p.start {
                match self.spawn(&server, launch) {
                    Ok(r) => self.replicas.push(r),
                    // Tried again next round; a bad argv just logs every round.
                    Err(e) => tracing::warn!(%server, "starting a replica: {e}"),
                }
            }
        }
    }

    fn spawn(&mut self, server: &str, launch: &LaunchSpec) -> Result<Replica> {
        let Some((program, args)) = launch.argv.split_first() else {
            return Err(SuperviseError::Config("launch.argv is empty".into()));
        };
        // The port is probed and released for the child to bind: a small race with other
        // binders, which at worst makes the replica fail to start and be replaced.
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|cause| SuperviseError::Spawn { what: "finding a free port".into(), cause })?
            .port();
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = format!("{}-{seq}", self.prefix);
        let span = tracing::info_span!("replica", %server, replica = %id, port);
        let child = Command::new(program)
            .args(args)
            .envs(&launch.env)
            .env(&launch.port_env, port.to_string())
            .stdin(Stdio::null())
            // Its own process group, so SIGTERM reaches a shell wrapper's children too;
            // kill_on_drop, so a supervisor that exits (or panics) takes its replicas along.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|cause| SuperviseError::Spawn {
                what: format!("spawning {program:?}"),
                cause,
            })?;
        let pgid =
            child.id().and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw);
        span.in_scope(|| tracing::info!(pid = ?child.id(), "replica started"));
        Ok(Replica {
            server: server.to_owned(),
            id,
            seq,
            port,
            protocol: launch.protocol,
            child,
            pgid,
            phase: Phase::Starting,
            started: Instant::now(),
            startup_timeout: launch.startup_timeout,
            grace: launch.exit_grace_period,
            drain: None,
            span,
        })
    }

    async fn publish(&mut self, store: &mut Store) {
        let mut specs: Vec<ReplicaSpec> = self
            .replicas
            .iter()
            .filter(|r| self.known.contains(&r.server))
            .map(Replica::spec)
            .collect();
        specs.sort_by(|a, b| (&a.server, &a.id).cmp(&(&b.server, &b.id)));
        if self.published.as_ref() == Some(&specs) {
            return;
        }
        match store.publish(&specs).await {
            Ok(()) => self.published = Some(specs),
            // `published` unchanged: retried next round.
            Err(e) => tracing::warn!("writing replicas: {e}"),
        }
    }

    /// Shutdown: deregister first (the proxy stops routing to them), then SIGTERM every
    /// replica and wait, bounded by `kill_after`, before SIGKILL.
    async fn stop_all(&mut self, store: &mut Store) {
        if let Err(e) = store.publish(&[]).await {
            tracing::warn!("deregistering replicas: {e}");
        }
        for r in &self.replicas {
            r.signal(rustix::process::Signal::TERM);
        }
        let deadline = tokio::time::Instant::now() + self.kill_after;
        for r in &mut self.replicas {
            if tokio::time::timeout_at(deadline, r.child.wait()).await.is_err() {
                r.signal(rustix::process::Signal::KILL);
                let _ = r.child.wait().await;
            }
        }
        tracing::info!("supervisor stopped");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_routing::{InFlightGuard, RoutingTable};

    fn addr(port: u16) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, port).into()
    }

    fn seen(id: &str, port: u16, state: ReplicaState, in_flight: u64) -> ProxyReplica {
        ProxyReplica { id: id.into(), address: addr(port), state, in_flight }
    }

    #[test]
    fn idle_only_when_the_proxy_shows_it_draining_with_nothing_in_flight() {
        let view = [
            seen("a", 1, ReplicaState::Draining, 0),
            seen("b", 2, ReplicaState::Draining, 1),
            seen("c", 3, ReplicaState::Ready, 0),
        ];
        assert!(idle_in(&view, "a", addr(1)));
        assert!(!idle_in(&view, "b", addr(2)), "a request in flight");
        assert!(!idle_in(&view, "c", addr(3)), "the proxy has not seen it draining yet");
        assert!(!idle_in(&view, "a", addr(9)), "same id, another process (an earlier run)");
        assert!(!idle_in(&view, "d", addr(4)), "unknown to the proxy: it may not have caught up");
    }

    #[test]
    fn drain_deadlines_round_up_to_the_second() {
        let at = |s, ns| SystemTime::UNIX_EPOCH + Duration::new(s, ns);
        assert_eq!(whole_second_after(at(10, 0)), at(10, 0));
        assert_eq!(whole_second_after(at(10, 1)), at(11, 0));
        assert_eq!(whole_second_after(at(10, 999_999_999)), at(11, 0));
    }

    /// The in-process source reads the live counters of the table the proxy serves from.
    #[tokio::test]
    async fn shared_state_reads_the_tables_in_flight_counts() {
        let mut server = ServerSpec::new("app", "app");
        server.unauthenticated = true;
        let mut r = ReplicaSpec::new("app", "sup-1", addr(4000));
        r.state = ReplicaState::Draining;
        let doc = RoutingDoc { servers: vec![server], replicas: vec![r], ..RoutingDoc::default() };
        let table = RoutingTable::from_doc(Default::default(), doc).unwrap();
        let source = SharedState(table.clone());
        let view = source.replicas("app").await.unwrap();
        assert_eq!(view, [seen("sup-1", 4000, ReplicaState::Draining, 0)]);
        assert!(idle_in(&view, "sup-1", addr(4000)));

        let snap = table.load_full();
        let replica = snap.draining().next().unwrap().0.clone();
        let guard =
            InFlightGuard::new(snap.server("app").unwrap().stats.clone(), replica.stats.clone());
        let view = source.replicas("app").await.unwrap();
        assert!(!idle_in(&view, "sup-1", addr(4000)), "{view:?}");
        drop(guard);
        assert!(idle_in(&source.replicas("app").await.unwrap(), "sup-1", addr(4000)));
        assert_eq!(source.replicas("nope").await.unwrap(), []);
    }
}
