//! A real, single-member etcd for tests.
//!
//! [`Etcd::start`] runs Debian's `etcd` (package `etcd-server`, installed by
//! `scripts/setup.sh`) on free loopback ports with its data dir in a temp dir, and waits
//! (bounded) until it answers `/health`. [`Etcd::kill`] and [`Etcd::restart`] simulate an
//! outage on the same ports and data, so revisions and keys survive. Dropping the value
//! kills the process and removes the data dir.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where Debian's etcd-server package puts the binary; `SLUICE_ETCD_BIN` overrides it.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a start or restart may take before it counts as failed. etcd is ready in
/// about half a second here; the margin is for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Attempts with fresh ports when etcd cannot bind (another test took the port between
/// our probe and etcd's bind).
const START_ATTEMPTS: usize = 5;

/// Why an etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The binary is not installed.
    #[error("etcd binary not found at {0}: run scripts/setup.sh (installs Debian's etcd-server)")]
    Missing(PathBuf),
    /// Spawning, the temp dir or a port probe failed.
    #[error("etcd: {0}")]
    Io(#[from] io::Error),
    /// The process exited or never became healthy; the log tail says why.
    #[error("etcd did not become ready: {reason}\n--- etcd log (tail) ---\n{log}")]
    NotReady {
        /// What went wrong.
        reason: String,
        /// The last lines etcd printed.
        log: String,
    },
}

/// A CA, a serving certificate for 127.0.0.1 and a client certificate, written as PEM
/// files into `dir`.
pub struct TestPki {
    /// The CA certificate.
    pub ca: std::path::PathBuf,
    /// etcd's serving certificate (127.0.0.1, localhost).
    pub server_cert: std::path::PathBuf,
    /// Its key.
    pub server_key: std::path::PathBuf,
    /// A client certificate the CA signed.
    pub client_cert: std::path::PathBuf,
    /// Its key.
    pub client_key: std::path::PathBuf,
}

impl TestPki {
    /// The server side, for [`Etcd::start_tls`]; with `client_auth` etcd requires client
    /// certificates signed by the CA.
    pub fn server_tls(&self, client_auth: bool) -> EtcdServerTls {
        EtcdServerTls {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
            client_ca: client_auth.then(|| self.ca.clone()),
        }
    }

    /// Makes the certificates and writes them into `dir`.
    pub fn write(dir: &std::path::Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let ca_key = KeyPair::generate().expect("test certificate");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("test certificate");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "sluice test CA");
        let ca = ca_params.self_signed(&ca_key).expect("test certificate");
        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("test certificate");
            let mut params = CertificateParams::new(sans).expect("test certificate");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            (params.signed_by(&key, &ca, &ca_key).expect("test certificate"), key)
        };
        let (server, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "etcd",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) =
            leaf(Vec::new(), "sluice-node", ExtendedKeyUsagePurpose::ClientAuth);
        let put = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write test certificate");
            path
        };
        TestPki {
            ca: put("ca.pem", ca.pem()),
            server_cert: put("server.pem", server.pem()),
            server_key: put("server-key.pem", server_key.serialize_pem()),
            client_cert: put("client.pem", client.pem()),
            client_key: put("client-key.pem", client_key.serialize_pem()),
        }
    }

    /// The client side of TLS for the store: the CA, and the client identity if asked.
    pub fn client_tls(&self, with_identity: bool) -> sluice_store::etcd::EtcdTls {
        sluice_store::etcd::EtcdTls {
            ca_file: Some(self.ca.clone()),
            cert_file: with_identity.then(|| self.client_cert.clone()),
            key_file: with_identity.then(|| self.client_key.clone()),
            server_name: None,
        }
    }
}

/// Files for an etcd that serves TLS.
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// PEM serving certificate (valid for 127.0.0.1).
    pub cert_file: PathBuf,
    /// PEM key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA that client certificates must chain to; `None` accepts any client.
    pub client_ca: Option<PathBuf>,
}

