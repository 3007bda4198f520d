//! What this kernel actually offers, learned by loading and attaching the smallest
//! program of each kind (never by reading the kernel version).
//!
//! The probe attaches only to things it creates: a cgroup of its own, a socket of its
//! own, an interface in a network namespace of its own. It leaves nothing behind.

use std::{fmt, net::SocketAddr, path::Path};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{SockHash, SockMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkMsg, SkReuseport, SkSkb, SockOps, Xdp, XdpMode,
    },
};
use serde::Serialize;
use sluice_abi::{SockKey, names};

use crate::{
    DataplaneError,
    error::prog_err,
    loader::program,
    sys::{self, Capability, ScopedCgroup},
};

/// A kernel feature sluice can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Kernel BTF at /sys/kernel/btf/vmlinux.
    Btf,
    /// A cgroup v2 mount to attach cgroup programs to.
    #[serde(rename = "cgroup_v2")]
    Cgroup2,
    /// bpffs at /sys/fs/bpf, for pinning.
    Bpffs,
    /// The embedded object loads (maps created, programs parsed).
    ObjectLoad,
    /// sock_ops recording into a sockhash plus an sk_msg redirect.
    SockhashSkMsg,
    /// An sk_skb stream verdict program on a sockmap.
    SkSkbVerdict,
    /// XDP on an interface.
    Xdp,
    /// An sk_reuseport program on a SO_REUSEPORT group.
    SkReuseport,
    /// A cgroup connect4 (sock_addr) program.
    CgroupSockAddr,
}

impl Feature {
    /// Every feature, in report order.
    pub const ALL: [Feature; 9] = [
        Feature::Btf,
        Feature::Cgroup2,
        Feature::Bpffs,
        Feature::ObjectLoad,
        Feature::SockhashSkMsg,
        Feature::SkSkbVerdict,
        Feature::Xdp,
        Feature::SkReuseport,
        Feature::CgroupSockAddr,
    ];

    /// Short name used in tables, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Btf => "btf",
            Feature::Cgroup2 => "cgroup_v2",
            Feature::Bpffs => "bpffs",
            Feature::ObjectLoad => "object_load",
            Feature::SockhashSkMsg => "sockhash_sk_msg",
            Feature::SkSkbVerdict => "sk_skb_verdict",
            Feature::Xdp => "xdp",
            Feature::SkReuseport => "sk_reuseport",
            Feature::CgroupSockAddr => "cgroup_sock_addr",
        }
    }

    /// What sluice uses the feature for, for operators reading the table.
    pub fn purpose(self) -> &'static str {
        match self {
            Feature::Btf => "typed maps and CO-RE",
            Feature::Cgroup2 => "scoping socket programs",
            Feature::Bpffs => "pinning maps for bpftool",
            Feature::ObjectLoad => "every kernel program",
            Feature::SockhashSkMsg => "proxy<->local replica redirect",
            Feature::SkSkbVerdict => "spliced upgraded streams",
            Feature::Xdp => "ingress guard",
            Feature::SkReuseport => "listener steering",
            Feature::CgroupSockAddr => "server virtual addresses",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a feature is usable, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FeatureStatus {
    /// Loaded and attached successfully (with a short detail, e.g. the XDP mode).
    Available {
        /// What was checked.
        detail: String,
    },
    /// Not usable here.
    Missing {
        /// Why, in words an operator can act on.
        reason: String,
    },
}

impl FeatureStatus {
    fn ok(detail: impl Into<String>) -> Self {
        FeatureStatus::Available { detail: detail.into() }
    }

    fn missing(reason: impl Into<String>) -> Self {
        FeatureStatus::Missing { reason: reason.into() }
    }

    /// True when the feature can be used.
    pub fn is_available(&self) -> bool {
        matches!(self, FeatureStatus::Available { .. })
    }
}

/// One feature's probe result.
#[derive(Clone, Debug, Serialize)]
pub struct FeatureReport {
    /// The feature.
    pub feature: Feature,
    /// Its status.
    #[serde(flatten)]
    pub status: FeatureStatus,
}

/// The probe's findings, one status per feature.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// Status per feature, in [`Feature::ALL`] order.
    pub features: Vec<FeatureReport>,
    /// Data plane capabilities this process lacks (names as `capsh` prints them).
    pub missing_capabilities: Vec<&'static str>,
}

impl ProbeReport {
    /// The status of one feature.
    pub fn status(&self, feature: Feature) -> Option<&FeatureStatus> {
        self.features.iter().find(|r| r.feature == feature).map(|r| &r.status)
    }

    /// Whether a feature is usable.
    pub fn has(&self, feature: Feature) -> bool {
        self.status(feature).is_some_and(FeatureStatus::is_available)
    }

