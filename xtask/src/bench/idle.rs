//! P6: memory per idle connection. A client in this process opens N HTTP/1.1 (or h2c)
//! connections to a freshly started proxy, makes one request on each (so every
//! connection has been through the whole request path) and keeps them open; the proxy's
//! RSS growth divided by N is the cost of an idle connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
    task::JoinHandle,
    time::timeout,
};

use super::{
    Ctx, procs,
    results::{Better, Metric},
    scenarios,
    systems::Kind,
    upstream::BODY,
};

/// Connections being set up at once.
const PARALLEL: usize = 128;
/// Bound on one connection's setup + request.
const PER_CONNECTION: Duration = Duration::from_secs(10);

/// Runs P6.
pub fn p6(ctx: &mut Ctx) -> Result<()> {
    let n = ctx.plan.idle_conns;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let proxies: Vec<Kind> = ctx
        .wanted
        .iter()
        .copied()
        .filter(|k| *k != Kind::Direct && ctx.systems.iter().any(|s| s.kind == *k))
        .collect();
    for run in 0..ctx.plan.runs {
        for kind in &proxies {
            for h2 in [false, true] {
                let proto = if h2 { "h2c" } else { "HTTP/1.1" };
                let m = Metric::new(
                    "P6",
                    "-",
                    format!("memory per idle {proto} connection"),
                    "KiB",
                    Better::Lower,
                );
                let sys = match scenarios::fresh(ctx, *kind, &format!("p6-{run}-{}", u8::from(h2)))
                {
                    Ok(s) => s,
                    Err(e) => {
                        ctx.results.note("P6", format!("{kind}: cannot start: {e:#}"));
                        continue;
                    }
                };
                let Some(pid) = sys.pid() else { continue };
                let to = if h2 { sys.h2c } else { sys.h1 };
                let host = ctx.env.host.clone();
                let measured = rt.block_on(measure(pid, to, &host, n, h2));
                match measured {
                    Ok(kib) => ctx.results.add(&m, *kind, kib),
                    Err(e) => ctx.results.note("P6", format!("{kind} {proto}: run failed: {e:#}")),
                }
                if run == 0 {
                    ctx.results.note("P6", format!("{kind} {proto}: {}", sys.placement()));
                }
            }
        }
    }
    ctx.results.note(
        "P6",
        format!(
            "{n} connections per protocol, one request each, then idle; RSS growth of a fresh \
             proxy process tree / {n}; client in the harness on CPU {}",
            scenarios::CLIENT_CPU
        ),
    );
    Ok(())
}

/// An open idle connection (dropping it closes it).
enum Held {
    H1(#[allow(dead_code)] TcpStream),
    H2(#[allow(dead_code)] h2::client::SendRequest<Bytes>, JoinHandle<()>),
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Held::H2(_, task) = self {
            task.abort();
        }
    }
}

async fn measure(pid: u32, to: SocketAddr, host: &str, n: usize, h2: bool) -> Result<f64> {
    // Warm-up: upstream pool, lazily built state, allocator arenas. A fresh proxy may
    // not route yet (sluice's replica is not ready before its first health check), so
    // each warm-up request is retried until it gets its 200, within a bound.
    let mut warm = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while warm.len() < 16 {
        match timeout(PER_CONNECTION, open(to, host, h2)).await {
            Ok(Ok(held)) => warm.push(held),
            Ok(Err(e)) if tokio::time::Instant::now() > deadline => {
                return Err(e.context("warm-up connection"));
            }
            Err(_) => bail!("warm-up connection timed out"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = procs::status_kib(pid, "VmRSS:");

    let gate = Arc::new(Semaphore::new(PARALLEL));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let gate = gate.clone();
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            timeout(PER_CONNECTION, open(to, &host, h2))
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))?
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(h)) => held.push(h),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if failed > n / 100 {
        bail!("{failed} of {n} connections failed (first: {})", first_error.unwrap_or_default());
    }
    // Let the proxy finish whatever it does after a response (pool returns, buffers).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = procs::status_kib(pid, "VmRSS:");
    let kib = after.saturating_sub(before) as f64 / held.len().max(1) as f64;
    drop(held);
    Ok(kib)
}

/// Connects and makes one request; returns the open connection.
async fn open(to: SocketAddr, host: &str, h2: bool) -> Result<Held> {
    let mut tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    if !h2 {
        tcp.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        // The body is fixed and ends the response; headers vary by proxy.
        while !buf.ends_with(BODY) {
            let k = tcp.read(&mut chunk).await?;
            if k == 0 {
                bail!("closed before the response ended");
            }
            buf.extend_from_slice(&chunk[..k]);
            // Another status (a 503 before the replica is ready) never ends with the
            // upstream's body: refuse it as soon as its status line is in.
            if buf.len() >= 12 && !buf.starts_with(b"HTTP/1.1 200") {
                bail!("status line {:?}", String::from_utf8_lossy(&buf[..buf.len().min(20)]));
            }
            if buf.len() > 64 * 1024 {
                bail!("unexpected response");
            }
        }
        return Ok(Held::H1(tcp));
    }
    let (send, conn) = h2::client::handshake(tcp).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await?;
    let req = http::Request::get(format!("http://{host}/")).body(())?;
    let (resp, _) = send.send_request(req, true)?;
    let resp = resp.await?;
    if resp.status() != http::StatusCode::OK {
        task.abort();
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(Held::H2(send, task))
}
