//! Slow readers through the real binary (docs/proxy.md, "Memory: slow readers and the
//! allocator"): N clients each fetch a 1 MiB response but read it a few bytes every 100 ms
//! through a 4 KiB receive buffer. While they read, sluice's resident memory may grow by a
//! bounded amount per connection (the response waits in the replica's socket or HTTP/2
//! window, not in sluice); after they leave it must fall back near its baseline (the
//! allocator hands the pages back), and a second round must not ratchet it up. Over
//! HTTP/1.1 (the fast path), h2c to an h2c replica, and TLS (the hyper path with rustls).
//!
//! `SLUICE_SLOW_READERS=<n>` changes the number of clients (e.g. 1000);
//! `SLUICE_SLOW_LIMITS` and `SLUICE_SLOW_UPSTREAM` add lines to the config's `[limits]`
//! and `[upstream]` tables (to measure other bounds, e.g. the old defaults).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_tests::process::{SluiceProcess, free_port};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const HOST: &str = "slow.r1.example.test";
/// The response every replica sends.
const BODY: usize = 1 << 20;
/// A slow reader's receive buffer (SO_RCVBUF), and what it reads per tick.
const RCVBUF: u32 = 4096;
const READ_PER_TICK: usize = 64;
/// What a TLS reader reads per tick: a TLS client sees nothing of a record before all of
/// it arrived, and the first record (head and body) may be 16 KiB. Still 40 KiB/s.
const TLS_READ_PER_TICK: usize = 4096;
const TICK: Duration = Duration::from_millis(100);
/// Resident growth allowed per slow connection while they all read.
const PER_CONN_BOUND: u64 = 128 * 1024;
/// How far above the baseline RSS may stay once the clients are gone.
const RETURN_BOUND: u64 = 16 * 1024 * 1024;
/// How close to the baseline RSS is awaited (bounded) before it is checked against
/// [`RETURN_BOUND`]: reached within about a second when the allocator gives pages back.
const RETURN_TARGET: u64 = 8 * 1024 * 1024;

fn readers() -> usize {
    std::env::var("SLUICE_SLOW_READERS").ok().and_then(|v| v.parse().ok()).unwrap_or(150)
}

/// `VmRSS` of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY])
}

