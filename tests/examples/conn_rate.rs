//! New-connection rate with and without sluice's kernel programs,
//! measured at the data plane: `cargo xtask bench P8` runs this.
//!
//! A node namespace and a client namespace joined by a veth link. The node runs two
//! identical accept loops on SO_REUSEPORT listeners (as sluice's are): one bare, one
//! behind the XDP guard (attached to the link for its runs only, the listener's port
//! protected, a SYN rate limit far above the load and a denylist entry, so every check
//! runs) and listener steering (the sk_reuseport program over its listener group).
//! Connector threads in the client namespace each loop for a fixed time: a fresh TCP
//! connection, one small HTTP/1.1 request, the response, close. Runs alternate between
//! the two so drift hits both alike. `--programs guard`, `steer` or `none` puts only that
//! on the "with" side (`none`: an A/A run showing the noise floor).
//!
//! With `--xdp-baseline OBJ` (an object whose `xdp` section only returns XDP_PASS) a
//! third side runs the bare loop with that program on the link: a native XDP program on
//! a veth moves the veth's receive onto NAPI, a cost any XDP program pays there, so
//! programs ÷ xdp-pass is what the guard's own checks and steering add.
//!
//! Output: one JSON line per run (`{"placement","side","rate","ok","failed"}`, side
//! `none`, `xdp-pass` or `programs`), other lines are notes. Needs root; without it,
//! says `skipped: …` and exits 0.
//!
//! `conn_rate [--placements A,B] [--runs N] [--secs S] [--connectors C] [--programs
//! guard,steer] [--xdp-baseline OBJ]`; placement A
//! pins the accept loops to CPU 1 and the connectors to CPU 0, placement B everything to
//! CPU 0.

use std::{
    error::Error,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use sluice_dataplane::{Dataplane, DataplaneOptions, sys};
use sluice_tests::netns::Topology;
use socket2::{Domain, Socket, Type};

type Res<T> = Result<T, Box<dyn Error>>;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";

struct Args {
    placements: Vec<(String, &'static str, &'static str)>,
    runs: usize,
    secs: f64,
    connectors: usize,
    /// Which programs go on the "with" side (both by default; one alone to see which
    /// costs what).
    guard: bool,
    steer: bool,
    /// An XDP object whose program only passes packets (section `xdp`): measured as a
    /// third side, the cost of having any XDP program on the link at all.
    xdp_baseline: Option<String>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        placements: Vec::new(),
        runs: 3,
        secs: 1.0,
        connectors: 8,
        guard: true,
        steer: true,
        xdp_baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--placements" => {
                for p in value.split(',') {
                    a.placements.push(match p {
                        "A" => ("A".into(), "1", "0"),
                        "B" => ("B".into(), "0", "0"),
                        other => return Err(format!("placement {other}: expected A or B").into()),
                    });
                }
            }
            "--runs" => a.runs = value.parse()?,
            "--secs" => a.secs = value.parse()?,
            "--connectors" => a.connectors = value.parse()?,
            "--xdp-baseline" => a.xdp_baseline = Some(value),
            "--programs" => {
                a.guard = value.split(',').any(|p| p == "guard");
                a.steer = value.split(',').any(|p| p == "steer");
            }
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    if a.placements.is_empty() {
        a.placements.push(("A".into(), "1", "0"));
    }
    Ok(a)
}

