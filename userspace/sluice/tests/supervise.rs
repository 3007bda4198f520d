//! `sluice supervise` through the real binary, with real replica processes: this test
//! binary re-executed as the replica (`replica_process`), which logs its start and any
//! SIGTERM it receives to an events file the test reads.
//!
//! - scale from zero, end to end: `sluice run` + `sluice autoscale` + `sluice supervise`;
//!   the first request gets 503 with Retry-After, a client retrying gets its 200;
//! - scale-down: draining, then SIGTERM as soon as the proxy (`--proxy-admin`) shows
//!   nothing in flight, after a held request completes, or at the end of the grace period
//!   (a request held past it, or no proxy to ask); the replica sees it;
//! - a crashed replica is replaced.
//!
//! Waits are bounded polls, never sleeps tuned to timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use sluice_routing::model::{ReplicaState, RoutingDoc};
use sluice_tests::process::{SluiceProcess, http_get};

/// Set in the replica's environment (via the launch spec): where it logs its events.
const EVENTS_ENV: &str = "SLUICE_SUPERVISE_TEST_EVENTS";
/// Set (via the launch spec's env): the replica logs SIGTERM but keeps running.
const IGNORE_TERM_ENV: &str = "SLUICE_SUPERVISE_TEST_IGNORE_TERM";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

/// The replica: when started by the supervisor (EVENTS_ENV set), serve HTTP/1.1 on
/// `127.0.0.1:$PORT` answering every request with the port, log `start <port> <pid>` once
/// listening and `term <port>` on SIGTERM (then exit). Otherwise a no-op test.
#[test]
fn replica_process() {
    let Ok(events) = std::env::var(EVENTS_ENV) else { return };
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        // Installed before announcing the start, so no SIGTERM can go unseen.
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        log_event(&events, &format!("start {port} {}", std::process::id()));
        loop {
            tokio::select! {
                _ = term.recv() => {
                    log_event(&events, &format!("term {port}"));
                    // A replica that ignores SIGTERM, to be SIGKILLed.
                    if std::env::var_os(IGNORE_TERM_ENV).is_none() {
                        std::process::exit(0);
                    }
                }
                Ok((s, _)) = listener.accept() => {
                    let s = s.into_std().unwrap();
                    s.set_nonblocking(false).unwrap();
                    thread::spawn(move || serve(s, port));
                }
            }
        }
    });
}

fn log_event(path: &str, line: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// Keep-alive HTTP/1.1 (until `connection: close`), GETs without bodies: every
/// response's body is the port. `GET /hold` is a request kept in flight: logged as
/// `hold <port>`, answered once the test creates the release file, then `done <port>`.
fn serve(s: TcpStream, port: u16) {
    let events = std::env::var(EVENTS_ENV).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let mut line = String::new();
        let mut close = false;
        let mut hold = false;
        let mut first = true;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            hold |= first && line.starts_with("GET /hold ");
            first = false;
            close |= line.eq_ignore_ascii_case("connection: close\r\n");
        }
        if hold {
            log_event(&events, &format!("hold {port}"));
            let release = release_file(Path::new(&events));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !release.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let body = port.to_string();
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
        if hold {
            log_event(&events, &format!("done {port}"));
        }
        if close {
            return;
        }
    }
}

/// The file whose existence answers the held requests (beside the events file).
fn release_file(events: &Path) -> PathBuf {
    events.with_extension("release")
}

/// A child process stopped with SIGTERM (bounded wait, then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    let child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

