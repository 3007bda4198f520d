//! End to end through the real binary: an idle HTTP/1.1 keep-alive client connection
//! survives `sluice upgrade`. The old process hands the connection to the new one
//! between two requests; a bounded request loop on that one client socket, running across
//! the upgrade, gets every answer (each naming its request), and afterwards the new
//! process serves the connection (its counters move) while the old one has exited. And a
//! refused handover (the new process claims another protocol version) falls back to the
//! drain: the old process closes the idle connection and exits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_tests::process::{
    SluiceProcess, Successors, http_get, metric, owner_pid, running, sluice_upgrade,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "hello.r1.example.test";
const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// An HTTP/1.1 replica answering each request with its path as the body, keep-alive.
async fn path_replica() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{path}",
                        path.len()
                    );
                    if tcp.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One client connection doing one request at a time.
struct Client {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// What one request on the connection got.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The status, whether the response said `connection: close`, and the body.
    Response(u16, bool, String),
    /// The connection ended (or failed) before a whole response.
    Ended,
}

impl Client {
    async fn connect(proxy: std::net::SocketAddr) -> Client {
        Client { tcp: TcpStream::connect(proxy).await.unwrap(), buf: Vec::new() }
    }

    async fn get(&mut self, path: &str) -> Answer {
        let req = format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
        if self.tcp.write_all(req.as_bytes()).await.is_err() {
            return Answer::Ended;
        }
        match tokio::time::timeout(Duration::from_secs(10), self.response()).await {
            Ok(Some(a)) => a,
            Ok(None) => Answer::Ended,
            Err(_) => panic!("{path}: no answer within 10 s"),
        }
    }

    async fn response(&mut self) -> Option<Answer> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status = head.split(' ').nth(1)?.parse().ok()?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let close =
                    head.lines().any(|l| l.starts_with("connection:") && l.contains("close"));
                while self.buf.len() < end + 4 + len {
                    self.fill().await?;
                }
                let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                self.buf.drain(..end + 4 + len);
                return Some(Answer::Response(status, close, body));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 4096];
        match self.tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }
}

async fn get(admin: std::net::SocketAddr, path: &'static str) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || http_get(admin, "admin", path)).await.unwrap()
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    get(admin, "/metrics").await.expect("metrics").1
}

/// Routes for one server on an HTTP/1.1 `replica`; the rest of the config with the given
/// drain deadline.
fn config(dir: &Path, replica: std::net::SocketAddr, drain: &str) -> String {
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\n\
             [[replicas]]\nserver = \"hello\"\nid = \"r1\"\naddress = \"{replica}\"\n\
             protocol = \"http1\"\n"
        ),
    )
    .unwrap();
    format!(
        "[timeouts]\ndrain = \"{drain}\"\n[node]\nbase_domains = [\"example.test\"]\n\
         regions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n"
    )
}

