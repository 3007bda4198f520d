//! Loading the real programs, pinning their maps, and the redirect path's lifecycle.

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps, sk_msg::SkMsgLinkId, sock_ops::SockOpsLinkId},
};
use sluice_abi::{AddrKey, RedirectStats, SockKey, ipv4_mapped, names};
use tracing::{debug, info, warn};

use crate::{DEFAULT_PIN_DIR, DataplaneError, KERNEL_LOG_TARGET, error::prog_err, sys};

/// How to load the data plane.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// Where maps are pinned; must be on bpffs. `None` pins nothing (tests, probes).
    pub pin_dir: Option<PathBuf>,
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        DataplaneOptions { pin_dir: Some(PathBuf::from(DEFAULT_PIN_DIR)) }
    }
}

/// The loaded kernel object: maps created (and pinned), programs ready to attach.
///
/// Dropping it detaches every program it attached and removes the pins it made, so a
/// stopped sluice leaves nothing running in the kernel.
pub struct Dataplane {
    pub(crate) ebpf: Ebpf,
    pub(crate) guard_links: Vec<(String, aya::programs::xdp::XdpLinkId)>,
    pub(crate) splice_attached: bool,
    pub(crate) vip_links:
        Vec<(&'static str, aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId)>,
    /// The long-lived local-replica redirect (sock_ops, sk_msg) of `sluice run`.
    redirect_links: Option<(SockOpsLinkId, SkMsgLinkId)>,
    pinned: Vec<PathBuf>,
    pin_dir: Option<PathBuf>,
    logger_started: bool,
}

/// Maps pinned for operators, in `bpftool map dump pinned <dir>/<name>` form.
const PINNED_MAPS: [&str; 17] = [
    names::SPLICE_SOCKS,
    names::SPLICE_PEERS,
    names::SPLICE_STATS,
    names::STEER_STATS,
    names::VIP_SERVICES,
    names::VIP_BACKENDS,
    names::VIP_STATS,
    names::REDIR_SOCKS,
    names::LOCAL_REPLICAS,
    names::REDIR_STATS,
    names::GUARD_DENY_V4,
    names::GUARD_DENY_V6,
    names::GUARD_PORTS,
    names::GUARD_CONFIG,
    names::GUARD_SYN_RATE,
    names::GUARD_STATS,
    names::GUARD_IFACES,
];

impl Dataplane {
    /// Loads the embedded object and pins its maps under `options.pin_dir`.
    ///
    /// Stale pins from a previous process are replaced: maps are per-process state
    /// here, and reusing an old sockhash can leave sockets that make inserts fail with
    /// EBUSY (docs/design.md, What bites).
    pub fn load(options: DataplaneOptions) -> Result<Dataplane, DataplaneError> {
        Self::load_inner(options, false)
    }

    /// Like [`Dataplane::load`] for a process taking over from a running one on the same
    /// pin directory: the splice maps pinned there are reused rather than replaced, so
    /// that pairs the old process spliced can be handed over without leaving the
    /// kernel path (see [`Dataplane::adopt_splice`]).
    pub fn load_for_takeover(options: DataplaneOptions) -> Result<Dataplane, DataplaneError> {
        Self::load_inner(options, true)
    }

