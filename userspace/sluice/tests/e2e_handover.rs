//! End to end through the real binary: a WebSocket spliced in the kernel survives
//! `sluice upgrade`. The old process hands the spliced pair to the new one over the
//! handover channel and exits long before its drain deadline; a bounded message loop
//! running across the upgrade sees every message echoed once, in order, both ways; and
//! the new process counts the stream in flight until it closes. And a refused handover
//! (the new process claims another protocol version) falls back to the drain.
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

use futures_util::{SinkExt, StreamExt};
use sluice_tests::process::{
    SluiceProcess, Successors, http_get, metric, owner_pid, running, sluice_upgrade,
};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const HOST: &str = "hello.r1.example.test";
const BIN: &str = env!("CARGO_BIN_EXE_sluice");

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket echo replica (HTTP/1.1 Upgrade).
async fn echo_replica() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        break;
                    }
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Upgrades through sluice, retrying while the replica is not routable yet.
async fn ws_connect(proxy: std::net::SocketAddr) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut req = format!("ws://{HOST}/ws").into_client_request().unwrap();
        req.headers_mut().insert("host", HOST.parse().unwrap());
        match tokio_tungstenite::client_async(req, tcp).await {
            Ok((ws, resp)) => {
                assert_eq!(resp.status(), 101);
                return ws;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "upgrade through sluice: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Message `i`: its number, then bytes that depend on it (so a lost, duplicated or
/// reordered message shows as a mismatch).
fn message(i: u64) -> Message {
    let len = 1 + (i as usize * 7919) % 400;
    let mut body = i.to_be_bytes().to_vec();
    body.extend((0..len).map(|j| ((i as usize + j * 13) % 256) as u8));
    Message::binary(body)
}

async fn get(admin: std::net::SocketAddr, path: &'static str) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || http_get(admin, "admin", path)).await.unwrap()
}

/// The `hello` server's in-flight count in `/state`.
async fn in_flight(admin: std::net::SocketAddr) -> Option<u64> {
    let (_, body) = get(admin, "/state").await?;
    let state: serde_json::Value = serde_json::from_str(&body).ok()?;
    state["servers"].as_array()?.iter().find(|s| s["id"] == "hello")?["in_flight"].as_u64()
}

async fn wait_in_flight(admin: std::net::SocketAddr, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = in_flight(admin).await;
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "in flight {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Routes for one server spliced `always` to `replica`; the rest of the config with the
/// given drain deadline.
fn spliced_config(dir: &Path, replica: std::net::SocketAddr, drain: &str) -> String {
    ws_config(dir, replica, drain, "always")
}

/// Routes for one server with the given splice mode on `replica`; the rest of the
/// config with the given drain deadline.
fn ws_config(dir: &Path, replica: std::net::SocketAddr, drain: &str, splice: &str) -> String {
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\n\
             splice = \"{splice}\"\n\
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

/// Whether the stream was spliced (`always`); when not, the kernel refused splicing
/// here and the caller skips: the userspace relay is not what these tests are about.
async fn spliced(admin: std::net::SocketAddr) -> bool {
    let metrics = get(admin, "/metrics").await.unwrap().1;
    let always = metric(&metrics, "sluice_splice_decisions_total{decision=\"always\"}");
    if always != Some(1) {
        eprintln!("SKIPPED: kernel splice unavailable here (decisions: {always:?})");
    }
    always == Some(1)
}

/// The loop: bursts of 8 messages, each echo checked byte-exact and in order, until
/// `stop`; it runs across the upgrade. Returns the stop flag, the echo count and the
/// task (which gives the stream back).
fn echo_loop(ws: Ws) -> (Arc<AtomicBool>, Arc<AtomicU64>, tokio::task::JoinHandle<Ws>) {
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let looping = tokio::spawn({
        let (stop, echoed) = (stop.clone(), echoed.clone());
        async move {
            let mut ws = ws;
            let mut next = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Acquire) {
                assert!(Instant::now() < deadline, "the loop ran past its bound");
                for i in next..next + 8 {
                    ws.send(message(i)).await.expect("send");
                }
                for i in next..next + 8 {
                    let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
                        .await
                        .unwrap_or_else(|_| panic!("message {i}: no echo within 10 s"))
                        .expect("stream ended")
                        .expect("websocket error");
                    assert_eq!(back, message(i), "message {i} lost, corrupted or reordered");
                    echoed.fetch_add(1, Ordering::Relaxed);
                }
                next += 8;
            }
            ws
        }
    });
    (stop, echoed, looping)
}

/// Until the loop has echoed `n` messages (bounded).
async fn wait_echoed(echoed: Arc<AtomicU64>, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while echoed.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "the loop stalled at {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `sluice upgrade` on `pin_dir` (see [`sluice_upgrade`]); the new process's pid.
async fn upgrade(pin_dir: &Path, old_pid: u32) -> u32 {
    let pin_dir = pin_dir.to_owned();
    tokio::task::spawn_blocking(move || sluice_upgrade(Path::new(BIN), &pin_dir, old_pid))
        .await
        .unwrap()
}

/// Closes the stream; the new process then ends its accounting.
async fn close(mut ws: Ws, admin: std::net::SocketAddr) {
    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    drop(ws);
    wait_in_flight(admin, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_websocket_survives_an_upgrade() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    // Relayed in userspace (never spliced); a drain far longer than the test, as above.
    let rest = ws_config(dir.path(), replica, "120s", "never");
    let old = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, &rest)
    })
    .await
    .unwrap();
    let (proxy, admin, old_pid) = (old.proxy, old.admin, old.pid());
    let pin_dir: PathBuf = old.pin_dir().to_owned();
    let successors = Successors { pin_dir: pin_dir.clone(), old_pid };
    let ws = ws_connect(proxy).await;
    wait_in_flight(admin, 1).await;
    let never = metric(
        &get(admin, "/metrics").await.unwrap().1,
        "sluice_splice_decisions_total{decision=\"never\"}",
    );
    if never != Some(1) {
        // Without the kernel data plane the proxy's own relay runs, which is not handed
        // over.
        eprintln!("SKIPPED: the node's relay is not in use here (decisions: {never:?})");
        drop(successors);
        drop(old);
        return;
    }
    let (stop, echoed, looping) = echo_loop(ws);
    wait_echoed(echoed.clone(), 400).await;
    let new_pid = upgrade(&pin_dir, old_pid).await;

    // The same stream, now relayed by the new process alone.
    let after_upgrade = echoed.load(Ordering::Relaxed);
    wait_echoed(echoed.clone(), after_upgrade + 400).await;
    stop.store(true, Ordering::Release);
    let ws = looping.await.unwrap();
    let open = metric(&get(admin, "/metrics").await.unwrap().1, "sluice_opaque_streams_open");
    let counted = in_flight(admin).await;
    eprintln!(
        "upgrade {old_pid} -> {new_pid}: {} messages echoed, {} after the handover; new \
         process: {open:?} open, {counted:?} in flight",
        echoed.load(Ordering::Relaxed),
        echoed.load(Ordering::Relaxed) - after_upgrade
    );
    assert_eq!(open, Some(1), "the new process does not count the adopted stream");
    assert_eq!(counted, Some(1), "the adopted stream is not in flight in the new process");
    close(ws, admin).await;
    assert_eq!(successors.pids(), vec![new_pid], "exactly one new process");
    drop(successors);
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_websocket_survives_an_upgrade() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    // A drain far longer than the upgrade may take: the old process can only exit in
    // time if it handed the stream over rather than waiting for it.
    let rest = spliced_config(dir.path(), replica, "120s");
    let old = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, &rest)
    })
    .await
    .unwrap();
    let (proxy, admin, old_pid) = (old.proxy, old.admin, old.pid());
    let pin_dir: PathBuf = old.pin_dir().to_owned();
    let successors = Successors { pin_dir: pin_dir.clone(), old_pid };

    let ws = ws_connect(proxy).await;
    if !spliced(admin).await {
        drop(successors);
        drop(old);
        return;
    }
    wait_in_flight(admin, 1).await;

    let (stop, echoed, looping) = echo_loop(ws);
    let wait_echoed = |n: u64| wait_echoed(echoed.clone(), n);
    wait_echoed(400).await;
    let spliced_before =
        metric(&get(admin, "/metrics").await.unwrap().1, "sluice_bpf_splice_bytes_total")
            .expect("splice counter exported");

    let new_pid = upgrade(&pin_dir, old_pid).await;

    // The same stream, now held by the new process alone.
    let after_upgrade = echoed.load(Ordering::Relaxed);
    wait_echoed(after_upgrade + 400).await;
    stop.store(true, Ordering::Release);
    let mut ws = looping.await.unwrap();
    let total = echoed.load(Ordering::Relaxed);

    let metrics = get(admin, "/metrics").await.unwrap().1;
    let spliced_after = metric(&metrics, "sluice_bpf_splice_bytes_total").unwrap();
    let open = metric(&metrics, "sluice_opaque_streams_open");
    let counted = in_flight(admin).await;
    eprintln!(
        "upgrade {old_pid} -> {new_pid}: {total} messages echoed, {} after the handover; \
         spliced bytes {spliced_before} -> {spliced_after}; new process: {open:?} open, \
         {counted:?} in flight",
        total - after_upgrade
    );
    assert_eq!(open, Some(1), "the new process does not count the adopted stream");
    assert_eq!(counted, Some(1), "the adopted stream is not in flight in the new process");
    assert!(spliced_after > spliced_before, "the kernel stopped carrying the stream");

    // Closing it: the new process's close watcher ends the pair and its accounting.
    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    drop(ws);
    wait_in_flight(admin, 0).await;
    assert_eq!(successors.pids(), vec![new_pid], "exactly one new process");
    drop(successors);
    drop(old);
}