/// A first answer on a fresh connection, retrying while the replica is not routable.
async fn routed_client(proxy: std::net::SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect(proxy).await;
        match c.get("/warm").await {
            Answer::Response(200, false, body) if body == "/warm" => return c,
            other => {
                assert!(Instant::now() < deadline, "no route through sluice: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_survives_an_upgrade() {
    sluice_tests::require_root!();
    let replica = path_replica().await;
    let dir = tempfile::tempdir().unwrap();
    // A drain far longer than the test: only a handed-over connection lets the old
    // process exit in time while the loop keeps the connection in use.
    let rest = config(dir.path(), replica, "120s");
    let old = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, &rest)
    })
    .await
    .unwrap();
    let (proxy, admin, old_pid) = (old.proxy, old.admin, old.pid());
    let pin_dir: PathBuf = old.pin_dir().to_owned();
    let successors = Successors { pin_dir: pin_dir.clone(), old_pid };
    let client = routed_client(proxy).await;

    // The loop: one request at a time on the one connection (idle between them), each
    // answered with its own path, never `connection: close`, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let looping = tokio::spawn({
        let (stop, answered) = (stop.clone(), answered.clone());
        async move {
            let mut client = client;
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                assert!(Instant::now() < deadline, "the loop ran past its bound");
                let path = format!("/req/{i}");
                let got = client.get(&path).await;
                assert_eq!(got, Answer::Response(200, false, path), "request {i}");
                answered.fetch_add(1, Ordering::Relaxed);
                i += 1;
                // Idle a little between requests, as a pooled client is.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        }
    });
    let wait_answered = |n: u64| {
        let answered = answered.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while answered.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "the loop stalled at {n}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_answered(50).await;

    let new_pid = tokio::task::spawn_blocking({
        let pin_dir = pin_dir.clone();
        move || sluice_upgrade(Path::new(BIN), &pin_dir, old_pid)
    })
    .await
    .unwrap();

    // The same connection, now the new process's. The client keeps requesting while the
    // two counts are read, and the proxy counts a response as it finishes it, so one
    // request may sit between the counts at either end: the client waits for 51 answers,
    // of which the new process must have counted at least 50.
    let after_upgrade = answered.load(Ordering::Relaxed);
    let before = metric(&metrics(admin).await, "sluice_responses_total{code=\"200\"}").unwrap_or(0);
    wait_answered(after_upgrade + 51).await;
    stop.store(true, Ordering::Release);
    let mut client = looping.await.unwrap();
    let total = answered.load(Ordering::Relaxed);
    let want = before + (total - after_upgrade) - 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (served, open) = loop {
        let text = metrics(admin).await;
        let served = metric(&text, "sluice_responses_total{code=\"200\"}").unwrap_or(0);
        if served >= want || Instant::now() >= deadline {
            break (served, metric(&text, "sluice_client_connections_open"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "upgrade {old_pid} -> {new_pid}: {total} requests answered, {} after the handover; \
         new process: {before} -> {served} answered, {open:?} client connections open",
        total - after_upgrade
    );
    assert!(
        served >= want && served >= before + 50,
        "the new process does not serve the connection"
    );
    assert_eq!(open, Some(1), "the new process does not count the adopted connection");
    assert_eq!(client.get("/last").await, Answer::Response(200, false, "/last".into()));
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(admin).await, "sluice_client_connections_open") != Some(0) {
        assert!(Instant::now() < deadline, "the adopted connection's close is not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(successors.pids(), vec![new_pid], "exactly one new process");
    drop(successors);
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handover_closes_idle_connections_as_the_drain_did() {
    sluice_tests::require_root!();
    let replica = path_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let rest = config(dir.path(), replica, "3s");
    let old = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, &rest)
    })
    .await
    .unwrap();
    let (proxy, admin, old_pid) = (old.proxy, old.admin, old.pid());
    let pin_dir: PathBuf = old.pin_dir().to_owned();
    let successors = Successors { pin_dir: pin_dir.clone(), old_pid };
    let mut client = routed_client(proxy).await;
    for i in 0..20 {
        let path = format!("/req/{i}");
        assert_eq!(client.get(&path).await, Answer::Response(200, false, path));
    }

    // A takeover by a build that claims another handover protocol version (started by
    // hand, as the DaemonSet's new pod would be).
    let mut new = Command::new(BIN)
        .args(["run", "--takeover", "--config"])
        .arg(dir.path().join("sluice.toml"))
        .arg("--pin-dir")
        .arg(&pin_dir)
        .env("SLUICE_HANDOVER_VERSION", "999")
        .env("RUST_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while owner_pid(&pin_dir) != Some(new.id()) {
        assert!(Instant::now() < deadline, "the new process did not take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Today's drain: the old process closes the idle connection (it ends without a
    // byte of a response), and exits.
    let ended = tokio::time::timeout(Duration::from_secs(15), client.fill()).await;
    assert_eq!(ended.expect("the idle connection was not closed"), None, "bytes unasked for");
    let deadline = Instant::now() + Duration::from_secs(15);
    while running(old_pid) {
        assert!(Instant::now() < deadline, "the old process did not drain and exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fresh connection is the new process's; it adopted nothing.
    let mut fresh = routed_client(proxy).await;
    assert_eq!(fresh.get("/fresh").await, Answer::Response(200, false, "/fresh".into()));
    let open = metric(&metrics(admin).await, "sluice_client_connections_open");
    assert_eq!(open, Some(1), "the new process adopted a refused connection");
    drop(fresh);
    drop(successors);
    let _ = new.wait();
    drop(old);
}
