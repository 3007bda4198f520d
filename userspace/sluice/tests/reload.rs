//! SIGHUP through the real binary: the node config is re-read and the listener's
//! certificate files take effect without a restart; an invalid reload changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use sluice_tests::process::{SluiceProcess, free_port, http_get};
use sluice_tests::tls::AnyCert;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const HOST: &str = "hello.r1.example.test";

/// The leaf certificate the TLS listener serves for [`HOST`].
async fn served(addr: SocketAddr) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(c))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Writes a fresh self-signed certificate for the listener's names; returns its DER.
fn write_cert(dir: &Path) -> Vec<u8> {
    let c = rcgen::generate_simple_self_signed(vec!["*.r1.example.test".to_owned()]).unwrap();
    // By rename, so sluice never reads half a file.
    for (name, text) in [("cert.pem", c.cert.pem()), ("key.pem", c.key_pair.serialize_pem())] {
        std::fs::write(dir.join(format!("{name}.tmp")), text).unwrap();
        std::fs::rename(dir.join(format!("{name}.tmp")), dir.join(name)).unwrap();
    }
    c.cert.der().to_vec()
}

fn hup(pid: u32) {
    assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
}

#[tokio::test]
async fn sighup_switches_the_listener_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path());
    let tls_port = free_port();
    let rest = format!(
        "[[listeners]]\naddr = \"127.0.0.1:{tls_port}\"\n\
         tls = {{ certs = [{{ names = [\"*.r1.example.test\"], cert_pem = \"cert.pem\", key_pem = \"key.pem\" }}] }}\n\
         [node]\nbase_domains = [\"example.test\"]\nregions = [\"r1\"]\n"
    );
    let sluice = SluiceProcess::start(Path::new(BIN), dir.path(), &rest);
    let tls: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    assert_eq!(served(tls).await, first);

    // New files under the same names: served after SIGHUP, without a restart.
    let second = write_cert(dir.path());
    assert_eq!(served(tls).await, first, "nothing changes before the signal");
    hup(sluice.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(tls).await != second {
        assert!(Instant::now() < deadline, "SIGHUP never switched the certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken key: the reload is refused and the last good certificate keeps serving.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let refused = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("sluice_tls_certificate_errors_total{reason=\"parse\"} "))
            .map(|v| v.parse::<u64>().unwrap())
    };
    let (_, metrics) = http_get(sluice.admin, "admin", "/metrics").unwrap();
    let before = refused(&metrics).unwrap();
    hup(sluice.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(sluice.admin, "admin", "/metrics").unwrap();
        if refused(&metrics).unwrap() > before {
            break;
        }
        assert!(Instant::now() < deadline, "the broken reload was never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served(tls).await, second);

    // A setting that needs a handover does not stop the process either.
    let third = write_cert(dir.path());
    let config = dir.path().join("sluice.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[limits]\nmax_header_bytes = 65536\n")).unwrap();
    hup(sluice.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(tls).await != third {
        assert!(Instant::now() < deadline, "the second reload never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(sluice.admin, "admin", "/livez").map(|(c, _)| c), Some(200));
}
