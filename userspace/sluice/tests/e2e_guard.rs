//! End to end through the real binary: `sluice run` inside a node network namespace
//! with the XDP guard on its client-facing veth links. A denylisted source cannot
//! connect while another is served; a source that keeps failing proxy auth is banned
//! in the kernel and served again once the ban expires; `sluice bpf status` shows
//! where the guard is attached and in which XDP mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use sluice_tests::{
    netns::{NetNs, Topology},
    process::{SluiceProcess, http_get_in, owner_pid},
};

const OPEN: &str = "open.r1.example.test";
const LOCKED: &str = "locked.r1.example.test";

/// A tiny HTTP/1.1 replica inside `ns` that answers `ok` to every request, keeping
/// connections alive (sluice pools them).
fn replica(ns: &NetNs) -> SocketAddr {
    let l = ns.listen("127.0.0.1:0".parse().unwrap());
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        while let Ok((s, _)) = l.accept() {
            thread::spawn(move || serve(s));
        }
    });
    addr
}

fn serve(s: TcpStream) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    loop {
        // GETs only: the head ends at the empty line.
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
            return;
        }
    }
}

/// Starts sluice in `topo`'s node namespace with an open and an auth-locked server,
/// and the guard on both client links configured by `guard` (extra `[guard]` keys).
fn start(topo: &Topology, dir: &Path, guard: &str) -> SluiceProcess {
    let ifaces: Vec<String> = topo.clients.iter().map(|c| c.node_if.clone()).collect();
    start_on(topo, dir, &ifaces, guard)
}

/// [`start`] with the guard on `interfaces`.
fn start_on(topo: &Topology, dir: &Path, interfaces: &[String], guard: &str) -> SluiceProcess {
    let replica = replica(&topo.node);
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[[servers]]\nid = \"open\"\nlabel = \"open\"\nunauthenticated = true\n\
             [[servers]]\nid = \"locked\"\nlabel = \"locked\"\n\
             [[replicas]]\nserver = \"open\"\nid = \"r-open\"\naddress = \"{replica}\"\nprotocol = \"http1\"\n\
             [[replicas]]\nserver = \"locked\"\nid = \"r-locked\"\naddress = \"{replica}\"\nprotocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let ifaces: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    let rest = format!(
        "[node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n\
         [guard]\ninterfaces = [{}]\n{guard}\n",
        ifaces.join(", ")
    );
    SluiceProcess::start_in_netns(Path::new(env!("CARGO_BIN_EXE_sluice")), dir, &topo.node, &rest)
}

/// GET `host`/ from client `i` (1-based) to the node's address on that client's link.
fn get(topo: &Topology, sluice: &SluiceProcess, i: u8, host: &str) -> Option<u16> {
    let addr = SocketAddr::new(Topology::node_v4(i), sluice.proxy.port());
    http_get_in(&topo.clients[usize::from(i - 1)].ns, addr, host, "/", &[]).map(|(c, _)| c)
}

/// Polls `f` until it is true or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The live state `sluice bpf status --json` reads through `sluice`'s pins.
fn live(sluice: &SluiceProcess) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bpf", "status", "--json", "--pin-dir"])
        .arg(sluice.pin_dir())
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc["live"].clone()
}

/// [`live`] as text, for failure messages.
fn status(sluice: &SluiceProcess) -> String {
    live(sluice).to_string()
}

