//! `sluice supervise`: the reference compute side for one node. It reads the desired
//! replica counts `sluice autoscale` writes, starts replica processes of the servers that
//! carry a `launch` spec on free loopback ports, and registers them in the routing state
//! the proxy watches: `starting`, then `ready` once the port accepts (the proxy's own
//! health check then admits it), and `draining` on scale-down, after which the process
//! gets SIGTERM at the end of `exit_grace_period` and SIGKILL `--kill-after` later. A
//! replica that exits on its own is deregistered and replaced.
//!
//! The decisions themselves are [`sluice_routing::supervisor`]; this module runs them
//! against real processes and a real store.
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

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_proxy::autoscaler::{DesiredSink, SinkError};
use sluice_routing::DesiredReplicas;
use sluice_routing::model::{
    LaunchSpec, Protocol, ReplicaSpec, ReplicaState, RoutingDoc, ServerSpec,
};
use sluice_routing::source::etcd::{EtcdError, EtcdStore};
use sluice_routing::source::file::SourceError;
use sluice_routing::supervisor::{Managed, Phase, plan, targets};
use tokio::process::{Child, Command};

/// `sluice supervise (--routes PATH --replicas-file FILE --desired-file FILE | --endpoints ..)`
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The proxy's routing file or directory, to read server specs from (file store).
    #[arg(long, requires_all = ["replicas_file", "desired_file"])]
    pub routes: Option<PathBuf>,
    /// Where to write this supervisor's replicas (file store): a `*.toml` inside the
    /// directory `--routes` names, so the proxy merges it in.
    #[arg(long, requires = "routes")]
    pub replicas_file: Option<PathBuf>,
    /// The desired counts `sluice autoscale --file` writes (file store; a missing file
    /// means no counts yet: every server runs `min_replicas`).
    #[arg(long, requires = "routes")]
    pub desired_file: Option<PathBuf>,
    /// Where etcd is and how to authenticate (without --routes).
    #[command(flatten)]
    pub etcd: crate::etcd_args::EtcdArgs,
    /// Replica ids are `<prefix>-<n>`; must be unique per node, since replicas with this
    /// prefix are taken to be this supervisor's own (in etcd, leftovers of an earlier run
    /// are deleted at start).
    #[arg(long, default_value = "sup")]
    pub id_prefix: String,
    /// After SIGTERM, how long a replica has to exit before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub kill_after: Duration,
    /// How often processes, ports and the store are looked at.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

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
}

/// Runs until SIGTERM/SIGINT, then deregisters and stops every replica.
pub fn main(args: SuperviseArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args))
}

async fn run(args: SuperviseArgs) -> Result<()> {
    let store = match (args.routes, args.replicas_file, args.desired_file) {
        (Some(routes), Some(replicas_file), Some(desired_file)) => {
            Store::files(FileStore { routes, replicas_file, desired_file })?
        }
        _ => {
            let etcd = crate::etcd_args::connect(&args.etcd.config()).await?;
            let store = Store::Etcd { store: Box::new(etcd), published: BTreeMap::new() };
            store.forget_leftovers(&args.id_prefix).await?;
            store
        }
    };
    let sup = Supervisor::new(args.id_prefix, args.kill_after);
    supervise(store, sup, args.interval, sluice_proxy::shutdown::signal()).await
}

/// The file store's paths (see [`SuperviseArgs`]).
pub(crate) struct FileStore {
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
pub(crate) async fn run_on_files(
    files: FileStore,
    id_prefix: String,
    kill_after: Duration,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let store = Store::files(files)?;
    supervise(store, Supervisor::new(id_prefix, kill_after), interval, shutdown).await
}

async fn supervise(
    mut store: Store,
    mut sup: Supervisor,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if interval.is_zero() {
        bail!("--interval must be positive");
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
            _ = tick.tick() => sup.round(&mut store).await,
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
            bail!("--replicas-file must end in .toml, or the proxy's file source skips it");
        }
        let FileStore { routes, replicas_file, desired_file } = f;
        Ok(Store::Files { routes, replicas_file, desired_file })
    }

    async fn inputs(&self) -> Result<(Vec<ServerSpec>, Vec<DesiredReplicas>), SuperviseError> {
        match self {
            Store::Files { routes, desired_file, .. } => {
                let doc = sluice_routing::source::file::load_doc(routes)?;
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
        let listing = store.list_replicas(None).await.context("listing replicas")?;
        for r in listing.items.iter().filter(|r| r.id.starts_with(&own)) {
            tracing::info!(server = %r.server, replica = %r.id, "deleting a leftover registration");
            store.delete_replica(&r.server, &r.id).await.context("deleting a replica")?;
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
            deadline: SystemTime::now() + grace,
            terminated: None,
            killed: false,
        });
    }
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
        }
    }

    /// One round: reap, promote, stop, plan against the store's desired counts, publish.
    async fn round(&mut self, store: &mut Store) {
        self.reap();
        self.check_starting().await;
        self.advance_drains();
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

    /// Draining replicas: SIGTERM at the end of the grace period, SIGKILL `kill_after`
    /// later.
    fn advance_drains(&mut self) {
        let now = Instant::now();
        for r in &mut self.replicas {
            let grace = r.grace;
            let Some(d) = &mut r.drain else { continue };
            match d.terminated {
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
                    Err(e) => tracing::warn!(%server, "starting a replica: {e:#}"),
                }
            }
        }
    }

    fn spawn(&mut self, server: &str, launch: &LaunchSpec) -> Result<Replica> {
        let Some((program, args)) = launch.argv.split_first() else {
            bail!("launch.argv is empty");
        };
        // The port is probed and released for the child to bind: a small race with other
        // binders, which at worst makes the replica fail to start and be replaced.
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
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
            .with_context(|| format!("spawning {program:?}"))?;
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