fn main() -> Res<()> {
    let args = args()?;
    if !sluice_tests::privilege::is_root() {
        println!("skipped: needs root (network namespaces, XDP, sk_reuseport)");
        return Ok(());
    }
    let mut dp = match Dataplane::load(DataplaneOptions { pin_dir: None }) {
        Ok(dp) => dp,
        Err(e) => {
            println!("skipped: the data plane does not load here: {e}");
            return Ok(());
        }
    };
    let topo = Topology::new(1);
    let client = &topo.clients[0];
    // Tens of thousands of connections per run: the default range would run dry.
    let _ = Command::new("ip")
        .args(["netns", "exec", client.ns.name(), "sysctl", "-qw"])
        .arg("net.ipv4.ip_local_port_range=1024 65535")
        .status();
    let bare = listener(&topo)?;
    let guarded = listener(&topo)?;
    let bare_port = bare.local_addr()?.port();
    let guarded_port = guarded.local_addr()?.port();

    // Steering stays on the guarded listener's group (a program attached to a group
    // cannot be taken off it); the guard goes on the link only around runs with the
    // programs, so both sides share one link and differ only by the programs.
    let mut with = Vec::new();
    let mut guard_mode = "native";
    if args.guard {
        dp.guard_port(guarded_port)?;
        dp.guard_syn_rate(1_000_000, 1_000_000)?;
        dp.guard_deny(
            "198.19.255.0/24".parse().map_err(|e: sluice_dataplane::CidrError| e.to_string())?,
            None,
        )?;
        let attached = dp.attach_guard_in(&topo.node.path(), &client.node_if)?;
        dp.detach_guard()?;
        guard_mode = attached.mode;
        with.push(format!(
            "guard: XDP on the node side of the link ({} mode, attached for these runs only), \
             the port protected, a SYN limit of 1M/s per source, one denylist entry",
            attached.mode
        ));
    }
    // The baseline goes on in the guard's mode, so the two differ only by the program.
    let baseline = args.xdp_baseline.as_ref().map(|obj| {
        let mode = if guard_mode == "generic" { "xdpgeneric" } else { "xdpdrv" };
        (obj.clone(), mode)
    });
    if args.steer {
        let generation = dp.steer_register(std::slice::from_ref(&guarded))?;
        dp.steer_attach(&guarded)?;
        dp.steer_activate(generation)?;
        with.push("steering: the sk_reuseport program over the listener's group".into());
    }
    println!(
        "with programs: {}; without: the same accept loop on another port of the same node, \
         over the same link, no program on either",
        with.join("; ")
    );
    if baseline.is_some() {
        println!(
            "xdp-pass: the bare accept loop with an XDP program that only passes packets on \
             the link ({guard_mode} mode, its runs only): the cost of any XDP program there"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let server_cpu = Arc::new(std::sync::Mutex::new("1"));
    let servers: Vec<_> = [bare, guarded]
        .into_iter()
        .map(|l| {
            let (stop, cpu) = (stop.clone(), server_cpu.clone());
            thread::spawn(move || serve(l, &stop, &cpu))
        })
        .collect();

    let bare_to = SocketAddr::new(Topology::node_v4(1), bare_port);
    let guarded_to = SocketAddr::new(Topology::node_v4(1), guarded_port);
    let ns = client.ns.path();
    for (name, server, cpus) in &args.placements {
        if let Ok(mut c) = server_cpu.lock() {
            *c = server;
        }
        // Wakes both accept loops so they re-pin before the first timed connection, and
        // warms both paths.
        for to in [bare_to, guarded_to] {
            let _ = run(&ns, to, cpus, args.connectors, 0.2);
        }
        println!(
            "placement {name}: accept loops pinned to CPU {server}; {} connector threads per \
             run pinned to CPU {cpus}",
            args.connectors
        );
        for r in 0..args.runs {
            // Rotated each run so no side always goes first.
            let mut order = vec![Side::Bare, Side::Programs];
            if baseline.is_some() {
                order.insert(1, Side::XdpPass);
            }
            let sides = order.len();
            order.rotate_left(r % sides);
            for side in order {
                let to = if side == Side::Programs { guarded_to } else { bare_to };
                match side {
                    Side::Programs if args.guard => {
                        dp.attach_guard_in(&topo.node.path(), &client.node_if)?;
                    }
                    Side::XdpPass => {
                        if let Some((obj, mode)) = &baseline {
                            xdp_ip(&topo, &client.node_if, &[mode, "obj", obj, "sec", "xdp"])?;
                        }
                    }
                    _ => {}
                }
                let guard0 = dp.guard_stats().ok();
                let steer0 = dp.steer_stats().ok();
                let measured = run(&ns, to, cpus, args.connectors, args.secs);
                let (g1, s1) = (dp.guard_stats().ok(), dp.steer_stats().ok());
                match side {
                    Side::Programs if args.guard => dp.detach_guard()?,
                    Side::XdpPass => {
                        if let Some((_, mode)) = &baseline {
                            xdp_ip(&topo, &client.node_if, &[mode, "off"])?;
                        }
                    }
                    _ => {}
                }
                let (ok, failed, secs) = measured?;
                println!(
                    "{{\"placement\":\"{name}\",\"side\":\"{}\",\"rate\":{:.1},\"ok\":{ok},\"failed\":{failed}}}",
                    side.name(),
                    ok as f64 / secs
                );
                if side == Side::Programs
                    && r == 0
                    && let (Some(g0), Some(g1), Some(s0), Some(s1)) = (guard0, g1, steer0, s1)
                {
                    println!(
                        "placement {name}: one run with programs: the guard inspected {} \
                         packets ({} SYNs, {} dropped), steering picked the listener for {} \
                         connections ({} fell back), {ok} connections completed",
                        g1.inspected - g0.inspected,
                        g1.syns - g0.syns,
                        (g1.dropped_denied + g1.dropped_syn_rate)
                            - (g0.dropped_denied + g0.dropped_syn_rate),
                        s1.selected - s0.selected,
                        s1.fallback - s0.fallback,
                    );
                }
            }
        }
    }
    // The accept loops are left blocked in accept(): the namespaces go with `topo` and
    // the threads with the process (joining them could hang on a loop that never wakes).
    stop.store(true, Ordering::Release);
    drop(servers);
    Ok(())
}

/// What a run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// No program anywhere.
    Bare,
    /// Only the pass-everything XDP program on the link.
    XdpPass,
    /// The guard on the link and steering on the listener.
    Programs,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Bare => "none",
            Side::XdpPass => "xdp-pass",
            Side::Programs => "programs",
        }
    }
}

