//! Kernel-tier tests: load sluice's real object, attach to a cgroup created for the
//! test (never the root cgroup), and prove traffic took the kernel path.
//!
//! They need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Without it they print a
//! loud SKIPPED line and pass, so unprivileged `cargo test` stays usable; CI is root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_tests::require_root;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sluice_dataplane::{
    Dataplane, DataplaneOptions, Feature, probe,
    sys::{self, ScopedCgroup},
};

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("sluice-test-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A pin directory for one test on bpffs, removed at the end.
struct TestPinDir(PathBuf);

impl TestPinDir {
    fn new(name: &str) -> TestPinDir {
        sys::ensure_bpffs().expect("bpffs");
        TestPinDir(PathBuf::from("/sys/fs/bpf").join(unique(name)))
    }
}

impl Drop for TestPinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the peer binary inside `cgroup`: `sh` moves itself into the cgroup, then
/// execs the peer, so every socket the peer creates belongs to the cgroup.
fn spawn_peer_in(cgroup: &ScopedCgroup, count: usize, size: usize) -> std::process::Child {
    let procs = cgroup.path().join("cgroup.procs");
    Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {} && exec \"$0\" {count} {size}", procs.display()))
        .arg(env!("CARGO_BIN_EXE_sluice-test-peer"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn peer")
}

#[test]
fn probe_reports_every_feature_on_this_kernel() {
    require_root!();
    let report = probe::probe();
    eprintln!("{}", report.table());
    for feature in Feature::ALL {
        assert!(report.has(feature), "{feature} missing: {:?}", report.status(feature));
    }
    // The probe leaves no cgroup behind.
    let mount = sys::cgroup2_mount().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&mount)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("sluice-probe-{}", std::process::id()))
        })
        .collect();
    assert!(leftovers.is_empty(), "probe left cgroups behind: {leftovers:?}");
}

#[test]
fn sockops_and_sk_msg_redirect_loopback_bytes_in_a_test_cgroup() {
    require_root!();
    let pins = TestPinDir::new("redirect");
    let cgroup = ScopedCgroup::create(&unique("redirect")).expect("test cgroup");
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load");
    // Maps are pinned with readable names while loaded.
    for name in ["redir_socks", "local_replicas", "redir_stats"] {
        assert!(pins.0.join(name).exists(), "{name} not pinned");
    }
    let before = dp.redirect_stats().unwrap();
    assert_eq!(before.bytes_redirected, 0);

    let (count, size) = (200usize, 64usize);
    let mut redirect = dp.attach_redirect(cgroup.file()).expect("attach sock_ops + sk_msg");
    let mut peer = spawn_peer_in(&cgroup, count, size);
    let mut out = BufReader::new(peer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("port ").expect("port line").parse().unwrap();
    let listener: SocketAddr = ([127, 0, 0, 1], port).into();
    redirect.dataplane().add_local_replica(listener).unwrap();
    writeln!(peer.stdin.as_mut().unwrap(), "go").unwrap();

    line.clear();
    out.read_line(&mut line).unwrap();
    let status = peer.wait().unwrap();
    assert!(status.success() && line.starts_with("ok "), "peer failed: {line}");
    let exchanged: u64 = line.trim().strip_prefix("ok ").unwrap().parse().unwrap();

    let stats = redirect.dataplane().redirect_stats().unwrap();
    eprintln!("redirect stats after {exchanged} bytes: {stats:?}");
    assert!(stats.socks_tracked >= 2, "both ends tracked: {stats:?}");
    assert_eq!(stats.track_failed, 0);
    // Every byte the peer exchanged went through sk_msg to the peer socket's ingress.
    assert_eq!(stats.bytes_redirected, exchanged, "{stats:?}");
    assert_eq!(stats.no_peer, 0);
    redirect.detach().expect("detach");

    // Detached: new traffic in the cgroup no longer reaches the programs.
    let mut peer = spawn_peer_in(&cgroup, 10, 64);
    let mut out = BufReader::new(peer.stdout.take().unwrap());
    line.clear();
    out.read_line(&mut line).unwrap();
    writeln!(peer.stdin.as_mut().unwrap(), "go").unwrap();
    assert!(peer.wait().unwrap().success());
    let after = dp.redirect_stats().unwrap();
    assert_eq!(after.bytes_redirected, stats.bytes_redirected, "programs still attached");
    drop(dp);
    assert!(!pins.0.join("redir_socks").exists(), "pins removed on unload");
}

#[test]
fn traffic_outside_the_test_cgroup_is_never_touched() {
    require_root!();
    let cgroup = ScopedCgroup::create(&unique("scope")).expect("test cgroup");
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
    let mut redirect = dp.attach_redirect(cgroup.file()).expect("attach");
    // This test process is not in the cgroup: its loopback pair must not be tracked,
    // even with its listener marked as a local replica.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    redirect.dataplane().add_local_replica(listener.local_addr().unwrap()).unwrap();
    let mut c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    let stats = redirect.dataplane().redirect_stats().unwrap();
    assert_eq!(stats.socks_tracked, 0, "a socket outside the cgroup was tracked: {stats:?}");
    assert_eq!(stats.messages, 0);
}

#[test]
fn kernel_logs_reach_tracing_with_the_kernel_crate_as_target() {
    require_root!();
    // The bridge needs a runtime; starting it must succeed on the loaded object.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut dp = Dataplane::load(DataplaneOptions { pin_dir: None }).expect("load");
        dp.start_kernel_logs().expect("aya-log bridge");
        let deadline = Instant::now() + Duration::from_millis(10);
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
    });
    assert_eq!(sluice_dataplane::KERNEL_LOG_TARGET, "sluice_ebpf");
}

