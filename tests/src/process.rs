//! Running the real `sluice` binary as a child process in a test: a config written to
//! a temp dir, its own pin directory (never the node's), ready-waiting on `/livez`, and
//! a SIGTERM-then-wait stop so it drains and removes its pins.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A free loopback port (bound and released: a tiny race, acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// The first of `n` consecutive free loopback ports (probed, then released).
pub fn free_port_run(n: u16) -> u16 {
    for _ in 0..50 {
        let base = free_port();
        let held: Vec<_> = (0..n)
            .map_while(|i| base.checked_add(i))
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    free_port()
}

/// One HTTP/1.1 request on a fresh connection: the status code and body.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// The pid a pin dir's owner record names (`<pid>@<pid namespace>`): the sluice that
/// serves with that pin dir, e.g. the one a `sluice upgrade` started.
pub fn owner_pid(pin_dir: &Path) -> Option<u32> {
    let target = std::fs::read_link(pin_dir.join("owner")).ok()?;
    target.to_string_lossy().split_once('@')?.0.parse().ok()
}

/// `sluice upgrade` (the binary at `bin`) on `pin_dir`, asserted to succeed; the new
/// process's pid, checked to be running while `old_pid` has exited. Blocking.
pub fn sluice_upgrade(bin: &Path, pin_dir: &Path, old_pid: u32) -> u32 {
    let out = std::process::Command::new(bin)
        .args(["upgrade", "--timeout", "30", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run sluice upgrade");
    eprintln!(
        "sluice upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sluice upgrade failed (nothing was handed over?)");
    let new_pid = owner_pid(pin_dir).expect("owner record");
    assert_ne!(new_pid, old_pid);
    assert!(!running(old_pid), "the old process is still running");
    assert!(running(new_pid), "the new process is not running");
    new_pid
}

/// The value of the sample named exactly `name` (labels included) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// Running and not a zombie.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, t)| t.trim_start().starts_with(['Z', 'X'])))
        == Some(false)
}

/// The processes an upgrade started (the re-exec'd sluice is not the test's child): on
/// drop (also when the test fails half-way), every process started on `pin_dir` other
/// than `old_pid` (which the `SluiceProcess` handle owns) gets SIGTERM, then SIGKILL;
/// drop it before that handle removes the pin dir.
pub struct Successors {
    /// The pin dir the processes were started with.
    pub pin_dir: PathBuf,
    /// The process the test started itself.
    pub old_pid: u32,
}

impl Successors {
    /// Live processes started on the pin dir, other than the test's own.
    pub fn pids(&self) -> Vec<u32> {
        let needle = self.pin_dir.as_os_str().as_encoded_bytes();
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        procs
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != self.old_pid && running(pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle))
            })
            .collect()
    }
}

