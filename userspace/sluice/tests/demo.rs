//! `sluice demo` through the binary: it is `sluice run` on its embedded config, so the
//! same admin API answers (`/generation`, `/state`, `/bpf`, `/metrics`) and its
//! replicas serve through the proxy; `--print-config` shows the config it runs; its
//! `lazy` server scales from zero and back with the in-process autoscaler and
//! supervisor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::process::{SluiceProcess, http_get};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

#[test]
fn demo_serves_with_the_run_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let demo = SluiceProcess::start_demo(bin(), dir.path());
    let (status, body) = http_get(demo.proxy, "hello.local.sluice.localhost", "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from replica"), "{body}");
    let (status, _) = http_get(demo.proxy, "private.local.sluice.localhost", "/").unwrap();
    assert_eq!(status, 401, "the private server wants the demo token");
    for path in ["/generation", "/state", "/bpf", "/metrics"] {
        let (status, body) = http_get(demo.admin, "admin", path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, generation) = http_get(demo.admin, "admin", "/generation").unwrap();
    assert!(generation.trim().parse::<u64>().unwrap() > 0, "{generation}");
}

#[test]
fn print_config_shows_a_run_config() {
    let out = Command::new(bin()).args(["demo", "--print-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (node, routes) = text.split_once("# routes/demo.toml\n").expect("both files");
    // The node config is what `sluice check` accepts, once its routes file exists.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sluice.toml"), node).unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    std::fs::write(dir.path().join("routes/demo.toml"), routes).unwrap();
    sluice_demo::write_self_signed(&["*.local.sluice.localhost"], dir.path()).unwrap();
    let check = Command::new(bin())
        .args(["check", "--config"])
        .arg(dir.path().join("sluice.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(summary.contains("3 servers, 3 replicas"), "{summary}");
}

/// `--print-config` prints what the demo runs: given a running demo's own arguments, its
/// output is, byte for byte, the `sluice.toml` and `routes/demo.toml` the demo wrote and
/// serves, but for what is one per process (the cgroup's `sluice-demo-<pid>` and the
/// demo token's random secret). As root that includes `[local_replicas]` and `[vip]` on
/// the demo's cgroup.
#[test]
fn print_config_is_the_config_the_demo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let demo = SluiceProcess::start_demo(bin(), dir.path());
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", demo.pid())).unwrap();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .skip(1)
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect();
    assert_eq!(args[0], "demo", "{args:?}");
    let printer = Command::new(bin())
        .args(&args)
        .arg("--print-config")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let printer_pid = printer.id();
    let out = printer.wait_with_output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    // The printer's own per-process cgroup name, as the demo's.
    let printed = printed
        .replace(&format!("sluice-demo-{printer_pid}\""), &format!("sluice-demo-{}\"", demo.pid()));
    let (node, routes) = printed.split_once("\n# routes/demo.toml\n").expect("both files");
    let node = node.strip_prefix("# sluice.toml\n").expect("the node config first");

    let ran = std::env::temp_dir().join(format!("sluice-demo-{}", demo.pid()));
    let ran_node = std::fs::read_to_string(ran.join("sluice.toml")).unwrap();
    assert_eq!(node, ran_node);
    toml::from_str::<toml::Table>(node).expect("the node config parses");
    if sluice_tests::privilege::is_root() {
        let t: toml::Table = toml::from_str(node).unwrap();
        for section in ["local_replicas", "vip"] {
            let cgroup = t[section]["cgroup"].as_str().expect(section);
            assert!(cgroup.ends_with(&format!("/sluice-demo-{}", demo.pid())), "{cgroup}");
            assert!(Path::new(cgroup).is_dir(), "{section}: {cgroup} is the demo's live cgroup");
        }
    }

    let ran_routes = std::fs::read_to_string(ran.join("routes/demo.toml")).unwrap();
    let without_secret = |text: &str| {
        let mut doc: sluice_routing::RoutingDoc = toml::from_str(text).expect("routes parse");
        for t in &mut doc.tokens {
            t.secret_hash.clear();
        }
        doc
    };
    assert_eq!(without_secret(routes), without_secret(&ran_routes));
}

/// One request on a fresh connection: status and lower-cased head.
fn get_head(addr: SocketAddr, host: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.to_ascii_lowercase()))
}

/// Poll `f` every 100 ms until it returns Some, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// How many replicas (any state) the demo's `/state` shows for `lazy`.
fn lazy_replicas(admin: SocketAddr) -> usize {
    let (status, body) = http_get(admin, "admin", "/state?server=lazy").unwrap();
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    view["replicas"].as_array().unwrap().len()
}

#[test]
fn lazy_scales_from_zero_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let demo = SluiceProcess::start_demo(bin(), dir.path());
    let host = "lazy.local.sluice.localhost";
    assert_eq!(lazy_replicas(demo.admin), 0, "no replica before the first request");
    let (status, head) = get_head(demo.proxy, host).unwrap();
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");

    // A client retrying on the 503 gets its 200 once the supervisor's replica is ready:
    // the autoscaler's and supervisor's rounds plus a process start.
    let head =
        wait_for("a 200 from lazy", Duration::from_secs(30), || match get_head(demo.proxy, host) {
            Some((200, head)) => Some(head),
            Some((503, _)) => None,
            other => panic!("unexpected answer {other:?}"),
        });
    assert!(head.contains("hello from replica lazy"), "{head}");
    assert_eq!(lazy_replicas(demo.admin), 1);

    // Idle: after the scale-down window (10 s), the grace period (2 s) and SIGTERM the
    // replica is gone, and lazy refuses again as at the start.
    wait_for("lazy back at zero", Duration::from_secs(60), || {
        (lazy_replicas(demo.admin) == 0).then_some(())
    });
    let (status, head) = get_head(demo.proxy, host).unwrap();
    assert_eq!(status, 503, "{head}");
}

/// As root the demo runs the kernel data plane: the splice, steering, local-replica
/// redirect and VIP programs are loaded, and proxy <-> replica bytes move socket to
/// socket (its redirect counter grows with a request).
#[test]
fn demo_as_root_runs_the_kernel_data_plane() {
    sluice_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let demo = SluiceProcess::start_demo(bin(), dir.path());
    let (status, bpf) = http_get(demo.admin, "admin", "/bpf").unwrap();
    assert_eq!(status, 200, "{bpf}");
    // The VIP programs attach from a task once the routing state names a VIP, which may
    // be a moment after /livez answers: a bounded poll.
    let names = ["sluice_splice", "sluice_steer", "sluice_track", "sluice_redirect", "sluice_vip4"];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("bpftool").args(["prog", "show"]).output();
        let Some(out) = out.ok().filter(|o| o.status.success()) else { break };
        let progs = String::from_utf8_lossy(&out.stdout);
        let missing: Vec<_> = names.iter().filter(|n| !progs.contains(*n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{missing:?} not loaded:\n{progs}");
        thread::sleep(Duration::from_millis(100));
    }
    let redirected = || {
        let (_, metrics) = http_get(demo.admin, "admin", "/metrics").unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("sluice_bpf_redirect_bytes_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = redirected();
    let (status, body) = http_get(demo.proxy, "hello.local.sluice.localhost", "/").unwrap();
    assert_eq!(status, 200, "{body}");
    wait_for("redirected bytes", Duration::from_secs(10), || (redirected() > before).then_some(()));
}
