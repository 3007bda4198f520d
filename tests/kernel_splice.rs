//! Kernel tier: splicing an opaque stream. A client talks to an echo replica through
//! two proxy-held sockets that are spliced in the kernel; the proxy's watchers only
//! see EOF (and would forward, and count, any byte the kernel left to userspace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use sluice_dataplane::{Dataplane, DataplaneOptions};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

macro_rules! require_root {
    () => {
        if !is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "kernel-tier tests must run as root in CI"
            );
            eprintln!("SKIPPED (kernel tier): {} needs root", module_path!());
            return;
        }
    };
}

/// The proxy's watcher for one direction: blocks until `from` has something for
/// userspace. On a spliced leg that is EOF, which becomes a half-close of `to`;
/// anything else is forwarded by hand and counted as a fallback.
fn watch(
    mut from: TcpStream,
    mut to: TcpStream,
    userspace_bytes: Arc<AtomicU64>,
    spurious: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let r = from.read(&mut buf);
            if std::env::var("SPLICE_DEBUG").is_ok() {
                eprintln!(
                    "watch {:?} -> {:?}: read {:?} state {:?}",
                    from.local_addr(),
                    to.local_addr(),
                    r.as_ref().map_err(|e| e.to_string()),
                    tcp_state(&from)
                );
            }
            match r {
                // A spliced leg's reader is woken for skbs that were redirected away
                // and then finds nothing: the kernel answers EAGAIN even on a blocking
                // socket. That is "not ready", never a close.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    spurious.fetch_add(1, Ordering::Relaxed);
                }
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    userspace_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

fn tcp_state(s: &TcpStream) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnH", "src", &s.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("?").to_owned()
}

struct Legs {
    client: TcpStream,
    proxy_front: TcpStream,
    proxy_back: TcpStream,
    replica: thread::JoinHandle<u64>,
}

/// client → [front | back] → echo replica, all on loopback.
fn legs() -> Legs {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let replica = thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut echoed = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    s.write_all(&buf[..n]).unwrap();
                    echoed += n as u64;
                }
            }
        }
        // Half-close seen: finish our side.
        let _ = s.shutdown(Shutdown::Write);
        echoed
    });
    let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_front, _) = front.accept().unwrap();
    let proxy_back = TcpStream::connect(up_addr).unwrap();
    for s in [&client, &proxy_front, &proxy_back] {
        s.set_nodelay(true).unwrap();
    }
    Legs { client, proxy_front, proxy_back, replica }
}

#[test]
fn spliced_websocket_like_stream_echoes_10k_messages_without_userspace() {
    require_root!();
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
    let Legs { mut client, proxy_front, proxy_back, replica } = legs();
    let pair = dp.splice(&proxy_front, &proxy_back).expect("splice");
    let userspace = Arc::new(AtomicU64::new(0));
    let spurious = Arc::new(AtomicU64::new(0));
    let w1 = watch(
        proxy_front.try_clone().unwrap(),
        proxy_back.try_clone().unwrap(),
        userspace.clone(),
        spurious.clone(),
    );
    let w2 = watch(
        proxy_back.try_clone().unwrap(),
        proxy_front.try_clone().unwrap(),
        userspace.clone(),
        spurious.clone(),
    );

    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = 0u64;
    let mut got = vec![0u8; 512];
    for i in 0..10_000usize {
        // Sizes 1..=300 with varying content: framing must survive byte-exact.
        let len = 1 + (i * 7919) % 300;
        let msg: Vec<u8> = (0..len).map(|j| ((i + j * 13) % 256) as u8).collect();
        client.write_all(&msg).unwrap();
        client.read_exact(&mut got[..len]).unwrap();
        assert_eq!(&got[..len], &msg[..], "message {i} corrupted");
        sent += len as u64;
    }
    // Half-close from the client: the replica sees EOF, finishes, and the client sees
    // EOF in turn, all through the watchers.
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(replica.join().unwrap(), sent);
    w1.join().unwrap();
    w2.join().unwrap();

    let stats = dp.splice_stats().unwrap();
    eprintln!(
        "spliced {sent} bytes each way; {stats:?}; userspace carried {}; spurious wake-ups {}",
        userspace.load(Ordering::Relaxed),
        spurious.load(Ordering::Relaxed)
    );
    assert_eq!(
        userspace.load(Ordering::Relaxed),
        0,
        "userspace carried payload after the hand-off"
    );
    assert_eq!(stats.bytes, 2 * sent, "{stats:?}");
    dp.unsplice(pair).unwrap();
}

#[test]
fn close_from_the_replica_side_tears_down_both_legs() {
    require_root!();
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
    let Legs { mut client, proxy_front, proxy_back, replica } = legs();
    let pair = dp.splice(&proxy_front, &proxy_back).expect("splice");
    let userspace = Arc::new(AtomicU64::new(0));
    let spurious = Arc::new(AtomicU64::new(0));
    let w1 = watch(
        proxy_front.try_clone().unwrap(),
        proxy_back.try_clone().unwrap(),
        userspace.clone(),
        spurious.clone(),
    );
    let w2 = watch(
        proxy_back.try_clone().unwrap(),
        proxy_front.try_clone().unwrap(),
        userspace.clone(),
        spurious.clone(),
    );
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    // The replica ends the stream after the client half-closes; then everything ends.
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(replica.join().unwrap(), 4);
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(client.read(&mut b).unwrap(), 0, "client did not see the close");
    w1.join().unwrap();
    w2.join().unwrap();
    assert_eq!(userspace.load(Ordering::Relaxed), 0);
    dp.unsplice(pair).unwrap();
}