    /// True when every feature is available.
    pub fn all_available(&self) -> bool {
        self.features.iter().all(|r| r.status.is_available())
    }

    /// One line naming what is missing, for a start-up log, or `None` when complete.
    pub fn summary_of_missing(&self) -> Option<String> {
        let missing: Vec<String> = self
            .features
            .iter()
            .filter_map(|r| match &r.status {
                FeatureStatus::Missing { reason } => Some(format!("{} ({reason})", r.feature)),
                FeatureStatus::Available { .. } => None,
            })
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// The report as an aligned text table.
    pub fn table(&self) -> String {
        let mut out =
            format!("{:<18} {:<10} {:<32} {}\n", "FEATURE", "STATUS", "USED FOR", "DETAIL");
        for FeatureReport { feature: f, status } in &self.features {
            let (state, detail) = match status {
                FeatureStatus::Available { detail } => ("ok", detail.as_str()),
                FeatureStatus::Missing { reason } => ("MISSING", reason.as_str()),
            };
            out.push_str(&format!(
                "{:<18} {:<10} {:<32} {}\n",
                f.name(),
                state,
                f.purpose(),
                detail
            ));
        }
        if !self.missing_capabilities.is_empty() {
            out.push_str(&format!(
                "missing capabilities: {}\n",
                self.missing_capabilities.join(", ")
            ));
        }
        out
    }
}

/// Explains a load/attach failure in words an operator can act on: the capability to
/// add when the kernel said EPERM (or EACCES on the cgroup root), CAP_PERFMON when the
/// verifier refused pointer arithmetic it allows only with it, and the verifier's
/// last line rather than its whole log.
fn explain(err: &dyn std::error::Error, missing_caps: &[Capability]) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    let mut rejected_by_verifier = false;
    if let Some((head, log)) = text.split_once("Verifier output:") {
        tracing::debug!(verifier_log = log, "program rejected");
        rejected_by_verifier = true;
        let reason = log
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| {
                !l.is_empty()
                    && !l.starts_with("verification time")
                    && !l.starts_with("stack depth")
                    && !l.starts_with("processed")
                    && !l.starts_with(')')
            })
            .unwrap_or("");
        text = format!("{}verifier: {reason}", head.trim_end_matches(['.', ' ']).to_owned() + ". ");
    }
    let names = |caps: &[Capability]| caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
    if rejected_by_verifier {
        if missing_caps.contains(&Capability::Perfmon) {
            return format!(
                "rejected without CAP_PERFMON (the verifier allows this program's pointer arithmetic only with it): {text}"
            );
        }
        return text;
    }
    let denied = text.contains("Operation not permitted") || text.contains("EPERM");
    let access = text.contains("Permission denied");
    let dac = missing_caps.contains(&Capability::DacOverride);
    if access && dac && text.contains("cgroup") {
        return format!(
            "permission denied: missing CAP_DAC_OVERRIDE (the cgroup root is read-only without it) ({text})"
        );
    }
    let caps: Vec<Capability> =
        missing_caps.iter().copied().filter(|c| *c != Capability::DacOverride).collect();
    if (denied || access) && !caps.is_empty() {
        text = format!("permission denied: missing {} ({text})", names(&caps));
    }
    text
}