impl Drop for Successors {
    fn drop(&mut self) {
        // By pid from here on: an exiting process's cmdline reads empty before it is
        // reaped.
        let pids = self.pids();
        for signal in ["-TERM", "-KILL"] {
            let alive: Vec<u32> = pids.iter().copied().filter(|p| running(*p)).collect();
            if alive.is_empty() {
                return;
            }
            for pid in &alive {
                let _ = Command::new("kill").args([signal, &pid.to_string()]).status();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive.iter().any(|p| running(*p)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A running `sluice run`.
pub struct SluiceProcess {
    child: Child,
    /// The first client listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    pin_dir: PathBuf,
}

/// One HTTP/1.1 request with extra `headers` on a fresh connection made from inside
/// `ns`: the status code and body; `None` when the connection or exchange fails.
pub fn http_get_in(
    ns: &crate::netns::NetNs,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let mut s = ns.connect(addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// How to launch `sluice run` for a test.
struct Launch<'a> {
    bin: &'a Path,
    dir: &'a Path,
    rest: &'a str,
    /// The client listener's IP (`0.0.0.0` inside a namespace, so every address of it
    /// reaches the proxy).
    listen_ip: &'a str,
    env: &'a [(&'a str, &'a str)],
    pin_dir: Option<PathBuf>,
    /// Run under `nsenter --net=<ns>`.
    netns: Option<&'a crate::netns::NetNs>,
    /// `sluice demo` (its own embedded config) instead of `sluice run --config`.
    demo: bool,
}

impl Launch<'_> {
    /// Writes the config, spawns sluice, and waits (bounded) until `/livez` answers.
    fn spawn(self) -> SluiceProcess {
        let (proxy, admin) = (free_port(), free_port());
        let config = format!(
            "[[listeners]]\naddr = \"{}:{proxy}\"\n[admin]\naddr = \"127.0.0.1:{admin}\"\n{}\n",
            self.listen_ip, self.rest
        );
        let path = self.dir.join("sluice.toml");
        std::fs::write(&path, config).expect("write config");
        // bpffs refuses names with a '.', so no temp-dir names here.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pin_dir = self.pin_dir.unwrap_or_else(|| {
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            PathBuf::from(format!("/sys/fs/bpf/sluice-test-{}-{n}", std::process::id()))
        });
        let mut cmd = match self.netns {
            // `nsenter --net` rather than `ip netns exec`: the latter also remounts /sys,
            // which would hide the pins (bpffs) from other processes. nsenter execs sluice
            // in place, so the child's pid is sluice's (for SIGTERM).
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path().display())).arg("--").arg(self.bin);
                c
            }
            None => Command::new(self.bin),
        };
        if self.demo {
            let port = |p: u16| format!("127.0.0.1:{p}");
            cmd.arg("demo")
                .args(["--http", &port(proxy), "--admin", &port(admin)])
                .args(["--https", &port(free_port())])
                .args(["--replica-port-base", &free_port_run(3).to_string()]);
        } else {
            cmd.args(["run", "--config"]).arg(&path);
        }
        cmd.arg("--pin-dir")
            .arg(&pin_dir)
            .env("RUST_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        for (k, v) in self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn sluice");
        let s = SluiceProcess {
            child,
            proxy: ([127, 0, 0, 1], proxy).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            pin_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let live = || match self.netns {
            Some(ns) => http_get_in(ns, s.admin, "admin", "/livez", &[]),
            None => http_get(s.admin, "admin", "/livez"),
        };
        while live().map(|(c, _)| c) != Some(200) {
            assert!(Instant::now() < deadline, "sluice did not come up");
            thread::sleep(Duration::from_millis(20));
        }
        s
    }
}

impl SluiceProcess {
    /// Starts `bin run` with `[[listeners]]` and `[admin]` on free loopback ports plus
    /// `rest` (the `[node]`, routing source and other sections), and waits until
    /// `/livez` answers.
    pub fn start(bin: &Path, dir: &Path, rest: &str) -> SluiceProcess {
        Self::start_with(bin, dir, rest, &[], None)
    }

    /// Like [`SluiceProcess::start`], with extra environment variables for the child
    /// and, optionally, a given pin directory (e.g. one a killed sluice left behind).
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        rest: &str,
        env: &[(&str, &str)],
        pin_dir: Option<PathBuf>,
    ) -> SluiceProcess {
        Launch { bin, dir, rest, listen_ip: "127.0.0.1", env, pin_dir, netns: None, demo: false }
            .spawn()
    }

    /// Starts `bin demo` with its listeners and replicas moved to free loopback ports,
    /// and waits until `/livez` answers. `proxy` is its plaintext listener.
    pub fn start_demo(bin: &Path, dir: &Path) -> SluiceProcess {
        Launch {
            bin,
            dir,
            rest: "",
            listen_ip: "127.0.0.1",
            env: &[],
            pin_dir: None,
            netns: None,
            demo: true,
        }
        .spawn()
    }

    /// Starts `bin run` inside the network namespace `ns`, with the client listener on
    /// `0.0.0.0` and the admin listener on the namespace's loopback. `proxy` and `admin`
    /// are loopback addresses *inside* `ns` (use [`http_get_in`]); clients elsewhere
    /// reach the proxy at the namespace's own addresses on `proxy.port()`.
    pub fn start_in_netns(
        bin: &Path,
        dir: &Path,
        ns: &crate::netns::NetNs,
        rest: &str,
    ) -> SluiceProcess {
        Launch {
            bin,
            dir,
            rest,
            listen_ip: "0.0.0.0",
            env: &[],
            pin_dir: None,
            netns: Some(ns),
            demo: false,
        }
        .spawn()
    }

    /// The process id (e.g. to move sluice into a test cgroup).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pin directory this sluice was told to use.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// SIGKILL, as a crash: no drain, and its pins stay behind under the returned pin
    /// directory for the next sluice to find (pass it to [`SluiceProcess::start_with`],
    /// whose drop then cleans up).
    pub fn kill_hard(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pin_dir = self.pin_dir.clone();
        // Skips Drop's cleanup on purpose: the child is reaped, nothing else leaks.
        std::mem::forget(self);
        pin_dir
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        // SIGTERM, so sluice drains and removes its pins; SIGKILL only if it hangs.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
