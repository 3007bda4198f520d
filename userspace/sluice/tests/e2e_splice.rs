//! End to end through the real binary: a WebSocket through `sluice run` whose two legs
//! are plaintext TCP is spliced in the kernel after the 101. 10,000 messages echo
//! byte-exact, and the kernel's counters show it carried the payload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, time::Duration};

use futures_util::{SinkExt, StreamExt};
use sluice_tests::process::{SluiceProcess, http_get};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const HOST: &str = "hello.r1.example.test";

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

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_spliced_in_the_kernel_and_echoes_10k_messages() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\n\
             splice = \"always\"\n\
         [[replicas]]\nserver = \"hello\"\nid = \"r1\"\naddress = \"{replica}\"\nprotocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let rest = "[node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n";
    let sluice = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), &dir, rest)
    })
    .await
    .unwrap();
    let (proxy, admin) = (sluice.proxy, sluice.admin);

    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut req = format!("ws://{HOST}/ws").into_client_request().unwrap();
    req.headers_mut().insert("host", HOST.parse().unwrap());
    let (mut ws, resp) =
        tokio_tungstenite::client_async(req, tcp).await.expect("upgrade through sluice");
    assert_eq!(resp.status(), 101);

    let mut payload = 0u64;
    for i in 0..10_000usize {
        let len = 1 + (i * 7919) % 300;
        let msg = if i % 2 == 0 {
            Message::binary((0..len).map(|j| ((i + j * 13) % 256) as u8).collect::<Vec<u8>>())
        } else {
            Message::text("x".repeat(len))
        };
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back, msg, "message {i} corrupted");
        payload += len as u64;
    }
    ws.close(None).await.unwrap();

    let metrics = tokio::task::spawn_blocking(move || http_get(admin, "admin", "/metrics"))
        .await
        .unwrap()
        .unwrap()
        .1;
    let spliced =
        metric(&metrics, "sluice_bpf_splice_bytes_total").expect("splice counter exported");
    eprintln!("payload {payload} bytes each way; kernel spliced {spliced} bytes (frames included)");
    // Every frame went through the kernel, both ways: at least twice the payload.
    assert!(spliced >= 2 * payload, "spliced {spliced} < 2 x {payload}: userspace carried payload");
    drop(sluice);
}

// ---- Splice policy, behaviour probe fallback and restart safety ----

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Writes routes for one server with `splice = "<mode>"` and starts sluice with `env`
/// (and, optionally, a given pin directory).
async fn start_sluice(
    dir: &Path,
    replica: std::net::SocketAddr,
    mode: &str,
    env: &'static [(&'static str, &'static str)],
    pin_dir: Option<std::path::PathBuf>,
) -> SluiceProcess {
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[[servers]]\nid = \"hello\"\nlabel = \"hello\"\nunauthenticated = true\nsplice = \"{mode}\"\n\
             [[replicas]]\nserver = \"hello\"\nid = \"r1\"\naddress = \"{replica}\"\nprotocol = \"http1\"\n"
        ),
    )
    .unwrap();
    let rest = "[node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n";
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        SluiceProcess::start_with(Path::new(env!("CARGO_BIN_EXE_sluice")), &dir, rest, env, pin_dir)
    })
    .await
    .unwrap()
}

