//! Kernel tier: listener steering and the zero-downtime handover between an old and a
//! new sluice. Two data plane instances share the pinned steering maps exactly as two
//! processes do; a steady, bounded connection loop must see no failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_tests::require_root;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use sluice_dataplane::{Dataplane, DataplaneOptions, sys};
use socket2::{Domain, Socket, Type};

struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        sys::ensure_bpffs().unwrap();
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/sluice-test-steer-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(128).unwrap();
    s.into()
}

/// One "process generation" of listeners answering each connection with `tag`.
struct Generation {
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Generation {
    fn serve(listeners: Vec<TcpListener>, tag: u8) -> Generation {
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .map(|l| {
                let (paused, stop) = (paused.clone(), stop.clone());
                thread::spawn(move || {
                    l.set_nonblocking(true).unwrap();
                    // The listener closes when this thread ends: that is the close the
                    // migrate path must survive.
                    while !stop.load(Ordering::Acquire) {
                        if paused.load(Ordering::Acquire) {
                            thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        match l.accept() {
                            Ok((mut s, _)) => {
                                s.set_nonblocking(false).unwrap();
                                let _ = s.write_all(&[tag]);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(1));
                            }
                            Err(e) => panic!("accept: {e}"),
                        }
                    }
                })
            })
            .collect();
        Generation { paused, stop, threads }
    }

    fn close(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

#[test]
fn handover_to_a_new_generation_loses_no_connection() {
    require_root!();
    let pins = PinDir::new();
    let first = reuseport_listener("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap();
    let old_listeners = vec![first, reuseport_listener(addr)];

    let mut old =
        Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load old");
    let g_old = old.steer_register(&old_listeners).unwrap();
    old.steer_attach(&old_listeners[0]).unwrap();
    old.steer_activate(g_old).unwrap();
    let old_gen = Generation::serve(old_listeners, b'A');

    // The steady client loop: bounded in time; every connection must get an answer.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, last_b) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, last_b) =
                (stop.clone(), ok.clone(), failed.clone(), last_b.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                    let answer = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                        .and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            let mut b = [0u8; 1];
                            s.read_exact(&mut b).map(|_| b[0])
                        });
                    match answer {
                        Ok(tag) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if tag == b'B' {
                                last_b.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(200);

    // The old process stops accepting: connections now queue on its listeners.
    old_gen.paused.store(true, Ordering::Release);
    thread::sleep(Duration::from_millis(50));

    // The new process: same pins, same address, the idle half of the socket array.
    let new_listeners = vec![reuseport_listener(addr), reuseport_listener(addr)];
    let mut new =
        Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load new");
    let g_new = new.steer_register(&new_listeners).unwrap();
    assert_ne!(g_new.base, g_old.base, "the new generation must use the idle half");
    new.steer_attach(&new_listeners[0]).unwrap();
    let new_gen = Generation::serve(new_listeners, b'B');
    new.steer_activate(g_new).unwrap();

    // The old process closes its listeners with connections still queued on them.
    old_gen.close();
    let before = ok.load(Ordering::Relaxed);
    wait_for(before + 200);
    stop.store(true, Ordering::Release);
    for c in clients {
        c.join().unwrap();
    }
    new_gen.close();

    let stats = new.steer_stats().unwrap();
    let (ok, failed, answered_by_new) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        last_b.load(Ordering::Relaxed),
    );
    eprintln!(
        "handover: {ok} ok, {failed} failed, {answered_by_new} answered by the new generation; {stats:?}"
    );
    assert_eq!(failed, 0, "connections failed during the handover");
    assert!(answered_by_new >= 200, "the new generation did not take over");
    assert!(stats.migrated >= 1, "queued connections were not migrated: {stats:?}");
    drop(old);
}

/// The tag of the listener that answered a fresh connection to `addr`.
fn answer(addr: SocketAddr) -> u8 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    b[0]
}

#[test]
fn every_listening_address_follows_the_active_generation() {
    require_root!();
    let pins = PinDir::new();
    // Two addresses (say :80 and :443), each its own SO_REUSEPORT group; one socket per
    // address per generation, all registered as the generation.
    let (a1, b1) = (
        reuseport_listener("127.0.0.1:0".parse().unwrap()),
        reuseport_listener("127.0.0.1:0".parse().unwrap()),
    );
    let (a, b) = (a1.local_addr().unwrap(), b1.local_addr().unwrap());
    let mut old =
        Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load old");
    let g_old = old.steer_register(&[a1.as_fd(), b1.as_fd()]).unwrap();
    old.steer_attach(&a1).unwrap();
    old.steer_attach(&b1).unwrap();
    old.steer_activate(g_old).unwrap();
    let old_gen = Generation::serve(vec![a1, b1], b'A');

    let (a2, b2) = (reuseport_listener(a), reuseport_listener(b));
    let mut new =
        Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load new");
    let g_new = new.steer_register(&[a2.as_fd(), b2.as_fd()]).unwrap();
    new.steer_attach(&a2).unwrap();
    new.steer_attach(&b2).unwrap();
    let new_gen = Generation::serve(vec![a2, b2], b'B');
    // Both generations listen on both addresses; only the active one gets connections.
    for _ in 0..20 {
        assert_eq!((answer(a), answer(b)), (b'A', b'A'), "the old generation is active");
    }
    new.steer_activate(g_new).unwrap();
    for _ in 0..20 {
        assert_eq!((answer(a), answer(b)), (b'B', b'B'), "the new generation is active");
    }
    let stats = new.steer_stats().unwrap();
    assert_eq!(stats.fallback, 0, "a connection fell back to the kernel's hash: {stats:?}");
    old_gen.close();
    new_gen.close();
    drop(old);
}