    fn load_inner(
        options: DataplaneOptions,
        share_splice: bool,
    ) -> Result<Dataplane, DataplaneError> {
        if options.pin_dir.is_some() {
            sys::ensure_bpffs()?;
        }
        let ebpf = load_object(options.pin_dir.as_deref(), share_splice)?;
        let mut dp = Dataplane {
            ebpf,
            guard_links: Vec::new(),
            vip_links: Vec::new(),
            splice_attached: false,
            redirect_links: None,
            pinned: Vec::new(),
            pin_dir: options.pin_dir,
            logger_started: false,
        };
        if let Some(dir) = dp.pin_dir.clone() {
            fs::create_dir_all(&dir)
                .map_err(|e| DataplaneError::io(format!("creating {}", dir.display()), e))?;
            for name in PINNED_MAPS {
                let path = dir.join(name);
                match fs::remove_file(&path) {
                    Ok(()) => debug!(path = %path.display(), "replaced a stale pin"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(DataplaneError::io(format!("removing {}", path.display()), e));
                    }
                }
                let map = dp
                    .ebpf
                    .map(name)
                    .ok_or_else(|| DataplaneError::Unsupported(format!("map {name} missing")))?;
                map.pin(&path).map_err(|source| DataplaneError::Pin {
                    name,
                    path: path.clone(),
                    source,
                })?;
                dp.pinned.push(path);
            }
            info!(dir = %dir.display(), maps = PINNED_MAPS.len(), "eBPF maps pinned");
        }
        Ok(dp)
    }

    /// Steering maps live on across processes; see [`load_object`].
    pub(crate) fn shares_steering(&self) -> bool {
        self.pin_dir.is_some()
    }

