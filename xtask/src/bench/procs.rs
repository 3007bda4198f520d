//! Child processes for benchmarks: a guard that kills on drop, CPU pinning with
//! `taskset`, and the `/proc` readings the scenarios report (CPU ticks, RSS, placement).

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Pids of the children alive right now, for the interrupt handler.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn track(pid: u32, alive: bool) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| *p != pid);
        if alive {
            live.push(pid);
        }
    }
}

/// On SIGINT or SIGTERM: kill every child (and its descendants), remove `scratch`, exit
/// 130. Guards only run on a normal return; this covers Ctrl-C and `kill`.
pub fn on_interrupt(scratch: PathBuf) {
    thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        let got = rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
            else {
                return false;
            };
            tokio::select! {
                _ = int.recv() => true,
                _ = term.recv() => true,
            }
        });
        if !got {
            return;
        }
        eprintln!("bench: interrupted; stopping every process it started");
        let pids = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
        for pid in pids {
            signal("KILL", &tree(pid));
        }
        let _ = fs::remove_dir_all(&scratch);
        // The run's bpffs pin directories, as a normal end removes them.
        let prefix = super::systems::bench_pin_prefix();
        if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
            for e in entries.flatten() {
                if e.path().display().to_string().starts_with(&prefix) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        if let Some(cg) = RUN_CGROUP.get() {
            // Killed processes leave their cgroup as they exit: a bounded wait.
            let deadline = Instant::now() + Duration::from_secs(2);
            while fs::remove_dir(cg).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        std::process::exit(130);
    });
}

/// A CPU set in `taskset -c` syntax, e.g. `"0"` or `"1"`.
pub type Cpus = &'static str;

/// A running child that is terminated (with its descendants) when dropped, so a failed
/// or interrupted scenario never leaves an nginx or a load generator behind.
pub struct Guard {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Guard {
    /// Starts `program args…` pinned to `cpus`, stdout and stderr to `log`.
    pub fn spawn(
        name: &str,
        cpus: Cpus,
        program: &str,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self> {
        let out =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = pinned(cpus, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        track(child.id(), true);
        Ok(Self { name: name.to_string(), child, log })
    }

    /// Starts a child whose first stdout line is `listening <addr>` and returns it with
    /// that address (used for the upstream, which picks its own port).
    pub fn spawn_announcing(
        name: &str,
        cpus: Cpus,
        program: &str,
        args: &[String],
        log: PathBuf,
    ) -> Result<(Self, SocketAddr)> {
        let err =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = pinned(cpus, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        track(child.id(), true);
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let guard = Self { name: name.to_string(), child, log };
        // The line arrives within milliseconds; a thread keeps the wait bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).with_context(|| {
            format!("{name} did not announce its address; see {}", guard.log.display())
        })?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{name} printed {line:?}, expected `listening <addr>`"))?;
        Ok((guard, addr))
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file's tail, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(strip_ansi).collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Log lines containing `needle`, without terminal colour codes.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().map(strip_ansi).filter(|l| l.contains(needle)).collect()
    }

    /// Fails if the child already exited (a proxy that rejected its config).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// Waits up to `limit` until `addr` accepts TCP connections (a proxy started under
    /// valgrind takes seconds to read its debug info).
    pub fn wait_port_within(&mut self, addr: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not accept on {addr} after {limit:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the child to completion within `limit`, then returns its log.
    pub fn finish(mut self, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let text = fs::read_to_string(&self.log).unwrap_or_default();
                if !status.success() {
                    bail!("{} failed ({status}):\n{}", self.name, self.log_tail());
                }
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {limit:?}; killed", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `program` pinned to `cpus`, and killed by the kernel if the harness dies without
/// running its guards (e.g. SIGKILL), so no proxy outlives a run.
fn pinned(cpus: Cpus, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "taskset", "-c", cpus, program]);
    cmd
}

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.child.id();
        track(pid, false);
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // Descendants first (nginx's worker), gathered before the parent goes away.
        let family = tree(pid);
        signal("TERM", &family);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) && family.iter().all(|p| !alive(*p)) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        signal("KILL", &family);
        let _ = self.child.wait();
    }
}

/// A process the harness did not spawn but must stop: the sluice a `sluice upgrade`
/// re-executed. The interrupt handler kills it too, and dropping this stops it (and its
/// descendants) as a [`Guard`] does its child.
pub struct Adopted(u32);

impl Adopted {
    /// Takes charge of `pid`.
    pub fn new(pid: u32) -> Self {
        track(pid, true);
        Adopted(pid)
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        track(self.0, false);
        let family = tree(self.0);
        signal("TERM", &family);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && family.iter().any(|p| alive(*p)) {
            thread::sleep(Duration::from_millis(10));
        }
        signal("KILL", &family);
    }
}

/// Removes `ESC [ … letter` sequences (tracing's colours).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn signal(sig: &str, pids: &[u32]) {
    let live: Vec<String> = pids.iter().filter(|p| alive(**p)).map(u32::to_string).collect();
    if live.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(&live)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).and_then(|f| f.first().copied()) != Some("Z"),
        Err(_) => false,
    }
}

/// The fields after `(comm)`, which may itself contain spaces.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// `pid` and all its descendants (a scan of /proc; the trees here are tiny).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
            // Field 4 of stat (index 1 after the state letter) is the parent pid.
            if let Some(ppid) = stat_fields(&stat).and_then(|f| f.get(1)?.parse().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut family = BTreeSet::from([pid]);
    loop {
        let before = family.len();
        for (p, pp) in &parents {
            if family.contains(pp) {
                family.insert(*p);
            }
        }
        if family.len() == before {
            break;
        }
    }
    family.into_iter().collect()
}

