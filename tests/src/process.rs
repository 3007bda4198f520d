//! Running the real `sluice` binary as a child process in a test: a config written to
//! a temp dir, its own pin directory (never the node's), ready-waiting on `/livez`, and
//! a SIGTERM-then-wait stop so it drains and removes its pins.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A free loopback port (bound and released: a tiny race, acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// One HTTP/1.1 request on a fresh connection: the status code and body.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// A running `sluice run`.
pub struct SluiceProcess {
    child: Child,
    /// The first client listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    pin_dir: PathBuf,
}

impl SluiceProcess {
    /// Starts `bin run` with `[[listeners]]` and `[admin]` on free ports plus `rest` (the
    /// `[node]`, routing source and other sections), and waits until `/livez` answers.
    pub fn start(bin: &Path, dir: &Path, rest: &str) -> SluiceProcess {
        let (proxy, admin) = (free_port(), free_port());
        let config = format!(
            "[[listeners]]\naddr = \"127.0.0.1:{proxy}\"\n[admin]\naddr = \"127.0.0.1:{admin}\"\n{rest}\n"
        );
        let path = dir.join("sluice.toml");
        std::fs::write(&path, config).expect("write config");
        // bpffs refuses names with a '.', so no temp-dir names here.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sluice-test-{}-{n}", std::process::id()));
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&path)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .env("RUST_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sluice");
        let s = SluiceProcess {
            child,
            proxy: ([127, 0, 0, 1], proxy).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            pin_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(s.admin, "admin", "/livez").map(|(c, _)| c) != Some(200) {
            assert!(Instant::now() < deadline, "sluice did not come up");
            thread::sleep(Duration::from_millis(20));
        }
        s
    }
}

impl SluiceProcess {
    /// The process id (of the `sluice run` this handle started).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its pin directory (on bpffs).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        // SIGTERM, so sluice drains and removes its pins; SIGKILL only if it hangs.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
