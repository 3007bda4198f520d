//! The container image, run the way `deploy/daemonset.yaml` runs it, under podman:
//! host network, every capability dropped and the DaemonSet's set added back, no
//! seccomp filter, read-only root, the host's bpffs (shared propagation) and cgroup
//! hierarchy mounted, the config mounted read-only.
//!
//! - `daemonset_like_run`: a request is routed to a replica on the host; the kernel
//!   programs are loaded and the maps pinned in the host's `/sys/fs/bpf/sluice`; SIGTERM
//!   with a request in flight drains it and exits 0, removing the pins.
//! - `without_cap_bpf`: the same without CAP_BPF: sluice names the missing capability
//!   (log and `sluice bpf status` in the container) and still serves in userspace.
//! - `default_config_starts`: the image's ENTRYPOINT/CMD and baked-in config (the same
//!   files as the ConfigMap) start and bind.
//!
//! Needs root, podman and the image (`cargo xtask image`); otherwise each test prints
//! `SKIPPED (podman image): <why>` and passes, unless `SLUICE_PODMAN_TEST=require`
//! (then a missing prerequisite fails). `SLUICE_IMAGE` overrides the image
//! (default `localhost/sluice:latest`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

/// The capabilities deploy/daemonset.yaml adds (keep in sync with it).
const DAEMONSET_CAPS: [&str; 5] =
    ["BPF", "PERFMON", "NET_ADMIN", "DAC_OVERRIDE", "NET_BIND_SERVICE"];
/// Maps sluice pins (`sluice_abi::names`), in the default pin directory.
const PINNED_MAPS: [&str; 3] = ["redir_socks", "local_replicas", "redir_stats"];
const PIN_DIR: &str = "/sys/fs/bpf/sluice";
/// Upper bound for anything that should take a second: generous so a loaded CI machine
/// does not flake, and only ever reached on failure.
const WAIT: Duration = Duration::from_secs(60);

/// The tests share the host's one pin directory: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn skip_or_fail(reason: &str) {
    if std::env::var("SLUICE_PODMAN_TEST").as_deref() == Ok("require") {
        panic!("SLUICE_PODMAN_TEST=require but {reason}");
    }
    eprintln!("SKIPPED (podman image): {reason}");
}

/// podman with a containers.conf fitted to this host (written to a temp dir and passed
/// through CONTAINERS_CONF; nothing under /etc is touched).
struct Podman {
    conf: tempfile::TempDir,
    image: String,
}

impl Podman {
    /// Checks every prerequisite; `None` (after saying why) when the test cannot run.
    fn new() -> Option<Podman> {
        let uid = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(str::to_owned));
        if uid.as_deref().and_then(|u| u.split_whitespace().next()) != Some("0") {
            skip_or_fail("not root (rootful podman is needed to add capabilities)");
            return None;
        }
        if Command::new("podman")
            .arg("--version")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            skip_or_fail("podman not installed (scripts/setup.sh --image)");
            return None;
        }
        let conf = tempfile::tempdir().unwrap();
        fs::write(conf.path().join("containers.conf"), containers_conf()).unwrap();
        let image =
            std::env::var("SLUICE_IMAGE").unwrap_or_else(|_| "localhost/sluice:latest".into());
        let podman = Podman { conf, image };
        if !podman.cmd().args(["image", "exists", &podman.image]).status().unwrap().success() {
            skip_or_fail(&format!("image {} not built (run `cargo xtask image`)", podman.image));
            return None;
        }
        let smoke =
            podman.output(&["run", "--rm", "--network", "none", &podman.image, "--version"]);
        if !smoke.status.success() {
            skip_or_fail(&format!(
                "podman cannot run containers here: {}",
                String::from_utf8_lossy(&smoke.stderr).trim()
            ));
            return None;
        }
        Some(podman)
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.conf.path().join("containers.conf"));
        cmd.stdin(Stdio::null());
        cmd
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("podman runs")
    }

    /// `podman run -d` as the DaemonSet runs the pod, with `caps` added.
    fn run_daemonset_like(&self, name: &str, caps: &[&str], config_dir: &Path) -> Container<'_> {
        let cgroup2 = cgroup2_mount();
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.into(),
            "--network".into(),
            "host".into(),
            "--read-only".into(),
            "--cap-drop".into(),
            "ALL".into(),
            // As deploy/daemonset.yaml: runtime default seccomp profiles admit bpf(2)
            // only with CAP_SYS_ADMIN.
            "--security-opt".into(),
            "seccomp=unconfined".into(),
            "-v".into(),
            "/sys/fs/bpf:/sys/fs/bpf:rshared".into(),
            "-v".into(),
            format!("{0}:{0}:rslave", cgroup2.display()),
            "-v".into(),
            format!("{}:/etc/sluice:ro", config_dir.display()),
            "-e".into(),
            "RUST_LOG=info".into(),
        ];
        for cap in caps {
            args.push("--cap-add".into());
            args.push((*cap).into());
        }
        args.push(self.image.clone());
        args.extend(["run", "--config", "/etc/sluice/sluice.toml"].map(String::from));
        let out = self.cmd().args(&args).output().unwrap();
        let container = Container { podman: self, name: name.to_owned() };
        assert!(
            out.status.success(),
            "podman run failed: {}\n{args:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        container
    }
}

