//! `sluice demo`: the embedded default config with demo replicas it starts itself.

use anyhow::{Context, Result};
use sluice_proxy::config::{CertConfig, ListenerConfig, TlsConfig};
use sluice_proxy::demo::{DemoProtocol, spawn_replica, write_self_signed};
use sluice_proxy::headers::RequestIds;
use sluice_proxy::{ProxyConfig, Server};
use sluice_routing::{
    NodeConfig, Protocol, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec, TokenSpec, hash_secret,
};

const BASE: &str = "sluice.localhost";
const REGION: &str = "local";

/// Runs the demo until Ctrl-C.
pub fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let res = rt.block_on(run());
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res
}

async fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hello_host = format!("hello.{REGION}.{BASE}");
    let private_host = format!("private.{REGION}.{BASE}");
    let wildcard = format!("*.{REGION}.{BASE}");
    let (cert_pem, key_pem) = write_self_signed(&[&wildcard, &hello_host, "localhost"], &dir)?;

    let hello_h2c = spawn_replica("hello-h2c", DemoProtocol::H2c).await?;
    let hello_h1 = spawn_replica("hello-http1", DemoProtocol::Http1).await?;
    let private_1 = spawn_replica("private-1", DemoProtocol::Http1).await?;

    let mut hello = ServerSpec::new("hello", "hello");
    hello.unauthenticated = true;
    let mut private = ServerSpec::new("private", "private");
    private.environment = "demo".into();
    let replica = |server: &str, id: &str, addr, protocol| {
        let mut r = ReplicaSpec::new(server, id, addr);
        r.protocol = protocol;
        r
    };
    let secret = RequestIds::new().next_id();
    let doc = RoutingDoc {
        servers: vec![hello, private],
        replicas: vec![
            replica("hello", "hello-h2c", hello_h2c.addr, Protocol::H2c),
            replica("hello", "hello-http1", hello_h1.addr, Protocol::Http1),
            replica("private", "private-1", private_1.addr, Protocol::Http1),
        ],
        tokens: vec![TokenSpec {
            id: "demo".into(),
            secret_hash: hash_secret(&secret),
            environments: vec!["demo".into()],
        }],
    };
    let node = NodeConfig { base_domains: vec![BASE.into()], regions: vec![REGION.into()] };
    let table = RoutingTable::from_doc(node, doc).context("demo routing document")?;

    let cfg = ProxyConfig {
        listeners: vec![
            ListenerConfig { addr: "127.0.0.1:8080".parse()?, tls: None },
            ListenerConfig {
                addr: "127.0.0.1:8443".parse()?,
                tls: Some(TlsConfig {
                    certs: vec![CertConfig {
                        names: vec![wildcard.clone(), hello_host.clone()],
                        cert_pem,
                        key_pem,
                    }],
                }),
            },
        ],
        ..ProxyConfig::default()
    };
    let server = Server::bind(cfg, table).await.context("starting the demo proxy")?;
    let admin = server.admin_addr().map(|a| a.to_string()).unwrap_or_default();

    println!(
        r#"
sluice demo is running (Ctrl-C to stop).

  plain HTTP/1.1 and h2c on 127.0.0.1:8080, TLS (self-signed) on 127.0.0.1:8443, admin on {admin}
  server "hello": replicas hello-h2c (h2c) at {h2c} and hello-http1 (HTTP/1.1) at {h1}
  server "private": replica private-1 at {p1}; token id "demo", secret "{secret}"
  (`*.localhost` resolves to 127.0.0.1 in curl, so no /etc/hosts changes are needed)

Try:
  curl http://{hello_host}:8080/
  curl --http2-prior-knowledge http://{hello_host}:8080/
  curl -k --resolve {hello_host}:8443:127.0.0.1 https://{hello_host}:8443/
  curl -k --http1.1 --resolve {hello_host}:8443:127.0.0.1 https://{hello_host}:8443/
  curl --include --no-buffer -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
       http://{hello_host}:8080/ws          # 101, then a WebSocket echo (websocat ws://{hello_host}:8080/ws to chat)
  curl -X POST --data-binary @/etc/os-release http://{hello_host}:8080/echo
  curl -H 'Sluice-Key: demo' -H 'Sluice-Secret: {secret}' http://{private_host}:8080/
  curl http://{private_host}:8080/          # 401 without the token
  curl http://{admin}/metrics
  curl --no-buffer http://{admin}/autoscaler/stream   # in-flight per server and replica, each second
"#,
        h2c = hello_h2c.addr,
        h1 = hello_h1.addr,
        p1 = private_1.addr,
    );
    let res = server.run(sluice_proxy::shutdown::signal()).await;
    let _ = std::fs::remove_dir_all(&dir);
    drop((hello_h2c, hello_h1, private_1));
    res.map_err(Into::into)
}
