//! Client identity behind a trusted edge, over real sockets: PROXY v1/v2 headers from a
//! trusted peer (HTTP/1.1 fast and hyper paths, h2c, TLS), refusal of untrusted or
//! malformed headers, X-Forwarded-For from trusted prefixes, and bans of the reported
//! client that never hit the edge. The edge is 127.0.0.1; an untrusted peer is
//! 127.0.0.2 (all of 127/8 is loopback on Linux).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice_proxy::Proxy;
use sluice_proxy::config::{CertConfig, ListenerConfig, ProxyConfig, ProxyProtocol, TlsConfig};
use sluice_proxy::{encode_v1, encode_v2};
use sluice_routing::{
    Protocol, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec, TokenSpec, hash_secret,
};
use sluice_tests::proxy_harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CLIENT: &str = "203.0.113.7:4000";

/// A replica answering `<x-forwarded-for>|<x-real-ip>`.
async fn echo(proto: Protocol) -> TestReplica {
    replica(proto, |req: Request<Incoming>| async move {
        let h = req.headers();
        let get = |k: &str| h.get(k).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        Response::new(text(format!("{}|{}", get("x-forwarded-for"), get("x-real-ip"))))
    })
    .await
}

/// A connection from `local` (an address of the loopback interface).
async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(local.parse().unwrap(), 0)).unwrap();
    s.connect(to).await.unwrap()
}

fn edge_cfg(mode: ProxyProtocol) -> ProxyConfig {
    let mut c = cfg();
    c.listeners[0].proxy_protocol = mode;
    c.listeners[0].trusted_proxies = vec!["127.0.0.1/32".into()];
    c
}

async fn h1_on(tcp: TcpStream, req: Request<Empty<Bytes>>) -> Option<Response<Incoming>> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(conn);
    tokio::time::timeout(T, send.send_request(req)).await.ok()?.ok()
}

async fn h2_on<I>(io: I, req: Request<Empty<Bytes>>) -> Option<Response<Incoming>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.ok()?;
    tokio::spawn(conn);
    tokio::time::timeout(T, send.send_request(req)).await.ok()?.ok()
}

/// Sends a spoofed X-Forwarded-For too: the reported client is not trusted, so it must go.
fn spoofing_get() -> Request<Empty<Bytes>> {
    Request::builder()
        .uri("/")
        .header("host", HOST)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .body(Empty::new())
        .unwrap()
}

/// Reads until the peer closes (bounded): what a refused connection gets.
async fn read_to_close(mut tcp: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out)).await.expect("not closed").ok();
    out
}