/// Starts sluice with client 1's subnet denylisted and waits until client 2 is served
/// (the health checker must have seen the replica first).
fn start_denying_client_1(topo: &Topology, dir: &Path) -> SluiceProcess {
    let sluice = start(topo, dir, "deny = [\"198.18.1.0/24\"]");
    assert!(
        eventually(Duration::from_secs(10), || get(topo, &sluice, 2, OPEN) == Some(200)),
        "client 2 is not served"
    );
    sluice
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[test]
fn denylisted_source_is_dropped_and_status_shows_the_guard() {
    sluice_tests::require_root!();
    let topo = Topology::new(2);
    let dir = tempfile::tempdir().unwrap();
    let sluice = start_denying_client_1(&topo, dir.path());
    assert_eq!(get(&topo, &sluice, 1, OPEN), None, "denylisted client 1 got an answer");
    assert_eq!(get(&topo, &sluice, 2, OPEN), Some(200), "client 2 after client 1's attempt");

    // `sluice bpf status` from another process (and network namespace) reads the guard
    // through the pins: both links, each in native or generic mode, and the deny entry.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bpf", "status", "--json", "--pin-dir"])
        .arg(sluice.pin_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ifaces = doc["live"]["guard_interfaces"].as_array().unwrap();
    let names: Vec<&str> = ifaces.iter().map(|i| i["interface"].as_str().unwrap()).collect();
    assert_eq!(names, ["n1", "n2"], "{doc}");
    for i in ifaces {
        assert!(["native", "generic"].contains(&i["mode"].as_str().unwrap()), "{i}");
    }
    let denied = doc["live"]["denied"].as_array().unwrap();
    assert!(denied.iter().any(|d| d["prefix"] == "198.18.1.0/24"), "{doc}");
    assert!(doc["live"]["guard"]["dropped_denied"].as_u64().unwrap() >= 1, "{doc}");

    // The table form names the interfaces and modes too.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bpf", "status", "--pin-dir"])
        .arg(sluice.pin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("attached to n1") && text.contains(" XDP"), "{text}");

    // So does the /bpf admin route of the running process.
    let (code, body) = http_get_in(&topo.node, sluice.admin, "admin", "/bpf", &[]).unwrap();
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ifaces = doc["guard"]["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2, "{doc}");
    assert!(ifaces.iter().all(|i| i["mode"] == "native" || i["mode"] == "generic"), "{doc}");
}

#[test]
fn auth_failures_ban_the_source_until_the_ban_expires() {
    sluice_tests::require_root!();
    let topo = Topology::new(2);
    let dir = tempfile::tempdir().unwrap();
    let sluice = start(
        &topo,
        dir.path(),
        "auth_fail_threshold = 3\nauth_fail_window = \"30s\"\nauth_ban = \"3s\"",
    );
    assert!(
        eventually(Duration::from_secs(10), || get(&topo, &sluice, 1, OPEN) == Some(200)),
        "client 1 is not served before any failure"
    );

    // Three bad-token requests from client 1: each a 401 from sluice itself.
    let c1 = &topo.clients[0].ns;
    let addr = SocketAddr::new(Topology::node_v4(1), sluice.proxy.port());
    for _ in 0..3 {
        let got =
            http_get_in(c1, addr, LOCKED, "/", &[("sluice-key", "nope"), ("sluice-secret", "x")]);
        assert_eq!(got.map(|(c, _)| c), Some(401));
    }
    // The ban lands asynchronously (after the third 401 is sent), so wait for it on
    // the admin listener, which is on the node's loopback and never guarded.
    let metrics = || http_get_in(&topo.node, sluice.admin, "admin", "/metrics", &[]).unwrap().1;
    assert!(
        eventually(Duration::from_secs(5), || metric(&metrics(), "sluice_guard_bans_total")
            == Some(1)),
        "no ban after 3 auth failures: {}",
        metrics()
    );
    let banned_at = Instant::now();
    assert_eq!(get(&topo, &sluice, 1, OPEN), None, "banned client 1 connects: {}", status(&sluice));
    assert_eq!(get(&topo, &sluice, 2, OPEN), Some(200), "client 2 must still be served");
    let text = metrics();
    assert_eq!(metric(&text, "sluice_guard_auth_failures_total"), Some(3), "{text}");
    assert_eq!(metric(&text, "sluice_guard_active_bans"), Some(1), "{text}");

    // A 3s ban (rounded up to whole seconds) lifts by itself.
    assert!(
        eventually(Duration::from_secs(10), || get(&topo, &sluice, 1, OPEN) == Some(200)),
        "client 1 still banned well after the 3s ban"
    );
    assert!(banned_at.elapsed() >= Duration::from_secs(2), "ban lifted too early");
}

#[test]
fn guard_that_cannot_attach_warns_or_with_require_ebpf_stops_start_up() {
    sluice_tests::require_root!();
    let bin = Path::new(env!("CARGO_BIN_EXE_sluice"));
    let dir = tempfile::tempdir().unwrap();
    let guard = "[guard]\ninterfaces = [\"nosuch0\"]\n";
    // Without --require-ebpf sluice serves, and /bpf says the guard is attached nowhere.
    let sluice = SluiceProcess::start(bin, dir.path(), guard);
    let (code, body) = sluice_tests::process::http_get(sluice.admin, "admin", "/bpf").unwrap();
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["guard"]["interfaces"].as_array().map(Vec::len), Some(0), "{doc}");
    drop(sluice);

    // With it, start-up fails and says why.
    let config = dir.path().join("strict.toml");
    std::fs::write(&config, format!("[[listeners]]\naddr = \"127.0.0.1:0\"\n{guard}")).unwrap();
    let pin_dir = format!("/sys/fs/bpf/sluice-test-guardfail-{}", std::process::id());
    let out = Command::new(bin)
        .args(["run", "--require-ebpf", "--config"])
        .arg(&config)
        .args(["--pin-dir", &pin_dir])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&pin_dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its guard: {stderr}");
    assert!(stderr.contains("XDP guard") && stderr.contains("nosuch0"), "{stderr}");
}

#[test]
fn an_interface_that_cannot_be_guarded_leaves_the_others_guarded() {
    sluice_tests::require_root!();
    let topo = Topology::new(2);
    let dir = tempfile::tempdir().unwrap();
    // Both clients denied; only n1 can be guarded (nosuch0 does not exist, n2 is not
    // listed): client 1 is dropped by XDP, and client 2, through the unguarded link, is
    // refused at accept by the userspace deny check, which a partial attach turns on.
    let ifaces = ["n1".to_owned(), "nosuch0".to_owned()];
    let sluice = start_on(&topo, dir.path(), &ifaces, "deny = [\"198.18.0.0/15\"]");
    let denied = || {
        let (code, text) = http_get_in(&topo.node, sluice.admin, "admin", "/metrics", &[])?;
        (code == 200).then(|| metric(&text, "sluice_client_connections_denied_total "))?
    };
    assert!(eventually(Duration::from_secs(10), || denied().is_some()), "no metrics");
    assert_eq!(get(&topo, &sluice, 1, OPEN), None, "client 1 got past the guard on n1");
    assert_eq!(denied(), Some(0), "client 1 reached userspace: XDP did not drop it");
    assert_eq!(get(&topo, &sluice, 2, OPEN), None, "client 2 (unguarded link) was served");
    assert!(
        eventually(Duration::from_secs(10), || denied().is_some_and(|n| n >= 1)),
        "client 2 was not refused at accept"
    );
    let (code, body) = http_get_in(&topo.node, sluice.admin, "admin", "/bpf", &[]).unwrap();
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ifaces = doc["guard"]["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 1, "{doc}");
    assert_eq!(ifaces[0]["interface"], "n1", "{doc}");
}

#[test]
fn syn_flood_from_one_source_is_limited_while_another_is_served() {
    sluice_tests::require_root!();
    let topo = Topology::new(2);
    let dir = tempfile::tempdir().unwrap();
    let sluice = start(&topo, dir.path(), "syn_rate = 1\nsyn_burst = 3");
    // Warm up over the node's loopback (not guarded), so no client spends its SYN
    // budget waiting for the first health check.
    assert!(
        eventually(Duration::from_secs(10), || {
            http_get_in(&topo.node, sluice.proxy, OPEN, "/", &[]).map(|(c, _)| c) == Some(200)
        }),
        "sluice does not serve the open server"
    );
    let addr = SocketAddr::new(Topology::node_v4(1), sluice.proxy.port());
    let (mut ok, mut dropped) = (0, 0);
    for _ in 0..10 {
        match topo.clients[0].ns.connect(addr, Duration::from_millis(300)) {
            Ok(_) => ok += 1,
            Err(_) => dropped += 1,
        }
    }
    assert!(ok >= 1 && dropped >= 3, "burst 3 at 1/s: {ok} connected, {dropped} dropped");
    assert_eq!(get(&topo, &sluice, 2, OPEN), Some(200), "client 2 must be unaffected");
    let (_, metrics) = http_get_in(&topo.node, sluice.admin, "admin", "/metrics", &[]).unwrap();
    let counted =
        metric(&metrics, "sluice_bpf_guard_dropped_total{reason=\"syn_rate\"}").unwrap_or(0);
    assert!(counted >= 3, "{metrics}");
}

/// The process a `sluice upgrade` started (not our child): stopped on drop.
struct Replacement(Option<u32>);

impl Drop for Replacement {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

#[test]
fn the_guard_moves_to_the_new_process_on_upgrade() {
    sluice_tests::require_root!();
    let topo = Topology::new(2);
    let dir = tempfile::tempdir().unwrap();
    let sluice = start_denying_client_1(&topo, dir.path());
    let old = sluice.pid();

    // One XDP link per interface: the new process can only attach once the old one has
    // let go, and must then do so by itself.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["upgrade", "--timeout", "60", "--pin-dir"])
        .arg(sluice.pin_dir())
        .output()
        .unwrap();
    let new = Replacement(owner_pid(sluice.pin_dir()).filter(|p| *p != old));
    assert!(out.status.success(), "upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(new.0.is_some(), "no new owner after the upgrade");

    let attached = || live(&sluice)["guard_interfaces"].as_array().map(Vec::len) == Some(2);
    assert!(
        eventually(Duration::from_secs(10), attached),
        "guard not re-attached: {}",
        status(&sluice)
    );
    // The new process's guard enforces the configured denylist.
    assert!(
        eventually(Duration::from_secs(10), || get(&topo, &sluice, 2, OPEN) == Some(200)),
        "client 2 is not served after the upgrade"
    );
    assert_eq!(get(&topo, &sluice, 1, OPEN), None, "denylisted client 1 got an answer");
}
