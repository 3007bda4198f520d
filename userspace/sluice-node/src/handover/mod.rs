//! Process handover (a zero-downtime binary upgrade): SIGUSR2, and the handover between
//! an old and a new `sluice run` on the same pin directory. The `sluice upgrade` command
//! drives it from outside through [`Owner`].
//!
//! The running process (the *owner*) is named by a record in the pin directory: a
//! symlink `owner` whose target is `<pid>@<pid namespace inode>` (bpffs holds no regular
//! files, but it does hold symlinks). SIGUSR2 makes the owner re-exec its binary with the
//! same arguments plus `--takeover`. The new process binds its listeners beside the old
//! ones (SO_REUSEPORT), and once it is ready to serve it registers them as the next
//! listener generation, attaches the steering program and activates that generation:
//! from then on the kernel sends every new connection to the new process. The old
//! process polls the shared `steer_config` (and the owner record), sees that it is no
//! longer active, and drains exactly as on SIGTERM. Closing its listeners then migrates
//! whatever was still queued on them to the new listeners (the program is attached in
//! select-or-migrate mode, which migrates whatever `net.ipv4.tcp_migrate_req` says).
//!
//! Before it activates, the new process connects to the old one's handover channel
//! ([`channel`]); when their hellos agree, the old process, once superseded,
//! passes its spliced streams over that channel instead of draining them, and then,
//! until it exits, each idle HTTP/1.1 keep-alive connection as it goes idle and each
//! stream it relays in userspace at a clean point (`idle`).
//!
//! Without kernel steering the same handover runs degraded: the old process learns of
//! its successor from the owner record only, and connections still queued on its
//! listeners when it closes them may be reset (unless `net.ipv4.tcp_migrate_req = 1`).

use std::{
    io,
    path::{Path, PathBuf},
    pin::pin,
    process::ExitStatus,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_dataplane::{Dataplane, Feature, SteerGeneration};
use sluice_proxy::Proxy;
use sluice_routing::{RoutingTable, model::ReplicaState, snapshot::Health};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

pub mod channel;
mod idle;

use self::channel::{Agreement, Channel, ChannelError, ChannelListener, Hello, Msg, socket_path};
use crate::{NodeError, Result, kernel::Kernel, splice::KernelSplice};

/// How often a serving process checks whether a successor took over: cheap (one map
/// lookup and one readlink), and short next to any drain deadline.
const POLL: Duration = Duration::from_millis(200);

/// Name of the owner record in the pin directory (bpffs refuses names with a '.').
const RECORD: &str = "owner";

/// Longest a taking-over process waits for its routing to be complete.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Longest the new process waits on the handover channel for the old process's next
/// message (it offers its streams once it sees the new process active, within a poll).
const RECEIVE_WAIT: Duration = Duration::from_secs(30);

/// The `sluice run` flags that shape a handover.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandoverFlags {
    /// `--takeover`: this start is an intended takeover of a running sluice.
    pub takeover: bool,
    /// `--linger-after-handover`: after handing over, wait for SIGTERM instead of exiting.
    pub linger: bool,
}

/// A sluice process as the owner record names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Its process id (in the pid namespace `ns`).
    pub pid: u32,
    /// The pid namespace's inode: a pid means nothing outside its namespace (two pods).
    ns: u64,
}

impl Owner {
    fn me() -> Owner {
        Owner { pid: std::process::id(), ns: own_pid_ns() }
    }

    fn encode(&self) -> String {
        format!("{}@{}", self.pid, self.ns)
    }

    fn parse(s: &str) -> Option<Owner> {
        let (pid, ns) = s.split_once('@')?;
        Some(Owner { pid: pid.parse().ok()?, ns: ns.parse().ok()? })
    }