/// Probes the running kernel. Never fails: every problem becomes a `Missing` status.
pub fn probe() -> ProbeReport {
    let caps = sys::missing_capabilities();
    let mut features = Vec::with_capacity(Feature::ALL.len());
    let mut push = |feature, status| features.push(FeatureReport { feature, status });

    push(
        Feature::Btf,
        match Btf::from_sys_fs() {
            Ok(_) => FeatureStatus::ok("/sys/kernel/btf/vmlinux"),
            Err(e) => FeatureStatus::missing(format!("kernel BTF unavailable: {e}")),
        },
    );

    let cgroup2 = sys::cgroup2_mount();
    push(
        Feature::Cgroup2,
        match &cgroup2 {
            Ok(path) => FeatureStatus::ok(path.display().to_string()),
            Err(e) => FeatureStatus::missing(e.to_string()),
        },
    );

    push(
        Feature::Bpffs,
        match sys::ensure_bpffs() {
            Ok(false) => FeatureStatus::ok("mounted at /sys/fs/bpf"),
            Ok(true) => FeatureStatus::ok("mounted at /sys/fs/bpf by sluice"),
            Err(e) => FeatureStatus::missing(explain(&e, &relevant(&caps, Feature::Bpffs))),
        },
    );

    // Maps are created at load time, so a missing CAP_BPF shows up right here.
    let mut ebpf = match EbpfLoader::new().load(crate::object()) {
        Ok(ebpf) => {
            push(Feature::ObjectLoad, FeatureStatus::ok("maps created"));
            Some(ebpf)
        }
        Err(e) => {
            let reason = explain(&e, &relevant(&caps, Feature::ObjectLoad));
            push(Feature::ObjectLoad, FeatureStatus::missing(reason));
            None
        }
    };

    let cgroup = match &cgroup2 {
        Ok(_) => ScopedCgroup::create(&format!("sluice-probe-{}", std::process::id())),
        Err(e) => Err(DataplaneError::Unsupported(e.to_string())),
    };

    let checks: [(Feature, AttachCheck); 5] = [
        (Feature::SockhashSkMsg, probe_sockhash_sk_msg),
        (Feature::SkSkbVerdict, probe_sk_skb),
        (Feature::Xdp, probe_xdp),
        (Feature::SkReuseport, probe_reuseport),
        (Feature::CgroupSockAddr, probe_sock_addr),
    ];
    for (feature, check) in checks {
        let status = match ebpf.as_mut() {
            None => FeatureStatus::missing("the eBPF object did not load (see object_load)"),
            Some(ebpf) => match check(ebpf, &cgroup) {
                Ok(detail) => FeatureStatus::ok(detail),
                Err(e) => FeatureStatus::missing(explain(&e, &relevant(&caps, feature))),
            },
        };
        push(feature, status);
    }
    // Dropping the object detaches every probe link before the cgroup is removed.
    drop(ebpf);
    drop(cgroup);

    ProbeReport { features, missing_capabilities: caps.iter().map(|c| c.name()).collect() }
}

/// The missing capabilities that can explain an EPERM for `feature`: loading needs
/// CAP_BPF (+ CAP_PERFMON for the redirect helpers) or, on its own, CAP_SYS_ADMIN;
/// cgroup and XDP attachment need CAP_NET_ADMIN; bpffs and namespaces CAP_SYS_ADMIN.
fn relevant(missing: &[Capability], feature: Feature) -> Vec<Capability> {
    use Capability::*;
    let wanted: &[Capability] = match feature {
        Feature::Btf | Feature::Cgroup2 => &[],
        Feature::Bpffs => &[SysAdmin],
        // Creating the object's sockmap and sockhash needs CAP_NET_ADMIN too.
        Feature::ObjectLoad => &[Bpf, NetAdmin, Perfmon, SysAdmin],
        Feature::SkSkbVerdict | Feature::SkReuseport => &[Bpf, Perfmon, SysAdmin],
        Feature::SockhashSkMsg | Feature::CgroupSockAddr => {
            &[Bpf, Perfmon, NetAdmin, SysAdmin, DacOverride]
        }
        // The XDP probe attaches inside a private network namespace.
        Feature::Xdp => &[Bpf, NetAdmin, SysAdmin],
    };
    let mut out: Vec<Capability> = missing.iter().copied().filter(|c| wanted.contains(c)).collect();
    // CAP_SYS_ADMIN stands in for CAP_BPF/CAP_PERFMON: only name it when it is the
    // sole explanation, so the message points at the least privilege to add.
    if out.len() > 1 && feature != Feature::Bpffs {
        out.retain(|c| *c != SysAdmin);
    }
    out
}

/// One attach check: given the loaded object and the probe cgroup, a detail or why not.
type AttachCheck =
    fn(&mut Ebpf, &Result<ScopedCgroup, DataplaneError>) -> Result<String, DataplaneError>;

fn cgroup_of(cg: &Result<ScopedCgroup, DataplaneError>) -> Result<&ScopedCgroup, DataplaneError> {
    cg.as_ref().map_err(|e| DataplaneError::Unsupported(format!("no probe cgroup: {e}")))
}

fn probe_sockhash_sk_msg(
    ebpf: &mut Ebpf,
    cg: &Result<ScopedCgroup, DataplaneError>,
) -> Result<String, DataplaneError> {
    let cgroup = cgroup_of(cg)?;
    let map_fd = {
        let map = ebpf
            .map(names::REDIR_SOCKS)
            .ok_or(DataplaneError::Unsupported("redir_socks map missing".into()))?;
        let hash: SockHash<_, SockKey> = SockHash::try_from(map)
            .map_err(|source| DataplaneError::Map { name: names::REDIR_SOCKS, source })?;
        hash.fd().try_clone().map_err(|e| DataplaneError::io("dup sockhash fd", e))?
    };
    let sk_msg: &mut SkMsg = program(ebpf, names::PROG_REDIRECT)?;
    sk_msg.load().map_err(prog_err(names::PROG_REDIRECT))?;
    sk_msg.attach(&map_fd).map_err(prog_err(names::PROG_REDIRECT))?;
    let sock_ops: &mut SockOps = program(ebpf, names::PROG_TRACK)?;
    sock_ops.load().map_err(prog_err(names::PROG_TRACK))?;
    sock_ops
        .attach(cgroup.file(), CgroupAttachMode::Single)
        .map_err(prog_err(names::PROG_TRACK))?;
    Ok("sock_ops on a probe cgroup, sk_msg on a sockhash".into())
}

