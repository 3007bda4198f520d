//! Network namespaces for tests: a "node" namespace and client namespaces joined to
//! it by veth pairs, with addresses from the benchmarking range 198.18.0.0/15 and the
//! documentation range 2001:db8::/32. Everything is created with `ip` and removed on
//! drop, so no test touches the machine's own interfaces.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use sluice_dataplane::{DataplaneError, sys};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2, scripts/setup.sh)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with a unique name derived from `tag`, with `lo` up.
    pub fn new(tag: &str) -> NetNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("sl{}{}{}", std::process::id(), tag, N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs { name }
    }

    /// The namespace's name (for `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind-mounted path, for setns.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> std::io::Result<T> {
        sys::in_netns(&self.path(), || {
            f().map_err(|source| DataplaneError::Io { what: "in netns".into(), source })
        })
        .map_err(|e| match e {
            DataplaneError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    }

    /// Binds a listener inside this namespace (it stays in the namespace).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.run(|| TcpListener::bind(addr)).expect("bind in netns")
    }

    /// Connects from inside this namespace with a timeout.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, timeout))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// One client namespace linked to the node.
#[derive(Debug)]
pub struct Client {
    /// The client's namespace.
    pub ns: NetNs,
    /// The client's IPv4 address.
    pub v4: Ipv4Addr,
    /// The client's IPv6 address.
    pub v6: Ipv6Addr,
    /// The node-side interface of this client's link (where the node's XDP goes).
    pub node_if: String,
}

/// A node namespace with clients, each on its own veth link and subnet.
#[derive(Debug)]
pub struct Topology {
    /// Clients, in creation order (declared before `node` so they drop first).
    pub clients: Vec<Client>,
    /// The node namespace (where sluice's listeners live in a test).
    pub node: NetNs,
}

impl Topology {
    /// Creates a node and `n` clients. Client `i` is 198.18.i.2 / 2001:db8:i::2; the
    /// node is 198.18.i.1 / 2001:db8:i::1 on interface `n<i>`.
    pub fn new(n: u8) -> Topology {
        let node = NetNs::new("n");
        let mut clients = Vec::new();
        for i in 1..=n {
            let ns = NetNs::new("c");
            let node_if = format!("n{i}");
            ip(&[
                "-n",
                node.name(),
                "link",
                "add",
                &node_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            let (v4n, v4c) = (format!("198.18.{i}.1/24"), format!("198.18.{i}.2/24"));
            let (v6n, v6c) = (format!("2001:db8:{i}::1/64"), format!("2001:db8:{i}::2/64"));
            ip(&["-n", node.name(), "addr", "add", &v4n, "dev", &node_if]);
            ip(&["-n", node.name(), "addr", "add", &v6n, "dev", &node_if, "nodad"]);
            ip(&["-n", ns.name(), "addr", "add", &v4c, "dev", "eth0"]);
            ip(&["-n", ns.name(), "addr", "add", &v6c, "dev", "eth0", "nodad"]);
            ip(&["-n", node.name(), "link", "set", &node_if, "up"]);
            ip(&["-n", ns.name(), "link", "set", "eth0", "up"]);
            clients.push(Client {
                ns,
                v4: Ipv4Addr::new(198, 18, i, 2),
                v6: Ipv6Addr::new(0x2001, 0xdb8, u16::from(i), 0, 0, 0, 0, 2),
                node_if,
            });
        }
        Topology { clients, node }
    }

    /// The node's IPv4 address as seen from client `i` (1-based).
    pub fn node_v4(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, i, 1))
    }

    /// The node's IPv6 address as seen from client `i` (1-based).
    pub fn node_v6(i: u8) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, u16::from(i), 0, 0, 0, 0, 1))
    }
}