/// The process tree's names and where the kernel lets them (and last let them) run,
/// e.g. `nginx[1234] allowed 1 last on 1`.
pub fn placement(pid: u32) -> String {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let status = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let name = field(&status, "Name:").unwrap_or("?").to_string();
            let allowed = field(&status, "Cpus_allowed_list:").unwrap_or("?").to_string();
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Field 39 (`processor`): the CPU it last ran on.
            let last = stat_fields(&stat).and_then(|f| f.get(36).map(|s| s.to_string()));
            let threads = field(&status, "Threads:").unwrap_or("?").to_string();
            Some(format!(
                "{name}[{p}] threads {threads} allowed {allowed} last on {}",
                last.unwrap_or_else(|| "?".into())
            ))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

/// Re-pins every thread of `pid`'s process tree to `cpus`.
pub fn repin(pid: u32, cpus: Cpus) -> Result<()> {
    for p in tree(pid) {
        pin_threads(p, cpus)?;
    }
    Ok(())
}

/// Pins this process (every thread it has now, and so those it starts later) to `cpus`.
pub fn pin_self(cpus: Cpus) -> Result<()> {
    pin_threads(std::process::id(), cpus)
}

fn pin_threads(pid: u32, cpus: Cpus) -> Result<()> {
    // `taskset -a` lists the threads, then sets each; a thread that exits in between
    // fails the call, so try again (the set converges within a few tries).
    for _ in 0..5 {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("taskset -a -p -c {cpus} {pid} failed")
}

/// Lowers this process's nice value to `nice` (children inherit it), so that whatever
/// else runs on the machine (builds) disturbs the measured processes less. Best effort:
/// returns whether it took.
pub fn renice_self(nice: i32) -> bool {
    let reniced = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // With autogroup scheduling a nice value only ranks tasks within their session;
    // the session's own weight against other sessions is set here.
    let grouped = !Path::new("/proc/self/autogroup").exists()
        || fs::write("/proc/self/autogroup", nice.to_string()).is_ok();
    reniced && grouped
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Clock ticks per second for /proc times.
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of `pid`'s process tree so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks: u64 = tree(pid)
        .into_iter()
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let f = stat_fields(&stat)?;
            // Fields 14 and 15 (utime, stime) are indices 11 and 12 after the comm.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clk_tck()
}

/// Sum over `pid`'s process tree of a `/proc/<pid>/status` size in kB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, key: &str) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let status = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            field(&status, key)?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Resets the peak-RSS mark (VmHWM) of `pid`'s tree (`clear_refs` value 5).
pub fn reset_hwm(pid: u32) {
    for p in tree(pid) {
        let _ = fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; the harness starts its servers
/// right after, and nothing else on the machine races for loopback ports here).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Raises this process's open-file limit towards `want` (children inherit it): to `want`
/// where allowed (root with CAP_SYS_RESOURCE), else the soft limit up to the hard one.
/// Returns the limit in force.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let set = |limit: u64| {
        Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={limit}:{limit}"))
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .context("cannot run prlimit (util-linux)")
    };
    if set(want)? {
        return Ok(want);
    }
    let limits = fs::read_to_string("/proc/self/limits")?;
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse::<u64>().ok())
        .context("no open-files line in /proc/self/limits")?;
    if !set(hard)? {
        bail!("prlimit --nofile={hard} failed");
    }
    Ok(hard)
}

/// The run's cgroup, for the interrupt handler to remove.
static RUN_CGROUP: OnceLock<PathBuf> = OnceLock::new();

/// A cgroup v2 directory this run creates for sluice and its local replica, so sluice's
/// local-replica redirect (sock_ops + sk_msg) covers exactly those two processes and
/// never the peers' sockets. Removed on drop, with anything still in it moved back.
///
/// Hand-rolled rather than sluice-dataplane's `ScopedCgroup`: xtask must build on a
/// fresh machine before the eBPF object that crate embeds exists (xtask builds it).
pub struct RunCgroup {
    path: PathBuf,
    /// The cgroup this process was in, where it returns after each spawn.
    home: PathBuf,
}

impl RunCgroup {
    /// Creates `<cgroup2 mount>/<name>`; fails without cgroup v2 or without root.
    pub fn create(name: &str) -> Result<Self> {
        let mounts = fs::read_to_string("/proc/mounts")?;
        let mount = mounts
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
                (kind == "cgroup2").then(|| PathBuf::from(at))
            })
            .context("no cgroup v2 mount")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process is in no cgroup v2")?;
        let home = mount.join(rel.trim_start_matches('/'));
        let path = mount.join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let _ = RUN_CGROUP.set(path.clone());
        Ok(Self { path, home })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with this process inside the cgroup, so what `f` spawns starts there
    /// (and creates its sockets there: a socket keeps the cgroup it was made in), then
    /// moves this process back home.
    pub fn spawn_inside<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let me = std::process::id().to_string();
        fs::write(self.path.join("cgroup.procs"), &me)
            .with_context(|| format!("joining {}", self.path.display()))?;
        let out = f();
        fs::write(self.home.join("cgroup.procs"), &me)
            .with_context(|| format!("returning to {}", self.home.display()))?;
        out
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        // Only an empty cgroup can be removed.
        if let Ok(pids) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = fs::write(self.home.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}