/// Upgrades through sluice, retrying while the replica is not routable yet (its first
/// health check may still be under way right after start-up).
async fn ws_connect(proxy: std::net::SocketAddr) -> Ws {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
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
                assert!(tokio::time::Instant::now() < deadline, "upgrade through sluice: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// `n` echoed messages of `len(i)` bytes, checked byte-exact; returns the payload sent.
async fn echo_messages(ws: &mut Ws, n: usize, len: impl Fn(usize) -> usize) -> u64 {
    let mut payload = 0u64;
    for i in 0..n {
        let l = len(i);
        let msg = Message::binary((0..l).map(|j| ((i + j * 13) % 256) as u8).collect::<Vec<u8>>());
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(back, msg, "message {i} corrupted");
        payload += l as u64;
    }
    payload
}

async fn get(admin: std::net::SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(admin, "admin", path)).await.unwrap().unwrap()
}

async fn spliced_bytes(admin: std::net::SocketAddr) -> u64 {
    metric(&get(admin, "/metrics").await.1, "sluice_bpf_splice_bytes_total")
        .expect("splice counter exported")
}

async fn decisions(admin: std::net::SocketAddr, label: &str) -> u64 {
    let name = format!("sluice_splice_decisions_total{{decision=\"{label}\"}}");
    metric(&get(admin, "/metrics").await.1, &name).unwrap_or(0)
}

/// Polls until the `label` decision count reaches `want` (decisions of streams that
/// end in userspace are counted when the stream ends).
async fn wait_decisions(admin: std::net::SocketAddr, label: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = decisions(admin, label).await;
        if got >= want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{label} decisions {got} < {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_never_relays_10k_messages_in_userspace() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let sluice = start_sluice(dir.path(), replica, "never", &[], None).await;
    let before = spliced_bytes(sluice.admin).await;
    let mut ws = ws_connect(sluice.proxy).await;
    echo_messages(&mut ws, 10_000, |i| 1 + (i * 7919) % 300).await;
    ws.close(None).await.unwrap();
    assert_eq!(
        spliced_bytes(sluice.admin).await,
        before,
        "the kernel carried bytes of a never stream"
    );
    wait_decisions(sluice.admin, "never", 1).await;
    assert_eq!(decisions(sluice.admin, "always").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_probe_failure_falls_back_to_userspace_and_is_named() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    // Even `always` cannot splice once the behaviour probe failed.
    let sluice =
        start_sluice(dir.path(), replica, "always", &[("SLUICE_PROBE_FAIL", "echo")], None).await;
    let (code, readyz) = get(sluice.admin, "/readyz").await;
    assert_eq!(code, 200, "{readyz}");
    assert!(readyz.contains("splice: disabled") && readyz.contains("echo failed"), "{readyz}");
    let bpf: serde_json::Value = serde_json::from_str(&get(sluice.admin, "/bpf").await.1).unwrap();
    assert_eq!(bpf["splice"], "disabled", "{bpf}");
    let echo = bpf["behaviour"]["checks"].as_array().unwrap().iter().find(|c| c["check"] == "echo");
    assert_eq!(echo.unwrap()["status"], "failed", "{bpf}");
    // `sluice bpf status` runs the same probe (with the same knob) and names it too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bpf", "status"])
        .env("SLUICE_PROBE_FAIL", "echo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("behaviour check failed: echo"), "{text}");

    let before = spliced_bytes(sluice.admin).await;
    let mut ws = ws_connect(sluice.proxy).await;
    echo_messages(&mut ws, 10_000, |i| 1 + (i * 7919) % 300).await;
    ws.close(None).await.unwrap();
    assert_eq!(spliced_bytes(sluice.admin).await, before, "spliced despite the failed probe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_splices_small_interactive_messages_and_keeps_bulk_in_userspace() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let sluice = start_sluice(dir.path(), replica, "auto", &[], None).await;

    // Bulk: 64 KiB messages stay on the userspace relay.
    let before = spliced_bytes(sluice.admin).await;
    let mut ws = ws_connect(sluice.proxy).await;
    let bulk = echo_messages(&mut ws, 100, |_| 64 * 1024).await;
    assert_eq!(spliced_bytes(sluice.admin).await, before, "bulk stream was spliced");
    ws.close(None).await.unwrap();
    drop(ws);
    wait_decisions(sluice.admin, "auto_userspace", 1).await;
    assert_eq!(decisions(sluice.admin, "auto_spliced").await, 0);

    // Interactive: small messages are spliced once the policy has seen a window.
    let before = spliced_bytes(sluice.admin).await;
    let mut ws = ws_connect(sluice.proxy).await;
    let small = echo_messages(&mut ws, 2_000, |i| 1 + (i * 7919) % 200).await;
    let spliced = spliced_bytes(sluice.admin).await - before;
    eprintln!("bulk {bulk} B each way in userspace; small {small} B each way, {spliced} B spliced");
    assert_eq!(decisions(sluice.admin, "auto_spliced").await, 1);
    // Only the first window went through userspace: most of the payload was spliced.
    assert!(spliced >= small, "spliced {spliced} < {small}: the small stream stayed in userspace");
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_reuses_the_pin_dir_and_splices() {
    sluice_tests::require_root!();
    let replica = echo_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let first = start_sluice(dir.path(), replica, "always", &[], None).await;
    // A spliced stream open at the moment of the crash: its sockets sit in the
    // sockhash the pins keep alive.
    let mut ws = ws_connect(first.proxy).await;
    echo_messages(&mut ws, 100, |i| 1 + i % 100).await;
    let pin_dir = tokio::task::spawn_blocking(move || first.kill_hard()).await.unwrap();
    assert!(std::fs::read_dir(&pin_dir).map(|d| d.count() > 0).unwrap_or(false), "no stale pins");
    drop(ws);

    let second = start_sluice(dir.path(), replica, "always", &[], Some(pin_dir)).await;
    let (_, readyz) = get(second.admin, "/readyz").await;
    assert!(readyz.contains("splice: enabled"), "{readyz}");
    let before = spliced_bytes(second.admin).await;
    let mut ws = ws_connect(second.proxy).await;
    let payload = echo_messages(&mut ws, 1_000, |i| 1 + (i * 7919) % 300).await;
    let spliced = spliced_bytes(second.admin).await - before;
    assert!(spliced >= 2 * payload, "spliced {spliced} < 2 x {payload} after the restart");
    ws.close(None).await.unwrap();
}

/// A replica that does the WebSocket handshake, then treats the stream as raw bytes:
/// frames would put tungstenite's (debug-build) framing cost into a relay benchmark.
/// Echoes everything; `u64::MAX` is never sent, so it runs until the client closes.
async fn raw_echo_replica() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let s = ws.get_mut();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Relay benchmark, run by hand (`cargo test -p sluice --test e2e_splice -- --ignored
/// --nocapture splice_policy_benchmark`): per mode, the median 64 B round trip and the
/// echo throughput of a 1 KiB-write bulk stream. `auto` must never be slower than
/// `never` (userspace) on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand"]
async fn splice_policy_benchmark() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sluice_tests::require_root!();
    let replica = raw_echo_replica().await;
    for mode in ["never", "auto", "always"] {
        let dir = tempfile::tempdir().unwrap();
        let sluice = start_sluice(dir.path(), replica, mode, &[], None).await;
        // Latency: 64 B round trips (the first 100 warm up, and let `auto` decide).
        let mut ws = ws_connect(sluice.proxy).await;
        let s = ws.get_mut();
        s.set_nodelay(true).unwrap();
        let (msg, mut back) = ([7u8; 64], [0u8; 64]);
        let mut rtts = Vec::new();
        for i in 0..3_000 {
            let t = std::time::Instant::now();
            s.write_all(&msg).await.unwrap();
            s.read_exact(&mut back).await.unwrap();
            if i >= 100 {
                rtts.push(t.elapsed());
            }
        }
        rtts.sort();
        let p50 = rtts[rtts.len() / 2];
        drop(ws);
        // Bulk: 64 MiB written in 1 KiB writes, echoed back, read concurrently.
        let mut ws = ws_connect(sluice.proxy).await;
        let (mut r, mut w) = ws.get_mut().split();
        const TOTAL: usize = 64 << 20;
        let t = std::time::Instant::now();
        let writer = async {
            let chunk = [1u8; 1024];
            for _ in 0..TOTAL / 1024 {
                w.write_all(&chunk).await.unwrap();
            }
        };
        let reader = async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < TOTAL {
                got += r.read(&mut buf).await.unwrap();
            }
        };
        tokio::join!(writer, reader);
        let secs = t.elapsed().as_secs_f64();
        drop(ws);
        let spliced = decisions(sluice.admin, "auto_spliced").await;
        eprintln!(
            "{mode:>6}: 64 B round trip p50 {p50:?}; bulk echo {:.0} MB/s; auto_spliced {spliced}",
            TOTAL as f64 / secs / 1e6
        );
    }
}

/// A WebSocket to a replica that goes draining is ended at its `drain_deadline`, spliced
/// in the kernel or relayed in userspace alike, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_a_draining_replica_ends_at_its_deadline() {
    sluice_tests::require_root!();
    for mode in ["always", "never"] {
        let replica = echo_replica().await;
        let dir = tempfile::tempdir().unwrap();
        let sluice = start_sluice(dir.path(), replica, mode, &[], None).await;
        let mut ws = ws_connect(sluice.proxy).await;
        echo_messages(&mut ws, 100, |i| 1 + i % 50).await;
        if mode == "always" {
            assert!(spliced_bytes(sluice.admin).await > 0, "the stream is spliced");
        }
        // Draining, the deadline two seconds ahead (the store keeps whole seconds).
        let at = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(2),
        )
        .to_string();
        let deadline = humantime::parse_rfc3339(&at).unwrap();
        let routes = std::fs::read_to_string(dir.path().join("routes.toml")).unwrap();
        let routes = format!("{routes}state = \"draining\"\ndrain_deadline = \"{at}\"\n");
        let tmp = dir.path().join(".routes.tmp");
        std::fs::write(&tmp, routes).unwrap();
        std::fs::rename(&tmp, dir.path().join("routes.toml")).unwrap();
        // The stream echoes on until the deadline, then ends (close, EOF or an error).
        let t0 = std::time::Instant::now();
        let ended = loop {
            if ws.send(Message::binary(vec![1u8; 8])).await.is_err() {
                break t0.elapsed();
            }
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(m))) if m.is_binary() => {}
                Ok(_) => break t0.elapsed(),
                Err(_) => panic!("{mode}: no echo and no end within 10 s"),
            }
            assert!(t0.elapsed() < Duration::from_secs(15), "{mode}: never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(std::time::SystemTime::now() >= deadline, "{mode}: ended before the deadline");
        eprintln!("{mode}: ended {ended:?} after the drain was written");
        let admin = sluice.admin;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let cut = metric(
                &get(admin, "/metrics").await.1,
                "sluice_replica_drain_deadline_cancelled_total",
            );
            if cut == Some(1) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{mode}: counted {cut:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(sluice);
    }
}