/// A keep-alive HTTP/1.1 replica answering every request with the 1 MiB body.
async fn h1_replica() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = body();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
                        if tcp.write_all(head.as_bytes()).await.is_err()
                            || tcp.write_all(&body).await.is_err()
                        {
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

/// An h2c replica answering every request with the 1 MiB body.
async fn h2c_replica() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = body();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let body = body.clone();
            let svc = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// A client socket that reads at most [`READ_PER_TICK`] bytes per [`TICK`]: with its
/// small receive buffer, the sender sees a window that stays shut.
struct Slow<T> {
    inner: T,
    sleep: Pin<Box<tokio::time::Sleep>>,
    budget: usize,
    per_tick: usize,
    /// Reads at full speed until set (a TLS handshake, which has its own deadline).
    slow: bool,
}

impl<T> Slow<T> {
    fn new(inner: T, per_tick: usize) -> Self {
        let sleep = Box::pin(tokio::time::sleep(TICK));
        Self { inner, sleep, budget: per_tick, per_tick, slow: true }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Slow<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.slow {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        if self.budget == 0 {
            ready!(self.sleep.as_mut().poll(cx));
            self.sleep.as_mut().reset(tokio::time::Instant::now() + TICK);
            self.budget = self.per_tick;
        }
        let n = self.budget.min(buf.remaining());
        let mut small = ReadBuf::new(buf.initialize_unfilled_to(n));
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
        let got = small.filled().len();
        buf.advance(got);
        self.budget -= got;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Slow<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection to `addr` with a [`RCVBUF`] receive buffer, read slowly.
async fn slow_connect(addr: SocketAddr, per_tick: usize) -> Slow<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(RCVBUF).unwrap();
    Slow::new(s.connect(addr).await.unwrap(), per_tick)
}

#[derive(Clone, Copy, Debug)]
enum Client {
    H1,
    H2c,
    Tls,
}

/// One slow reader: requests the body and reads it slowly until aborted (which closes
/// its connection), counting itself in `started` once the first response bytes arrived:
/// by then sluice has written all the socket takes and holds what it buffers.
async fn slow_reader(
    kind: Client,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    started: Arc<AtomicUsize>,
) {
    let request = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    match kind {
        Client::H1 | Client::Tls => {
            let per_tick = if tls.is_some() { TLS_READ_PER_TICK } else { READ_PER_TICK };
            let mut tcp = slow_connect(addr, per_tick).await;
            let mut io: Pin<Box<dyn AsyncReadWrite>> = match (kind, tls) {
                (Client::Tls, Some(tls)) => {
                    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
                    // The handshake at full speed: on a small CI machine a debug build's
                    // handshakes, read slowly, can outlast `timeouts.tls_handshake`.
                    tcp.slow = false;
                    let mut stream = tls.connect(name, tcp).await.unwrap();
                    stream.get_mut().0.slow = true;
                    Box::pin(stream)
                }
                _ => Box::pin(tcp),
            };
            io.write_all(request.as_bytes()).await.unwrap();
            // TLS: the request may sit in rustls' buffer until flushed.
            io.flush().await.unwrap();
            let mut buf = [0u8; 1024];
            let mut first = true;
            while let Ok(1..) = io.read(&mut buf).await {
                if std::mem::take(&mut first) {
                    started.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Client::H2c => {
            let io = TokioIo::new(slow_connect(addr, READ_PER_TICK).await);
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            let exchange = async move {
                let req = hyper::Request::get(format!("http://{HOST}/"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let mut body = resp.into_body();
                started.fetch_add(1, Ordering::Relaxed);
                while let Some(Ok(_)) = body.frame().await {}
            };
            // The connection is driven in this task, so aborting it closes the socket.
            tokio::select! {
                _ = conn => {}
                () = exchange => {}
            }
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// Status of one plain HTTP/1.1 request, reading only the head.
async fn status(addr: SocketAddr) -> Option<u16> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        let k = tcp.read(&mut buf[n..]).await.ok()?;
        if k == 0 {
            return None;
        }
        n += k;
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).ok()?;
            return head.split_whitespace().nth(1)?.parse().ok();
        }
    }
}

/// Full fast reads of the body, so the baseline includes the steady state of a working
/// proxy (pools, buffers once used).
async fn warm_up(addr: SocketAddr) {
    for _ in 0..8 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.unwrap();
        assert!(out.len() > BODY, "short warm-up response: {} bytes", out.len());
    }
}

/// Polls sluice's RSS until it is at most `limit` or `deadline` passes; the last value.
async fn rss_falls_to(pid: u32, limit: u64, deadline: Duration) -> (u64, Duration) {
    let start = Instant::now();
    loop {
        let now = rss(pid);
        if now <= limit || start.elapsed() > deadline {
            return (now, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(kind: Client, replica: SocketAddr, protocol: &str) {
    let n = readers();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[[servers]]\nid = \"slow\"\nlabel = \"slow\"\nunauthenticated = true\n\
             [[replicas]]\nserver = \"slow\"\nid = \"r1\"\naddress = \"{replica}\"\n\
             protocol = \"{protocol}\"\n"
        ),
    )
    .unwrap();
    sluice_demo::write_self_signed(&["*.r1.example.test"], dir.path()).unwrap();
    let tls_port = free_port();
    let rest = format!(
        "[[listeners]]\naddr = \"127.0.0.1:{tls_port}\"\n\
         tls = {{ certs = [{{ names = [\"*.r1.example.test\"], cert_pem = \"cert.pem\", \
         key_pem = \"key.pem\" }}] }}\n\
         [limits]\nmax_connections = 20000\n{}\n[upstream]\n{}\n\
         [node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n\
         [routes]\nfile = \"routes.toml\"\n",
        std::env::var("SLUICE_SLOW_LIMITS").unwrap_or_default(),
        std::env::var("SLUICE_SLOW_UPSTREAM").unwrap_or_default(),
    );
    let sluice = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || SluiceProcess::start(Path::new(BIN), &dir, &rest)
    })
    .await
    .unwrap();
    let (proxy, pid) = (sluice.proxy, sluice.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(proxy).await != Some(200) {
        assert!(Instant::now() < deadline, "route never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tls = match kind {
        Client::Tls => {
            let pem = std::fs::read(dir.path().join("cert.pem")).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile_certs(&pem) {
                roots.add(cert).unwrap();
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();

            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        }
        _ => None,
    };
    let addr = match kind {
        Client::Tls => SocketAddr::from(([127, 0, 0, 1], tls_port)),
        _ => proxy,
    };
    warm_up(proxy).await;
    // Let the workers park once the warm-up is done, so the baseline is what an idle
    // sluice holds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let baseline = rss(pid);
    eprintln!("{kind:?}: {n} slow readers; baseline RSS {} KiB", baseline / 1024);

    for round in 1..=2 {
        let started = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            tasks.push(tokio::spawn(slow_reader(kind, addr, tls.clone(), started.clone())));
            // Staggered, so a debug build's TLS handshakes on a small CI machine do not
            // pile up past `timeouts.tls_handshake`.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while started.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "{kind:?}: only {} of {n} readers got their response",
                started.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Everything the replica could push has reached sluice within milliseconds on
        // loopback; the peak over the next second is what the readers pin.
        let mut peak = 0;
        for _ in 0..10 {
            peak = peak.max(rss(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let per_conn = peak.saturating_sub(baseline) / n as u64;
        eprintln!(
            "{kind:?} round {round}: peak RSS {} KiB while reading, {} KiB per connection",
            peak / 1024,
            per_conn / 1024
        );
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let (after, took) =
            rss_falls_to(pid, baseline + RETURN_TARGET, Duration::from_secs(10)).await;
        eprintln!(
            "{kind:?} round {round}: RSS {} KiB {took:?} after the readers left",
            after / 1024
        );
        assert!(
            per_conn < PER_CONN_BOUND,
            "{kind:?} round {round}: {} KiB resident per slow reader (peak {} KiB, baseline {} KiB)",
            per_conn / 1024,
            peak / 1024,
            baseline / 1024
        );
        assert!(
            after <= baseline + RETURN_BOUND,
            "{kind:?} round {round}: RSS stayed at {} KiB after the readers left (baseline {} KiB)",
            after / 1024,
            baseline / 1024
        );
    }
    drop(sluice);
}

/// The certificates of a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).map(|c| c.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_slow_readers_are_bounded_and_memory_returns() {
    let replica = h1_replica().await;
    run(Client::H1, replica, "http1").await;
}

/// HTTP/2 clients of an HTTP/1.1 replica: what sluice buffers is its own send buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_slow_readers_of_h1_replica_are_bounded_and_memory_returns() {
    let replica = h1_replica().await;
    run(Client::H2c, replica, "http1").await;
}

/// HTTP/2 on both sides: the upstream receive windows bound what sluice holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_slow_readers_of_h2c_replica_are_bounded_and_memory_returns() {
    let replica = h2c_replica().await;
    run(Client::H2c, replica, "h2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_slow_readers_are_bounded_and_memory_returns() {
    let replica = h1_replica().await;
    run(Client::Tls, replica, "http1").await;
}