/// A container removed (forcefully, at once) when dropped, whatever the test did.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl Container<'_> {
    /// The container's log, without terminal colour codes.
    fn logs(&self) -> String {
        let out = self.podman.output(&["logs", &self.name]);
        let raw = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        strip_ansi(&raw)
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", &self.name];
        all.extend_from_slice(args);
        self.podman.output(&all)
    }

    fn running(&self) -> bool {
        let out = self.podman.output(&["inspect", "--format", "{{.State.Running}}", &self.name]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// Waits for the container to exit and returns its exit code.
    fn wait_exit(&self, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "container still running after {within:?}:\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
        let out = self.podman.output(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]);
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("exit code")
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.podman.output(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// A containers.conf for this host: rlimits no higher than this process may set (podman
/// asks rootful containers for more, which fails without CAP_SYS_RESOURCE), runc where
/// crun refuses (hybrid cgroup v1/v2 hosts), file events (no journald needed).
fn containers_conf() -> String {
    let hard = |name: &str| -> Option<u64> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with(name))?;
        // "Max open files            20000                20000                files"
        let rest = line[name.len()..].split_whitespace().collect::<Vec<_>>();
        rest.get(1)?.parse().ok()
    };
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let nofile = hard("Max open files").unwrap_or(1024).min(1 << 20);
    let nproc = hard("Max processes").unwrap_or(4096).min(pid_max);
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let hybrid = mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup"))
        && mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
    let has_runc = Command::new("runc").arg("--version").output().is_ok_and(|o| o.status.success());
    let runtime = if hybrid && has_runc { "runtime = \"runc\"\n" } else { "" };
    format!(
        "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         [engine]\nevents_logger = \"file\"\ncgroup_manager = \"cgroupfs\"\n{runtime}"
    )
}

/// The host's cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hosts), mounted into the container at the same path as the DaemonSet does.
fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) from `s`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A free TCP port on 127.0.0.1 (bound and released: sluice binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tiny HTTP/1.1 replica on the host. `/slow` requests are announced on `arrived` and
/// answered only after a message on the release channel.
struct Replica {
    addr: SocketAddr,
    arrived: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

fn spawn_replica() -> Replica {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let arrived_tx = arrived_tx.clone();
            let release_rx = release_rx.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(WAIT)).unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                if path.starts_with("/slow") {
                    let _ = arrived_tx.send(());
                    let _ = release_rx.lock().unwrap().recv_timeout(WAIT);
                }
                let body = format!("replica saw {path}\n");
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
    Replica { addr, arrived, release }
}

/// GET `path` with `host` from `addr`; returns (status, body).
fn get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(WAIT))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Polls `/readyz` on the admin port until it answers 200.
fn wait_ready(admin: SocketAddr, c: &Container<'_>) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok((200, _)) = get(admin, "localhost", "/readyz") {
            return;
        }
        assert!(c.running(), "sluice exited before it was ready:\n{}", c.logs());
        assert!(Instant::now() < deadline, "sluice not ready after {WAIT:?}:\n{}", c.logs());
        thread::sleep(Duration::from_millis(100));
    }
}

const HOST: &str = "hello.local.sluice.test";