    /// Forwards kernel log records (aya-log) into `tracing`, with the kernel crate's
    /// name as the target. Needs a Tokio runtime; idempotent.
    pub fn start_kernel_logs(&mut self) -> Result<(), DataplaneError> {
        if self.logger_started {
            return Ok(());
        }
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf).map_err(|e| {
            DataplaneError::io("starting the kernel log reader", io::Error::other(e.to_string()))
        })?;
        // SAFETY: the logger owns its ring buffer fd for its whole life and always
        // returns that same fd; the AsyncFd owns the logger, so the fd outlives it.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| DataplaneError::io("registering the kernel log reader", e.into()))?;
        tokio::spawn(async move {
            loop {
                match fd.readable_mut().await {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "kernel log reader stopped");
                        return;
                    }
                }
            }
        });
        debug!(target: KERNEL_LOG_TARGET, "kernel log bridge started");
        self.logger_started = true;
        Ok(())
    }

    /// Leaves the pins to the process that took over from this one: it pinned its own
    /// maps under the same names, which this process's drop must not remove.
    pub fn release_pins(&mut self) {
        self.pinned.clear();
    }

    /// The pin directory, if maps are pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Loads sock_ops + sk_msg and attaches them to `cgroup` (a cgroup v2 directory
    /// descriptor): connections to or from local replicas opened by processes in that
    /// cgroup are then recorded and their bytes redirected to the peer socket. The
    /// returned guard detaches both on drop (tests, scoped use).
    pub fn attach_redirect(
        &mut self,
        cgroup: impl AsFd,
    ) -> Result<RedirectPath<'_>, DataplaneError> {
        let (ops_link, msg_link) = self.attach_redirect_links(cgroup)?;
        Ok(RedirectPath { dp: self, ops_link: Some(ops_link), msg_link: Some(msg_link) })
    }

    /// Like [`Dataplane::attach_redirect`], but the attachment lives as long as the
    /// data plane (or until [`Dataplane::detach_local_redirect`]): what a long-running
    /// process that shares its data plane behind a lock needs.
    pub fn attach_local_redirect(&mut self, cgroup: impl AsFd) -> Result<(), DataplaneError> {
        if self.redirect_links.is_some() {
            return Err(DataplaneError::Unsupported(
                "the local-replica redirect is already attached".into(),
            ));
        }
        self.redirect_links = Some(self.attach_redirect_links(cgroup)?);
        Ok(())
    }

    /// Detaches the long-lived local-replica redirect, if attached.
    pub fn detach_local_redirect(&mut self) -> Result<(), DataplaneError> {
        let Some((ops_link, msg_link)) = self.redirect_links.take() else { return Ok(()) };
        detach_redirect_links(&mut self.ebpf, Some(ops_link), Some(msg_link))
    }

    fn attach_redirect_links(
        &mut self,
        cgroup: impl AsFd,
    ) -> Result<(SockOpsLinkId, SkMsgLinkId), DataplaneError> {
        let map_fd = {
            let map = self
                .ebpf
                .map(names::REDIR_SOCKS)
                .ok_or_else(|| DataplaneError::Unsupported("redir_socks missing".into()))?;
            let hash: SockHash<&MapData, SockKey> = SockHash::try_from(map)
                .map_err(|source| DataplaneError::Map { name: names::REDIR_SOCKS, source })?;
            hash.fd().try_clone().map_err(|e| DataplaneError::io("dup sockhash fd", e))?
        };
        let sk_msg: &mut SkMsg = program(&mut self.ebpf, names::PROG_REDIRECT)?;
        if sk_msg.fd().is_err() {
            sk_msg.load().map_err(prog_err(names::PROG_REDIRECT))?;
        }
        let msg_link = sk_msg.attach(&map_fd).map_err(prog_err(names::PROG_REDIRECT))?;
        let sock_ops: &mut SockOps = program(&mut self.ebpf, names::PROG_TRACK)?;
        if sock_ops.fd().is_err() {
            sock_ops.load().map_err(prog_err(names::PROG_TRACK))?;
        }
        let ops_link = match sock_ops.attach(cgroup, CgroupAttachMode::Single) {
            Ok(link) => link,
            Err(source) => {
                // Leave nothing half-attached.
                let _ = detach_redirect_links(&mut self.ebpf, None, Some(msg_link));
                return Err(DataplaneError::Program { name: names::PROG_TRACK, source });
            }
        };
        Ok((ops_link, msg_link))
    }

    fn local_replicas(&mut self) -> Result<HashMap<&mut MapData, AddrKey, u8>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(names::LOCAL_REPLICAS)
            .ok_or_else(|| DataplaneError::Unsupported("local_replicas missing".into()))?;
        HashMap::try_from(map)
            .map_err(|source| DataplaneError::Map { name: names::LOCAL_REPLICAS, source })
    }

    /// Marks `addr` as a local replica endpoint: connections to or from it are eligible
    /// for the redirect path.
    pub fn add_local_replica(&mut self, addr: SocketAddr) -> Result<(), DataplaneError> {
        self.local_replicas()?
            .insert(addr_key(addr), 1, 0)
            .map_err(|source| DataplaneError::Map { name: names::LOCAL_REPLICAS, source })
    }

    /// Removes a local replica endpoint (already tracked sockets stay until closed).
    pub fn remove_local_replica(&mut self, addr: SocketAddr) -> Result<(), DataplaneError> {
        match self.local_replicas()?.remove(&addr_key(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { name: names::LOCAL_REPLICAS, source }),
        }
    }

    /// Redirect counters summed over CPUs.
    pub fn redirect_stats(&self) -> Result<RedirectStats, DataplaneError> {
        let map = self
            .ebpf
            .map(names::REDIR_STATS)
            .ok_or_else(|| DataplaneError::Unsupported("redir_stats missing".into()))?;
        crate::per_cpu::sum(map, RedirectStats::merge)
            .map_err(|source| DataplaneError::Map { name: names::REDIR_STATS, source })
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        for path in &self.pinned {
            if let Err(e) = fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "could not remove pin");
            }
        }
        if let Some(dir) = &self.pin_dir {
            // Only removes the directory if nothing else (another process) uses it.
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Maps that outlive a process: an upgrading sluice opens the same listener steering
/// maps by pin so the old and new process steer one SO_REUSEPORT group together.
pub(crate) const SHARED_MAPS: [&str; 2] = [names::STEER_SOCKS, names::STEER_CONFIG];

/// Maps a taking-over process shares with its predecessor (see
/// [`DataplaneOptions::share_splice`]): a spliced pair's sockets stay in the same
/// sockhash, its byte counts in the same pairing map, across the handover.
pub(crate) const SPLICE_MAPS: [&str; 3] =
    [names::SPLICE_SOCKS, names::SPLICE_PEERS, names::SPLICE_STATS];

/// Loads the object; with a pin directory, the shared maps are reused from their pins
/// (created and pinned when absent). A pin left by an incompatible build is replaced.
fn load_object(pin_dir: Option<&Path>, share_splice: bool) -> Result<Ebpf, DataplaneError> {
    let Some(dir) = pin_dir else {
        return Ok(EbpfLoader::new().load(crate::object())?);
    };
    // bpffs answers EPERM for a name with a '.', which reads like a privilege problem.
    if let Some(name) = dir.file_name().and_then(|n| n.to_str()).filter(|n| n.contains('.')) {
        return Err(DataplaneError::Unsupported(format!(
            "pin directory {name:?}: bpffs does not allow '.' in names"
        )));
    }
    fs::create_dir_all(dir)
        .map_err(|e| DataplaneError::io(format!("creating {}", dir.display()), e))?;
    let splice: &[&str] = if share_splice { &SPLICE_MAPS } else { &[] };
    let load = || {
        let mut loader = EbpfLoader::new();
        for name in SHARED_MAPS.iter().chain(splice) {
            loader.map_pin_path(name, dir.join(name));
        }
        loader.load(crate::object())
    };
    match load() {
        Ok(ebpf) => Ok(ebpf),
        Err(e) => {
            // The splice maps are then fresh too: a handover of spliced pairs sees a
            // different sockhash and is refused (the pairs drain on the old process).
            warn!(error = %e, "shared maps could not be reused; replacing their pins");
            for name in SHARED_MAPS.iter().chain(splice) {
                let _ = fs::remove_file(dir.join(name));
            }
            Ok(load()?)
        }
    }
}

/// The attached sock_ops + sk_msg pair; detaches both on drop.
pub struct RedirectPath<'a> {
    dp: &'a mut Dataplane,
    ops_link: Option<SockOpsLinkId>,
    msg_link: Option<SkMsgLinkId>,
}