/// `ip -n NODE link set dev IF ARGS…` (attaching or removing the baseline XDP program).
fn xdp_ip(topo: &Topology, interface: &str, args: &[&str]) -> Res<()> {
    let status = Command::new("ip")
        .args(["-n", topo.node.name(), "link", "set", "dev", interface])
        .args(args)
        .status()?;
    if !status.success() {
        return Err(format!("ip link set dev {interface} {}: {status}", args.join(" ")).into());
    }
    Ok(())
}

/// A SO_REUSEPORT listener on all of the node's addresses.
fn listener(topo: &Topology) -> Res<TcpListener> {
    let l = topo.node.run(|| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_port(true)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
        s.listen(4096)?;
        Ok(TcpListener::from(s))
    })?;
    Ok(l)
}

/// Pins the calling thread to `cpus` (`taskset` on its thread id).
fn pin_thread(cpus: &str) {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(tid) = tid {
        let _ = Command::new("taskset")
            .args(["-p", "-c", cpus, &tid])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// The accept loop: one request and one response per connection, then close. Re-pins
/// itself when the placement changes.
fn serve(l: TcpListener, stop: &AtomicBool, cpu: &std::sync::Mutex<&'static str>) {
    let mut pinned = "";
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Acquire) {
        let Ok((mut s, _)) = l.accept() else { continue };
        let want = cpu.lock().map(|c| *c).unwrap_or("1");
        if want != pinned {
            pin_thread(want);
            pinned = want;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut got = 0;
        while got < buf.len() {
            match s.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            if buf[..got].ends_with(b"\r\n\r\n") {
                let _ = s.write_all(RESPONSE);
                break;
            }
        }
    }
}

/// `connectors` threads in the namespace at `ns`, pinned to `cpus`, each connecting to
/// `to` in a loop for `secs`. Returns completed and failed connections, and the seconds
/// measured.
fn run(
    ns: &std::path::Path,
    to: SocketAddr,
    cpus: &str,
    connectors: usize,
    secs: f64,
) -> Res<(u64, u64, f64)> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..connectors)
        .map(|_| {
            let (ok, failed, ns, cpus) =
                (ok.clone(), failed.clone(), ns.to_owned(), cpus.to_owned());
            thread::spawn(move || {
                sys::in_netns(&ns, || {
                    pin_thread(&cpus);
                    let mut buf = [0u8; 256];
                    while Instant::now() < deadline {
                        if one(to, &mut buf) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                })
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "connector thread panicked")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), elapsed))
}

/// One connection: connect, request, read the whole response, close.
fn one(to: SocketAddr, buf: &mut [u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    if s.set_read_timeout(Some(Duration::from_secs(2))).is_err() || s.write_all(REQUEST).is_err() {
        return false;
    }
    let mut got = 0;
    loop {
        match s.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return false,
        }
        if got == buf.len() {
            break;
        }
    }
    buf[..got] == *RESPONSE
}
