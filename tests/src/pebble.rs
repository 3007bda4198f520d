//! A real ACME server for tests: Debian's `pebble` (package `pebble`, installed by
//! `scripts/setup.sh`), with `pebble-challtestsrv` as its DNS server so every name
//! resolves to 127.0.0.1 and the validation of an HTTP-01 challenge reaches the sluice
//! under test.
//!
//! [`Pebble::prepare`] picks free loopback ports and makes pebble's HTTPS certificate (a
//! [`crate::etcd::TestPki`], so the ACME client trusts [`Pebble::ca`]): the directory URL
//! is known before anything runs, for the config of the sluice pebble then validates
//! against. [`Pebble::start`] writes pebble's config, starts both processes and waits
//! (bounded) until the directory port listens. Dropping the value kills both.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::etcd::TestPki;
use crate::process::free_port;

/// Where Debian puts the binaries.
const PEBBLE: &str = "/usr/bin/pebble";
const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

/// A pebble and its DNS server, prepared or running.
pub struct Pebble {
    children: Vec<Child>,
    /// The ACME directory URL, `https://127.0.0.1:<port>/dir`.
    pub directory: String,
    /// The CA certificate that signed pebble's HTTPS certificate (for the ACME client).
    pub ca: PathBuf,
    pki: TestPki,
    port: u16,
    validity: Option<u64>,
    blocked: Vec<String>,
    dir: TempDir,
}

impl Pebble {
    /// Ports and certificates; nothing runs yet.
    pub fn prepare() -> Pebble {
        for bin in [PEBBLE, CHALLTESTSRV] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} missing: run scripts/setup.sh (installs Debian's pebble)"
            );
        }
        let dir = tempfile::Builder::new().prefix("sluice-pebble-").tempdir().expect("temp dir");
        let pki = TestPki::write(dir.path());
        let port = free_port();
        Pebble {
            children: Vec::new(),
            directory: format!("https://127.0.0.1:{port}/dir"),
            ca: pki.ca.clone(),
            pki,
            port,
            validity: None,
            blocked: Vec::new(),
            dir,
        }
    }

    /// Refuse orders for `domain` (pebble's `domainBlocklist`), to see orders fail.
    pub fn blocking(mut self, domain: &str) -> Pebble {
        self.blocked.push(domain.to_owned());
        self
    }

    /// Issue certificates valid for `secs` seconds (pebble's default is five years), to
    /// see renewals happen.
    pub fn with_validity(mut self, secs: u64) -> Pebble {
        self.validity = Some(secs);
        self
    }

    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1 (the sluice under test), panicking with its log if it does not listen
    /// within 20 s.
    pub fn start(&mut self, http_port: u16, tls_port: u16) {
        let (management, dns) = (free_port(), free_port());
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.port),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": self.pki.server_cert,
                "privateKey": self.pki.server_key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        if let Some(secs) = self.validity {
            config["pebble"]["certificateValidityPeriod"] = secs.into();
        }
        if !self.blocked.is_empty() {
            config["pebble"]["domainBlocklist"] = self.blocked.clone().into();
        }
        let dir = self.dir.path();
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).expect("write pebble config");
        let log =
            |name: &str| std::fs::File::create(dir.join(name)).map(Stdio::from).expect("log file");
        let child = Command::new(CHALLTESTSRV)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("spawn pebble-challtestsrv");
        self.children.push(child);
        let pebble = Command::new(PEBBLE)
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // Validate at once, and never reject a nonce: the test waits on issuance.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("spawn pebble");
        self.children.push(pebble);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills both processes and starts them again on the same ports and certificates:
    /// pebble forgets every account, order and certificate (it keeps no state).
    pub fn restart(&mut self, http_port: u16, tls_port: u16) {
        self.stop();
        self.start(http_port, tls_port);
    }

    fn stop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What pebble printed so far (for a failing assertion's message).
    pub fn log(&self) -> String {
        ["pebble.log", "pebble.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}
