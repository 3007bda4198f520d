//! The `[guard]` section of `sluice run`: the XDP guard on the node's ingress
//! interfaces (static denylist, per-source SYN rate, protected ports) and temporary
//! bans of sources that keep failing proxy auth.
//!
//! Auth-failure bans: the proxy reports each proxy-auth rejection with the request's
//! client (the socket peer, or the client a trusted edge reported; never a trusted
//! address), a task counts them per source and bans a source's host address for
//! `auth_ban`: in the kernel when the guard is attached, and always in the proxy's
//! userspace ban list, which closes a banned source at accept, after its PROXY header,
//! and refuses its requests (403). Behind an edge XDP only sees the edge, so the
//! userspace list is what keeps a banned client out there; without XDP it is the only
//! enforcement (the same bans, enforced later and at more cost).

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use sluice_dataplane::{Cidr, Dataplane, GuardAttachment};
use sluice_proxy::Proxy;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{NodeError, Result};

/// Auth-failure events buffered between the request path and the ban task; beyond
/// this, events are dropped (counted) rather than slowing requests down.
const EVENT_QUEUE: usize = 4096;
/// How often expired bans are swept from the kernel and closed windows forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// `[guard]`: the XDP guard. Off unless `interfaces` names at least one interface.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Ingress interfaces to attach to (in sluice's network namespace). Empty: off.
    pub interfaces: Vec<String>,
    /// Destination ports to protect. Empty (default): every client listener's port.
    pub ports: Vec<u16>,
    /// New connections (SYNs) per second allowed per source; 0 disables the limit.
    /// Default 200.
    pub syn_rate: u32,
    /// SYNs a source may send in a burst. Default 400.
    pub syn_burst: u32,
    /// Prefixes whose packets to the protected ports are always dropped: `10.0.0.0/8`,
    /// `2001:db8::/32`, or bare addresses (hosts).
    pub deny: Vec<String>,
    /// Proxy-auth failures from one source within `auth_fail_window` that ban it;
    /// 0 disables auth-failure bans. Default 20.
    pub auth_fail_threshold: u32,
    /// The window the threshold counts in. Default 60s.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub auth_fail_window: Duration,
    /// How long a ban lasts (rounded up to whole seconds). Default 10m.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub auth_ban: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            interfaces: Vec::new(),
            ports: Vec::new(),
            syn_rate: 200,
            syn_burst: 400,
            deny: Vec::new(),
            auth_fail_threshold: 20,
            auth_fail_window: Duration::from_secs(60),
            auth_ban: Duration::from_secs(600),
        }
    }
}

