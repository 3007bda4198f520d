//! End to end through the real binary: a replica on this node, in its own network
//! namespace behind a veth, with sluice and the replica in a test cgroup named in
//! `[local_replicas]`. The bytes between sluice's upstream socket and the replica's
//! socket go through sock_ops + sk_msg instead of the TCP/IP stack: responses arrive
//! byte-exact and the kernel's redirect counters account for them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sluice_dataplane::sys::ScopedCgroup;
use sluice_tests::{
    netns::NetNs,
    process::{SluiceProcess, http_get},
    replica,
};

const HOST: &str = "hello.r1.example.test";

/// Not a test of its own: the replica process this file's test re-executes.
#[test]
fn http_replica_process() {
    replica::run_if_requested();
}

/// A replica namespace joined to the host by a veth: host side `.1`, replica `.2` of a
/// /30 derived from the pid, so parallel runs do not collide.
struct ReplicaNet {
    ns: NetNs,
    host_if: String,
    host: String,
    replica: String,
    prefix: String,
}

impl ReplicaNet {
    fn new() -> ReplicaNet {
        let ns = NetNs::new("r");
        let n = std::process::id() % 60;
        let (subnet, host, replica) = (
            format!("198.19.{}.0", 100 + n),
            format!("198.19.{}.1", 100 + n),
            format!("198.19.{}.2", 100 + n),
        );
        let host_if = format!("slr{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "ip {args:?} failed");
        };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", ns.name(), "addr", "add", &format!("{replica}/30"), "dev", "eth0"]);
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"]);
        ReplicaNet { ns, host_if, host, replica, prefix: format!("{subnet}/30") }
    }
}

impl Drop for ReplicaNet {
    fn drop(&mut self) {
        // Deleting one end removes the pair; the namespace goes when `ns` drops.
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
    }
}

/// Starts this test binary as the replica inside `net`'s namespace and `cgroup`.
fn spawn_replica(net: &ReplicaNet, cgroup: &ScopedCgroup) -> (Child, SocketAddr) {
    let procs = cgroup.path().join("cgroup.procs");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec ip netns exec {} \"$0\" --exact http_replica_process --nocapture",
            procs.display(),
            net.ns.name()
        ))
        .arg(std::env::current_exe().unwrap())
        .env(replica::LISTEN_ENV, format!("{}:0", net.replica))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn replica");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "replica exited before listening");
        if let Some(p) = line.trim().strip_prefix("port ") {
            break p.parse::<u16>().unwrap();
        }
    };
    (child, SocketAddr::new(net.replica.parse().unwrap(), port))
}

/// One keep-alive request; returns the status and body.
fn request(s: &mut BufReader<TcpStream>, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    write!(
        s.get_mut(),
        "{method} {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.get_mut().write_all(body).unwrap();
    let mut status_line = String::new();
    s.read_line(&mut status_line).unwrap();
    let status = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        s.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut out = vec![0u8; length];
    s.read_exact(&mut out).unwrap();
    (status, out)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[test]
fn local_replica_in_its_own_namespace_is_reached_through_sk_msg() {
    sluice_tests::require_root!();
    if std::env::var_os(replica::LISTEN_ENV).is_some() {
        return;
    }
    let name = format!("sluice-test-local-{}", std::process::id());
    let cgroup = ScopedCgroup::create(&name).expect("test cgroup");
    let net = ReplicaNet::new();
    let (mut replica_proc, replica) = spawn_replica(&net, &cgroup);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\n\
             [[replicas]]\nserver = \"hello\"\nid = \"r1\"\naddress = \"{replica}\"\nprotocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let rest = format!(
        "[node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n\
         [local_replicas]\ncgroup = \"{}\"\nprefixes = [\"{}\"]\n",
        cgroup.path().display(),
        net.prefix
    );
    let sluice = SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path(), &rest);
    // Sockets belong to the cgroup of the process that creates them: sluice joins before
    // its first upstream connection (opened by the first proxied request).
    cgroup.add_pid(sluice.pid()).unwrap();
    eprintln!("replica {replica} (host side {}), cgroup {}", net.host, cgroup.path().display());

    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(sluice.proxy, HOST, "/1").map(|(c, _)| c) != Some(200) {
        assert!(Instant::now() < deadline, "replica never became routable through sluice");
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = || http_get(sluice.admin, "admin", "/metrics").unwrap().1;
    let before = metric(&metrics(), "sluice_bpf_redirect_bytes_total");

    let conn = TcpStream::connect(sluice.proxy).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = BufReader::new(conn);
    let (size, rounds) = (64 * 1024, 32);
    for _ in 0..rounds {
        let (status, body) = request(&mut conn, "GET", &format!("/{size}"), b"");
        assert_eq!(status, 200);
        assert_eq!(body.len(), size);
        assert!(body.iter().enumerate().all(|(i, b)| *b == replica::pattern_byte(i)), "corrupted");
    }
    let upload: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let (status, echoed) = request(&mut conn, "POST", "/echo", &upload);
    assert_eq!(status, 200);
    assert!(echoed == upload, "POST body corrupted on the way");

    let text = metrics();
    let redirected = metric(&text, "sluice_bpf_redirect_bytes_total") - before;
    let payload = (size * rounds + 2 * upload.len()) as u64;
    eprintln!(
        "payload {payload} B; redirected {redirected} B; no peer {}; insert failures {}",
        metric(&text, "sluice_bpf_redirect_no_peer_total"),
        metric(&text, "sluice_bpf_track_failed_total"),
    );
    // Both directions (request bytes and response bytes, plus headers) went socket to
    // socket in the kernel.
    assert!(redirected >= payload, "only {redirected} of {payload} bytes took the redirect");
    drop(sluice);
    let _ = replica_proc.kill();
    let _ = replica_proc.wait();
}
