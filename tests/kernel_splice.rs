//! Kernel tier: splicing an opaque stream. A client talks to a replica through two
//! proxy-held sockets that are spliced in the kernel and handed to the close watcher,
//! as the proxy does after an upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_tests::require_root;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::OwnedFd,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use sluice_dataplane::{Dataplane, DataplaneOptions, SpliceEnd, SpliceWatcher};

struct Kernel {
    dp: Arc<Mutex<Dataplane>>,
    watcher: SpliceWatcher,
}

fn kernel() -> Kernel {
    let dp =
        Arc::new(Mutex::new(Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load")));
    let watcher = SpliceWatcher::spawn(dp.clone()).expect("watcher");
    Kernel { dp, watcher }
}

/// client → [front | back] → replica (running `serve` on its socket).
fn connect_through<T: Send + 'static>(
    k: &Kernel,
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (TcpStream, thread::JoinHandle<T>, mpsc::Receiver<SpliceEnd>) {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let replica = thread::spawn(move || serve(upstream.accept().unwrap().0));
    let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_front, _) = front.accept().unwrap();
    let proxy_back = TcpStream::connect(up_addr).unwrap();
    for s in [&client, &proxy_front, &proxy_back] {
        s.set_nodelay(true).unwrap();
    }
    let pair = k.dp.lock().unwrap().splice(&proxy_front, &proxy_back).expect("splice");
    let (tx, rx) = mpsc::channel();
    k.watcher.watch(
        pair,
        OwnedFd::from(proxy_front),
        OwnedFd::from(proxy_back),
        Box::new(move |end| {
            let _ = tx.send(end);
        }),
    );
    (client, replica, rx)
}

fn echo(mut s: TcpStream) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0u64;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
        echoed += n as u64;
    }
    let _ = s.shutdown(Shutdown::Write);
    echoed
}

#[test]
fn spliced_stream_echoes_10k_messages_without_userspace() {
    require_root!();
    let k = kernel();
    let (mut client, replica, ended) = connect_through(&k, echo);
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = 0u64;
    let mut got = vec![0u8; 512];
    for i in 0..10_000usize {
        // Sizes 1..=300 with varying content: bytes must survive exactly and in order.
        let len = 1 + (i * 7919) % 300;
        let msg: Vec<u8> = (0..len).map(|j| ((i + j * 13) % 256) as u8).collect();
        client.write_all(&msg).unwrap();
        client.read_exact(&mut got[..len]).unwrap();
        assert_eq!(&got[..len], &msg[..], "message {i} corrupted");
        sent += len as u64;
    }
    // Half-close from the client: the replica sees EOF and finishes; the client then
    // sees EOF in turn, all propagated by the watcher.
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(replica.join().unwrap(), sent);
    let end = ended.recv_timeout(Duration::from_secs(10)).expect("pair end reported");
    let stats = k.dp.lock().unwrap().splice_stats().unwrap();
    let wakeups = k.watcher.wakeups();
    eprintln!("spliced {sent} bytes each way; {end:?}; {stats:?}; watcher wake-ups {wakeups}");
    assert_eq!(end, SpliceEnd { a_to_b: sent, b_to_a: sent, clean: true });
    // Every payload byte went through the kernel, and the watcher woke for closes,
    // not for messages.
    assert_eq!(stats.bytes, 2 * sent);
    assert!(wakeups < 100, "watcher woke {wakeups} times for 20k messages");
}

#[test]
fn data_then_immediate_half_close_arrives_whole() {
    require_root!();
    let k = kernel();
    // The FIN must never overtake redirected bytes still queued for the peer.
    for round in 0..10 {
        let (mut client, replica, ended) = connect_through(&k, |mut s: TcpStream| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        });
        let blob = vec![0x5au8; 4 << 20];
        client.write_all(&blob).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            replica.join().unwrap(),
            blob.len() as u64,
            "round {round}: bytes lost at the half-close"
        );
        drop(client);
        let end = ended.recv_timeout(Duration::from_secs(15)).expect("pair end");
        assert_eq!(end.a_to_b, blob.len() as u64);
    }
}

#[test]
fn a_reset_on_one_leg_resets_the_other() {
    require_root!();
    let k = kernel();
    let (client, replica, ended) = connect_through(&k, |mut s: TcpStream| {
        let mut buf = [0u8; 16];
        let mut outcome = Ok(0);
        for _ in 0..1000 {
            outcome = s.read(&mut buf);
            if !matches!(outcome, Ok(n) if n > 0) {
                break;
            }
        }
        outcome.map_err(|e| e.kind())
    });
    // An abortive close from the client (RST, not FIN).
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    assert_eq!(
        replica.join().unwrap(),
        Err(ErrorKind::ConnectionReset),
        "replica must see a reset, not a clean end"
    );
    let end = ended.recv_timeout(Duration::from_secs(10)).expect("pair end");
    assert!(!end.clean);
}