/// A running (or deliberately killed) etcd member.
pub struct Etcd {
    bin: PathBuf,
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP port for `/health` (etcd's metrics listener), so readiness can be
    /// checked without speaking TLS.
    metrics_port: u16,
    tls: Option<EtcdServerTls>,
    starts: usize,
    // Dropped last: the data dir outlives the process.
    dir: TempDir,
}

impl Etcd {
    /// Starts etcd, panicking with a clear message if it cannot (test helper).
    pub fn start() -> Self {
        match Self::try_start() {
            Ok(etcd) => etcd,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts etcd on free loopback ports and waits until it is healthy.
    pub fn try_start() -> Result<Self, EtcdError> {
        Self::try_start_with(None)
    }

    /// Starts etcd serving TLS on its client port, with these files; with
    /// `client_ca` set it also requires client certificates signed by it.
    pub fn start_tls(tls: EtcdServerTls) -> Self {
        match Self::try_start_with(Some(tls)) {
            Ok(etcd) => etcd,
            Err(e) => panic!("{e}"),
        }
    }

    fn try_start_with(tls: Option<EtcdServerTls>) -> Result<Self, EtcdError> {
        let bin = std::env::var_os("SLUICE_ETCD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD_BIN));
        if !bin.exists() {
            return Err(EtcdError::Missing(bin));
        }
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new().prefix("sluice-etcd-").tempdir()?;
            let mut etcd = Etcd {
                bin: bin.clone(),
                child: None,
                client_port: free_port()?,
                peer_port: free_port()?,
                metrics_port: free_port()?,
                tls: tls.clone(),
                starts: 0,
                dir,
            };
            match etcd.spawn_and_wait() {
                Ok(()) => return Ok(etcd),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::NotReady {
            reason: "no start attempt".into(),
            log: String::new(),
        }))
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client URLs (one member), in the form the etcd clients take.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// The data dir (kept across [`Etcd::kill`] / [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process (SIGKILL, like a crash) and waits for it to exit. The ports are
    /// closed when this returns; a no-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir (killing it first if it is still
    /// running) and waits until it is healthy.
    pub fn restart(&mut self) -> Result<(), EtcdError> {
        self.kill();
        // The port was ours a moment ago; a test elsewhere may briefly hold it as an
        // ephemeral probe, so retry a few times before giving up.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(EtcdError::NotReady { .. }) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), EtcdError> {
        self.starts += 1;
        let log = File::options().create(true).append(true).open(self.log_path())?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen-metrics-urls").arg(&metrics);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert_file).arg("--key-file").arg(&tls.key_file);
            if let Some(ca) = &tls.client_ca {
                cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(ca);
            }
        }
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(self.not_ready(format!("etcd exited with {status}")));
            }
            if health_ok(SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(self.not_ready(format!("not healthy within {READY_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn not_ready(&self, reason: String) -> EtcdError {
        EtcdError::NotReady { reason, log: tail(&self.log_path(), 30) }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoint", &self.endpoint())
            .field("peer_port", &self.peer_port)
            .field("starts", &self.starts)
            .field("running", &self.child.is_some())
            .finish()
    }
}

/// A TCP forwarder in front of etcd (or anything) that a test can cut and restore, to
/// simulate a network partition between one client and the store while the store itself
/// stays up (so the test can keep writing to it directly, e.g. to compact it).
pub struct TcpGate {
    addr: SocketAddr,
    inner: Arc<GateInner>,
    acceptor: Option<JoinHandle<()>>,
}

struct GateInner {
    target: SocketAddr,
    open: AtomicBool,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl GateInner {
    fn close_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl TcpGate {
    /// Listen on a free loopback port and forward every connection to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(GateInner {
            target,
            open: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("tcp-gate".into())
                .spawn(move || accept_loop(listener, inner))?
        };
        Ok(TcpGate { addr, inner, acceptor: Some(acceptor) })
    }

    /// The gate's own address (give this to the client under test).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<gate port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Close every forwarded connection and refuse (accept and drop) new ones.
    pub fn cut(&self) {
        self.inner.open.store(false, Ordering::SeqCst);
        self.inner.close_all();
    }

    /// Forward new connections again.
    pub fn restore(&self) {
        self.inner.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.close_all();
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for TcpGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGate")
            .field("addr", &self.addr)
            .field("target", &self.inner.target)
            .field("open", &self.inner.open.load(Ordering::SeqCst))
            .finish()
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<GateInner>) {
    for conn in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if !inner.open.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(upstream) = TcpStream::connect_timeout(&inner.target, Duration::from_secs(1)) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let clones =
            (client.try_clone(), upstream.try_clone(), client.try_clone(), upstream.try_clone());
        let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = clones else {
            continue;
        };
        {
            let mut conns = inner.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.push(c3);
            conns.push(u3);
        }
        spawn_pipe(client, upstream);
        spawn_pipe(u2, c2);
    }
}

/// Copy `from` → `to` until EOF or error, then close both directions.
fn spawn_pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::thread::Builder::new().name("tcp-gate-pipe".into()).spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// A port that was free a moment ago.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `GET /health` with a short bounded exchange; true once etcd has a leader and serves.
fn health_ok(addr: SocketAddr) -> bool {
    let exchange = || -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut body = String::new();
        stream.take(64 * 1024).read_to_string(&mut body)?;
        Ok(body)
    };
    match exchange() {
        Ok(resp) => resp.starts_with("HTTP/1.") && resp.contains("\"health\":\"true\""),
        Err(_) => false,
    }
}

/// The last `lines` lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_kills_and_restarts() {
        let mut etcd = Etcd::start();
        assert!(health_ok(etcd.client_addr()));
        etcd.kill();
        assert!(!etcd.is_running());
        assert!(!health_ok(etcd.client_addr()));
        etcd.restart().unwrap();
        assert!(etcd.is_running());
        assert!(health_ok(etcd.client_addr()));
        let data = etcd.data_dir();
        let dir = etcd.dir.path().to_path_buf();
        drop(etcd);
        assert!(!data.exists());
        assert!(!dir.exists());
    }

    #[test]
    fn gate_forwards_cuts_and_restores() {
        let etcd = Etcd::start();
        let gate = TcpGate::start(etcd.client_addr()).unwrap();
        assert!(health_ok(gate.addr()));
        gate.cut();
        assert!(!health_ok(gate.addr()));
        gate.restore();
        assert!(health_ok(gate.addr()));
    }
}