fn probe_sk_skb(
    ebpf: &mut Ebpf,
    _cg: &Result<ScopedCgroup, DataplaneError>,
) -> Result<String, DataplaneError> {
    let map_fd = {
        let map = ebpf
            .map(names::PROBE_SOCKMAP)
            .ok_or(DataplaneError::Unsupported("probe_sockmap map missing".into()))?;
        let sockmap = SockMap::try_from(map)
            .map_err(|source| DataplaneError::Map { name: names::PROBE_SOCKMAP, source })?;
        sockmap.fd().try_clone().map_err(|e| DataplaneError::io("dup sockmap fd", e))?
    };
    let skb: &mut SkSkb = program(ebpf, names::PROBE_SKB_VERDICT)?;
    skb.load().map_err(prog_err(names::PROBE_SKB_VERDICT))?;
    skb.attach(&map_fd).map_err(prog_err(names::PROBE_SKB_VERDICT))?;
    Ok("stream verdict on a sockmap".into())
}

fn probe_xdp(
    ebpf: &mut Ebpf,
    _cg: &Result<ScopedCgroup, DataplaneError>,
) -> Result<String, DataplaneError> {
    let xdp: &mut Xdp = program(ebpf, names::PROBE_XDP)?;
    xdp.load().map_err(prog_err(names::PROBE_XDP))?;
    // `lo` in a namespace of our own: attaching there can't disturb node traffic. The
    // link is detached before the thread (and with it the namespace) goes away.
    let attached = sys::in_new_netns(|| {
        let link = xdp.attach("lo", XdpMode::Skb).map_err(prog_err(names::PROBE_XDP))?;
        xdp.detach(link).map_err(prog_err(names::PROBE_XDP))?;
        Ok(())
    });
    match attached {
        Ok(()) => Ok("generic (skb) mode on lo in a private netns".into()),
        // Without CAP_SYS_ADMIN there is no private namespace to attach in, and the
        // probe never attaches to the node's own interfaces. The program loaded, and
        // attaching needs only CAP_NET_ADMIN: the guard reports its own attach errors.
        Err(DataplaneError::Io { ref what, .. })
            if what.starts_with("creating a network namespace")
                && !sys::missing_capabilities().contains(&Capability::NetAdmin) =>
        {
            Ok("loaded; attach not probed (a private netns needs CAP_SYS_ADMIN)".into())
        }
        Err(e) => Err(e),
    }
}

fn probe_reuseport(
    ebpf: &mut Ebpf,
    _cg: &Result<ScopedCgroup, DataplaneError>,
) -> Result<String, DataplaneError> {
    use socket2::{Domain, Socket, Type};
    let prog: &mut SkReuseport = program(ebpf, names::PROBE_REUSEPORT)?;
    prog.load().map_err(prog_err(names::PROBE_REUSEPORT))?;
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)
        .map_err(|e| DataplaneError::io("probe socket", e))?;
    sock.set_reuse_port(true).map_err(|e| DataplaneError::io("SO_REUSEPORT", e))?;
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    sock.bind(&addr.into()).map_err(|e| DataplaneError::io("probe bind", e))?;
    sock.listen(1).map_err(|e| DataplaneError::io("probe listen", e))?;
    prog.attach(&sock).map_err(prog_err(names::PROBE_REUSEPORT))?;
    Ok("on a SO_REUSEPORT listener".into())
}

fn probe_sock_addr(
    ebpf: &mut Ebpf,
    cg: &Result<ScopedCgroup, DataplaneError>,
) -> Result<String, DataplaneError> {
    let cgroup = cgroup_of(cg)?;
    let prog: &mut CgroupSockAddr = program(ebpf, names::PROBE_CONNECT4)?;
    prog.load().map_err(prog_err(names::PROBE_CONNECT4))?;
    prog.attach(cgroup.file(), CgroupAttachMode::Single)
        .map_err(prog_err(names::PROBE_CONNECT4))?;
    Ok("connect4 on a probe cgroup".into())
}

/// Whether `path` looks like a mounted bpffs directory or lies inside one.
pub fn under_bpffs(path: &Path) -> bool {
    path.ancestors().any(sys::is_bpffs)
}
