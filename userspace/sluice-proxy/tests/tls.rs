//! TLS: certificates by SNI (exact and wildcard), ALPN h2 and http/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice_demo::write_self_signed;
use sluice_proxy::config::{CertConfig, ListenerConfig, TlsConfig};
use sluice_routing::{Protocol, ReplicaSpec, ServerSpec};
use sluice_tests::proxy_harness::*;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn client(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(sluice_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    TlsConnector::from(Arc::new(c))
}

fn der(path: &std::path::Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap()
}

#[tokio::test]
async fn sni_and_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    // One wildcard cert for the base domain, one exact cert for a custom domain.
    let (c1, k1) = write_self_signed(&["*.r1.example.test"], &d1).unwrap();
    let (c2, k2) = write_self_signed(&["api.custom.test"], &d2).unwrap();

    let r = hello("a", Protocol::H2c).await;
    let mut d = doc(&[("a", r.addr, Protocol::H2c)]);
    let mut s2 = ServerSpec::new("custom", "custom");
    s2.unauthenticated = true;
    s2.custom_domains = vec!["api.custom.test".into()];
    d.servers.push(s2);
    let mut rs = ReplicaSpec::new("custom", "c", r.addr);
    rs.protocol = Protocol::H2c;
    d.replicas.push(rs);

    let mut c = cfg();
    c.listeners.push(ListenerConfig {
        tls: Some(TlsConfig {
            certs: vec![
                CertConfig {
                    names: vec!["*.r1.example.test".into()],
                    cert_pem: c1.clone(),
                    key_pem: k1,
                },
                CertConfig {
                    names: vec!["api.custom.test".into()],
                    cert_pem: c2.clone(),
                    key_pem: k2,
                },
            ],
        }),
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    let h = start(c, d).await;
    let tls_addr = h.addrs[1];

    for (name, cert, alpn, want_h2) in [
        (HOST, &c1, &[b"h2".as_slice(), b"http/1.1"][..], true),
        ("api.custom.test", &c2, &[b"http/1.1".as_slice()][..], false),
        ("api.custom.test", &c2, &[][..], false),
    ] {
        let connector = client(&[der(cert)], alpn);
        let tcp = TcpStream::connect(tls_addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let negotiated = tls.get_ref().1.alpn_protocol().map(|a| a.to_vec());
        assert_eq!(
            negotiated.as_deref() == Some(b"h2".as_slice()),
            want_h2,
            "{name} {negotiated:?}"
        );
        let io = TokioIo::new(tls);
        let resp = if want_h2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::builder()
                .uri(format!("https://{name}/"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(get("/", name)).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), if want_h2 { Version::HTTP_2 } else { Version::HTTP_11 });
        let body = body_string(resp).await;
        assert!(body.starts_with("hello from a"), "{body}");
    }

    // A name no certificate covers fails the handshake.
    let connector = client(&[der(&c1)], &[b"h2"]);
    let tcp = TcpStream::connect(tls_addr).await.unwrap();
    assert!(
        connector.connect(ServerName::try_from("nope.other.test").unwrap(), tcp).await.is_err()
    );
}

/// Each served certificate's expiry is a gauge per SNI name, with its serial.
#[tokio::test]
async fn certificate_expiry_is_a_metric() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = write_self_signed(&["*.r1.example.test"], dir.path()).unwrap();
    let mut c = cfg();
    c.listeners.push(ListenerConfig {
        tls: Some(TlsConfig {
            certs: vec![CertConfig { names: vec!["*.r1.example.test".into()], cert_pem, key_pem }],
        }),
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    });
    let h = start(c, doc(&[])).await;
    let metrics =
        raw(h.admin, b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sluice_tls_certificate_expiry_timestamp_seconds{"))
        .unwrap_or_else(|| panic!("no expiry gauge in:\n{metrics}"));
    assert!(line.contains("name=\"*.r1.example.test\""), "{line}");
    assert!(line.contains("serial=\""), "{line}");
    let expiry: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    assert!(expiry > now.as_secs() as i64, "a fresh certificate expires in the future: {line}");
    assert!(metrics.contains("# TYPE sluice_tls_certificate_expiry_timestamp_seconds gauge"));
}
