//! `sluice demo`: `sluice run` on an embedded default config, plus the demo replicas it
//! starts itself. Same start-up, same admin API (`/generation`, `/state`, `/bpf`,
//! `/autoscaler/stream`, `/metrics`), and, as root, the same kernel data plane; only
//! the config is written for it (into a temporary directory) instead of read.
//!
//! Beside the proxy it runs the serverless loop in-process: the autoscaler (following
//! the demo's own `/autoscaler/stream`, writing `desired.json`) and the replica
//! supervisor (starting `sluice demo-replica` processes for the scale-from-zero server
//! `lazy`, registered in `routes/zz-supervisor.toml`), with short windows so a newcomer
//! sees `lazy` go from zero to one replica and back within half a minute.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_demo::{DemoProtocol, spawn_replica_at, write_self_signed};
use sluice_node::autoscaler::{AutoscalerSettings, DesiredSink, run_autoscaler};
use sluice_proxy::RequestIds;
use sluice_routing::model::LaunchSpec;
use sluice_routing::{Protocol, ReplicaSpec, RoutingDoc, ServerSpec, TokenSpec, hash_secret};

use sluice_dataplane::sys::ScopedCgroup;

use crate::run::RunConfig;

const BASE: &str = "sluice.localhost";
/// `hello`'s VIP, from a range no machine routes (served only inside the demo's cgroup).
const HELLO_VIP: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 255, 1), 80));
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

/// `sluice demo-replica` (hidden): one demo replica process, as the supervisor starts
/// them for the `lazy` server. Listens on `127.0.0.1:$PORT` until SIGTERM/SIGINT.
#[derive(clap::Args)]
pub struct ReplicaArgs {
    /// The name it answers with (`hello from replica <name>`).
    #[arg(long, default_value = "replica")]
    pub name: String,
    /// The variable holding the port to listen on.
    #[arg(long, default_value = sluice_routing::model::DEFAULT_PORT_ENV)]
    pub port_env: String,
}

/// Runs one demo replica until SIGTERM/SIGINT.
pub fn replica_main(args: ReplicaArgs) -> Result<()> {
    let port: u16 = std::env::var(&args.port_env)
        .with_context(|| format!("${} (the port to listen on)", args.port_env))?
        .parse()
        .with_context(|| format!("${} is not a port", args.port_env))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let _replica = spawn_replica_at(&args.name, DemoProtocol::Http1, addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!(%addr, name = %args.name, "demo replica listening");
        sluice_proxy::shutdown::signal().await;
        Ok(())
    })
}

/// The scale-from-zero server: no replica until a request asks for one.
const LAZY: &str = "lazy";
/// How long `lazy`'s demand must stay at zero before its replica goes (short, so the
/// whole loop fits in the time a newcomer watches).
const LAZY_SCALE_DOWN: Duration = Duration::from_secs(10);
/// How long `lazy`'s draining replica may keep in-flight requests before SIGTERM (it
/// gets it sooner once the proxy shows none).
const LAZY_GRACE: Duration = Duration::from_secs(2);

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
    if args.print_config {
        // What a demo started with these arguments runs: the same function, with the
        // cgroup it would make (without making it).
        let (config, routes) = demo_config(&args, planned_cgroup().as_deref(), &replicas, &secret)?;
        print!("# sluice.toml\n{config}\n# routes/demo.toml\n{routes}");
        return Ok(());
    }
    // As root, the demo moves into a cgroup of its own before it opens a socket, so the
    // local-replica redirect and the VIP programs act on its sockets (and its replicas')
    // only, never on the rest of the machine. Removed when the demo stops.
    let cgroup = demo_cgroup();
    let (config, routes) =
        demo_config(&args, cgroup.as_ref().map(ScopedCgroup::path), &replicas, &secret)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let res = serve(&args, &dir, &config, &routes, &replicas, &secret);
    let _ = std::fs::remove_dir_all(&dir);
    drop(cgroup);
    res
}

/// The demo's node config and routing document (`sluice.toml`, `routes/demo.toml`):
/// what it runs and what `--print-config` prints, both built here. `cgroup` is the
/// demo's own cgroup, when it has one (root).
fn demo_config(
    args: &DemoArgs,
    cgroup: Option<&Path>,
    replicas: &[SocketAddr],
    secret: &str,
) -> Result<(String, String)> {
    let exe = std::env::current_exe().context("finding the sluice binary for `lazy`")?;
    Ok((node_config(args, cgroup), routing_doc(replicas, secret, &exe)?))
}

