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