async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let b = body_string(h1(admin, get("/metrics", "admin")).await.unwrap()).await;
    b.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_from_a_trusted_peer_name_the_client_on_h1_and_h2c() {
    // An HTTP/1.1 replica (the fast path) and an h2c one (the hyper path).
    for proto in [Protocol::Http1, Protocol::H2c] {
        let r = echo(proto).await;
        let h = start(edge_cfg(ProxyProtocol::Any), doc(&[("a", r.addr, proto)])).await;
        let dest = h.addr();
        for header in
            [encode_v1(CLIENT.parse().unwrap(), dest), encode_v2(CLIENT.parse().unwrap(), dest)]
        {
            let mut tcp = connect_from("127.0.0.1", dest).await;
            tcp.write_all(&header).await.unwrap();
            let resp = h1_on(tcp, spoofing_get()).await.expect("h1 through the edge");
            assert_eq!(body_string(resp).await, "203.0.113.7|203.0.113.7", "{proto:?} h1");

            let mut tcp = connect_from("127.0.0.1", dest).await;
            tcp.write_all(&header).await.unwrap();
            let resp = h2_on(tcp, spoofing_get()).await.expect("h2c through the edge");
            assert_eq!(body_string(resp).await, "203.0.113.7|203.0.113.7", "{proto:?} h2c");
        }
        // The header and the request in one segment (the edge's usual write).
        let mut tcp = connect_from("127.0.0.1", dest).await;
        let mut bytes = encode_v2(CLIENT.parse().unwrap(), dest);
        bytes.extend_from_slice(
            format!("GET / HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n").as_bytes(),
        );
        tcp.write_all(&bytes).await.unwrap();
        let text = String::from_utf8(read_to_close(tcp).await).unwrap();
        assert!(text.ends_with("203.0.113.7|203.0.113.7"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_precedes_tls() {
    let r = echo(Protocol::H2c).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) =
        sluice_demo::write_self_signed(&["*.r1.example.test"], dir.path()).unwrap();
    let der = CertificateDer::pem_file_iter(&cert_pem).unwrap().next().unwrap().unwrap();
    let mut c = cfg();
    c.listeners = vec![ListenerConfig {
        tls: Some(TlsConfig {
            certs: vec![CertConfig { names: vec!["*.r1.example.test".into()], cert_pem, key_pem }],
        }),
        proxy_protocol: ProxyProtocol::V2,
        trusted_proxies: vec!["127.0.0.1".into()],
        ..ListenerConfig::new("127.0.0.1:0".parse().unwrap())
    }];
    let h = start(c, doc(&[("a", r.addr, Protocol::H2c)])).await;
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut store = rustls::RootCertStore::empty();
        store.add(der.clone()).unwrap();
        let mut cc = rustls::ClientConfig::builder_with_provider(sluice_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        cc.alpn_protocols = vec![alpn.to_vec()];
        let mut tcp = connect_from("127.0.0.1", h.addr()).await;
        tcp.write_all(&encode_v2(CLIENT.parse().unwrap(), h.addr())).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .unwrap();
        let resp = if alpn == b"h2" {
            h2_on(tls, spoofing_get()).await
        } else {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            send.send_request(spoofing_get()).await.ok()
        };
        let resp = resp.expect("TLS through the edge");
        assert_eq!(body_string(resp).await, "203.0.113.7|203.0.113.7");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_missing_and_malformed_headers_are_refused() {
    let r = echo(Protocol::Http1).await;
    let h = start(edge_cfg(ProxyProtocol::V2), doc(&[("a", r.addr, Protocol::Http1)])).await;
    let dest = h.addr();
    let refused = "sluice_client_proxy_header_refused_total ";

    // An untrusted peer may not claim to speak for anyone.
    let mut tcp = connect_from("127.0.0.2", dest).await;
    let mut bytes = encode_v2(CLIENT.parse().unwrap(), dest);
    bytes.extend_from_slice(format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes());
    // One write: the refusal may reset the connection under a second one.
    let _ = tcp.write_all(&bytes).await;
    assert!(read_to_close(tcp).await.is_empty());
    assert_eq!(metric(h.admin, refused).await, 1);

    // Without a header it is served as itself.
    let tcp = connect_from("127.0.0.2", dest).await;
    let resp = h1_on(tcp, spoofing_get()).await.expect("untrusted, no header");
    assert_eq!(body_string(resp).await, "127.0.0.2|127.0.0.2");

    // The trusted edge must send one, of the configured version, well formed.
    let v1 = encode_v1(CLIENT.parse().unwrap(), dest);
    let mut bad_family = encode_v2(CLIENT.parse().unwrap(), dest);
    bad_family[13] = 0x31;
    for (i, bytes) in [
        format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n").into_bytes(),
        v1,
        bad_family,
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut tcp = connect_from("127.0.0.1", dest).await;
        let _ = tcp.write_all(&bytes).await;
        assert!(read_to_close(tcp).await.is_empty(), "case {i} was answered");
        assert_eq!(metric(h.admin, refused).await, 2 + i as u64, "case {i}");
    }
    assert_eq!(r.hits(), 1, "only the untrusted peer's plain request got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_that_never_completes_is_closed_at_header_read() {
    let r = echo(Protocol::Http1).await;
    let mut c = edge_cfg(ProxyProtocol::V1);
    c.timeouts.header_read = Duration::from_millis(200);
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    let mut tcp = connect_from("127.0.0.1", h.addr()).await;
    tcp.write_all(b"PROXY TCP4 203.0.113.7").await.unwrap();
    assert!(read_to_close(tcp).await.is_empty());
    assert_eq!(metric(h.admin, "sluice_client_proxy_header_refused_total ").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xff_from_trusted_prefixes_names_the_rightmost_untrusted_hop() {
    let r = echo(Protocol::Http1).await;
    let mut c = cfg();
    c.listeners[0].trusted_proxies = vec!["127.0.0.1".into(), "10.0.0.0/8".into()];
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    let with_xff = |xff: &'static str| {
        Request::builder()
            .uri("/")
            .header("host", HOST)
            .header("x-forwarded-for", xff)
            .header("x-real-ip", "6.6.6.6")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let tcp = connect_from("127.0.0.1", h.addr()).await;
    let resp = h1_on(tcp, with_xff("6.6.6.6, 203.0.113.9, 10.1.2.3")).await.unwrap();
    assert_eq!(
        body_string(resp).await,
        "6.6.6.6, 203.0.113.9, 10.1.2.3, 127.0.0.1|203.0.113.9",
        "the chain is extended, the client is the rightmost untrusted hop"
    );
    let tcp = connect_from("127.0.0.2", h.addr()).await;
    let resp = h1_on(tcp, with_xff("203.0.113.9")).await.unwrap();
    assert_eq!(body_string(resp).await, "127.0.0.2|127.0.0.2", "an untrusted peer's XFF goes");
}

/// One server that needs a token, one that does not, and a proxy whose auth-rejection
/// hook bans at the first failure (the threshold is the guard's business; the proxy
/// enforces what it is told).
async fn banning_proxy(mut c: ProxyConfig) -> (Harness, Arc<Mutex<Vec<IpAddr>>>, TestReplica) {
    let r = echo(Protocol::Http1).await;
    let mut open = ServerSpec::new("hello", "hello");
    open.unauthenticated = true;
    let mut locked = ServerSpec::new("locked", "locked");
    locked.environment = "prod".into();
    let doc = RoutingDoc {
        servers: vec![open, locked],
        replicas: vec![
            ReplicaSpec::new("hello", "a", r.addr),
            ReplicaSpec::new("locked", "b", r.addr),
        ],
        tokens: vec![TokenSpec {
            id: "tok".into(),
            secret_hash: hash_secret("sec"),
            environments: vec!["prod".into()],
        }],
    };
    c.admin.addr = Some("127.0.0.1:0".parse().unwrap());
    let mut server = Proxy::bind(c, RoutingTable::from_doc(node(), doc).unwrap()).await.unwrap();
    let seen: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let (s, bans) = (seen.clone(), server.bans());
    server.on_auth_rejected(Arc::new(move |ip| {
        s.lock().unwrap().push(ip);
        bans.ban(ip, Duration::from_secs(600));
    }));
    let (addrs, admin, metrics) =
        (server.local_addrs(), server.admin_addr().unwrap(), server.metrics());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let h = Harness::new(addrs, admin, metrics, tx, done);
    (h, seen, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_behind_a_proxy_header_ban_the_client_not_the_edge() {
    let (h, seen, _r) = banning_proxy(edge_cfg(ProxyProtocol::V2)).await;
    let dest = h.addr();
    let via_edge = |client: &'static str, host: &'static str| async move {
        let mut tcp = connect_from("127.0.0.1", dest).await;
        tcp.write_all(&encode_v2(client.parse().unwrap(), dest)).await.unwrap();
        let req = Request::builder().uri("/").header("host", host).body(Empty::new()).unwrap();
        h1_on(tcp, req).await.map(|r| r.status().as_u16())
    };
    let locked = "locked.r1.example.test";
    assert_eq!(via_edge("203.0.113.66:1", locked).await, Some(401));
    assert_eq!(*seen.lock().unwrap(), vec!["203.0.113.66".parse::<IpAddr>().unwrap()]);
    // The banned client is closed right after its PROXY header; the edge's other
    // clients, and the edge itself (a header naming a trusted address), are served.
    assert_eq!(via_edge("203.0.113.66:2", HOST).await, None, "banned client served");
    assert_eq!(metric(h.admin, "sluice_client_connections_denied_total ").await, 1);
    assert_eq!(via_edge("203.0.113.7:1", HOST).await, Some(200));
    assert_eq!(via_edge("127.0.0.1:9", locked).await, Some(401), "the edge's own failure");
    assert_eq!(seen.lock().unwrap().len(), 1, "a trusted edge is never reported for a ban");
    assert_eq!(via_edge("127.0.0.1:9", HOST).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_behind_xff_ban_the_client_per_request() {
    let mut c = cfg();
    c.listeners[0].trusted_proxies = vec!["127.0.0.1".into()];
    let (h, seen, _r) = banning_proxy(c).await;
    // One keep-alive connection from the edge carries every client's requests.
    let tcp = connect_from("127.0.0.1", h.addr()).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut status = async |xff: &str, host: &str| {
        let mut b = Request::builder().uri("/").header("host", host);
        if !xff.is_empty() {
            b = b.header("x-forwarded-for", xff);
        }
        send.ready().await.unwrap();
        send.send_request(b.body(Empty::<Bytes>::new()).unwrap()).await.unwrap().status().as_u16()
    };
    let locked = "locked.r1.example.test";
    assert_eq!(status("203.0.113.66", locked).await, 401);
    assert_eq!(status("203.0.113.66", HOST).await, 403, "banned client served");
    assert_eq!(status("203.0.113.7", HOST).await, 200, "another client behind the edge");
    assert_eq!(status("", locked).await, 401, "the edge's own failure");
    assert_eq!(status("", HOST).await, 200, "the edge is never banned");
    assert_eq!(*seen.lock().unwrap(), vec!["203.0.113.66".parse::<IpAddr>().unwrap()]);
    assert_eq!(metric(h.admin, "sluice_client_requests_banned_total ").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_reported_clients_are_closed_after_the_header() {
    let r = echo(Protocol::Http1).await;
    let routing = RoutingTable::from_doc(node(), doc(&[("a", r.addr, Protocol::Http1)])).unwrap();
    let mut server = Proxy::bind(edge_cfg(ProxyProtocol::V1), routing).await.unwrap();
    // What sluice's guard does with XDP attached: the edge's packets pass XDP, so only
    // the proxy can refuse a denied client behind it.
    server
        .deny_reported_clients(vec![sluice_proxy::config::Cidr::parse("198.51.100.0/24").unwrap()]);
    let (dest, admin) = (server.local_addrs()[0], server.admin_addr().unwrap());
    let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
    let _run = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let via_edge = |client: &'static str| async move {
        let mut tcp = connect_from("127.0.0.1", dest).await;
        tcp.write_all(&encode_v1(client.parse().unwrap(), dest)).await.unwrap();
        h1_on(tcp, get("/", HOST)).await.map(|r| r.status().as_u16())
    };
    assert_eq!(via_edge("198.51.100.20:1").await, None);
    assert_eq!(metric(admin, "sluice_client_connections_denied_total ").await, 1);
    assert_eq!(via_edge("203.0.113.7:1").await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_hold_over_h2c_behind_xff_and_at_accept_for_direct_peers() {
    let mut c = cfg();
    c.listeners[0].trusted_proxies = vec!["127.0.0.1".into()];
    let (h, seen, _r) = banning_proxy(c).await;
    // h2c from the edge: one connection, many clients, each judged per request.
    let tcp = connect_from("127.0.0.1", h.addr()).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut status = async |xff: &str, host: &str| {
        let req = Request::builder()
            .uri(format!("http://{host}/"))
            .header("x-forwarded-for", xff)
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await.unwrap().status().as_u16()
    };
    let locked = "locked.r1.example.test";
    assert_eq!(status("203.0.113.66", locked).await, 401);
    assert_eq!(status("203.0.113.66", HOST).await, 403);
    assert_eq!(status("203.0.113.7", HOST).await, 200);
    // A direct (untrusted) peer that fails is banned as itself and closed at accept.
    let tcp = connect_from("127.0.0.2", h.addr()).await;
    let req = Request::builder().uri("/").header("host", locked).body(Empty::new()).unwrap();
    assert_eq!(h1_on(tcp, req).await.map(|r| r.status().as_u16()), Some(401));
    let tcp = connect_from("127.0.0.2", h.addr()).await;
    assert!(h1_on(tcp, get("/", HOST)).await.is_none(), "a banned peer was served");
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["203.0.113.66".parse::<IpAddr>().unwrap(), "127.0.0.2".parse().unwrap()]
    );
    assert_eq!(metric(h.admin, "sluice_client_connections_denied_total ").await, 1);
}

/// A replica answering `<forwarded>|<x-real-ip>`.
async fn echo_forwarded(proto: Protocol) -> TestReplica {
    replica(proto, |req: Request<Incoming>| async move {
        let h = req.headers();
        let all = |k: &str| {
            h.get_all(k).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>()
        };
        Response::new(text(format!(
            "{}|{}",
            all("forwarded").join(", "),
            all("x-real-ip").join(",")
        )))
    })
    .await
}

/// RFC 7239 `Forwarded` from a trusted prefix names the client (IPv6 bracketed and
/// quoted, ports allowed) and is extended with sluice's hop; an untrusted peer's is
/// replaced, on the fast path, the hyper path and HTTP/2.
#[tokio::test]
async fn forwarded_from_trusted_prefixes_names_the_client_and_is_extended() {
    for proto in [Protocol::Http1, Protocol::H2c] {
        let r = echo_forwarded(proto).await;
        let mut c = cfg();
        c.listeners[0].trusted_proxies = vec!["127.0.0.1".into(), "10.0.0.0/8".into()];
        c.listeners[0].forwarded_header = true;
        let h = start(c, doc(&[("a", r.addr, proto)])).await;
        let with = |fwd: &'static str, te: bool| {
            let mut b = Request::builder()
                .uri("/")
                .header("host", HOST)
                .header("forwarded", fwd)
                .header("x-real-ip", "6.6.6.6");
            if te {
                b = b.header("te", "trailers"); // declined by the fast path
            }
            b.body(Empty::<Bytes>::new()).unwrap()
        };
        let chain = "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, for=10.1.2.3";
        let ours = |node: &str| format!("{node};host=\"{HOST}\";proto=http");
        let tcp = connect_from("127.0.0.1", h.addr()).await;
        let resp = h1_on(tcp, with(chain, false)).await.unwrap();
        assert_eq!(
            body_string(resp).await,
            format!("{chain}, {}|2001:db8::7", ours("for=127.0.0.1")),
            "{proto:?}: the chain is extended, the client is the rightmost untrusted hop"
        );
        let tcp = connect_from("127.0.0.1", h.addr()).await;
        let req = Request::builder()
            .uri(format!("http://{HOST}/"))
            .header("forwarded", "for=203.0.113.9;by=10.0.0.1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2_on(tcp, req).await.unwrap();
        assert_eq!(
            body_string(resp).await,
            format!("for=203.0.113.9;by=10.0.0.1, {}|203.0.113.9", ours("for=127.0.0.1")),
            "{proto:?}: h2"
        );
        let want = format!("{}|127.0.0.2", ours("for=127.0.0.2"));
        for te in [false, true] {
            let tcp = connect_from("127.0.0.2", h.addr()).await;
            let resp = h1_on(tcp, with("for=203.0.113.9", te)).await.unwrap();
            assert_eq!(body_string(resp).await, want, "{proto:?} te={te}: untrusted replaced");
        }
        let tcp = connect_from("127.0.0.2", h.addr()).await;
        let req = Request::builder()
            .uri(format!("http://{HOST}/"))
            .header("forwarded", "for=203.0.113.9")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2_on(tcp, req).await.unwrap();
        assert_eq!(body_string(resp).await, want, "{proto:?}: h2 untrusted replaced");
    }
}

/// By default (`forwarded_header` off) sluice sets no `Forwarded` of its own: a trusted
/// edge's passes as it is, and anyone else's is removed, on both HTTP/1.1 paths and
/// HTTP/2; the client is still read from the trusted edge's.
#[tokio::test]
async fn forwarded_is_not_set_by_default_and_a_clients_is_removed() {
    let r = echo_forwarded(Protocol::Http1).await;
    let mut c = cfg();
    c.listeners[0].trusted_proxies = vec!["127.0.0.1".into()];
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    let with = |fwd: &'static str, te: bool| {
        let mut b = Request::builder().uri("/").header("host", HOST).header("forwarded", fwd);
        if te {
            b = b.header("te", "trailers"); // declined by the fast path
        }
        b.body(Empty::<Bytes>::new()).unwrap()
    };
    for te in [false, true] {
        let tcp = connect_from("127.0.0.1", h.addr()).await;
        let resp = h1_on(tcp, with("for=203.0.113.9", te)).await.unwrap();
        assert_eq!(body_string(resp).await, "for=203.0.113.9|203.0.113.9", "trusted te={te}");
        let tcp = connect_from("127.0.0.2", h.addr()).await;
        let resp = h1_on(tcp, with("for=203.0.113.9", te)).await.unwrap();
        assert_eq!(body_string(resp).await, "|127.0.0.2", "untrusted te={te}");
    }
    let tcp = connect_from("127.0.0.2", h.addr()).await;
    let req = Request::builder()
        .uri(format!("http://{HOST}/"))
        .header("forwarded", "for=203.0.113.9")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h2_on(tcp, req).await.unwrap();
    assert_eq!(body_string(resp).await, "|127.0.0.2", "h2 untrusted");
}

/// An IPv6 client's own hop is written bracketed and quoted.
#[tokio::test]
async fn forwarded_names_an_ipv6_peer_quoted() {
    let r = echo_forwarded(Protocol::Http1).await;
    let mut c = cfg();
    c.listeners[0].addr = "[::1]:0".parse().unwrap();
    c.listeners[0].forwarded_header = true;
    let h = start(c, doc(&[("a", r.addr, Protocol::Http1)])).await;
    for te in [false, true] {
        let tcp = TcpStream::connect(h.addr()).await.unwrap();
        let mut b = Request::builder().uri("/").header("host", HOST);
        if te {
            b = b.header("te", "trailers");
        }
        let resp = h1_on(tcp, b.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        assert_eq!(
            body_string(resp).await,
            format!("for=\"[::1]\";host=\"{HOST}\";proto=http|::1"),
            "te={te}"
        );
    }
}

/// The same behind an edge that reports clients in RFC 7239 `Forwarded` (IPv6 client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_behind_forwarded_ban_the_client_per_request() {
    let mut c = cfg();
    c.listeners[0].trusted_proxies = vec!["127.0.0.1".into()];
    let (h, seen, _r) = banning_proxy(c).await;
    let tcp = connect_from("127.0.0.1", h.addr()).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut status = async |fwd: &str, host: &str| {
        let mut b = Request::builder().uri("/").header("host", host);
        if !fwd.is_empty() {
            b = b.header("forwarded", fwd);
        }
        send.ready().await.unwrap();
        send.send_request(b.body(Empty::<Bytes>::new()).unwrap()).await.unwrap().status().as_u16()
    };
    let locked = "locked.r1.example.test";
    let bad = "for=\"[2001:db8::66]:443\";proto=https";
    assert_eq!(status(bad, locked).await, 401);
    assert_eq!(status(bad, HOST).await, 403, "banned client served");
    assert_eq!(status("for=203.0.113.7", HOST).await, 200, "another client behind the edge");
    assert_eq!(status("", locked).await, 401, "the edge's own failure");
    assert_eq!(status("", HOST).await, 200, "the edge is never banned");
    assert_eq!(*seen.lock().unwrap(), vec!["2001:db8::66".parse::<IpAddr>().unwrap()]);
}