impl RedirectPath<'_> {
    /// The data plane this path belongs to (for map updates and counters).
    pub fn dataplane(&mut self) -> &mut Dataplane {
        self.dp
    }

    /// Detaches both programs now, reporting errors (drop ignores them).
    pub fn detach(mut self) -> Result<(), DataplaneError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), DataplaneError> {
        detach_redirect_links(&mut self.dp.ebpf, self.ops_link.take(), self.msg_link.take())
    }
}

fn detach_redirect_links(
    ebpf: &mut Ebpf,
    ops_link: Option<SockOpsLinkId>,
    msg_link: Option<SkMsgLinkId>,
) -> Result<(), DataplaneError> {
    if let Some(link) = ops_link {
        let prog: &mut SockOps = program(ebpf, names::PROG_TRACK)?;
        prog.detach(link).map_err(prog_err(names::PROG_TRACK))?;
    }
    if let Some(link) = msg_link {
        let prog: &mut SkMsg = program(ebpf, names::PROG_REDIRECT)?;
        prog.detach(link).map_err(prog_err(names::PROG_REDIRECT))?;
    }
    Ok(())
}

impl Drop for RedirectPath<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            warn!(error = %e, "detaching the redirect path failed");
        }
    }
}

/// The normalised map key of a socket address (IPv4 as IPv4-mapped IPv6).
pub(crate) fn addr_key(addr: SocketAddr) -> AddrKey {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => ipv4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ipv4_mapped(u32::from_ne_bytes(v4.octets())),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                [w(0), w(4), w(8), w(12)]
            }
        },
    };
    AddrKey { ip, port: u32::from(addr.port()) }
}

pub(crate) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(DataplaneError::MissingProgram(name))?;
    prog.try_into().map_err(|source| DataplaneError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_mapped_ipv6_normalise_to_the_same_key() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8080".parse().unwrap();
        assert_eq!(addr_key(v4), addr_key(mapped));
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_ne!(addr_key(v4), addr_key(v6));
        assert_eq!(addr_key(v6).ip[3], u32::from_ne_bytes([0, 0, 0, 1]));
    }
}