    /// Asks the process to hand over to a new one (SIGUSR2: it re-execs its binary with
    /// `--takeover`).
    pub fn request_upgrade(&self) -> Result<()> {
        let invalid = || NodeError::Config(format!("invalid pid {} in the owner record", self.pid));
        let raw = i32::try_from(self.pid).map_err(|_| invalid())?;
        let pid = rustix::process::Pid::from_raw(raw).ok_or_else(invalid)?;
        rustix::process::kill_process(pid, rustix::process::Signal::USR2).map_err(|e| {
            NodeError::io(format!("signalling pid {}", self.pid), std::io::Error::from(e))
        })
    }

    /// Whether the process is a live sluice: `None` when it is in another pid namespace,
    /// where this process cannot tell.
    pub fn alive(&self) -> Option<bool> {
        if self.ns != own_pid_ns() {
            return None;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return Some(false);
        };
        // "pid (comm) S ...": the comm may hold spaces and parentheses, the state
        // follows the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else { return Some(false) };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let state = tail.trim_start().chars().next().unwrap_or('X');
        // A zombie has exited; a pid reused by another program is not a sluice.
        Some(!matches!(state, 'Z' | 'X' | 'x') && comm.contains("sluice"))
    }
}

fn own_pid_ns() -> u64 {
    // "pid:[4026531836]"
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|p| {
            let s = p.to_string_lossy().into_owned();
            s.trim_start_matches("pid:[").trim_end_matches(']').parse().ok()
        })
        .unwrap_or(0)
}

/// Where the owner record lives: the pin directory, or (when that is not writable, e.g.
/// no bpffs) a file in the temp dir named after the pin directory.
fn record_paths(pin_dir: &Path) -> [PathBuf; 2] {
    let flat: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    [pin_dir.join(RECORD), std::env::temp_dir().join(format!("sluice-owner{flat}"))]
}

/// The sluice the owner record in `pin_dir` names, if there is a readable record.
pub fn read_owner(pin_dir: &Path) -> Option<Owner> {
    record_paths(pin_dir)
        .iter()
        .find_map(|p| std::fs::read_link(p).ok())
        .and_then(|t| Owner::parse(&t.to_string_lossy()))
}

