//! `sluice demo`: `sluice run` on an embedded default config, plus the demo replicas it
//! starts itself. Same start-up, same admin API (`/generation`, `/state`, `/bpf`,
//! `/autoscaler/stream`, `/metrics`), and, as root, the same kernel data plane; only
//! the config is written for it (into a temporary directory) instead of read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sluice_proxy::demo::{DemoProtocol, spawn_replica_at, write_self_signed};
use sluice_proxy::headers::RequestIds;
use sluice_routing::{Protocol, ReplicaSpec, RoutingDoc, ServerSpec, TokenSpec, hash_secret};

use crate::run::RunConfig;

const BASE: &str = "sluice.localhost";
const REGION: &str = "local";

/// `sluice demo` arguments: where it listens. The defaults are what the printed
/// instructions use; tests move them to free ports.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Print the config the demo runs (`sluice.toml`, then the routing document) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Plaintext listener (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// TLS listener (self-signed certificate for `*.local.sluice.localhost`).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub https: SocketAddr,
    /// Admin listener.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// The demo's three replicas listen on this loopback port and the next two.
    #[arg(long, default_value_t = 18101)]
    pub replica_port_base: u16,
    /// Where the kernel maps are pinned: apart from a production sluice's, so the demo
    /// can run beside one.
    #[arg(long, default_value = "/sys/fs/bpf/sluice-demo")]
    pub pin_dir: PathBuf,
}

/// The demo's replicas: (server, replica id, protocol).
const REPLICAS: [(&str, &str, Protocol); 3] = [
    ("hello", "hello-h2c", Protocol::H2c),
    ("hello", "hello-http1", Protocol::Http1),
    ("private", "private-1", Protocol::Http1),
];

/// Runs the demo until Ctrl-C (or prints its config).
pub fn main(args: DemoArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    let secret = RequestIds::new().next_id();
    let replicas = replica_addrs(args.replica_port_base)?;
    let config = node_config(&args);
    let routes = routing_doc(&replicas, &secret)?;
    if args.print_config {
        print!("# sluice.toml\n{config}\n# routes.toml\n{routes}");
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let res = serve(&args, &dir, &config, &routes, &replicas, &secret);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn serve(
    args: &DemoArgs,
    dir: &Path,
    config: &str,
    routes: &str,
    replicas: &[SocketAddr],
    secret: &str,
) -> Result<()> {
    let hello_host = format!("hello.{REGION}.{BASE}");
    let wildcard = format!("*.{REGION}.{BASE}");
    write_self_signed(&[&wildcard, &hello_host, "localhost"], dir)?;
    std::fs::write(dir.join("routes.toml"), routes)?;
    std::fs::write(dir.join("sluice.toml"), config)?;
    let cfg = RunConfig::parse(config, dir).context("the demo's config")?;
    let pin_dir = args.pin_dir.clone();
    crate::run::block_on(async move {
        // Held until the proxy stops: dropping a replica stops it.
        let mut running = Vec::new();
        for ((_, id, protocol), addr) in REPLICAS.iter().zip(replicas) {
            let protocol = match protocol {
                Protocol::H2c => DemoProtocol::H2c,
                _ => DemoProtocol::Http1,
            };
            let replica = spawn_replica_at(id, protocol, *addr)
                .await
                .with_context(|| format!("demo replica {id} on {addr}"))?;
            running.push(replica);
        }
        print_instructions(args, replicas, secret);
        let res = crate::run::serve(cfg, false, pin_dir, None).await;
        drop(running);
        res
    })
}

fn replica_addrs(base: u16) -> Result<Vec<SocketAddr>> {
    (0..REPLICAS.len() as u16)
        .map(|i| {
            let port = base.checked_add(i).context("--replica-port-base too high")?;
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .collect()
}

/// The node config the demo runs: the same file format as `sluice run --config`.
fn node_config(args: &DemoArgs) -> String {
    format!(
        r#"# sluice demo: plaintext and TLS listeners on loopback, routes from routes.toml.
[[listeners]]
addr = "{http}"

[[listeners]]
addr = "{https}"
tls = {{ certs = [{{ names = ["*.{REGION}.{BASE}", "hello.{REGION}.{BASE}"], cert_pem = "cert.pem", key_pem = "key.pem" }}] }}

[admin]
addr = "{admin}"

[node]
base_domains = ["{BASE}"]
regions = ["{REGION}"]

[routes]
file = "routes.toml"
"#,
        http = args.http,
        https = args.https,
        admin = args.admin,
    )
}

/// The routing document: `hello` (open, one h2c and one HTTP/1.1 replica) and `private`
/// (needs the `demo` token).
fn routing_doc(replicas: &[SocketAddr], secret: &str) -> Result<String> {
    let mut hello = ServerSpec::new("hello", "hello");
    hello.unauthenticated = true;
    let mut private = ServerSpec::new("private", "private");
    private.environment = "demo".into();
    let replicas = REPLICAS
        .iter()
        .zip(replicas)
        .map(|((server, id, protocol), addr)| {
            let mut r = ReplicaSpec::new(*server, *id, *addr);
            r.protocol = *protocol;
            r
        })
        .collect();
    let doc = RoutingDoc {
        servers: vec![hello, private],
        replicas,
        tokens: vec![TokenSpec {
            id: "demo".into(),
            secret_hash: hash_secret(secret),
            environments: vec!["demo".into()],
        }],
    };
    toml::to_string(&doc).context("writing the demo's routing document")
}

fn print_instructions(args: &DemoArgs, replicas: &[SocketAddr], secret: &str) {
    let hello_host = format!("hello.{REGION}.{BASE}");
    let private_host = format!("private.{REGION}.{BASE}");
    let (http, https, admin) = (args.http, args.https, args.admin);
    let (h2c, h1, p1) = (replicas[0], replicas[1], replicas[2]);
    let (hp, tp) = (http.port(), https.port());
    println!(
        r#"
sluice demo is running: `sluice run` on the config `sluice demo --print-config` shows (Ctrl-C to stop).

  plain HTTP/1.1 and h2c on {http}, TLS (self-signed) on {https}, admin on {admin}
  server "hello": replicas hello-h2c (h2c) at {h2c} and hello-http1 (HTTP/1.1) at {h1}
  server "private": replica private-1 at {p1}; token id "demo", secret "{secret}"
  (`*.localhost` resolves to 127.0.0.1 in curl, so no /etc/hosts changes are needed)

Try:
  curl http://{hello_host}:{hp}/
  curl --http2-prior-knowledge http://{hello_host}:{hp}/
  curl -k --resolve {hello_host}:{tp}:127.0.0.1 https://{hello_host}:{tp}/
  curl --include --no-buffer -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
       http://{hello_host}:{hp}/ws          # 101, then a WebSocket echo
  curl -X POST --data-binary @/etc/os-release http://{hello_host}:{hp}/echo
  curl -H 'Sluice-Key: demo' -H 'Sluice-Secret: {secret}' http://{private_host}:{hp}/
  curl http://{private_host}:{hp}/          # 401 without the token
  curl http://{admin}/generation            # the routing generation being served
  curl http://{admin}/state                 # servers, replicas, in-flight
  curl http://{admin}/bpf                   # what the kernel data plane loaded (root only)
  curl http://{admin}/metrics
  curl --no-buffer http://{admin}/autoscaler/stream   # in-flight per server and replica, each second
  sudo bpftool prog show | grep -A2 sluice            # the kernel programs, when run as root
"#
    );
}