/// A test's files: `routes/` (the proxy's routing directory, with the server spec and the
/// supervisor's replicas file), `desired.json` and `events`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(grace: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("routes")).unwrap();
        let exe = std::env::current_exe().unwrap();
        let events = dir.path().join("events");
        let server = format!(
            r#"[[servers]]
id = "app"
label = "hello"
min_replicas = 0
unauthenticated = true

[servers.launch]
argv = [{exe:?}, "--exact", "replica_process", "--nocapture", "--test-threads=1"]
env = {{ {EVENTS_ENV} = {events:?} }}
startup_timeout = "30s"
exit_grace_period = {grace:?}
"#
        );
        std::fs::write(dir.path().join("routes/app.toml"), server).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn supervise(&self) -> Proc {
        self.supervise_killing_after("5s")
    }

    fn supervise_killing_after(&self, kill_after: &str) -> Proc {
        self.supervise_with(&["--kill-after", kill_after])
    }

    /// Supervise, asking the proxy at `admin` for in-flight counts.
    fn supervise_asking(&self, admin: SocketAddr) -> Proc {
        self.supervise_with(&["--proxy-admin", &format!("http://{admin}")])
    }

    fn supervise_with(&self, extra: &[&str]) -> Proc {
        let p = |n: &str| self.path(n).to_str().unwrap().to_owned();
        let mut args = vec![
            "supervise",
            "--routes",
            &p("routes"),
            "--replicas-file",
            &p("routes/zz-supervisor.toml"),
            "--desired-file",
            &p("desired.json"),
            "--interval",
            "100ms",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A proxy on the routes directory, with fast health checks.
    fn proxy(&self) -> SluiceProcess {
        let rest = r#"
[node]
base_domains = ["example.test"]
regions = ["r1"]
[routes]
file = "routes"
[health]
interval = "100ms"
"#;
        SluiceProcess::start(bin(), self.dir.path(), rest)
    }

    /// Answer the replicas' held requests.
    fn release(&self) {
        std::fs::write(release_file(&self.path("events")), "").unwrap();
    }

    fn has_event(&self, e: &str) -> bool {
        self.events().iter().any(|l| l == e)
    }

    /// Play the autoscaler: write a desired count.
    fn set_desired(&self, n: u32) {
        let json = format!(r#"{{"app": {{"server": "app", "replicas": {n}, "ts": 1}}}}"#);
        let tmp = self.path(".desired.tmp");
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(tmp, self.path("desired.json")).unwrap();
    }

    /// The replicas the supervisor has registered (None before it wrote the file).
    fn registered(&self) -> Option<RoutingDoc> {
        let text = std::fs::read_to_string(self.path("routes/zz-supervisor.toml")).ok()?;
        toml::from_str(&text).ok()
    }

    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("events"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Poll `f` every 50 ms until it returns Some, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// One request on a fresh connection: status, lower-cased head, body.
fn get(addr: SocketAddr, host: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((status, head.to_ascii_lowercase(), body.to_owned()))
}

/// The only registered replica, once it is in `state`.
fn sole_replica_in(s: &Setup, state: ReplicaState) -> Option<sluice_routing::ReplicaSpec> {
    let doc = s.registered()?;
    match doc.replicas.as_slice() {
        [r] if r.state == state => Some(r.clone()),
        _ => None,
    }
}

#[test]
fn scale_from_zero_end_to_end() {
    let s = Setup::new("1s");
    let rest = r#"
[node]
base_domains = ["example.test"]
regions = ["r1"]
[routes]
file = "routes"
[health]
interval = "100ms"
[autoscaler]
interval = "100ms"
"#;
    let proxy = SluiceProcess::start(bin(), s.dir.path(), rest);
    let desired = s.path("desired.json");
    let _autoscale = spawn(&[
        "autoscale",
        "--from",
        &proxy.admin.to_string(),
        "--file",
        desired.to_str().unwrap(),
    ]);
    let _sup = s.supervise();
    // min_replicas = 0 and no demand yet: the supervisor registers nothing.
    let doc = wait_for("the replicas file", Duration::from_secs(20), || s.registered());
    assert!(doc.replicas.is_empty(), "{doc:?}");

    let host = "hello.r1.example.test";
    let (status, head, _) = get(proxy.proxy, host).expect("first request");
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    // The same refusal as for a domain nobody serves.
    let (status, unknown, _) = get(proxy.proxy, "nobody.r1.example.test").unwrap();
    assert_eq!(status, 503);
    assert!(unknown.contains("\r\nretry-after: 1"), "{unknown}");

    // A client that retries on 503 (Retry-After is 1 s; it polls faster to keep the test
    // short) gets its 200 within the replica's startup time (30 s) plus the autoscaler's
    // and supervisor's rounds.
    let started = Instant::now();
    let body = wait_for("a 200 after scale from zero", Duration::from_secs(40), || {
        match get(proxy.proxy, host) {
            Some((200, _, body)) => Some(body),
            Some((503, head, _)) => {
                assert!(head.contains("\r\nretry-after:"), "{head}");
                None
            }
            other => panic!("unexpected answer {other:?}"),
        }
    });
    let r = sole_replica_in(&s, ReplicaState::Ready).expect("a ready replica");
    assert_eq!(body, r.address.port().to_string(), "served by the supervised replica");
    pid_of(&s, r.address.port());
    let d = std::fs::read_to_string(&desired).unwrap();
    assert!(d.contains(r#""replicas": 1"#), "the autoscaler asked for one: {d}");
    eprintln!("scale from zero took {:?}", started.elapsed());
}

const HOST: &str = "hello.r1.example.test";

/// Scale to one replica under `proxy` and wait until the proxy routes to it.
fn one_routed_replica(s: &Setup, proxy: &SluiceProcess) -> u16 {
    s.set_desired(1);
    let r = wait_for("a ready replica", Duration::from_secs(30), || {
        sole_replica_in(s, ReplicaState::Ready)
    });
    let port = r.address.port();
    pid_of(s, port);
    wait_for("the proxy routing to it", Duration::from_secs(20), || match get(proxy.proxy, HOST) {
        Some((200, _, body)) if body == port.to_string() => Some(()),
        _ => None,
    });
    port
}

/// A `GET /hold` through the proxy, in a thread, once the replica has it in flight.
fn hold_a_request(s: &Setup, proxy: &SluiceProcess, port: u16) -> thread::JoinHandle<Option<u16>> {
    let addr = proxy.proxy;
    let held = thread::spawn(move || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
        write!(c, "GET /hold HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        c.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    });
    let hold = format!("hold {port}");
    wait_for("the held request at the replica", Duration::from_secs(10), || {
        s.has_event(&hold).then_some(())
    });
    held
}

/// Scale to zero; returns when the supervisor registered the replica draining.
fn scale_to_zero(s: &Setup) -> Instant {
    s.set_desired(0);
    let asked = Instant::now();
    let drained = wait_for("draining", Duration::from_secs(10), || {
        sole_replica_in(s, ReplicaState::Draining)
    });
    assert!(drained.drain_deadline.is_some(), "{drained:?}");
    asked
}

/// The proxy's state of its only replica of `app`, once it shows `want`.
fn proxy_shows(proxy: &SluiceProcess, want: &str) {
    wait_for("the proxy's view", Duration::from_secs(10), || {
        let (status, body) = http_get(proxy.admin, "admin", "/state?server=app")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && v["replicas"][0]["state"] == want).then_some(())
    });
}

#[test]
fn scale_down_with_nothing_in_flight_sigterms_well_before_the_grace_period() {
    let grace = Duration::from_secs(30);
    let s = Setup::new("30s");
    let proxy = s.proxy();
    let _sup = s.supervise_asking(proxy.admin);
    let port = one_routed_replica(&s, &proxy);
    let asked = scale_to_zero(&s);
    let term = format!("term {port}");
    wait_for("the replica's SIGTERM", grace / 2, || s.has_event(&term).then_some(()));
    eprintln!("SIGTERM {:?} after the scale-down", asked.elapsed());
    assert!(asked.elapsed() < grace / 2, "SIGTERM after {:?}", asked.elapsed());
    wait_for("the registration gone", Duration::from_secs(10), || {
        s.registered().filter(|d| d.replicas.is_empty())
    });
}

#[test]
fn scale_down_with_a_request_in_flight_sigterms_once_it_completes() {
    let grace = Duration::from_secs(30);
    let s = Setup::new("30s");
    let proxy = s.proxy();
    let _sup = s.supervise_asking(proxy.admin);
    let port = one_routed_replica(&s, &proxy);
    let held = hold_a_request(&s, &proxy, port);
    let asked = scale_to_zero(&s);
    // The supervisor now sees the replica draining with one request in flight; give it
    // rounds (100 ms each) to get that wrong before the request completes.
    proxy_shows(&proxy, "draining");
    let term = format!("term {port}");
    let watch = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch {
        assert!(!s.has_event(&term), "SIGTERM with a request in flight: {:?}", s.events());
        thread::sleep(Duration::from_millis(50));
    }
    s.release();
    assert_eq!(held.join().unwrap(), Some(200), "the held request completes");
    wait_for("the replica's SIGTERM", grace / 2, || s.has_event(&term).then_some(()));
    assert!(asked.elapsed() < grace, "SIGTERM after {:?}", asked.elapsed());
    // In that order: the held request was answered before the SIGTERM.
    let events = s.events();
    let at = |e: &str| events.iter().position(|l| l == e).unwrap();
    assert!(at(&format!("done {port}")) < at(&term), "{events:?}");
}

#[test]
fn scale_down_with_a_request_held_past_the_grace_period_sigterms_at_its_end() {
    let grace = Duration::from_secs(2);
    let s = Setup::new("2s");
    let proxy = s.proxy();
    let _sup = s.supervise_asking(proxy.admin);
    let port = one_routed_replica(&s, &proxy);
    let _held = hold_a_request(&s, &proxy, port);
    let asked = scale_to_zero(&s);
    let term = format!("term {port}");
    wait_for("the replica's SIGTERM", Duration::from_secs(20), || s.has_event(&term).then_some(()));
    // Not before the grace period: the draining replica had its time to finish requests.
    assert!(asked.elapsed() >= grace, "SIGTERM after {:?}", asked.elapsed());
    assert!(!s.has_event(&format!("done {port}")));
    wait_for("the registration gone", Duration::from_secs(10), || {
        s.registered().filter(|d| d.replicas.is_empty())
    });
}

/// No proxy answering at `--proxy-admin`: the whole grace period, as without one.
#[test]
fn scale_down_without_a_proxy_to_ask_waits_the_grace_period() {
    let grace = Duration::from_secs(2);
    let s = Setup::new("2s");
    // A port nobody listens on (bound, then released).
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let _sup = s.supervise_asking(nobody);
    s.set_desired(1);
    let r = wait_for("a ready replica", Duration::from_secs(30), || {
        sole_replica_in(&s, ReplicaState::Ready)
    });
    let port = r.address.port();
    pid_of(&s, port);
    let asked = scale_to_zero(&s);
    let term = format!("term {port}");
    wait_for("the replica's SIGTERM", Duration::from_secs(20), || s.has_event(&term).then_some(()));
    assert!(asked.elapsed() >= grace, "SIGTERM after {:?}", asked.elapsed());
}

#[test]
fn a_replica_ignoring_sigterm_is_sigkilled() {
    let s = Setup::new("1s");
    let spec = std::fs::read_to_string(s.path("routes/app.toml")).unwrap();
    let spec = spec.replace("env = { ", &format!("env = {{ {IGNORE_TERM_ENV} = \"1\", "));
    std::fs::write(s.path("routes/app.toml"), spec).unwrap();
    s.set_desired(1);
    let _sup = s.supervise_killing_after("1s");
    let r = wait_for("a ready replica", Duration::from_secs(30), || {
        sole_replica_in(&s, ReplicaState::Ready)
    });
    let port = r.address.port();
    let pid = pid_of(&s, port);
    s.set_desired(0);
    let term = format!("term {port}");
    wait_for("the replica's SIGTERM", Duration::from_secs(20), || {
        s.events().contains(&term).then_some(())
    });
    // It ignored SIGTERM; SIGKILL ends it, and its registration goes.
    wait_for("the registration gone", Duration::from_secs(20), || {
        s.registered().filter(|d| d.replicas.is_empty())
    });
    let alive = Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!alive, "pid {pid} still running");
}

/// The pid a replica logged at start (the log line follows its bind, so the port may
/// accept a moment before it is written).
fn pid_of(s: &Setup, port: u16) -> u32 {
    let prefix = format!("start {port} ");
    wait_for("the start event", Duration::from_secs(10), || {
        s.events().iter().find_map(|e| e.strip_prefix(&prefix).and_then(|p| p.parse().ok()))
    })
}

#[test]
fn a_replica_that_never_listens_is_killed_and_replaced() {
    let s = Setup::new("1s");
    let spec = std::fs::read_to_string(s.path("routes/app.toml")).unwrap();
    // A process that never binds its port, with a short startup timeout.
    let spec = spec
        .lines()
        .map(|l| match l {
            l if l.starts_with("argv") => r#"argv = ["sleep", "600"]"#,
            l if l.starts_with("startup_timeout") => r#"startup_timeout = "1s""#,
            l => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(s.path("routes/app.toml"), spec).unwrap();
    s.set_desired(1);
    let _sup = s.supervise();
    let first = wait_for("a starting replica", Duration::from_secs(10), || {
        sole_replica_in(&s, ReplicaState::Starting)
    });
    // Never routed, killed at its startup timeout and replaced by a new one.
    let second = wait_for("a replacement", Duration::from_secs(20), || {
        s.registered()?.replicas.into_iter().find(|r| r.id != first.id)
    });
    assert_eq!(second.state, ReplicaState::Starting);
}

#[test]
fn a_crashed_replica_is_replaced() {
    let s = Setup::new("1s");
    s.set_desired(1);
    let _sup = s.supervise();
    let first = wait_for("a ready replica", Duration::from_secs(30), || {
        sole_replica_in(&s, ReplicaState::Ready)
    });
    let pid = pid_of(&s, first.address.port());
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let second = wait_for("a replacement", Duration::from_secs(30), || {
        sole_replica_in(&s, ReplicaState::Ready).filter(|r| r.id != first.id)
    });
    let new_pid = pid_of(&s, second.address.port());
    assert_ne!(new_pid, pid);
    // It really serves.
    let (status, _, body) = get(second.address, "x").unwrap();
    assert_eq!((status, body), (200, second.address.port().to_string()));
    // No SIGTERM was involved: the first died of SIGKILL and was not "stopped".
    assert!(!s.events().iter().any(|e| e.starts_with("term ")));
}

/// The same loop over etcd: the server spec (with its launch table) in
/// `<prefix>servers/`, the autoscaler's count in `<prefix>desired/`, the supervisor's
/// replicas in `<prefix>replicas/`, and the proxy following them with its etcd source.
#[test]
fn scale_from_zero_over_etcd() {
    use sluice_store::etcd::{EtcdConfig, EtcdStore};
    let etcd = sluice_tests::etcd::Etcd::start();
    let ep = etcd.endpoint();
    let s = Setup::new("1s");
    // The spec the file tests use, stored in etcd instead.
    let doc: RoutingDoc =
        toml::from_str(&std::fs::read_to_string(s.path("routes/app.toml")).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(EtcdStore::connect(&EtcdConfig::with_endpoints([ep.clone()]))).unwrap();
    rt.block_on(store.put_server(&doc.servers[0])).unwrap();

    let rest = format!(
        "[node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[etcd]\nendpoints = \
         [\"{ep}\"]\n[health]\ninterval = \"100ms\"\n[autoscaler]\ninterval = \"100ms\"\n"
    );
    let proxy = SluiceProcess::start(bin(), s.dir.path(), &rest);
    let _autoscale = spawn(&["autoscale", "--from", &proxy.admin.to_string(), "--endpoints", &ep]);
    let _sup =
        spawn(&["supervise", "--endpoints", &ep, "--id-prefix", "node-a", "--interval", "100ms"]);

    let host = "hello.r1.example.test";
    let (status, head, _) = get(proxy.proxy, host).expect("first request");
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    let body = wait_for("a 200 after scale from zero", Duration::from_secs(40), || {
        match get(proxy.proxy, host) {
            Some((200, _, body)) => Some(body),
            Some((503, _, _)) => None,
            other => panic!("unexpected answer {other:?}"),
        }
    });
    let replicas = rt.block_on(store.list_replicas(Some("app"))).unwrap().items;
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    let r = &replicas[0];
    assert!(r.id.starts_with("node-a-"), "{r:?}");
    assert_eq!(r.state, ReplicaState::Ready);
    assert_eq!(body, r.address.port().to_string());
    let desired = rt.block_on(store.get_desired("app")).unwrap().expect("a desired count");
    assert_eq!(desired.replicas, 1);
}