#[test]
fn bpftool_lists_programs_and_maps_by_readable_names_while_loaded() {
    require_root!();
    let pins = TestPinDir::new("bpftool");
    let cgroup = ScopedCgroup::create(&unique("bpftool")).expect("test cgroup");
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load");
    let redirect = dp.attach_redirect(cgroup.file()).expect("attach");

    let bpftool = |args: &[&str]| -> String {
        let out = Command::new("bpftool").args(args).output().expect("bpftool (scripts/setup.sh)");
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let maps = bpftool(&["map", "show"]);
    for name in ["redir_socks", "local_replicas", "redir_stats"] {
        assert!(maps.contains(&format!("name {name}")), "map {name} not listed:\n{maps}");
    }
    let progs = bpftool(&["prog", "show"]);
    for name in ["sluice_track", "sluice_redirec"] {
        // Kernel object names are capped at 15 characters; BTF keeps the full name.
        assert!(progs.contains(&format!("name {name}")), "prog {name} not listed:\n{progs}");
    }
    // A pinned map dumps with its BTF field names, as an operator would read it.
    let dump = bpftool(&["map", "dump", "pinned", pins.0.join("redir_stats").to_str().unwrap()]);
    assert!(dump.contains("bytes_redirected"), "BTF names missing from dump:\n{dump}");
    eprintln!("bpftool map dump pinned .../redir_stats:\n{dump}");
    drop(redirect);
}

#[test]
fn live_state_reads_back_what_was_programmed_through_the_pins() {
    require_root!();
    let pins = TestPinDir::new("live");
    let mut dp = Dataplane::load(DataplaneOptions { pin_dir: Some(pins.0.clone()) }).expect("load");
    dp.guard_port(8443).unwrap();
    dp.guard_syn_rate(100, 20).unwrap();
    dp.guard_deny("203.0.113.0/24".parse().unwrap(), None).unwrap();
    dp.guard_deny("2001:db8::7".parse().unwrap(), Some(Duration::from_secs(60))).unwrap();
    let replicas = [
        sluice_dataplane::VipReplica { addr: "127.0.0.1:9001".parse().unwrap(), id: "a".into() },
        sluice_dataplane::VipReplica { addr: "127.0.0.1:9002".parse().unwrap(), id: "b".into() },
    ];
    let vip: SocketAddr = "198.51.100.7:80".parse().unwrap();
    dp.set_vip(vip, &replicas, sluice_dataplane::VipMode::Selected, 1).unwrap();

    // Read as another process would: only through the pins.
    let state = sluice_dataplane::live::read(&pins.0);
    assert_eq!(state.guard_ports, vec![8443]);
    assert_eq!(state.guard_config.map(|c| (c.syn_rate_per_sec, c.syn_burst)), Some((100, 20)));
    let permanent = state.denied.iter().find(|d| d.prefix == "203.0.113.0/24").expect("v4 entry");
    assert_eq!(permanent.expires_in_s, None);
    let ban = state.denied.iter().find(|d| d.prefix == "2001:db8::7/128").expect("v6 ban");
    assert!(matches!(ban.expires_in_s, Some(s) if (55..=61).contains(&s)), "{ban:?}");
    assert_eq!(state.vips.len(), 1);
    assert_eq!(state.vips[0].vip, vip);
    assert_eq!(state.vips[0].selected, 1);
    assert_eq!(state.vips[0].replicas, vec![replicas[0].addr, replicas[1].addr]);
    assert!(state.redirect.is_some() && state.guard.is_some() && state.vip.is_some());
}
