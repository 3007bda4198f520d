//! End to end through the real binary: server virtual addresses. `sluice run` with a
//! watched routes.toml gives a server a VIP; a client in the `[vip]` cgroup that
//! connects to it lands on the selected replica (the least loaded: load on it moves new
//! connects to the other); when routes.toml drops that replica,
//! the client's established connection is closed and new connects land on the other
//! one; connects from outside the cgroup are left alone.
//!
//! The VIP is a loopback address nothing listens on, so even an unrewritten connect
//! stays on the machine (and is refused).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use sluice_dataplane::{hrw, sys::ScopedCgroup};
use sluice_tests::process::{SluiceProcess, free_port, http_get};

/// A replica: a VIP caller (who sends nothing) gets the replica's id and a newline; a
/// proxied HTTP request gets no answer, so it stays in flight (load) until the client
/// goes away. Either way the connection is held until the peer closes it.
fn replica(id: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {} // the proxy's request: hold it unanswered
                    Err(_) => {
                        let _ = s.write_all(format!("{id}\n").as_bytes());
                    }
                }
                s.set_read_timeout(None).unwrap();
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// A session header value the proxy's HRW sends to replica `id` (of r1 and r2).
fn session_for(id: &str) -> String {
    let score =
        |s: &str, r: &str| hrw::score(hrw::fnv1a64(s.as_bytes()), hrw::fnv1a64(r.as_bytes()));
    let other = if id == "r1" { "r2" } else { "r1" };
    (0..).map(|i| format!("s{i}")).find(|s| score(s, id) > score(s, other)).unwrap()
}

/// A bash client that first moves itself into `cgroup` (so its sockets belong to it),
/// then connects to `vip` with bash's /dev/tcp and prints `got <first line>`. With
/// `hold`, it then reads until the connection ends and prints `closed`.
fn client(cgroup: &ScopedCgroup, vip: SocketAddr, hold: bool) -> Child {
    let procs = cgroup.path().join("cgroup.procs");
    let mut script = format!(
        "echo $$ > {} || exit 2; exec 3<>/dev/tcp/{}/{} || exit 3; read -r l <&3; echo \"got $l\"",
        procs.display(),
        vip.ip(),
        vip.port()
    );
    if hold {
        script.push_str("; while read -r x <&3; do :; done; echo closed");
    }
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bash")
}

/// Lines of a child's stdout, readable with a deadline.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn connect_once(cgroup: &ScopedCgroup, vip: SocketAddr) -> String {
    let mut c = client(cgroup, vip, false);
    let line = lines(&mut c).recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    c.wait().unwrap();
    line
}

fn write_routes(path: &Path, vip: SocketAddr, replicas: &[(&str, SocketAddr)]) {
    let mut doc = format!(
        "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\nvip = \"{vip}\"\n"
    );
    for (id, addr) in replicas {
        doc.push_str(&format!(
            "[[replicas]]\nserver = \"hello\"\nid = \"{id}\"\naddress = \"{addr}\"\n"
        ));
    }
    // Written aside and renamed, so the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `GET /vips` until `want` holds for the first VIP.
fn wait_vips(admin: SocketAddr, what: &str, want: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some((200, body)) = http_get(admin, "admin", "/vips") {
            if serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| want(&v[0])) {
                return;
            }
            last = body;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("VIPs never showed {what}; last /vips: {last}");
}

/// The pin directory `SluiceProcess` chose for this test process's only sluice.
fn pin_dir() -> PathBuf {
    let prefix = format!("sluice-test-{}-", std::process::id());
    std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .expect("sluice's pin dir")
}

#[test]
fn vip_connects_follow_the_routing_and_a_removed_replica_is_cut_off() {
    sluice_tests::require_root!();
    let cgroup =
        ScopedCgroup::create(&format!("sluice-test-e2evip-{}", std::process::id())).unwrap();
    let (r1, r2) = (replica("r1"), replica("r2"));
    let vip: SocketAddr = format!("127.77.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    write_routes(&routes, vip, &[("r1", r1), ("r2", r2)]);
    let rest = format!(
        "[node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n\
         [routes]\nfile = \"routes.toml\"\n\
         [vip]\ncgroup = \"{}\"\nrebalance_interval = \"50ms\"\n",
        cgroup.path().display()
    );
    let sluice = SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path(), &rest);

    // Both replicas routable (health-checked), no load: least_loaded picks r1 (ties go
    // to the lowest replica id).
    wait_vips(sluice.admin, "r1 and r2 with r1 selected", |v| {
        v["server"] == "hello"
            && v["replicas"].as_array().is_some_and(|r| r.len() == 2)
            && v["selected"] == "r1"
    });
    assert_eq!(connect_once(&cgroup, vip), "got r1");

    // Outside the cgroup the connect is not rewritten: nothing listens on the VIP.
    let outside = TcpStream::connect_timeout(&vip, Duration::from_secs(2));
    assert!(outside.is_err(), "a connect from outside the cgroup was rewritten");

    // `sluice bpf status` shows the VIP with its server.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bpf", "status", "--json", "--admin", &sluice.admin.to_string(), "--pin-dir"])
        .arg(pin_dir())
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = &status["live"]["vips"][0];
    assert_eq!(shown["vip"], vip.to_string(), "{status}");
    assert_eq!(shown["server"], "hello", "{status}");
    assert_eq!(shown["replicas"], serde_json::json!([r1.to_string(), r2.to_string()]));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bpf", "status", "--admin", &sluice.admin.to_string(), "--pin-dir"])
        .arg(pin_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table.lines().find(|l| l.contains(&vip.to_string())).unwrap_or_default();
    assert!(line.contains("hello") && line.contains(&r1.to_string()), "{table}");
    eprintln!("{line}");

    // Load on r1 (a proxied request held in flight) moves new VIP connects to r2; when
    // it ends they come back.
    let mut busy = TcpStream::connect(sluice.proxy).unwrap();
    write!(
        busy,
        "GET / HTTP/1.1\r\nhost: hello.r1.example.test\r\nsluice-session-id: {}\r\n\r\n",
        session_for("r1")
    )
    .unwrap();
    wait_vips(sluice.admin, "r2 selected under load on r1", |v| v["selected"] == "r2");
    assert_eq!(connect_once(&cgroup, vip), "got r2");
    drop(busy);
    wait_vips(sluice.admin, "r1 selected again", |v| v["selected"] == "r1");
    assert_eq!(connect_once(&cgroup, vip), "got r1");

    // A caller holds a connection to r1; then r1 leaves the routing.
    let mut holder = client(&cgroup, vip, true);
    let held = lines(&mut holder);
    assert_eq!(held.recv_timeout(Duration::from_secs(10)).unwrap(), "got r1");
    write_routes(&routes, vip, &[("r2", r2)]);
    assert_eq!(
        held.recv_timeout(Duration::from_secs(10)).expect("the connection to r1 stayed open"),
        "closed"
    );
    holder.wait().unwrap();
    wait_vips(sluice.admin, "only r2", |v| {
        v["replicas"].as_array().is_some_and(|r| r.len() == 1) && v["selected"] == "r2"
    });
    assert_eq!(connect_once(&cgroup, vip), "got r2");
    drop(sluice);
}
