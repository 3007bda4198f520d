//! Kernel tier: the XDP guard, on veth links between a node namespace and client
//! namespaces created per test (the veth plays the node's ingress interface).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_tests::require_root;

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use sluice_dataplane::{Cidr, Dataplane, DataplaneOptions};
use sluice_tests::netns::Topology;

const SHORT: Duration = Duration::from_millis(400);

/// A node with two clients, a dual-stack listener in the node namespace that accepts
/// forever, and the guard attached to both node-side links protecting its port.
struct Fixture {
    topo: Topology,
    dp: Dataplane,
    port: u16,
    _listener: Arc<TcpListener>,
}

impl Fixture {
    fn new() -> Fixture {
        let topo = Topology::new(2);
        let listener = Arc::new(topo.node.listen("[::]:0".parse().unwrap()));
        let port = listener.local_addr().unwrap().port();
        let accept = listener.clone();
        thread::spawn(move || {
            // Accept and drop: a completed handshake is the success the tests look for.
            while let Ok((s, _)) = accept.accept() {
                drop(s);
            }
        });
        let mut dp = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
        for c in &topo.clients {
            let a = dp.attach_guard_in(&topo.node.path(), &c.node_if).expect("attach guard");
            eprintln!("guard on {} in {} mode", a.interface, a.mode);
        }
        dp.guard_port(port).unwrap();
        Fixture { topo, dp, port, _listener: listener }
    }

    fn connect(&self, client: usize, node_addr: IpAddr) -> bool {
        let addr = SocketAddr::new(node_addr, self.port);
        self.topo.clients[client].ns.connect(addr, SHORT).is_ok()
    }
}

#[test]
fn denylisted_prefix_cannot_connect_while_another_source_can() {
    require_root!();
    let mut f = Fixture::new();
    assert!(f.connect(0, Topology::node_v4(1)), "baseline connect from client 1");
    f.dp.guard_deny("198.18.1.0/24".parse().unwrap(), None).unwrap();
    assert!(!f.connect(0, Topology::node_v4(1)), "denylisted client 1 still connects");
    assert!(f.connect(1, Topology::node_v4(2)), "client 2 must be unaffected");
    let stats = f.dp.guard_stats().unwrap();
    assert!(stats.dropped_denied >= 1, "{stats:?}");
    f.dp.guard_allow("198.18.1.0/24".parse().unwrap()).unwrap();
    assert!(f.connect(0, Topology::node_v4(1)), "allowed again");
}

#[test]
fn ipv6_denylist_applies_to_ipv6_only() {
    require_root!();
    let mut f = Fixture::new();
    f.dp.guard_deny("2001:db8:1::/64".parse().unwrap(), None).unwrap();
    assert!(!f.connect(0, Topology::node_v6(1)), "denylisted IPv6 source connects");
    assert!(f.connect(0, Topology::node_v4(1)), "its IPv4 address is not denied");
    assert!(f.connect(1, Topology::node_v6(2)), "another IPv6 source is unaffected");
}

#[test]
fn temporary_ban_applies_then_expires() {
    require_root!();
    let mut f = Fixture::new();
    let client = IpAddr::V4(f.topo.clients[0].v4);
    f.dp.guard_deny(Cidr::host(client), Some(Duration::from_secs(1))).unwrap();
    let banned_at = Instant::now();
    assert!(!f.connect(0, Topology::node_v4(1)), "banned source connects");
    // Bans have one-second granularity and round up: lifted within ~2 s.
    let deadline = banned_at + Duration::from_secs(6);
    let mut lifted = false;
    while Instant::now() < deadline {
        if f.connect(0, Topology::node_v4(1)) {
            lifted = true;
            break;
        }
    }
    assert!(lifted, "ban did not expire");
    assert!(banned_at.elapsed() >= Duration::from_millis(900), "ban lifted early");
    assert_eq!(f.dp.guard_expire_bans().unwrap(), 1, "expired ban is swept");
}

#[test]
fn syn_flood_from_one_source_does_not_stop_another() {
    require_root!();
    let mut f = Fixture::new();
    f.dp.guard_syn_rate(5, 5).unwrap();
    let addr = SocketAddr::new(Topology::node_v4(1), f.port);
    let ns = f.topo.clients[0].ns.path();
    // The flood: 60 concurrent connection attempts from client 1, bounded in count
    // and time (each gives up after SHORT).
    let flood: Vec<_> = (0..60)
        .map(|_| {
            let ns = ns.clone();
            thread::spawn(move || {
                sluice_dataplane::sys::in_netns(&ns, || {
                    Ok(std::net::TcpStream::connect_timeout(&addr, SHORT).is_ok())
                })
                .unwrap_or(false)
            })
        })
        .collect();
    // Meanwhile client 2 connects at a modest pace and must always get through.
    let mut other_ok = 0;
    for _ in 0..4 {
        if f.connect(1, Topology::node_v4(2)) {
            other_ok += 1;
        }
    }
    let flood_ok = flood.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count();
    let stats = f.dp.guard_stats().unwrap();
    eprintln!("flood: {flood_ok}/60 connected; other source: {other_ok}/4; {stats:?}");
    assert_eq!(other_ok, 4, "the other source was throttled");
    assert!(flood_ok <= 15, "the flood was not limited: {flood_ok} connected");
    assert!(stats.dropped_syn_rate >= 40, "{stats:?}");
}
