//! End to end through the real binary: `sluice upgrade` replaces a running `sluice run`
//! under a steady, bounded request loop (new connection per request, pooled HTTP/1.1
//! keep-alive connections, and multiplexed h2c) with zero failed requests. The kernel steers new
//! connections to the new process; the old one drains and exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{HttpConnector, dns::Name},
    },
    rt::TokioExecutor,
};
use sluice_tests::process::{SluiceProcess, Successors, http_get, owner_pid, running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "hello.r1.example.test";
const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A keep-alive HTTP/1.1 replica answering every GET with `ok`.
async fn replica() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// Resolves every name to the proxy, so the clients' URIs carry the routed host name
/// (HTTP/2 takes it from `:authority`, not a `host` header).
#[derive(Clone)]
struct ToProxy(SocketAddr);

impl tower_service::Service<Name> for ToProxy {
    type Response = std::iter::Once<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(std::iter::once(self.0)))
    }
}

/// One request on a fresh connection; `Err` describes the failure.
fn fresh_connection_get(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.1 200") && out.ends_with("ok") {
        Ok(())
    } else {
        Err(format!("answer: {out:?}"))
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 10 {
                    errors.push(e);
                }
            }
        }
    }
}

/// Sends one GET through the pooled `client`, again if a GOAWAY refused it.
///
/// RFC 9113 §6.8: a stream above a GOAWAY's last-stream-id was never processed, so the
/// client may send it again. The pool can hand out a connection while the old process's
/// final GOAWAY is still in flight; a client that does not retry then fails a request the
/// proxy never saw. Anything else (a reset, a timeout, a 5xx) stays a failure.
async fn request_retrying_refused(
    client: &Client<HttpConnector<ToProxy>, Empty<Bytes>>,
    proxy: SocketAddr,
    refused: &AtomicU64,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut attempts = 0;
    loop {
        let req = hyper::Request::get(format!("http://{HOST}:{}/", proxy.port()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let err = match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
            Err(_) => return Err("timed out".to_owned()),
            Ok(Ok(resp)) => return Ok(resp),
            Ok(Err(e)) => e,
        };
        attempts += 1;
        if attempts > 3 || !refused_by_goaway(&err) {
            return Err(format!("request: {err:?}"));
        }
        refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether `err`'s cause is an HTTP/2 stream the peer refused with a graceful GOAWAY.
fn refused_by_goaway(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        cause = e.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_fails_no_request() {
    sluice_tests::require_root!();
    let upstream = replica().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\n\
             [[replicas]]\nserver = \"hello\"\nid = \"r1\"\naddress = \"{upstream}\"\n\
             protocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let rest = "[timeouts]\ndrain = \"10s\"\n[node]\nbase_domains = [\"example.test\"]\n\
                regions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n";
    let old = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, rest)
    })
    .await
    .unwrap();
    let (proxy, admin, old_pid) = (old.proxy, old.admin, old.pid());
    let pin_dir: PathBuf = old.pin_dir().to_owned();
    // Replica health gating: wait until the route answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fresh_connection_get(proxy).is_err() {
        assert!(Instant::now() < deadline, "route never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = sluice_dataplane::live::read(&pin_dir).steering.expect("steering maps pinned");
    assert!(before.count > 0, "the first process did not activate steering: {before:?}");
    assert_eq!(owner_pid(&pin_dir), Some(old_pid));
    let successors = Successors { pin_dir: pin_dir.clone(), old_pid };

    // A second, unintended `sluice run` on the same pin dir is refused before it binds.
    let second = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("sluice.toml"))
        .arg("--pin-dir")
        .arg(&pin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second sluice started: {stderr}");
    assert!(stderr.contains("another sluice"), "unexpected refusal: {stderr}");

    // The steady loop: 3 threads opening a connection per request, 3 tasks sharing a
    // pooled keep-alive HTTP/1.1 client, 2 tasks sharing an h2c client.
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = Arc::new(Tally::default());
    let pooled = Arc::new(Tally::default());
    let multiplexed = Arc::new(Tally::default());
    let refused = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..3 {
        let (stop, fresh) = (stop.clone(), fresh.clone());
        threads.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                fresh.record(fresh_connection_get(proxy));
            }
        }));
    }
    let connector = HttpConnector::new_with_resolver(ToProxy(proxy));
    let client = Client::builder(TokioExecutor::new()).build(connector.clone());
    // Prior-knowledge HTTP/2 (h2c): one multiplexed connection, retired by GOAWAY.
    let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build(connector);
    let mut tasks = Vec::new();
    for i in 0..5 {
        let client = if i < 3 { client.clone() } else { h2.clone() };
        let (stop, pooled, refused) = (
            stop.clone(),
            if i < 3 { pooled.clone() } else { multiplexed.clone() },
            refused.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                let res = async {
                    let resp = request_retrying_refused(&client, proxy, &refused).await?;
                    let status = resp.status();
                    let body =
                        resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
                    if status == 200 && body.to_bytes() == "ok" {
                        Ok(())
                    } else {
                        Err(format!("status {status}"))
                    }
                }
                .await;
                pooled.record(res);
            }
        }));
    }
    let total = || {
        fresh.ok.load(Ordering::Relaxed)
            + pooled.ok.load(Ordering::Relaxed)
            + multiplexed.ok.load(Ordering::Relaxed)
    };
    let wait_for = |n: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while total() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    wait_for(300).await;

    // The upgrade, mid-loop: SIGUSR2 to the old process, wait for the handover.
    let upgrade = tokio::task::spawn_blocking({
        let pin_dir = pin_dir.clone();
        move || {
            Command::new(BIN)
                .args(["upgrade", "--timeout", "20", "--pin-dir"])
                .arg(pin_dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let new_pid = owner_pid(&pin_dir);
    let out = String::from_utf8_lossy(&upgrade.stdout);
    eprintln!("sluice upgrade: {out}{}", String::from_utf8_lossy(&upgrade.stderr));
    assert!(upgrade.status.success(), "sluice upgrade failed");
    let new_pid = new_pid.unwrap();
    assert_ne!(new_pid, old_pid);
    assert!(!running(old_pid), "the old process is still running");
    assert!(running(new_pid), "the new process is not running");

    // Keep the loop going against the new process alone.
    let after_upgrade = total();
    wait_for(after_upgrade + 300).await;
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }

    let after = sluice_dataplane::live::read(&pin_dir);
    let steering = after.steering.unwrap();
    let steer = after.steer.expect("the new process's steering counters are pinned");
    let metrics = http_get(admin, "admin", "/metrics").unwrap().1;
    let served_after = total() - after_upgrade;
    eprintln!(
        "upgrade {old_pid} -> {new_pid}: fresh {} ok / {} failed, pooled h1 {} ok / {} failed, \
         h2 {} ok / {} failed, {} sent again after a GOAWAY refused them; {served_after} after \
         the handover; steering {before:?} -> {steering:?}, {steer:?}",
        fresh.ok.load(Ordering::Relaxed),
        fresh.failed.load(Ordering::Relaxed),
        pooled.ok.load(Ordering::Relaxed),
        pooled.failed.load(Ordering::Relaxed),
        multiplexed.ok.load(Ordering::Relaxed),
        multiplexed.failed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    assert_eq!(fresh.failed.load(Ordering::Relaxed), 0, "{:?}", fresh.errors.lock().unwrap());
    assert_eq!(pooled.failed.load(Ordering::Relaxed), 0, "{:?}", pooled.errors.lock().unwrap());
    assert_eq!(
        multiplexed.failed.load(Ordering::Relaxed),
        0,
        "{:?}",
        multiplexed.errors.lock().unwrap()
    );
    assert!(served_after >= 300, "the new process did not serve the loop");
    for t in [&fresh, &pooled, &multiplexed] {
        assert!(t.ok.load(Ordering::Relaxed) > 0);
    }
    assert_ne!(steering.base, before.base, "the new generation is not the active one");
    assert!(steer.selected > 0, "the kernel did not steer to the new process: {steer:?}");
    let selected = metrics.lines().find_map(|l| {
        l.strip_prefix("sluice_bpf_steer_selected_total")?.trim().parse::<u64>().ok()
    });
    assert!(selected.is_some_and(|n| n > 0), "no steering in /metrics");
    // The new process serves on its own.
    assert_eq!(http_get(proxy, HOST, "/").map(|(c, _)| c), Some(200));
    assert_eq!(successors.pids(), vec![new_pid], "exactly one new process");
    drop(successors);
    assert!(!running(new_pid), "the new process did not stop");
    drop(old);
}