#[test]
fn close_from_the_replica_side_tears_down_both_legs() {
    require_root!();
    let k = kernel();
    let (mut client, replica, ended) = connect_through(&k, |mut s: TcpStream| {
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"bye!").unwrap();
        // The replica ends the whole stream first.
    });
    client.write_all(b"ping").unwrap();
    replica.join().unwrap();
    let mut got = Vec::new();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye!");
    client.shutdown(Shutdown::Write).unwrap();
    let end = ended.recv_timeout(Duration::from_secs(10)).expect("pair end");
    assert_eq!((end.a_to_b, end.b_to_a), (4, 4));
}

#[test]
fn bytes_queued_before_the_splice_are_not_stranded() {
    require_root!();
    let k = kernel();
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let replica = thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).map(|_| got)
    });
    let mut client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_front, _) = front.accept().unwrap();
    let proxy_back = TcpStream::connect(up_addr).unwrap();
    // The client speaks before the hand-off and then waits: its bytes sit in the
    // front socket's receive queue when the socket enters the sockhash.
    client.write_all(b"early").unwrap();
    thread::sleep(Duration::from_millis(50));
    let pair = k.dp.lock().unwrap().splice(&proxy_front, &proxy_back).expect("splice");
    let got = replica.join().unwrap();
    assert_eq!(
        got.as_ref().map(|g| &g[..]).map_err(|e| e.kind()),
        Ok(&b"early"[..]),
        "queued bytes stranded"
    );
    k.dp.lock().unwrap().unsplice(pair).unwrap();
    drop((proxy_front, proxy_back));
}

#[test]
fn behaviour_probe_passes_here_and_a_forced_failure_is_named() {
    require_root!();
    let k = kernel();
    let report = sluice_dataplane::probe_behaviour(&k.dp, None);
    eprintln!("{report:?}");
    assert!(report.passed(), "{}", report.summary());
    for c in &report.checks {
        assert_ne!(c.status, sluice_dataplane::CheckStatus::Failed, "{c:?}");
    }
    let forced = sluice_dataplane::probe_behaviour(&k.dp, Some("fionread"));
    assert!(!forced.passed());
    assert!(forced.summary().starts_with("fionread failed"), "{}", forced.summary());
    // The probe's bytes really went through the kernel.
    let stats = k.dp.lock().unwrap().splice_stats().unwrap();
    assert!(stats.bytes > 0, "{stats:?}");
}

/// Removes a test pin directory (on bpffs) on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One round trip of `msg` through the pair.
fn round_trip(client: &mut TcpStream, msg: &[u8]) {
    client.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    client.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn a_spliced_pair_moves_to_a_process_sharing_the_maps() {
    require_root!();
    sluice_dataplane::sys::ensure_bpffs().expect("bpffs");
    let pins = PinDir(format!("/sys/fs/bpf/sluice-handover-test-{}", std::process::id()).into());
    let options = || DataplaneOptions { pin_dir: Some(pins.0.clone()) };
    let old_dp = Arc::new(Mutex::new(Dataplane::load(options()).expect("load old")));
    let old =
        Kernel { watcher: SpliceWatcher::spawn(old_dp.clone()).expect("watcher"), dp: old_dp };
    let (mut client, replica, old_end) = connect_through(&old, echo);
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..100u32 {
        round_trip(&mut client, &i.to_be_bytes().repeat(1 + i as usize % 50));
    }

    // The successor: same pin dir, splice maps shared.
    let new_dp = Arc::new(Mutex::new(Dataplane::load_for_takeover(options()).expect("load new")));
    let new_watcher = SpliceWatcher::spawn(new_dp.clone()).expect("watcher");
    let mut detached = old.watcher.detach_open();
    assert_eq!(detached.len(), 1, "the open pair is given back");
    let d = detached.pop().unwrap();
    // A process with its own maps cannot adopt it.
    let mut stranger = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
    assert!(stranger.adopt_splice(&d.legs[0], &d.legs[1], d.pair.written_before()).is_err());
    drop(stranger);
    let [a, b] = d.legs;
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let pair =
        new_dp.lock().unwrap().adopt_splice(&a2, &b2, d.pair.written_before()).expect("adopt");
    let (tx, new_end) = mpsc::channel();
    new_watcher.watch(
        pair,
        a2,
        b2,
        Box::new(move |end| {
            let _ = tx.send(end);
        }),
    );
    // The old process lets go: its copies closed, its end callback told, its data plane
    // gone (leaving the pins to the successor).
    drop((a, b));
    (d.on_end)(SpliceEnd { a_to_b: 0, b_to_a: 0, clean: true });
    assert!(old_end.recv_timeout(Duration::from_secs(1)).is_ok());
    drop(old.watcher);
    old.dp.lock().unwrap().release_pins();
    drop(old.dp);

    for i in 100..200u32 {
        round_trip(&mut client, &i.to_be_bytes().repeat(1 + i as usize % 50));
    }
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let end = new_end.recv_timeout(Duration::from_secs(10)).expect("the new watcher ends it");
    assert!(end.clean, "{end:?}");
    assert!(replica.join().unwrap() > 0);
}
