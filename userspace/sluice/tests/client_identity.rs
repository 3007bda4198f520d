//! Through the real binary and a config file, without the XDP guard: a listener that
//! takes PROXY headers from a trusted edge (127.0.0.1) passes the reported client to the
//! replica, bans it (in userspace) after repeated proxy-auth failures while the edge and
//! its other clients are still served, and refuses a PROXY header from an untrusted peer
//! (127.0.0.2; all of 127/8 is loopback on Linux).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use sluice_proxy::encode_v2;
use sluice_tests::process::{SluiceProcess, free_port, http_get};

const OPEN: &str = "open.r1.example.test";
const LOCKED: &str = "locked.r1.example.test";

/// An HTTP/1.1 replica answering `<x-forwarded-for>|<x-real-ip>` to every GET, with the
/// `Forwarded` it got in a `seen-forwarded` response header.
fn replica() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        while let Ok((s, _)) = l.accept() {
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let (mut xff, mut real, mut fwd) =
                        (String::new(), String::new(), String::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("x-forwarded-for:") {
                            xff = v.trim().to_owned();
                        } else if let Some(v) = lower.strip_prefix("x-real-ip:") {
                            real = v.trim().to_owned();
                        } else if lower.starts_with("forwarded:") {
                            fwd = line["forwarded:".len()..].trim().to_owned();
                        }
                    }
                    let body = format!("{xff}|{real}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nseen-forwarded: {fwd}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A blocking connection from `local` (an address of the loopback interface).
fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(local.parse().unwrap(), 0))?;
            s.connect(to).await
        })
        .unwrap()
        .into_std()
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A GET to `host` from `local` with a PROXY v2 header naming `client` (`None`: no
/// header): the status and body, or `None` when the connection is closed unanswered.
fn get(local: &str, to: SocketAddr, client: Option<&str>, host: &str) -> Option<(u16, String)> {
    let mut s = connect_from(local, to);
    if let Some(c) = client {
        s.write_all(&encode_v2(c.parse().unwrap(), to)).ok()?;
    }
    s.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[test]
fn proxy_protocol_listener_bans_the_reported_client_not_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let rep = replica();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[[servers]]\nid = \"open\"\nlabel = \"open\"\nunauthenticated = true\n\
             [[servers]]\nid = \"locked\"\nlabel = \"locked\"\n\
             [[replicas]]\nserver = \"open\"\nid = \"r-open\"\naddress = \"{rep}\"\nprotocol = \"http1\"\n\
             [[replicas]]\nserver = \"locked\"\nid = \"r-locked\"\naddress = \"{rep}\"\nprotocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let edge_port = free_port();
    let rest = format!(
        "[[listeners]]\naddr = \"127.0.0.1:{edge_port}\"\nproxy_protocol = \"v2\"\n\
         trusted_proxies = [\"127.0.0.1/32\"]\n\
         [node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n\
         [guard]\nauth_fail_threshold = 2\nauth_fail_window = \"1m\"\nauth_ban = \"10m\"\n"
    );
    let sluice = SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path(), &rest);
    let edge: SocketAddr = ([127, 0, 0, 1], edge_port).into();

    // Bounded wait for the replica's first health check.
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        let r = get("127.0.0.1", edge, Some("203.0.113.7:1000"), OPEN);
        if r.as_ref().is_some_and(|(c, _)| *c == 200) || Instant::now() > deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(served, Some((200, "203.0.113.7|203.0.113.7".into())));

    // Two failures from one client behind the edge ban that client.
    for _ in 0..2 {
        let r = get("127.0.0.1", edge, Some("203.0.113.66:1000"), LOCKED);
        assert_eq!(r.map(|(c, _)| c), Some(401));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while get("127.0.0.1", edge, Some("203.0.113.66:1000"), OPEN).is_some() {
        assert!(Instant::now() < deadline, "the failing client was not banned");
        thread::sleep(Duration::from_millis(20));
    }
    // The edge's other clients, and the direct listener, are still served.
    assert_eq!(get("127.0.0.1", edge, Some("203.0.113.7:1000"), OPEN).map(|r| r.0), Some(200));
    assert_eq!(http_get(sluice.proxy, OPEN, "/").map(|r| r.0), Some(200));
    // An untrusted peer may not send a PROXY header; without one it is served as itself.
    assert_eq!(get("127.0.0.2", edge, Some("203.0.113.9:1"), OPEN), None);
    assert_eq!(get("127.0.0.2", edge, None, OPEN), Some((200, "127.0.0.2|127.0.0.2".into())));

    let (_, m) = http_get(sluice.admin, "admin", "/metrics").unwrap();
    assert_eq!(metric(&m, "sluice_guard_bans_total "), Some(1), "{m}");
    assert_eq!(metric(&m, "sluice_guard_auth_failures_total "), Some(2), "{m}");
    assert_eq!(metric(&m, "sluice_client_proxy_header_refused_total "), Some(1), "{m}");
    assert!(metric(&m, "sluice_client_connections_denied_total ").unwrap_or(0) >= 1, "{m}");
}

/// A GET to `host` from `local` carrying `forwarded`: the status, the `Forwarded` the
/// replica saw, and the body.
fn get_forwarded(
    local: &str,
    to: SocketAddr,
    forwarded: &str,
    host: &str,
) -> (u16, String, String) {
    let mut s = connect_from(local, to);
    let req = format!(
        "GET / HTTP/1.1\r\nhost: {host}\r\nforwarded: {forwarded}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let seen = head
        .lines()
        .find_map(|l| l.strip_prefix("seen-forwarded:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    (status, seen, body.to_owned())
}

/// `trusted_proxies` from the config file: a trusted edge's RFC 7239 `Forwarded` names
/// the client (X-Real-IP) and is extended with sluice's own hop; an untrusted peer's is
/// replaced.
#[test]
fn forwarded_from_trusted_proxies_names_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let rep = replica();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[[servers]]\nid = \"open\"\nlabel = \"open\"\nunauthenticated = true\n\
             [[replicas]]\nserver = \"open\"\nid = \"r-open\"\naddress = \"{rep}\"\nprotocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let rest = format!(
        "[[listeners]]\naddr = \"127.0.0.1:{port}\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         forwarded_header = true\n\
         [node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n"
    );
    let _sluice = SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path(), &rest);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let chain = "for=\"[2001:db8::9]:4711\";proto=https";
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        let r = get_forwarded("127.0.0.1", addr, chain, OPEN);
        if r.0 == 200 || Instant::now() > deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let ours = |node: &str| format!("{node};host=\"{OPEN}\";proto=http");
    assert_eq!(
        served,
        (200, format!("{chain}, {}", ours("for=127.0.0.1")), "127.0.0.1|2001:db8::9".into())
    );
    let untrusted = get_forwarded("127.0.0.2", addr, "for=203.0.113.9", OPEN);
    assert_eq!(untrusted, (200, ours("for=127.0.0.2"), "127.0.0.2|127.0.0.2".into()));
}