/// The name of the demo's cgroup under the cgroup v2 mount: one per demo process.
fn demo_cgroup_name() -> String {
    format!("sluice-demo-{}", std::process::id())
}

/// Where [`demo_cgroup`] makes the demo's cgroup, when it may (root, cgroup v2).
fn planned_cgroup() -> Option<PathBuf> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    sluice_dataplane::sys::cgroup2_mount().ok().map(|m| m.join(demo_cgroup_name()))
}

/// The demo's own cgroup, when it may make one (root, cgroup v2), with this process in
/// it; `None`, said in one line, otherwise: the demo then serves without the
/// local-replica redirect and VIPs.
fn demo_cgroup() -> Option<ScopedCgroup> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let made = ScopedCgroup::create(&demo_cgroup_name())
        .and_then(|cg| cg.add_pid(std::process::id()).map(|()| cg));
    match made {
        Ok(cg) => Some(cg),
        Err(e) => {
            tracing::warn!(error = %e, "no cgroup of its own: the demo runs without the local-replica redirect and VIPs");
            None
        }
    }
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
    let routes_dir = dir.join("routes");
    std::fs::create_dir_all(&routes_dir)?;
    std::fs::write(routes_dir.join("demo.toml"), routes)?;
    // The supervisor's file, empty until it starts a replica.
    let replicas_file = routes_dir.join("zz-supervisor.toml");
    std::fs::write(&replicas_file, "")?;
    std::fs::write(dir.join("sluice.toml"), config)?;
    let cfg = RunConfig::parse(config, dir).context("the demo's config")?;
    // Shared with the in-process supervisor, which reads its draining replicas'
    // in-flight counts from it.
    let table = sluice_routing::RoutingTable::new(cfg.node.clone());
    let pin_dir = args.pin_dir.clone();
    let desired_file = dir.join("desired.json");
    let admin = args.admin;
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
        // The serverless loop beside the proxy: the autoscaler follows the demo's own
        // stream and the supervisor acts on what it decides. Both stop when the proxy
        // does, the supervisor deregistering and stopping its replicas.
        let stop = stop_signal();
        let autoscaler = {
            let stop = stop.clone();
            let sink = DesiredSink::File(desired_file.clone());
            tokio::spawn(async move {
                // It follows the admin listener the proxy is about to open: wait for it
                // (bounded), so a newcomer's first screen has no reconnect warnings.
                let up = Instant::now() + Duration::from_secs(10);
                while tokio::net::TcpStream::connect(admin).await.is_err() && Instant::now() < up {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let settings = AutoscalerSettings::new(vec![admin]);
                if let Err(e) = run_autoscaler(settings, sink, wait(stop)).await {
                    tracing::warn!("demo autoscaler: {e}");
                }
            })
        };
        let supervisor = {
            let stop = stop.clone();
            let files = sluice_node::supervise::FileStore {
                routes: routes_dir,
                replicas_file,
                desired_file,
            };
            let proxy = sluice_node::supervise::SharedState(table.clone());
            tokio::spawn(async move {
                let every = Duration::from_millis(200);
                let res = sluice_node::supervise::run_on_files(
                    files,
                    proxy,
                    "demo".into(),
                    Duration::from_secs(5),
                    every,
                    wait(stop),
                );
                if let Err(e) = res.await {
                    tracing::warn!("demo supervisor: {e}");
                }
            })
        };
        print_instructions(args, replicas, secret);
        let res = crate::run::serve(cfg, table, false, pin_dir, None).await;
        let _ = stop.send(true);
        let _ = autoscaler.await;
        let _ = supervisor.await;
        drop(running);
        res
    })
}

/// A stop signal several tasks wait on (a watch, so a task that starts waiting after
/// the send still sees it).
fn stop_signal() -> tokio::sync::watch::Sender<bool> {
    tokio::sync::watch::Sender::new(false)
}