/// Replaces the record atomically (symlink then rename), so a reader never sees none.
fn write_owner(pin_dir: &Path, owner: &Owner) -> io::Result<PathBuf> {
    let mut last = io::Error::other("no record location");
    for path in record_paths(pin_dir) {
        let Some(dir) = path.parent() else { continue };
        let tmp = dir.join(format!("{RECORD}-new-{}", owner.pid));
        let res = std::fs::create_dir_all(dir)
            .and_then(|()| {
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(owner.encode(), &tmp)
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        match res {
            Ok(()) => return Ok(path),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                last = e;
            }
        }
    }
    Err(last)
}

/// Removes the record if it still names `me` (a successor's record stays).
fn remove_owner(pin_dir: &Path, me: &Owner) {
    for path in record_paths(pin_dir) {
        let named = std::fs::read_link(&path).ok().and_then(|t| Owner::parse(&t.to_string_lossy()));
        if named.as_ref() == Some(me) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// One `sluice run`'s side of the handover.
pub struct Handover {
    pin_dir: PathBuf,
    me: Owner,
    /// The live sluice this start takes over from.
    previous: Option<Owner>,
    usr2: Option<Signal>,
    /// This process's active steering generation.
    steer: Option<(Arc<Mutex<Dataplane>>, SteerGeneration)>,
    superseded: bool,
    /// Where this process's successor connects.
    listener: Option<ChannelListener>,
    /// The agreed channel to a successor, with its hello.
    successor_channel: Option<(Channel, Hello, Agreement)>,
    /// The kernel splice, whose pairs a handover moves.
    splice: Option<Arc<KernelSplice>>,
    /// How this start was asked to treat a running sluice.
    flags: HandoverFlags,
    /// The proxy's idle-connection handover (set once the server is bound).
    idle: Option<sluice_proxy::handover::IdleHandover>,
    /// Passing idle connections to the successor, until this process exits.
    idle_forwarder: Option<idle::Forwarder>,
}

impl Handover {
    /// Runs before anything touches the pin directory or binds a port: refuses to start
    /// beside a live sluice unless this is an intended takeover (`--takeover`), and
    /// installs the SIGUSR2 handler (SIGUSR2's default action would kill the process).
    pub fn begin(pin_dir: &Path, flags: HandoverFlags) -> Result<Handover> {
        let me = Owner::me();
        let takeover = flags.takeover;
        let mut previous = None;
        if let Some(owner) = read_owner(pin_dir).filter(|o| *o != me) {
            match owner.alive() {
                Some(true) if !takeover => {
                    return Err(NodeError::Refused(format!(
                        "another sluice (pid {}) is serving with pin dir {}; a second one would \
                         silently share its ports (SO_REUSEPORT). Replace it with `sluice \
                         upgrade --pin-dir {}` (or SIGUSR2 to pid {}), or pass --takeover if \
                         this start is meant to take over from it",
                        owner.pid,
                        pin_dir.display(),
                        pin_dir.display(),
                        owner.pid
                    )));
                }
                Some(true) => {
                    info!(pid = owner.pid, "taking over from the running sluice");
                    previous = Some(owner);
                }
                None if takeover => {
                    info!(
                        record = %owner.encode(),
                        "taking over from a sluice in another pid namespace"
                    );
                    previous = Some(owner);
                }
                None => warn!(
                    record = %owner.encode(),
                    "the pin dir names a sluice in another pid namespace, which this process \
                     cannot check; if it still serves, these ports are now shared (start with \
                     --takeover for an intended takeover)"
                ),
                Some(false) => {}
            }
        }
        let usr2 = match signal(SignalKind::user_defined2()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no SIGUSR2 handler: `sluice upgrade` cannot reach this process");
                None
            }
        };
        Ok(Handover {
            pin_dir: pin_dir.to_path_buf(),
            me,
            previous,
            usr2,
            steer: None,
            superseded: false,
            listener: None,
            successor_channel: None,
            splice: None,
            flags,
            idle: None,
            idle_forwarder: None,
        })
    }

    /// The kernel splice whose pairs an upgrade hands over (and into which the pairs of
    /// the process this one replaces are adopted).
    pub fn set_splice(&mut self, splice: Arc<KernelSplice>) {
        self.splice = Some(splice);
    }

    fn hello(&self) -> Hello {
        Hello::mine(self.splice.as_ref().and_then(|s| s.map_id()))
    }

    /// Whether this process is replacing a running sluice: kernel attachments that one
    /// still holds (an interface's XDP link) are then waited for, not given up on.
    pub fn replaces_another(&self) -> bool {
        self.previous.is_some()
    }

    /// Called once the server is bound: waits until it can serve what the old process
    /// serves (routing loaded, every ready replica past its first health check), then
    /// makes this process the active generation (kernel steering when available) and
    /// the owner.
    /// `routed`: a routing source is configured (without one the table stays empty).
    pub async fn ready(
        &mut self,
        kernel: &Kernel,
        server: &Proxy,
        table: &RoutingTable,
        routed: bool,
    ) {
        self.idle = Some(server.idle_handover());
        if self.previous.is_some() || self.flags.takeover {
            wait_until_routable(table, routed).await;
        }
        // Agreed before this process becomes active, so the old one knows, when it sees
        // a successor, whether to hand its streams over or drain them.
        let predecessor = match &self.previous {
            Some(prev) => connect_predecessor(prev.clone(), self.hello()).await,
            None => None,
        };
        let fds = server.listener_fds();
        if let Some(dp) = &kernel.dataplane
            && kernel.report.has(Feature::SkReuseport)
            && !fds.is_empty()
        {
            let res = match dp.lock() {
                Ok(mut d) if d.pin_dir().is_some() => {
                    activate(&mut d, &fds).map(Some).map_err(|e| e.to_string())
                }
                Ok(_) => Ok(None),
                Err(_) => Err(NodeError::Poisoned.to_string()),
            };
            match res {
                Ok(Some(generation)) => self.steer = Some((dp.clone(), generation)),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "listener steering unavailable"),
            }
        }
        if self.steer.is_none() {
            let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
            let fate = if migrate {
                "migrated (net.ipv4.tcp_migrate_req = 1)"
            } else {
                "reset (set net.ipv4.tcp_migrate_req = 1 to migrate them)"
            };
            if let Some(prev) = &self.previous {
                warn!(
                    pid = prev.pid,
                    "no kernel listener steering: taking over by binding beside the old \
                     process; connections queued in the old process's listeners when it \
                     closes them will be {fate}"
                );
            } else {
                info!(
                    "no kernel listener steering: upgrades bind beside the old process and \
                     connections queued in its listeners may be {fate}"
                );
            }
        }
        if let Some(ch) = predecessor {
            let (splice, table, metrics) = (self.splice.clone(), table.clone(), server.metrics());
            let idle = server.idle_handover();
            let rt = tokio::runtime::Handle::current();
            let spawned = std::thread::Builder::new()
                .name("sluice-handover".into())
                .spawn(move || receive(&ch, splice.as_deref(), (&idle, &rt), &table, &metrics));
            if let Err(e) = spawned {
                warn!(error = %e, "handover: no receiver thread; the old process's streams drain");
            }
        }
        let path = socket_path(self.me.pid, self.me.ns);
        match ChannelListener::bind(&path) {
            Ok(l) => self.listener = Some(l),
            Err(e) => warn!(
                error = %e,
                path = %path.display(),
                "no handover channel: at the next upgrade established streams drain"
            ),
        }
        match write_owner(&self.pin_dir, &self.me) {
            Ok(path) => {
                info!(
                    record = %path.display(),
                    pid = self.me.pid,
                    "serving; upgrade with SIGUSR2 or `sluice upgrade`"
                )
            }
            Err(e) => {
                warn!(
                    error = %e,
                    "no owner record: `sluice upgrade` and the second-instance check \
                     cannot find this process"
                )
            }
        }
    }

    /// Resolves when this process must drain: SIGTERM/SIGINT, or a successor became the
    /// active generation. SIGUSR2 meanwhile starts that successor.
    pub async fn until_shutdown(&mut self) {
        let mut term = pin!(sluice_proxy::shutdown::signal());
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut child: Option<tokio::process::Child> = None;
        loop {
            tokio::select! {
                () = &mut term => return,
                _ = tick.tick() => {
                    self.poll_channel().await;
                    if let Some(why) = self.successor() {
                        info!("{why}: draining and handing over");
                        self.superseded = true;
                        self.hand_over_streams().await;
                        return;
                    }
                }
                Some(()) = recv(&mut self.usr2) => {
                    if child.is_some() {
                        warn!("SIGUSR2: an upgrade is already under way");
                    } else {
                        match spawn_successor() {
                            Ok(c) => {
                                info!(pid = c.id(), "SIGUSR2: started the new process");
                                child = Some(c);
                            }
                            Err(e) => error!(
                                error = %e,
                                "SIGUSR2: starting the new process failed; still serving"
                            ),
                        }
                    }
                }
                status = wait(&mut child) => {
                    error!(?status, "the new process exited before taking over; still serving");
                    child = None;
                }
            }
        }
    }

    /// The old side of the hello, for a successor that connected since the last tick:
    /// one that agrees is remembered for the handover; one that does not leaves this
    /// process's streams to drain.
    async fn poll_channel(&mut self) {
        let ch = match self.listener.as_ref().map(ChannelListener::try_accept) {
            Some(Ok(Some(ch))) => ch,
            Some(Ok(None)) | None => return,
            Some(Err(e)) => {
                warn!(error = %e, "handover channel: accept failed");
                return;
            }
        };
        let mine = self.hello();
        let agreed =
            tokio::task::spawn_blocking(move || ch.handshake(&mine).map(|(h, a)| (ch, h, a))).await;
        match agreed {
            Ok(Ok((ch, theirs, agreement))) => {
                info!(
                    pid = theirs.pid,
                    splice = agreement.splice,
                    "handover channel agreed with the new process"
                );
                self.successor_channel = Some((ch, theirs, agreement));
            }
            Ok(Err(e)) => warn!(error = %e, "established connections will drain at the upgrade"),
            Err(e) => warn!(error = %e, "handover channel: handshake task failed"),
        }
    }

    /// Passes the spliced streams to the successor over the agreed channel, if any.
    async fn hand_over_streams(&mut self) {
        let Some((ch, theirs, agreement)) = self.successor_channel.take() else {
            info!("no handover channel with the new process: established streams drain");
            return;
        };
        // The process that became active must be the one that said hello.
        if let Some(owner) = read_owner(&self.pin_dir)
            && owner != self.me
            && owner.pid != theirs.pid
        {
            warn!(
                active = owner.pid,
                channel = theirs.pid,
                "the active process is not the one on the handover channel: streams drain"
            );
            return;
        }
        let splice = self.splice.clone().filter(|_| agreement.splice);
        let done = tokio::task::spawn_blocking(move || {
            let exported = splice.map(|s| s.export(&ch));
            (ch, exported)
        })
        .await;
        let ch = match done {
            Ok((ch, Some(exported))) => {
                let broken = exported.broken;
                crate::splice::log_export(exported);
                if broken {
                    return;
                }
                ch
            }
            Ok((ch, None)) => {
                info!(
                    "the new process does not share this process's splice maps: spliced \
                     streams drain"
                );
                ch
            }
            Err(e) => {
                warn!(error = %e, "handover task failed");
                return;
            }
        };
        // Then the idle keep-alive connections, as they go idle, and the streams relayed
        // in userspace, each at a clean point, until this one exits.
        match &self.idle {
            Some(idle) => self.idle_forwarder = idle::forward(ch, idle),
            None => {
                let _ = ch.send(&Msg::Done, &[]);
            }
        }
        if let (Some(f), Some(s)) = (&self.idle_forwarder, &self.splice) {
            s.hand_over_relays(f.relay_sink());
        }
    }

    /// Why this process is no longer the one to serve, if it is not.
    fn successor(&self) -> Option<String> {
        if let Some((dp, mine)) = &self.steer
            && let Ok(d) = dp.lock()
            && let Ok(active) = d.steer_active()
            && active.count > 0
            && (active.base, active.count) != (mine.base, mine.count)
        {
            return Some(format!(
                "listener generation at slot {} is active (this process: slot {})",
                active.base, mine.base
            ));
        }
        let owner = read_owner(&self.pin_dir)?;
        (owner != self.me && owner.alive() != Some(false))
            .then(|| format!("sluice pid {} took over", owner.pid))
    }

    /// After the drain: a superseded process leaves the pins (and the record) to its
    /// successor, and with `--linger-after-handover` waits for SIGTERM.
    pub async fn finish(mut self, kernel: &Kernel) {
        if let Some(f) = self.idle_forwarder.take() {
            f.stop().await;
        }
        if !self.superseded {
            remove_owner(&self.pin_dir, &self.me);
            return;
        }
        if let Some(dp) = &kernel.dataplane
            && let Ok(mut d) = dp.lock()
        {
            d.release_pins();
            // The successor's programs take over: an interface's XDP link is waited
            // for by it, and this process's VIP selections stop following the routing
            // now, so none of them may outlive the handover (nor linger with it).
            for (what, res) in [
                ("XDP guard", d.detach_guard()),
                ("VIP connect programs", d.detach_vip()),
                ("local-replica redirect", d.detach_local_redirect()),
            ] {
                if let Err(e) = res {
                    warn!(error = %e, "detaching the {what} after the handover");
                }
            }
        }
        info!("handed over to the new process");
        if self.flags.linger {
            info!("--linger-after-handover: idle until SIGTERM");
            sluice_proxy::shutdown::signal().await;
        }
    }
}

/// Until the routing table is loaded and no ready replica still awaits its first health
/// check: a new process activated earlier would answer 503 where the old one serves.
/// Bounded, so a store that never answers does not hold an upgrade forever.
async fn wait_until_routable(table: &RoutingTable, routed: bool) {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        let snap = table.load_full();
        let unchecked = if snap.health_gated() {
            snap.servers()
                .flat_map(|s| snap.replica_specs(s.id()))
                .filter(|(spec, health)| {
                    spec.state == ReplicaState::Ready && *health == Health::Unknown
                })
                .count()
        } else {
            0
        };
        if (snap.generation() > 0 || !routed) && unchecked == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                generation = snap.generation(),
                unchecked, "taking over before the routing is complete"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Registers the listeners as the next generation, attaches the steering program to
/// every listener group and activates the generation. Steering picks among the first
/// listener's group; the other groups get the program for its migrate path (queued
/// connections move to a live listener when the old process closes its own).
fn activate(
    d: &mut Dataplane,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<SteerGeneration, sluice_dataplane::DataplaneError> {
    let before = d.steer_active()?;
    // Every listening address's socket: the kernel picks the one of the connection's
    // group.
    let generation = d.steer_register(fds)?;
    for fd in fds {
        d.steer_attach(fd)?;
    }
    d.steer_activate(generation)?;
    info!(
        slot = generation.base,
        previous_slot = before.base,
        previous_listeners = before.count,
        "this process is the active listener generation"
    );
    Ok(generation)
}

/// The new side of the hello, to the process `prev`: `None` (with the reason logged)
/// means its established streams drain as without a channel.
async fn connect_predecessor(prev: Owner, mine: Hello) -> Option<Channel> {
    let path = socket_path(prev.pid, prev.ns);
    let res = tokio::task::spawn_blocking(move || {
        let ch = Channel::connect(&path)?;
        ch.handshake(&mine).map(|(_, agreement)| (ch, agreement))
    })
    .await;
    match res {
        Ok(Ok((ch, agreement))) => {
            info!(pid = prev.pid, splice = agreement.splice, "handover channel agreed");
            Some(ch)
        }
        Ok(Err(e)) => {
            info!(
                pid = prev.pid,
                error = %e,
                "no handover with the old process: its established streams drain"
            );
            None
        }
        Err(e) => {
            warn!(error = %e, "handover channel: connect task failed");
            None
        }
    }
}

/// The new process's receiver (blocking, on its own thread): adopts every pair the old
/// process offers and acknowledges each, until the old process is done.
fn receive(
    ch: &Channel,
    splice: Option<&KernelSplice>,
    (idle, rt): (&sluice_proxy::handover::IdleHandover, &tokio::runtime::Handle),
    table: &RoutingTable,
    metrics: &Arc<sluice_proxy::Metrics>,
) {
    // From the last message: the old process offers idle connections while it drains.
    let mut deadline = Instant::now() + RECEIVE_WAIT;
    let (mut adopted, mut refused) = (0u64, 0u64);
    let (mut idle_adopted, mut idle_refused) = (0u64, 0u64);
    let (mut relays_adopted, mut relays_refused) = (0u64, 0u64);
    loop {
        let got = ch.recv();
        if got.is_ok() {
            deadline = Instant::now() + RECEIVE_WAIT;
        }
        match got {
            Ok((Msg::Relay(offer), fds)) => {
                let res = match splice {
                    Some(s) => s.adopt_relay(&offer, fds, table, metrics, rt),
                    None => Err("this process has no userspace relay of its own".to_owned()),
                };
                let ack = match res {
                    Ok(()) => {
                        relays_adopted += 1;
                        Msg::Ack { tag: offer.tag, adopted: true, error: None }
                    }
                    Err(e) => {
                        relays_refused += 1;
                        warn!(error = %e, server = %offer.server, "handover: not adopting a relayed stream");
                        Msg::Ack { tag: offer.tag, adopted: false, error: Some(e) }
                    }
                };
                if let Err(e) = ch.send(&ack, &[]) {
                    warn!(error = %e, "handover: acknowledging failed");
                    break;
                }
            }
            Ok((Msg::Idle(offer), fds)) => {
                let ack = match idle::adopt(idle, &offer, fds) {
                    Ok(()) => {
                        idle_adopted += 1;
                        Msg::Ack { tag: offer.tag, adopted: true, error: None }
                    }
                    Err(e) => {
                        idle_refused += 1;
                        warn!(error = %e, peer = %offer.peer, "handover: not adopting an idle connection");
                        Msg::Ack { tag: offer.tag, adopted: false, error: Some(e) }
                    }
                };
                if let Err(e) = ch.send(&ack, &[]) {
                    warn!(error = %e, "handover: acknowledging failed");
                    break;
                }
            }
            Ok((Msg::Splice(offer), fds)) => {
                let res = match splice {
                    Some(s) => s.adopt(&offer, fds, table, metrics),
                    None => Err("this process does not splice".to_owned()),
                };
                let ack = match res {
                    Ok(()) => {
                        adopted += 1;
                        Msg::Ack { tag: offer.tag, adopted: true, error: None }
                    }
                    Err(e) => {
                        refused += 1;
                        warn!(error = %e, server = %offer.server, "handover: not adopting a spliced stream");
                        Msg::Ack { tag: offer.tag, adopted: false, error: Some(e) }
                    }
                };
                if let Err(e) = ch.send(&ack, &[]) {
                    warn!(error = %e, "handover: acknowledging failed");
                    break;
                }
            }
            Ok((Msg::Done, _)) | Err(ChannelError::Closed) => break,
            Ok((other, _)) => {
                warn!(message = ?other, "handover: unexpected message");
                break;
            }
            Err(ChannelError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
                    && Instant::now() < deadline => {}
            Err(e) => {
                warn!(error = %e, "handover: channel failed");
                break;
            }
        }
    }
    info!(
        adopted,
        refused,
        idle_adopted,
        idle_refused,
        relays_adopted,
        relays_refused,
        "handover from the old process complete"
    );
}

async fn recv(sig: &mut Option<Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait(child: &mut Option<tokio::process::Child>) -> io::Result<ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// Starts this binary again with the same arguments plus `--takeover`. An upgrade
/// usually replaced the file on disk: `/proc/self/exe` then reads "<path> (deleted)"
/// and the path holds the new binary, which is the one to start; otherwise the running
/// binary itself (`/proc/self/exe`) restarts.
fn spawn_successor() -> io::Result<tokio::process::Child> {
    let exe = std::fs::read_link("/proc/self/exe")
        .ok()
        .map(|p| {
            let s = p.to_string_lossy();
            PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
        })
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let mut args: Vec<_> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "--takeover") {
        args.push("--takeover".into());
    }
    info!(exe = %exe.display(), "starting the new process");
    tokio::process::Command::new(exe).args(args).stdin(std::process::Stdio::null()).spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_record_round_trips() {
        let me = Owner::me();
        assert_eq!(Owner::parse(&me.encode()), Some(me.clone()));
        assert_eq!(Owner::parse("12"), None);
        assert_eq!(Owner::parse("x@1"), None);
        // The test binary is not called sluice: a live pid that is not a sluice.
        assert_eq!(Owner { pid: u32::MAX - 1, ns: me.ns }.alive(), Some(false));
        assert_eq!(Owner { pid: me.pid, ns: me.ns.wrapping_add(1) }.alive(), None);
    }

    #[test]
    fn record_is_replaced_and_removed_only_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("pins");
        let me = Owner::me();
        write_owner(&pins, &me).unwrap();
        assert_eq!(read_owner(&pins), Some(me.clone()));
        let other = Owner { pid: 1, ns: me.ns };
        write_owner(&pins, &other).unwrap();
        remove_owner(&pins, &me);
        assert_eq!(read_owner(&pins), Some(other.clone()));
        remove_owner(&pins, &other);
        assert_eq!(read_owner(&pins), None);
    }
}