impl GuardConfig {
    /// Checks the section at start-up; returns the parsed denylist.
    pub fn validate(&self) -> Result<Vec<Cidr>> {
        let deny = self
            .deny
            .iter()
            .map(|s| s.parse::<Cidr>().map_err(|e| NodeError::Config(format!("deny: {s:?}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        for i in &self.interfaces {
            // IFNAMSIZ is 16 including the NUL.
            if i.is_empty()
                || i.len() > 15
                || i.contains(['/', '\0'])
                || i.contains(char::is_whitespace)
            {
                return Err(NodeError::Config(format!(
                    "interfaces: {i:?} is not an interface name"
                )));
            }
        }
        if self.auth_fail_threshold > 0 && self.auth_ban.is_zero() {
            return Err(NodeError::Config(
                "auth_ban: must be longer than 0s (or set auth_fail_threshold = 0)".into(),
            ));
        }
        Ok(deny)
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    auth_failures: AtomicU64,
    events_dropped: AtomicU64,
    bans: AtomicU64,
    ban_errors: AtomicU64,
    active_bans: AtomicU64,
}

/// The running guard; detaches from every interface when dropped.
pub struct Guard {
    dataplane: Option<Arc<Mutex<Dataplane>>>,
    attachments: Vec<GuardAttachment>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Set on drop: ends a pending attach after an upgrade.
    stopped: Arc<AtomicBool>,
}

impl Guard {
    /// Where the guard is attached, and in which XDP mode.
    pub fn attachments(&self) -> &[GuardAttachment] {
        &self.attachments
    }

    fn inactive() -> Guard {
        Guard {
            dataplane: None,
            attachments: Vec::new(),
            stop: None,
            stopped: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(dp) = &self.dataplane
            && let Ok(mut dp) = dp.lock()
            && let Err(e) = dp.detach_guard()
        {
            warn!(error = %e, "detaching the XDP guard");
        }
    }
}

/// Programs and attaches the guard (when configured) and hooks auth-failure bans into
/// `server`. A failure to attach is fatal only with `require_ebpf`. When `replacing` a
/// running sluice, interfaces it still holds are attached as soon as it lets go.
pub fn start(
    cfg: &GuardConfig,
    dataplane: Option<&Arc<Mutex<Dataplane>>>,
    server: &mut Proxy,
    require_ebpf: bool,
    replacing: bool,
) -> Result<Guard> {
    if cfg.interfaces.is_empty() {
        deny_in_userspace(cfg, server)?;
        let mut guard = Guard::inactive();
        hook_bans(cfg, None, server, &mut guard);
        return Ok(guard);
    }
    let Some(dp) = dataplane else {
        // With --require-ebpf a missing data plane already stopped start-up.
        warn!(
            interfaces = ?cfg.interfaces,
            "[guard] configured but the kernel data plane is not loaded: no XDP guard; deny list and auth-failure bans enforced in userspace"
        );
        deny_in_userspace(cfg, server)?;
        let mut guard = Guard::inactive();
        hook_bans(cfg, None, server, &mut guard);
        return Ok(guard);
    };
    let deny = cfg.validate()?;
    let ports: Vec<u16> = if cfg.ports.is_empty() {
        server.local_addrs().iter().map(|a| a.port()).collect()
    } else {
        cfg.ports.clone()
    };
    let mut guard = Guard {
        dataplane: Some(dp.clone()),
        attachments: Vec::new(),
        stop: None,
        stopped: Arc::new(AtomicBool::new(false)),
    };
    let mut waiting = Vec::new();
    let mut failed = Vec::new();
    let programmed = {
        let mut d = dp.lock().map_err(|_| NodeError::Poisoned)?;
        program_maps(&mut d, cfg, &deny, &ports).map(|()| {
            for i in &cfg.interfaces {
                match d.attach_guard(i) {
                    Ok(a) => guard.attachments.push(a),
                    // An upgrade: the process being replaced still holds the interface
                    // (one XDP link per interface) until it exits.
                    Err(e) if replacing && held_by_another(&e) => waiting.push(i.clone()),
                    Err(e) => failed.push(NodeError::dataplane(format!("attaching to {i}"), e)),
                }
            }
        })
    };
    let unavailable = match programmed {
        Err(e) => Some(e),
        // Not one interface guarded (nor about to be): the guard is off altogether.
        Ok(()) if guard.attachments.is_empty() && waiting.is_empty() => failed.pop(),
        Ok(()) => None,
    };
    if let Some(e) = unavailable {
        if require_ebpf {
            return Err(e.context("--require-ebpf: the XDP guard could not attach"));
        }
        warn!(error = %e.report(), "XDP guard unavailable; serving without it (deny list and auth-failure bans enforced in userspace)");
        deny_in_userspace(cfg, server)?;
        // Dropping `guard` detaches whatever did attach.
        let mut inactive = Guard::inactive();
        hook_bans(cfg, None, server, &mut inactive);
        return Ok(inactive);
    }
    // Some interfaces guarded, some not: protect what can be protected, and say which.
    // Traffic through an unguarded interface reaches the listeners unfiltered, so the
    // deny list is also enforced at accept (a denied source that came through a guarded
    // interface never gets there: checking it twice costs nothing).
    if !failed.is_empty() {
        deny_in_userspace(cfg, server)?;
    }
    for e in failed {
        if require_ebpf {
            return Err(e.context("--require-ebpf: the XDP guard could not attach"));
        }
        warn!(error = %e.report(), "XDP guard left off one interface; the others are guarded");
    }
    if !waiting.is_empty() {
        info!(
            interfaces = ?waiting,
            "XDP guard waits for the sluice being replaced to release these interfaces"
        );
        tokio::spawn(attach_when_released(dp.clone(), waiting, guard.stopped.clone()));
    }
    info!(
        interfaces = ?guard.attachments.iter().map(|a| format!("{}:{}", a.interface, a.mode)).collect::<Vec<_>>(),
        ?ports,
        denied = deny.len(),
        "XDP guard active"
    );
    // Clients behind a trusted edge reach userspace whatever XDP drops: the reported
    // client's deny-list check is the proxy's. Socket peers stay XDP's alone (an
    // interface left unguarded stays open to them, as documented).
    if !deny.is_empty() {
        server.deny_reported_clients(deny.clone());
    }
    hook_bans(cfg, Some(dp.clone()), server, &mut guard);
    Ok(guard)
}

/// Counts proxy-auth rejections towards bans (unless `auth_fail_threshold` is 0): bans go
/// to the proxy's userspace ban list and, with `dp`, to the XDP guard too.
fn hook_bans(
    cfg: &GuardConfig,
    dp: Option<Arc<Mutex<Dataplane>>>,
    server: &mut Proxy,
    guard: &mut Guard,
) {
    let counters = Arc::new(Counters::default());
    // With XDP attached the guard's metrics are always there, as before bans moved here.
    if cfg.auth_fail_threshold > 0 || dp.is_some() {
        install_metrics(server, counters.clone());
    }
    if cfg.auth_fail_threshold == 0 {
        return;
    }
    let (tx, rx) = mpsc::channel::<IpAddr>(EVENT_QUEUE);
    let c = counters.clone();
    server.on_auth_rejected(Arc::new(move |ip| {
        // Never block the request path: a full queue drops the event (counted).
        if tx.try_send(ip).is_err() {
            c.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    guard.stop = Some(stop_tx);
    let tracker = AuthFailureTracker::new(cfg.auth_fail_threshold, cfg.auth_fail_window);
    let bans = Bans { kernel: dp, userspace: server.bans() };
    tokio::spawn(ban_loop(rx, stop_rx, bans, tracker, cfg.auth_ban, counters));
}

/// Where bans are enforced.
struct Bans {
    /// The XDP guard, when attached.
    kernel: Option<Arc<Mutex<Dataplane>>>,
    /// The proxy's list: always (see the module doc).
    userspace: Arc<sluice_proxy::BanList>,
}

/// Without XDP the deny list is still honoured: the proxy closes denied sources at
/// accept, and denied clients a trusted edge reports right after its PROXY header.
fn deny_in_userspace(cfg: &GuardConfig, server: &mut Proxy) -> Result<()> {
    if cfg.deny.is_empty() {
        return Ok(());
    }
    let deny = parse_deny(cfg)?;
    info!(
        denied = deny.len(),
        "[guard] deny list enforced in userspace too, at accept and for reported clients"
    );
    server.deny_at_accept(deny);
    Ok(())
}

/// The deny list in the proxy's prefix type.
fn parse_deny(cfg: &GuardConfig) -> Result<Vec<sluice_proxy::config::Cidr>> {
    cfg.deny
        .iter()
        .map(|s| {
            sluice_proxy::config::Cidr::parse(s)
                .map_err(|e| NodeError::Config(format!("deny: {e}")))
        })
        .collect()
}

/// Whether an attach failed because another XDP program (the previous sluice's, during
/// an upgrade) holds the interface.
fn held_by_another(e: &sluice_dataplane::DataplaneError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::ResourceBusy
            )
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Attaches the guard to `interfaces` as soon as the process being replaced lets go of
/// them (it detaches on exit), until the guard is dropped.
async fn attach_when_released(
    dp: Arc<Mutex<Dataplane>>,
    mut interfaces: Vec<String>,
    stopped: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !interfaces.is_empty() && !stopped.load(Ordering::Relaxed) {
        tick.tick().await;
        let Ok(mut d) = dp.lock() else { return };
        // Checked again under the lock: the guard's drop detaches under it too.
        if stopped.load(Ordering::Relaxed) {
            return;
        }
        interfaces.retain(|i| match d.attach_guard(i) {
            Ok(a) => {
                info!(interface = %a.interface, mode = a.mode, "XDP guard attached after the handover");
                false
            }
            Err(e) if held_by_another(&e) => true,
            Err(e) => {
                warn!(interface = %i, error = %e, "XDP guard could not attach after the handover");
                false
            }
        });
    }
}

fn program_maps(dp: &mut Dataplane, cfg: &GuardConfig, deny: &[Cidr], ports: &[u16]) -> Result<()> {
    // Maps first, so the program never runs unconfigured.
    for &p in ports {
        dp.guard_port(p).map_err(|e| NodeError::dataplane(format!("protecting port {p}"), e))?;
    }
    dp.guard_syn_rate(cfg.syn_rate, cfg.syn_burst)
        .map_err(|e| NodeError::dataplane("setting the SYN rate", e))?;
    for &prefix in deny {
        dp.guard_deny(prefix, None).map_err(|e| {
            NodeError::dataplane(format!("denying {}/{}", prefix.addr, prefix.len), e)
        })?;
    }
    Ok(())
}

/// The address a rejected peer is counted and banned as: a dual-stack listener sees
/// IPv4 clients as `::ffff:a.b.c.d`, but XDP looks IPv4 sources up in the v4 trie.
fn ban_source(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

/// Counts auth failures per source and bans sources that reach the threshold; sweeps
/// expired bans out of the kernel.
async fn ban_loop(
    mut rx: mpsc::Receiver<IpAddr>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    bans: Bans,
    mut tracker: AuthFailureTracker,
    ban: Duration,
    counters: Arc<Counters>,
) {
    // Our bans and when the kernel's copy is surely past its deadline (it rounds up to
    // whole seconds): the active-bans gauge, and whether a sweep has anything to do.
    let mut active: std::collections::HashMap<IpAddr, Instant> = Default::default();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            ev = rx.recv() => {
                let Some(ip) = ev else { return };
                counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                let ip = ban_source(ip);
                let now = Instant::now();
                if !tracker.record(ip, now) {
                    continue;
                }
                bans.userspace.ban(ip, ban);
                let result = match &bans.kernel {
                    None => Ok(()),
                    Some(dp) => dp.lock().map_err(|_| "data plane lock poisoned".to_owned())
                        .and_then(|mut d| d.guard_deny(Cidr::host(ip), Some(ban)).map_err(|e| e.to_string())),
                };
                match result {
                    Ok(()) => {
                        counters.bans.fetch_add(1, Ordering::Relaxed);
                        active.insert(ip, now + ban + Duration::from_secs(1));
                        info!(source = %ip, ban = ?ban, "banned after repeated proxy-auth failures");
                    }
                    Err(e) => {
                        counters.ban_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(source = %ip, error = %e, "could not ban source");
                    }
                }
                counters.active_bans.store(active.len() as u64, Ordering::Relaxed);
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                tracker.prune(now);
                // Static denylist entries never expire, so with no ban of ours
                // outstanding there is nothing to sweep (and no trie walk under the
                // data plane lock).
                bans.userspace.sweep();
                if !active.is_empty() {
                    if let Some(dp) = &bans.kernel
                        && let Ok(mut d) = dp.lock()
                        && let Err(e) = d.guard_expire_bans()
                    {
                        warn!(error = %e, "sweeping expired bans");
                    }
                    active.retain(|_, until| *until > now);
                    counters.active_bans.store(active.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

fn install_metrics(server: &mut Proxy, c: Arc<Counters>) {
    server.metrics_extra(Box::new(c));
}

/// The guard's families on each `/metrics` scrape.
impl prometheus_client::collector::Collector for Counters {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        let c = self;
        let rows: [(&str, &str, &str, &AtomicU64); 5] = [
            (
                "sluice_guard_auth_failures_total",
                "counter",
                "Proxy-auth rejections counted towards bans.",
                &c.auth_failures,
            ),
            (
                "sluice_guard_auth_events_dropped_total",
                "counter",
                "Proxy-auth rejections not counted because the ban queue was full.",
                &c.events_dropped,
            ),
            (
                "sluice_guard_bans_total",
                "counter",
                "Sources banned after repeated proxy-auth failures (in userspace, and in the XDP guard when attached).",
                &c.bans,
            ),
            (
                "sluice_guard_ban_errors_total",
                "counter",
                "Bans the kernel map refused (the userspace ban still holds).",
                &c.ban_errors,
            ),
            (
                "sluice_guard_active_bans",
                "gauge",
                "Auth-failure bans in force now (may lag expiry by a second).",
                &c.active_bans,
            ),
        ];
        for (name, kind, help, v) in rows {
            let v = v.load(Ordering::Relaxed);
            match kind {
                "counter" => sluice_proxy::metrics::counter(&mut e, name, help, v)?,
                _ => sluice_proxy::metrics::gauge(&mut e, name, help, v)?,
            }
        }
        Ok(())
    }
}

/// The guard's part of the `/bpf` admin document: where it is attached, in which mode.
pub fn report_json(guard: &Guard) -> serde_json::Value {
    serde_json::json!({ "interfaces": guard.attachments() })
}

/// Counts authentication failures per source and bans a source that reaches the
/// threshold within the window. Pure bookkeeping; the caller applies bans with
/// `Dataplane::guard_deny` (or serves 403s in userspace when XDP is unavailable).
#[derive(Debug)]
pub struct AuthFailureTracker {
    threshold: u32,
    window: Duration,
    failures: std::collections::HashMap<IpAddr, (Instant, u32)>,
}

impl AuthFailureTracker {
    /// `threshold` failures within `window` trigger a ban.
    pub fn new(threshold: u32, window: Duration) -> Self {
        AuthFailureTracker { threshold: threshold.max(1), window, failures: Default::default() }
    }

    /// Records one failure; returns true when this failure crosses the threshold.
    pub fn record(&mut self, source: IpAddr, now: Instant) -> bool {
        let entry = self.failures.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) > self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 >= self.threshold {
            self.failures.remove(&source);
            return true;
        }
        false
    }

    /// Forgets windows that have closed, bounding memory under a spray of sources.
    pub fn prune(&mut self, now: Instant) {
        let window = self.window;
        self.failures.retain(|_, (start, _)| now.duration_since(*start) <= window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GuardConfig, Box<dyn std::error::Error>> {
        Ok(GuardConfig::deserialize(toml::from_str::<toml::Value>(text)?)?)
    }

    #[test]
    fn defaults_and_durations_parse() {
        let cfg =
            parse("interfaces = [\"eth0\"]\nauth_ban = \"30s\"\nauth_fail_window = 5").unwrap();
        assert_eq!(cfg.auth_ban, Duration::from_secs(30));
        assert_eq!(cfg.auth_fail_window, Duration::from_secs(5));
        assert_eq!((cfg.syn_rate, cfg.syn_burst, cfg.auth_fail_threshold), (200, 400, 20));
        assert!(cfg.validate().unwrap().is_empty());
        assert!(parse("bogus = 1").is_err());
    }

    #[test]
    fn mapped_peers_are_banned_as_ipv4() {
        let mapped: IpAddr = "::ffff:198.18.1.2".parse().unwrap();
        let v4: IpAddr = "198.18.1.2".parse().unwrap();
        assert_eq!(ban_source(mapped), v4);
        assert_eq!(Cidr::host(ban_source(mapped)).len, 32);
        let v6: IpAddr = "2001:db8:1::2".parse().unwrap();
        assert_eq!(ban_source(v6), v6);
    }

    #[test]
    fn deny_prefixes_are_validated() {
        let cfg = parse("deny = [\"10.0.0.0/8\", \"2001:db8::/32\", \"198.18.0.7\"]").unwrap();
        let deny = cfg.validate().unwrap();
        assert_eq!(deny.iter().map(|p| p.len).collect::<Vec<_>>(), vec![8, 32, 32]);
        let err = parse("deny = [\"10.0.0.0/40\"]").unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("10.0.0.0/40"), "{err}");
        assert!(parse("deny = [\"example.com\"]").unwrap().validate().is_err());
        assert!(parse("interfaces = [\"a/b\"]").unwrap().validate().is_err());
    }

    #[test]
    fn auth_failures_ban_at_threshold_within_window_only() {
        let mut t = AuthFailureTracker::new(3, Duration::from_secs(10));
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        let t0 = Instant::now();
        assert!(!t.record(ip, t0));
        assert!(!t.record(ip, t0 + Duration::from_secs(1)));
        assert!(t.record(ip, t0 + Duration::from_secs(2)));
        // A slow trickle across windows never bans.
        let mut slow = AuthFailureTracker::new(3, Duration::from_secs(1));
        for i in 0..10 {
            assert!(!slow.record(ip, t0 + Duration::from_secs(2 * i)));
        }
    }
}