async fn wait(stop: tokio::sync::watch::Sender<bool>) {
    let mut rx = stop.subscribe();
    let _ = rx.wait_for(|s| *s).await;
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
fn node_config(args: &DemoArgs, cgroup: Option<&Path>) -> String {
    let mut config = format!(
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

# Short rounds, so the demo's loop (503, a replica started, 200) takes about a second.
[autoscaler]
interval = "500ms"

[health]
interval = "500ms"

[routes]
file = "routes"
"#,
        http = args.http,
        https = args.https,
        admin = args.admin,
    );
    if let Some(cgroup) = cgroup {
        config.push_str(&format!(
            r#"
# As root: the demo's own cgroup (sluice-demo-<pid>, one per demo process; it and its
# replicas run in it). Proxy <-> replica bytes go socket to socket in the kernel
# (sluice_track, sluice_redirect), and a connect from inside it to hello's VIP reaches
# a replica (sluice_vip4, sluice_vip6).
[local_replicas]
cgroup = "{cg}"
prefixes = ["127.0.0.0/8"]

[vip]
cgroup = "{cg}"
"#,
            cg = cgroup.display()
        ));
    }
    config
}

/// The routing document: `hello` (open, one h2c and one HTTP/1.1 replica), `private`
/// (needs the `demo` token) and `lazy` (open, no replica until a request comes: the
/// supervisor starts `exe demo-replica` for it, and stops it once idle).
fn routing_doc(replicas: &[SocketAddr], secret: &str, exe: &Path) -> Result<String> {
    let mut hello = ServerSpec::new("hello", "hello");
    hello.unauthenticated = true;
    hello.vip = Some(HELLO_VIP);
    let mut private = ServerSpec::new("private", "private");
    private.environment = "demo".into();
    let mut lazy = ServerSpec::new(LAZY, LAZY);
    lazy.unauthenticated = true;
    lazy.min_replicas = 0;
    lazy.max_replicas = 3;
    lazy.target_concurrency = 5;
    lazy.scale_up_window = Duration::from_secs(5);
    lazy.scale_down_window = LAZY_SCALE_DOWN;
    let mut launch = LaunchSpec::new([
        exe.to_string_lossy().into_owned(),
        "demo-replica".into(),
        "--name".into(),
        LAZY.into(),
    ]);
    launch.startup_timeout = Duration::from_secs(10);
    launch.exit_grace_period = LAZY_GRACE;
    lazy.launch = Some(launch);
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
        servers: vec![hello, private, lazy],
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
    let lazy_host = format!("{LAZY}.{REGION}.{BASE}");
    let (down, grace) = (LAZY_SCALE_DOWN.as_secs(), LAZY_GRACE.as_secs());
    let (http, https, admin) = (args.http, args.https, args.admin);
    let (h2c, h1, p1) = (replicas[0], replicas[1], replicas[2]);
    let (hp, tp) = (http.port(), https.port());
    let (pin, vip) = (args.pin_dir.display(), HELLO_VIP);
    let cgroup = sluice_dataplane::sys::cgroup2_mount()
        .map(|m| m.join(demo_cgroup_name()).display().to_string())
        .unwrap_or_else(|_| "<no cgroup v2>".into());
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

As root, the kernel at work:
  sluice bpf status --pin-dir {pin}     # splice, steering, redirect and VIP counters; curl, then look again
  curl -s http://{admin}/metrics | grep sluice_bpf_redirect   # proxy <-> replica bytes moved socket to socket
  cat {cgroup}/cgroup.procs   # the demo's own cgroup, where redirect and VIP act
  hello's VIP {vip} answers connects from inside that cgroup (sluice_vip4 rewrites them to a replica).
  The XDP guard stays off in the demo: on lo it would filter every loopback client of these ports
  on the machine; `[guard] interfaces = ["eth0"]` turns it on in `sluice run` (docs/operations.md, "Guard").

Scale from zero and back (server "lazy", min_replicas = 0; the demo runs the autoscaler
and the replica supervisor in-process):
  curl --no-buffer http://{admin}/autoscaler/stream | grep --line-buffered '"{LAZY}"' &
                                            # lazy's in-flight, replicas and 503s, each interval
  curl -i http://{lazy_host}:{hp}/           # 503 + Retry-After: no replica yet (the demand is counted)
  curl --retry 10 http://{lazy_host}:{hp}/  # curl retries a 503 after its Retry-After; 200 once the supervisor's replica is ready
  curl -s 'http://{admin}/state?server={LAZY}' | grep '"state"'
                                            # the replica count: starting, ready, then draining
  About {down} s after the last request lazy's desired count is back at 0: its replica drains,
  gets SIGTERM once nothing is in flight to it ({grace} s later at most) and is gone (the same
  /state shows no replica, curl gets 503 again).
"#
    );
}
