//! Kernel tier: server virtual addresses. A client process placed in a test cgroup
//! connects to a VIP; the connect program sends it to the replica userspace chose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_tests::require_root;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use sluice_dataplane::{Dataplane, DataplaneOptions, VipMode, VipReplica, hrw, sys::ScopedCgroup};
use sluice_tests::netns::NetNs;

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("sluice-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A replica: answers every connection with its id and a newline, then holds it open
/// until the client goes away.
fn replica(id: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = s.write_all(format!("{id}\n").as_bytes());
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Runs the peer inside `cgroup` (its sockets belong to the cgroup).
fn peer_in(cgroup: &ScopedCgroup, args: &[&str]) -> Child {
    let procs = cgroup.path().join("cgroup.procs");
    Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {} && exec \"$0\" \"$@\"", procs.display()))
        .arg(env!("CARGO_BIN_EXE_sluice-test-peer"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn peer")
}

fn run_peer(cgroup: &ScopedCgroup, args: &[&str]) -> (u32, String) {
    let child = peer_in(cgroup, args);
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "peer {args:?}: {text}");
    (pid, text)
}

struct Fixture {
    dp: Dataplane,
    cgroup: ScopedCgroup,
}

fn fixture(tag: &str) -> Fixture {
    let cgroup = ScopedCgroup::create(&unique(tag)).expect("test cgroup");
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
    dp.attach_vip(cgroup.file()).expect("attach connect4/6");
    Fixture { dp, cgroup }
}

const VIP4: &str = "198.51.100.10:8080";
const VIP6: &str = "[2001:db8:ffff::10]:8080";

#[test]
fn vip_connect_lands_on_the_selected_replica_and_follows_a_new_selection() {
    require_root!();
    let mut f = fixture("vipsel");
    let (r1, r2) = (replica("r1"), replica("r2"));
    let replicas =
        [VipReplica { addr: r1, id: "r1".into() }, VipReplica { addr: r2, id: "r2".into() }];
    f.dp.set_vip(VIP4.parse().unwrap(), &replicas, VipMode::Selected, 0).unwrap();
    assert_eq!(run_peer(&f.cgroup, &["connect", VIP4, "3"]).1, "got r1,r1,r1");
    f.dp.select_vip(VIP4.parse().unwrap(), 1).unwrap();
    assert_eq!(run_peer(&f.cgroup, &["connect", VIP4, "2"]).1, "got r2,r2");
    // IPv6 VIPs reach IPv4 replicas through a dual-stack socket.
    f.dp.set_vip(VIP6.parse().unwrap(), &replicas, VipMode::Selected, 0).unwrap();
    assert_eq!(run_peer(&f.cgroup, &["connect", VIP6]).1, "got r1");
    let stats = f.dp.vip_stats().unwrap();
    assert_eq!((stats.connects, stats.rewritten), (6, 6), "{stats:?}");
    // A removed VIP is no longer rewritten. The client runs in a namespace with only
    // `lo`, so the unrewritten connect fails locally and no packet leaves the machine.
    f.dp.remove_vip(VIP4.parse().unwrap()).unwrap();
    let isolated = NetNs::new("v");
    let procs = f.cgroup.path().join("cgroup.procs");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec ip netns exec {} \"$0\" connect {VIP4}",
            procs.display(),
            isolated.name()
        ))
        .arg(env!("CARGO_BIN_EXE_sluice-test-peer"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("unreachable"),
        "removed VIP still rewritten: {text}"
    );
    assert_eq!(f.dp.vip_stats().unwrap().connects, 6, "a removed VIP was still matched");
}

#[test]
fn hrw_vip_matches_the_userspace_hrw_choice_for_the_connecting_process() {
    require_root!();
    let mut f = fixture("viphrw");
    let ids = ["alpha", "bravo", "charlie", "delta"];
    let replicas: Vec<VipReplica> =
        ids.iter().map(|id| VipReplica { addr: replica(id), id: (*id).into() }).collect();
    f.dp.set_vip(VIP4.parse().unwrap(), &replicas, VipMode::Hrw, 0).unwrap();
    for _ in 0..4 {
        let (pid, out) = run_peer(&f.cgroup, &["connect", VIP4, "3"]);
        let session = hrw::fnv1a64(&pid.to_le_bytes());
        let expected =
            ids.iter().max_by_key(|id| hrw::score(session, hrw::fnv1a64(id.as_bytes()))).unwrap();
        assert_eq!(out, format!("got {expected},{expected},{expected}"), "pid {pid}");
    }
}

#[test]
fn connections_pinned_to_a_removed_replica_are_closed() {
    require_root!();
    let mut f = fixture("vipgone");
    let (r1, r2) = (replica("r1"), replica("r2"));
    let vip: SocketAddr = VIP4.parse().unwrap();
    f.dp.set_vip(
        vip,
        &[VipReplica { addr: r1, id: "r1".into() }, VipReplica { addr: r2, id: "r2".into() }],
        VipMode::Selected,
        0,
    )
    .unwrap();
    let mut holder = peer_in(&f.cgroup, &["hold", VIP4]);
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "got r1");

    // r1 leaves: new connections go to r2 and the pinned one is closed.
    f.dp.set_vip(vip, &[VipReplica { addr: r2, id: "r2".into() }], VipMode::Selected, 0).unwrap();
    let closed = f.dp.close_connections_to(r1).unwrap();
    assert!(closed >= 1, "no socket to r1 was destroyed");
    let deadline = Instant::now() + Duration::from_secs(5);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "closed");
    assert!(Instant::now() < deadline);
    assert!(holder.wait().unwrap().success());
    assert_eq!(run_peer(&f.cgroup, &["connect", VIP4]).1, "got r2");
}
