//! Certificates in the routing state, over real sockets: picked by SNI from the current
//! snapshot, switched when the routing file or a referenced file changes, refused when
//! bad (the previous keeps serving), and the listener's wildcard and default behind them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice_proxy::config::{CertConfig, ListenerConfig, TlsConfig};
use sluice_proxy::{Proxy, ProxyConfig};
use sluice_routing::{CertificateSpec, RoutingDoc, RoutingTable, ServerSpec};
use sluice_store::file::FileSource;
use sluice_tests::proxy_harness::*;
use sluice_tests::tls::AnyCert;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

/// A test CA that signs leaf certificates.
struct Pki {
    ca: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf: PEM chain, PEM key and the leaf's DER (what a client sees).
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "sluice store-certs test CA");
        Pki { ca: p.self_signed(&key).unwrap(), key }
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.key).unwrap();
        Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.ca.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

fn connector() -> TlsConnector {
    let provider = sluice_proxy::tls::provider();
    let c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(c))
}

/// The leaf the listener at `addr` serves for `sni` (`None`: no SNI, an IP name).
async fn served(addr: SocketAddr, sni: Option<&str>) -> std::io::Result<Vec<u8>> {
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector().connect(name, tcp).await?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// Polls until `sni` is served `want` (bounded by [`T`]).
async fn wait_served(addr: SocketAddr, sni: &str, want: &Leaf) {
    let deadline = Instant::now() + T;
    loop {
        if served(addr, Some(sni)).await.unwrap() == want.der {
            return;
        }
        assert!(Instant::now() < deadline, "{sni} never got the expected certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_pem(dir: &Path, name: &str, leaf: &Leaf) -> (std::path::PathBuf, std::path::PathBuf) {
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, &leaf.cert_pem).unwrap();
    std::fs::write(&k, &leaf.key_pem).unwrap();
    (c, k)
}

/// A TLS listener whose own certificates are `listener` (the first is the default).
fn tls_cfg(dir: &Path, listener: &[(&str, &Leaf)]) -> ProxyConfig {
    let mut c = cfg();
    let certs = listener
        .iter()
        .enumerate()
        .map(|(i, (name, leaf))| {
            let (cert_pem, key_pem) = write_pem(dir, &format!("listener{i}"), leaf);
            CertConfig { names: vec![name.to_string()], cert_pem, key_pem }
        })
        .collect();
    c.listeners = vec![ListenerConfig {
        tls: Some(TlsConfig { certs }),
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    }];
    c
}

struct Running {
    tls: SocketAddr,
    admin: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn serve(cfg: ProxyConfig, table: RoutingTable) -> Running {
    let server = Proxy::bind(cfg, table).await.unwrap();
    let (tls, admin) = (server.local_addrs()[0], server.admin_addr().unwrap());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running { tls, admin, _stop: tx }
}

fn custom_server(certs: Vec<CertificateSpec>) -> ServerSpec {
    let mut s = ServerSpec::new("custom", "custom");
    s.unauthenticated = true;
    s.custom_domains = vec!["api.custom.test".into(), "www.custom.test".into()];
    s.certificates = certs;
    s
}

/// Writes the routing file with the server carrying `certs`, atomically (by rename), so
/// the file source never reads half a file.
fn put_routes(path: &Path, certs: Vec<CertificateSpec>) {
    let doc = RoutingDoc { servers: vec![custom_server(certs)], ..RoutingDoc::default() };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, toml::to_string(&doc).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// SNI picks the certificate a server carries in the routing file; replacing it in the
/// file switches what is served without a restart (handshakes running all along never
/// fail); a bad one is refused and the previous keeps serving; removing it falls back to
/// the listener's default.
#[tokio::test]
async fn routing_file_certificate_switches_live() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let default = pki.leaf(&["*.r1.example.test"]);
    let (a, b) =
        (pki.leaf(&["api.custom.test"]), pki.leaf(&["api.custom.test", "www.custom.test"]));
    let routes = dir.path().join("routes.toml");
    put_routes(
        &routes,
        vec![CertificateSpec::inline(["api.custom.test"], &a.cert_pem, &a.key_pem)],
    );
    let table = RoutingTable::new(node());
    let source = FileSource::new(&routes).with_poll_interval(Duration::from_millis(20));
    let status = source.status();
    let (_stop_source, stop_rx) = oneshot::channel::<()>();
    source.spawn(table.clone(), async move {
        let _ = stop_rx.await;
    });
    let h = serve(tls_cfg(dir.path(), &[("*.r1.example.test", &default)]), table.clone()).await;

    wait_served(h.tls, "api.custom.test", &a).await;
    assert_eq!(served(h.tls, Some("API.custom.test")).await.unwrap(), a.der, "case-insensitive");
    // A custom domain without a certificate of its own gets the listener's default.
    assert_eq!(served(h.tls, Some("www.custom.test")).await.unwrap(), default.der);

    // Handshakes keep running while the certificate changes: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let hammer = {
        let (stop, handshakes, addr) = (stop.clone(), handshakes.clone(), h.tls);
        let (a, b) = (a.der.clone(), b.der.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let got = served(addr, Some("api.custom.test")).await.expect("handshake failed");
                assert!(got == a || got == b, "served neither the old nor the new certificate");
                handshakes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    put_routes(
        &routes,
        vec![CertificateSpec::inline(
            ["api.custom.test", "www.custom.test"],
            &b.cert_pem,
            &b.key_pem,
        )],
    );
    wait_served(h.tls, "api.custom.test", &b).await;
    wait_served(h.tls, "www.custom.test", &b).await;
    stop.store(true, Ordering::Relaxed);
    hammer.await.unwrap();
    assert!(handshakes.load(Ordering::Relaxed) > 0);

    // A key that is not the certificate's: refused, naming the server and the domain.
    let failures = status.borrow().failures;
    put_routes(
        &routes,
        vec![CertificateSpec::inline(["api.custom.test"], &a.cert_pem, &b.key_pem)],
    );
    let deadline = Instant::now() + T;
    while status.borrow().failures == failures {
        assert!(Instant::now() < deadline, "the bad certificate was never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = status.borrow().last_error.clone().unwrap();
    assert!(error.contains(r#"server "custom""#), "{error}");
    assert!(error.contains("api.custom.test"), "{error}");
    assert!(error.contains("does not match"), "{error}");
    assert!(!error.contains("PRIVATE KEY"), "key material in an error: {error}");
    assert_eq!(served(h.tls, Some("api.custom.test")).await.unwrap(), b.der, "previous serves");

    // A certificate that does not cover its domain: refused the same way.
    let other = pki.leaf(&["elsewhere.test"]);
    let failures = status.borrow().failures;
    put_routes(
        &routes,
        vec![CertificateSpec::inline(["api.custom.test"], &other.cert_pem, &other.key_pem)],
    );
    let deadline = Instant::now() + T;
    while status.borrow().failures == failures {
        assert!(Instant::now() < deadline, "the uncovering certificate was never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = status.borrow().last_error.clone().unwrap();
    assert!(error.contains(r#"does not cover "api.custom.test""#), "{error}");
    assert_eq!(served(h.tls, Some("api.custom.test")).await.unwrap(), b.der, "previous serves");

    // /state shows names, issuer, serial and expiry, never key material; the counters
    // saw the loads and the refusals.
    let state = table.load().state_view();
    let text = serde_json::to_string(&state).unwrap();
    assert!(!text.contains("PRIVATE KEY") && !text.contains("BEGIN CERTIFICATE"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cert = &v["servers"][0]["certificates"][0];
    assert_eq!(cert["domains"], serde_json::json!(["api.custom.test", "www.custom.test"]));
    assert!(cert["issuer"].as_str().unwrap().contains("sluice store-certs test CA"), "{cert}");
    assert!(cert["serial"].is_string() && cert["not_after"].is_string(), "{cert}");
    let metrics =
        raw(h.admin, b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").await;
    assert!(
        metrics
            .contains("sluice_tls_certificate_expiry_timestamp_seconds{name=\"www.custom.test\""),
        "{metrics}"
    );
    assert!(metrics.contains("source=\"store\""), "{metrics}");
    assert!(metrics.contains("sluice_tls_certificate_errors_total{reason=\"key_mismatch\"} 1"));
    assert!(metrics.contains("sluice_tls_certificate_errors_total{reason=\"name_mismatch\"} 1"));
    let reloads: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_tls_certificate_reloads_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(reloads >= 3, "listener default, a and b: {reloads}");

    // Removing the certificate falls back to the listener's default.
    put_routes(&routes, vec![]);
    wait_served(h.tls, "api.custom.test", &default).await;
}

/// Exact name (routing state, then listener), then the listener's wildcard, then its
/// default, for SNI names and for clients that send none.
#[tokio::test]
async fn wildcard_and_default_fallback() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let default = pki.leaf(&["default.example.test"]);
    let wildcard = pki.leaf(&["*.r1.example.test"]);
    let exact = pki.leaf(&["exact.r1.example.test"]);
    let store = pki.leaf(&["api.custom.test"]);
    let doc = RoutingDoc {
        servers: vec![custom_server(vec![CertificateSpec::inline(
            ["api.custom.test"],
            &store.cert_pem,
            &store.key_pem,
        )])],
        ..RoutingDoc::default()
    };
    let table = RoutingTable::from_doc(node(), doc).unwrap();
    let cfg = tls_cfg(
        dir.path(),
        &[
            ("default.example.test", &default),
            ("*.r1.example.test", &wildcard),
            ("exact.r1.example.test", &exact),
        ],
    );
    let h = serve(cfg, table).await;
    for (sni, want) in [
        (Some("api.custom.test"), &store),
        (Some("exact.r1.example.test"), &exact),
        (Some("hello.r1.example.test"), &wildcard),
        // One label only: a deeper name is not the wildcard's.
        (Some("a.b.r1.example.test"), &default),
        (Some("www.custom.test"), &default),
        (Some("unknown.test"), &default),
        (None, &default),
    ] {
        assert_eq!(served(h.tls, sni).await.unwrap(), want.der, "{sni:?}");
    }
}

/// A certificate a server names by file (a mounted Secret: files behind a `..data`
/// symlink that an update swaps) is re-read when the files change; a broken update keeps
/// the last good one.
#[tokio::test]
async fn file_referenced_certificate_is_reread() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    // The Kubernetes layout: tls.crt -> ..data/tls.crt, ..data -> ..<version>.
    let version = |name: &str, leaf: &Leaf| {
        let v = secret.join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(v.join("tls.key"), &leaf.key_pem).unwrap();
        let tmp = secret.join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, secret.join("..data")).unwrap();
    };
    let (one, two) = (pki.leaf(&["api.custom.test"]), pki.leaf(&["api.custom.test"]));
    version("..v1", &one);
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();

    let doc = RoutingDoc {
        servers: vec![custom_server(vec![CertificateSpec::files(
            ["api.custom.test"],
            secret.join("tls.crt"),
            secret.join("tls.key"),
        )])],
        ..RoutingDoc::default()
    };
    let table = RoutingTable::from_doc(node(), doc).unwrap();
    let (_stop, rx) = oneshot::channel::<()>();
    sluice_store::cert_files::spawn_watcher(table.clone(), Duration::from_millis(20), async {
        let _ = rx.await;
    });
    let default = pki.leaf(&["*.r1.example.test"]);
    let h = serve(tls_cfg(dir.path(), &[("*.r1.example.test", &default)]), table.clone()).await;
    assert_eq!(served(h.tls, Some("api.custom.test")).await.unwrap(), one.der);

    version("..v2", &two);
    wait_served(h.tls, "api.custom.test", &two).await;

    // A broken update (the key of another certificate): refused, the last good serves,
    // and /state says why.
    let broken = Leaf { key_pem: one.key_pem.clone(), ..pki.leaf(&["api.custom.test"]) };
    version("..v3", &broken);
    let deadline = Instant::now() + T;
    loop {
        let snap = table.load();
        let c = snap.certificates().next().unwrap();
        if let Some(e) = &c.error {
            assert!(e.to_string().contains("does not match"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "the broken files were never looked at");
        drop(snap);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served(h.tls, Some("api.custom.test")).await.unwrap(), two.der);
    let state = serde_json::to_value(table.load().state_view()).unwrap();
    let cert = &state["servers"][0]["certificates"][0];
    assert_eq!(cert["source"], "files");
    assert!(cert["error"].as_str().unwrap().contains("does not match"), "{cert}");

    // Fixed again: picked up.
    let three = pki.leaf(&["api.custom.test"]);
    version("..v4", &three);
    wait_served(h.tls, "api.custom.test", &three).await;
}

#[test]
fn certificate_pem_parses_back() {
    // The helper's PEM is what the routing document carries: sanity-check the round trip.
    let leaf = Pki::new().leaf(&["a.test"]);
    let der = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).next().unwrap().unwrap();
    assert_eq!(der.to_vec(), leaf.der);
}