/// The first answer to `path` that is not the 503 of a replica not yet health-checked
/// (or the last 503 after `WAIT`): `/readyz` says the routing is loaded, and the replica
/// becomes routable once its first health check, run right after the load, passes.
fn first_routed(listen: SocketAddr, path: &str) -> (u16, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(listen, HOST, path).unwrap();
        if status != 503 || Instant::now() >= deadline {
            return (status, body);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// sluice.toml + routes.toml for one unauthenticated server with one replica.
fn write_config(dir: &Path, listen: SocketAddr, admin: SocketAddr, replica: SocketAddr) {
    fs::write(
        dir.join("sluice.toml"),
        format!(
            r#"
[[listeners]]
addr = "{listen}"

[admin]
addr = "{admin}"

[timeouts]
drain = "20s"

[node]
base_domains = ["sluice.test"]
regions = ["local"]

[routes]
file = "routes.toml"
"#
        ),
    )
    .unwrap();
    fs::write(
        dir.join("routes.toml"),
        format!(
            r#"
[[servers]]
id = "hello"
label = "hello"
unauthenticated = true

[[replicas]]
server = "hello"
id = "r1"
address = "{replica}"
"#
        ),
    )
    .unwrap();
}

struct Setup {
    _config: tempfile::TempDir,
    config_dir: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    replica: Replica,
}

fn setup() -> Setup {
    let config = tempfile::tempdir().unwrap();
    let config_dir = config.path().to_owned();
    // Readable by the container's uid 0 without CAP_DAC_OVERRIDE.
    let replica = spawn_replica();
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    write_config(&config_dir, listen, admin, replica.addr);
    Setup { _config: config, config_dir, listen, admin, replica }
}

#[test]
fn daemonset_like_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(podman) = Podman::new() else { return };
    let started = Instant::now();
    let s = setup();
    let c =
        podman.run_daemonset_like(&unique("sluice-podman-test"), &DAEMONSET_CAPS, &s.config_dir);
    wait_ready(s.admin, &c);

    // Routed through the container to the replica on the host. `/readyz` says the routing
    // is loaded; the replica is routable once its first health check (run at once after
    // the load) has passed, so allow that moment, bounded, before asserting.
    let (status, body) = first_routed(s.listen, "/through-the-image");
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    assert_eq!(body, "replica saw /through-the-image\n");

    // The kernel part: every feature but the XDP probe (which needs CAP_SYS_ADMIN for its
    // private network namespace) loads with the DaemonSet's capabilities.
    let status = c.exec(&["/sluice", "bpf", "status"]);
    let report = String::from_utf8_lossy(&status.stdout);
    for feature in
        ["object_load", "sockhash_sk_msg", "sk_skb_verdict", "sk_reuseport", "cgroup_sock_addr"]
    {
        let line = report.lines().find(|l| l.starts_with(feature)).unwrap_or_default();
        assert!(line.contains(" ok "), "{feature} not ok in the container:\n{report}");
    }
    // The loaded object's maps exist in the kernel while sluice runs (bpftool on the
    // host lists them by name) and are pinned in the host's bpffs.
    if let Ok(out) = Command::new("bpftool").args(["map", "show"]).output() {
        let maps = String::from_utf8_lossy(&out.stdout);
        for map in PINNED_MAPS {
            assert!(
                maps.contains(&format!("name {map} ")),
                "bpftool map show lacks {map}:\n{maps}"
            );
        }
    }
    let logs = c.logs();
    let pins_wired = !logs.contains("pin_dir=None");
    if pins_wired {
        for map in PINNED_MAPS {
            let pin = Path::new(PIN_DIR).join(map);
            assert!(pin.exists(), "{} not pinned on the host:\n{logs}", pin.display());
            if let Ok(out) =
                Command::new("bpftool").args(["map", "show", "pinned"]).arg(&pin).output()
            {
                assert!(out.status.success(), "bpftool map show pinned {}: {out:?}", pin.display());
            }
        }
    } else {
        // `sluice run` loads the data plane without a pin directory until the binary
        // passes one to kernel::start; then this check becomes strict by itself.
        eprintln!(
            "PARTIAL (podman image): sluice run logs pin_dir=None, so nothing is pinned under \
             {PIN_DIR}; pin checks skipped"
        );
    }

    // SIGTERM with a request in flight: readiness goes down, the request completes,
    // sluice exits 0 and leaves no pins behind.
    let listen = s.listen;
    let in_flight = thread::spawn(move || get(listen, HOST, "/slow"));
    s.replica.arrived.recv_timeout(WAIT).expect("the slow request reached the replica");
    let kill = podman.output(&["kill", "--signal", "TERM", &c.name]);
    assert!(kill.status.success(), "{kill:?}");
    let deadline = Instant::now() + WAIT;
    while matches!(get(s.admin, "localhost", "/readyz"), Ok((200, _))) {
        assert!(Instant::now() < deadline, "still ready after SIGTERM:\n{}", c.logs());
        thread::sleep(Duration::from_millis(50));
    }
    s.replica.release.send(()).unwrap();
    let (status, body) = in_flight.join().unwrap().expect("in-flight request completes");
    assert_eq!((status, body.as_str()), (200, "replica saw /slow\n"), "{}", c.logs());
    let code = c.wait_exit(WAIT);
    assert_eq!(code, 0, "sluice exited with {code} after SIGTERM:\n{}", c.logs());
    if pins_wired {
        for map in PINNED_MAPS {
            assert!(!Path::new(PIN_DIR).join(map).exists(), "{map} still pinned after exit");
        }
        // The directory itself, once empty (a real sluice on this host would keep it).
        let _ = std::fs::remove_dir(PIN_DIR);
    }
    eprintln!("podman image: daemonset-like run passed in {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn without_cap_bpf() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(podman) = Podman::new() else { return };
    let s = setup();
    let caps: Vec<&str> = DAEMONSET_CAPS.into_iter().filter(|c| *c != "BPF").collect();
    // A pin another run left behind must not be mistaken for one this run made.
    let pin_identity = || {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(Path::new(PIN_DIR).join("redir_stats"))
            .ok()
            .map(|m| (m.ino(), m.ctime_nsec()))
    };
    let pinned_before = pin_identity();
    let c = podman.run_daemonset_like(&unique("sluice-podman-nobpf"), &caps, &s.config_dir);
    wait_ready(s.admin, &c);

    // Served on the userspace path.
    let (status, body) = first_routed(s.listen, "/userspace");
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    assert_eq!(body, "replica saw /userspace\n");

    // It says exactly what is missing: in its log and in `sluice bpf status`.
    let logs = c.logs();
    assert!(logs.contains("CAP_BPF"), "the log does not name CAP_BPF:\n{logs}");
    let status = c.exec(&["/sluice", "bpf", "status"]);
    let report = String::from_utf8_lossy(&status.stdout);
    let load = report.lines().find(|l| l.starts_with("object_load")).unwrap_or_default();
    assert!(
        load.contains("MISSING") && load.contains("missing CAP_BPF"),
        "object_load does not name CAP_BPF:\n{report}"
    );
    assert_eq!(pin_identity(), pinned_before, "pinned without CAP_BPF?");

    let kill = podman.output(&["kill", "--signal", "TERM", &c.name]);
    assert!(kill.status.success(), "{kill:?}");
    let code = c.wait_exit(WAIT);
    assert_eq!(code, 0, "sluice exited with {code} after SIGTERM:\n{}", c.logs());
    // The owner record's directory, once empty.
    let _ = std::fs::remove_dir(PIN_DIR);
}

/// The image's own default (ENTRYPOINT + CMD and the baked-in config, the same files as
/// the ConfigMap) starts: the config parses, the routes load, the listeners bind. In a
/// private network namespace, so its port 80 and 9090 do not touch the host's.
#[test]
fn default_config_starts() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(podman) = Podman::new() else { return };
    let name = unique("sluice-podman-default");
    let out = podman.output(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_BIND_SERVICE",
        &podman.image,
    ]);
    let c = Container { podman: &podman, name };
    assert!(out.status.success(), "podman run failed: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + WAIT;
    loop {
        let logs = c.logs();
        if logs.contains("admin listening") {
            assert!(logs.contains("listening addr=0.0.0.0:80"), "{logs}");
            assert!(logs.contains("routing loaded"), "{logs}");
            break;
        }
        assert!(c.running(), "the default config does not start:\n{logs}");
        assert!(Instant::now() < deadline, "not listening after {WAIT:?}:\n{logs}");
        thread::sleep(Duration::from_millis(100));
    }
    let kill = podman.output(&["kill", "--signal", "TERM", &c.name]);
    assert!(kill.status.success(), "{kill:?}");
    assert_eq!(c.wait_exit(WAIT), 0, "{}", c.logs());
}
