//! End to end through the real binary: `sluice run` with routing from a real etcd,
//! written by `sluice ctl`. Requests go over real sockets to real replicas.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use sluice_tests::{
    etcd::Etcd,
    process::{SluiceProcess, http_get},
};

const HOST: &str = "hello.r1.example.test";

/// A keep-alive HTTP/1.1 replica answering every request with its id.
fn replica(id: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut line = String::new();
                    // Read one request head (GETs without bodies).
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let body = format!("{id}\n");
                    let resp =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    http_get(addr, host, path)
}

fn start_sluice(dir: &Path, etcd: &str) -> SluiceProcess {
    let rest = format!(
        r#"
[node]
base_domains = ["example.test"]
regions = ["r1"]
[etcd]
endpoints = ["{etcd}"]
[health]
interval = "200ms"
failure_threshold = 2
"#
    );
    SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir, &rest)
}

/// Runs `sluice ctl` and returns the revision it reports.
fn ctl(etcd: &str, args: &[&str]) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ctl", "--endpoints", etcd])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ctl {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap_or_default();
    v["revision"].as_u64().unwrap_or(0)
}

fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(2));
    }
    start.elapsed()
}

#[test]
fn routing_from_etcd_written_by_ctl_end_to_end() {
    let mut etcd = Etcd::start();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let sluice = start_sluice(dir.path(), &ep);
    let r1 = replica("r1");

    // Unknown domain: the same 503 as a server without replicas.
    assert_eq!(get(sluice.proxy, HOST, "/").unwrap().0, 503);

    // Create with ctl; the generation fence returns once the replica is routable.
    ctl(&ep, &["server", "put", "--id", "hello", "--label", "hello", "--unauthenticated"]);
    let rev = ctl(
        &ep,
        &["replica", "put", "--server", "hello", "--id", "r1", "--address", &r1.to_string()],
    );
    let committed = Instant::now();
    let fence =
        get(sluice.admin, "admin", &format!("/generation?wait={rev}&timeout=5000")).unwrap();
    assert_eq!(fence.0, 200, "fence: {fence:?}");
    let first = get(sluice.proxy, HOST, "/").unwrap();
    let routable = committed.elapsed();
    assert_eq!(first, (200, "r1\n".to_owned()));
    eprintln!("ctl commit -> fence -> first 200: {routable:?}");
    assert!(routable < Duration::from_millis(500), "commit to routable took {routable:?}");

    // Replica churn under a steady request loop: no request to a remaining replica fails.
    let r2 = replica("r2");
    let rev = ctl(
        &ep,
        &["replica", "put", "--server", "hello", "--id", "r2", "--address", &r2.to_string()],
    );
    assert_eq!(
        get(sluice.admin, "admin", &format!("/generation?wait={rev}&timeout=5000")).unwrap().0,
        200
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, proxy) = (stop.clone(), ok.clone(), failed.clone(), sluice.proxy);
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match get(proxy, HOST, "/") {
                    Some((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    until("load running", Duration::from_secs(10), || ok.load(Ordering::Relaxed) >= 50);
    ctl(&ep, &["replica", "delete", "hello", "r1"]);
    until("only r2 answers", Duration::from_secs(5), || {
        get(sluice.proxy, HOST, "/").map(|r| r.1) == Some("r2\n".into())
    });
    let seen = ok.load(Ordering::Relaxed);
    until("more load after the removal", Duration::from_secs(10), || {
        ok.load(Ordering::Relaxed) >= seen + 50
    });
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during replica churn");

    // etcd goes away: the last snapshot keeps serving and the store reports stale.
    etcd.kill();
    assert_eq!(get(sluice.proxy, HOST, "/").unwrap().0, 200);
    until("store reported stale", Duration::from_secs(15), || {
        get(sluice.admin, "admin", "/store").map(|r| r.0) == Some(503)
    });
    assert_eq!(get(sluice.proxy, HOST, "/").unwrap(), (200, "r2\n".to_owned()));
    // /readyz says so (and stays ready: a store outage must not take every node out).
    let ready = get(sluice.admin, "admin", "/readyz").unwrap();
    assert_eq!(ready.0, 200);
    assert!(ready.1.contains("store: ") && ready.1.contains("stale"), "{}", ready.1);
    let metrics = get(sluice.admin, "admin", "/metrics").unwrap().1;
    assert!(metrics.contains("sluice_store_stale 1"), "store staleness missing from /metrics");
    assert!(metrics.contains("sluice_bpf_feature_available{"), "probe state missing from /metrics");

    // Back: the source reconnects, and a change made now arrives.
    etcd.restart().unwrap();
    until("store fresh again", Duration::from_secs(20), || {
        get(sluice.admin, "admin", "/store").map(|r| r.0) == Some(200)
    });
    let rev = ctl(&ep, &["server", "delete", "hello"]);
    assert!(rev > 0);
    let gone = until("deleted server answers 503", Duration::from_secs(5), || {
        get(sluice.proxy, HOST, "/").map(|r| r.0) == Some(503)
    });
    eprintln!("ctl delete -> 503: {gone:?}");

    // /state shows what is routed, with secrets redacted.
    let state = get(sluice.admin, "admin", "/state").unwrap();
    assert_eq!(state.0, 200);
    assert!(!state.1.contains("sha256:"), "a secret hash leaked into /state");
}

/// `sluice ctl` against an etcd that serves TLS and requires client certificates: the
/// flags' environment fallbacks carry the CA and the client identity; without them the
/// write fails and says where it tried.
#[test]
fn ctl_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = sluice_tests::etcd::TestPki::write(dir.path());
    let etcd = Etcd::start_tls(pki.server_tls(true));
    let put = ["server", "put", "--id", "tls1", "--label", "tls1", "--unauthenticated"];
    let run = |env: &[(&str, &std::path::Path)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["ctl", "--endpoints", &etcd.endpoint()]).args(put).env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let refused = run(&[]);
    assert!(!refused.status.success(), "a write without the CA succeeded");
    assert!(String::from_utf8_lossy(&refused.stderr).contains(&etcd.endpoint()));
    let ok = run(&[
        ("SLUICE_ETCD_CA_FILE", &pki.ca),
        ("SLUICE_ETCD_CERT_FILE", &pki.client_cert),
        ("SLUICE_ETCD_KEY_FILE", &pki.client_key),
    ]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let get = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ctl", "--endpoints", &etcd.endpoint(), "--ca-file"])
        .arg(&pki.ca)
        .arg("--cert-file")
        .arg(&pki.client_cert)
        .arg("--key-file")
        .arg(&pki.client_key)
        .args(["server", "get", "tls1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&get.stdout).contains("\"tls1\""), "{get:?}");
}