/// One echo of message `i`: `Some(true)` when it came back intact, `None` when the
/// stream failed or ended.
async fn echo(ws: &mut Ws, i: u64) -> Option<bool> {
    let msg = message(i);
    ws.send(msg.clone()).await.ok()?;
    let back = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.ok()??;
    Some(back.ok()? == msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handover_drains_as_before() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let rest = spliced_config(dir.path(), replica, "3s");
    let old = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, &rest)
    })
    .await
    .unwrap();
    let (proxy, admin, old_pid) = (old.proxy, old.admin, old.pid());
    let pin_dir: PathBuf = old.pin_dir().to_owned();
    let successors = Successors { pin_dir: pin_dir.clone(), old_pid };
    let mut ws = ws_connect(proxy).await;
    if !spliced(admin).await {
        drop(successors);
        drop(old);
        return;
    }
    for i in 0..50 {
        assert_eq!(echo(&mut ws, i).await, Some(true), "message {i} before the takeover");
    }

    // A takeover by a build that claims another handover protocol version (started by
    // hand, as the DaemonSet's new pod would be, since `sluice upgrade` re-executes the
    // same environment).
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

    // Today's behaviour: the stream stays on the draining old process, working, until
    // the drain deadline cuts it.
    for i in 50..70 {
        assert_eq!(echo(&mut ws, i).await, Some(true), "message {i} on the draining process");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while running(old_pid) {
        assert!(Instant::now() < deadline, "the old process did not drain and exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(echo(&mut ws, 70).await, Some(true), "the stream outlived the old process");
    assert_eq!(in_flight(admin).await, Some(0), "the new process adopted a refused stream");
    drop(successors);
    let _ = new.wait();
    drop(old);
}
