//! The host facts the data plane depends on: the cgroup v2 mount, bpffs, process
//! capabilities, and scoped cgroups and network namespaces for probes and tests.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::DataplaneError;

/// A mount entry from `/proc/mounts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Mount point.
    pub path: PathBuf,
    /// Filesystem type (`cgroup2`, `bpf`, ...).
    pub fstype: String,
}

/// Parses `/proc/mounts`-formatted text. Octal escapes (`\040` for space) are decoded.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let path = fields.next()?;
            let fstype = fields.next()?;
            Some(Mount { path: PathBuf::from(unescape_mount(path)), fstype: fstype.to_owned() })
        })
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts() -> Result<Vec<Mount>, DataplaneError> {
    let text = fs::read_to_string("/proc/mounts")
        .map_err(|e| DataplaneError::io("reading /proc/mounts", e))?;
    Ok(parse_mounts(&text))
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on most nodes; a hybrid host may
/// mount it at `/sys/fs/cgroup/unified`). Read from `/proc/mounts`, never assumed.
pub fn cgroup2_mount() -> Result<PathBuf, DataplaneError> {
    mounts()?.into_iter().find(|m| m.fstype == "cgroup2").map(|m| m.path).ok_or_else(|| {
        DataplaneError::Unsupported(
            "no cgroup v2 mount in /proc/mounts (cgroup v1 only?): cgroup programs need \
                 the unified hierarchy"
                .into(),
        )
    })
}

/// The cgroup v2 path this process belongs to (relative to the mount), from
/// `/proc/self/cgroup`'s `0::` line.
pub fn own_cgroup() -> Result<PathBuf, DataplaneError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| DataplaneError::io("reading /proc/self/cgroup", e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .ok_or_else(|| DataplaneError::Unsupported("this process is in no cgroup v2".into()))
}

/// Whether `dir` is a mounted bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    mounts().map(|ms| ms.iter().any(|m| m.fstype == "bpf" && m.path == dir)).unwrap_or(false)
}

/// Makes sure bpffs is mounted at `/sys/fs/bpf` (mounting it needs CAP_SYS_ADMIN).
/// Returns whether this call mounted it.
pub fn ensure_bpffs() -> Result<bool, DataplaneError> {
    let dir = Path::new("/sys/fs/bpf");
    if is_bpffs(dir) {
        return Ok(false);
    }
    let target = c"/sys/fs/bpf";
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call;
    // `data` may be null for bpffs.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(DataplaneError::io(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed (needs CAP_SYS_ADMIN)",
            io::Error::last_os_error(),
        ));
    }
    Ok(true)
}

/// Linux capability numbers the data plane cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// CAP_DAC_OVERRIDE: creating a probe cgroup in a read-only (0555) cgroup root,
    /// as container runtimes mount it.
    DacOverride = 1,
    /// CAP_NET_ADMIN: sockmap/sockhash creation, XDP and cgroup attachment.
    NetAdmin = 12,
    /// CAP_SYS_ADMIN: mounting bpffs; also implies BPF on older kernels.
    SysAdmin = 21,
    /// CAP_PERFMON: pointer arithmetic and some helpers in programs.
    Perfmon = 38,
    /// CAP_BPF: creating maps and loading programs.
    Bpf = 39,
}

impl Capability {
    /// The capability's name as `capsh` spells it, upper-cased.
    pub fn name(self) -> &'static str {
        match self {
            Capability::DacOverride => "CAP_DAC_OVERRIDE",
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Perfmon => "CAP_PERFMON",
            Capability::Bpf => "CAP_BPF",
        }
    }

    /// All the capabilities the data plane may use.
    pub const ALL: [Capability; 5] = [
        Capability::Bpf,
        Capability::Perfmon,
        Capability::NetAdmin,
        Capability::SysAdmin,
        Capability::DacOverride,
    ];
}

/// The effective capability set of this process, from `/proc/self/status`.
pub fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The data plane capabilities this process lacks.
pub fn missing_capabilities() -> Vec<Capability> {
    let eff = effective_capabilities();
    Capability::ALL.into_iter().filter(|c| eff & (1u64 << (*c as u32)) == 0).collect()
}

/// A cgroup v2 directory created for a probe or a test, removed on drop.
///
/// Programs attached here see only the sockets of processes placed in it, never the
/// rest of the node: probes and tests must not touch other processes' sockets.
#[derive(Debug)]
pub struct ScopedCgroup {
    path: PathBuf,
    file: fs::File,
}

impl ScopedCgroup {
    /// Creates `<cgroup2 mount>/<name>`.
    pub fn create(name: &str) -> Result<ScopedCgroup, DataplaneError> {
        let path = cgroup2_mount()?.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(DataplaneError::io(format!("creating cgroup {}", path.display()), e));
            }
        }
        let file = fs::File::open(&path)
            .map_err(|e| DataplaneError::io(format!("opening cgroup {}", path.display()), e))?;
        Ok(ScopedCgroup { path, file })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open descriptor of the cgroup directory, for attaching programs.
    pub fn file(&self) -> &fs::File {
        &self.file
    }

    /// Moves a process into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), DataplaneError> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .map_err(|e| DataplaneError::io(format!("moving pid {pid} into cgroup"), e))
    }
}

impl Drop for ScopedCgroup {
    fn drop(&mut self) {
        // A cgroup can only be removed once empty; processes that outlive the guard
        // are moved to the parent first.
        if let (Ok(procs), Some(parent)) =
            (fs::read_to_string(self.path.join("cgroup.procs")), self.path.parent())
        {
            for pid in procs.lines() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// Runs `f` on a fresh thread inside a new, empty network namespace (only a `lo`
/// that is down), so probes can attach to interfaces without touching the node's.
pub fn in_new_netns<T: Send>(
    f: impl FnOnce() -> Result<T, DataplaneError> + Send,
) -> Result<T, DataplaneError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces (the thread was
            // spawned for this purpose and ends with the closure).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(DataplaneError::io(
                    "creating a network namespace (needs CAP_SYS_ADMIN)",
                    io::Error::last_os_error(),
                ));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(DataplaneError::Unsupported("probe thread panicked".into())))
    })
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`
/// (e.g. `/run/netns/NAME`), so interface names and sockets resolve there. The
/// calling thread's namespace is untouched.
pub fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, DataplaneError> + Send,
) -> Result<T, DataplaneError> {
    let file = fs::File::open(netns)
        .map_err(|e| DataplaneError::io(format!("opening netns {}", netns.display()), e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: `file` is an open namespace descriptor for the whole call; setns
            // changes only this thread, which exists for this closure alone.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(DataplaneError::io(
                    format!("joining netns {} (needs CAP_SYS_ADMIN)", netns.display()),
                    io::Error::last_os_error(),
                ));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(DataplaneError::Unsupported("netns thread panicked".into())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_and_bpffs_in_mounts_text() {
        let text = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                    cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
                    bpf /sys/fs/bpf bpf rw 0 0\n\
                    none /mnt/with\\040space tmpfs rw 0 0\n";
        let ms = parse_mounts(text);
        assert_eq!(
            ms[1],
            Mount { path: "/sys/fs/cgroup/unified".into(), fstype: "cgroup2".into() }
        );
        assert_eq!(ms[2].fstype, "bpf");
        assert_eq!(ms[3].path, PathBuf::from("/mnt/with space"));
    }
}
