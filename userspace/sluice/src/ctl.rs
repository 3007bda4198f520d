//! `sluice ctl`: validated reads and writes of the routing state in etcd, so nobody
//! hand-writes keys (layout: docs/etcd.md).
//!
//! Writes print one JSON line with the key and the etcd revision of the write; a node's
//! admin fence `GET /generation?wait=<revision>` returns once that write is routable there.
//! Tokens are created with a random secret that is printed once and stored only hashed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::json;
use sluice_store::etcd::{EtcdConfig, EtcdError, EtcdStore, Listing, StoreKey};

use crate::etcd_args::{EtcdArgs, connect};
use sluice_routing::{Protocol, ReplicaSpec, ReplicaState, RoutingDoc, ServerSpec, TokenSpec};

/// `sluice ctl [--endpoints URL,..] [--prefix P] [TLS and user flags] <object> <verb> ...`
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Where etcd is and how to authenticate.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Bound on each etcd request, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The object kinds `sluice ctl` manages.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Servers: `servers/<id>`.
    Server {
        /// Verb.
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// Replicas: `replicas/<server>/<id>`.
    Replica {
        /// Verb.
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Proxy-auth tokens: `tokens/<id>` (secrets stored hashed).
    Token {
        /// Verb.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write every server, replica and token of a routing document (the file source's
    /// format, TOML or JSON) into etcd; servers first, so replicas find them.
    Apply {
        /// The document (`-` for stdin).
        #[arg(long, short)]
        file: PathBuf,
    },
}

/// `sluice ctl server ...`
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create or replace a server from a file, or from flags for the common fields.
    Put(ServerPut),
    /// Print a server as JSON.
    Get {
        /// Server id.
        id: String,
    },
    /// Delete a server and all its replicas.
    Delete {
        /// Server id.
        id: String,
    },
    /// Print every server as a JSON array.
    List,
}

/// `sluice ctl server put`
#[derive(Debug, Args)]
pub struct ServerPut {
    /// A server spec, JSON or TOML (`-` for stdin); see docs/etcd.md.
    #[arg(long, short, conflicts_with_all = ["id", "label"])]
    pub file: Option<PathBuf>,
    /// Server id (without --file).
    #[arg(long, required_unless_present = "file")]
    pub id: Option<String>,
    /// DNS label (without --file).
    #[arg(long, required_unless_present = "file")]
    pub label: Option<String>,
    /// Environment (tokens are scoped to environments).
    #[arg(long, conflicts_with = "file")]
    pub environment: Option<String>,
    /// Region (repeatable or comma-separated); none means every region.
    #[arg(long = "region", value_delimiter = ',', conflicts_with = "file")]
    pub regions: Vec<String>,
    /// Custom domain (repeatable or comma-separated).
    #[arg(long = "domain", value_delimiter = ',', conflicts_with = "file")]
    pub custom_domains: Vec<String>,
    /// Serve without proxy auth.
    #[arg(long, conflicts_with = "file")]
    pub unauthenticated: bool,
    /// Server virtual address (`ip:port`) local callers connect to.
    #[arg(long, conflicts_with = "file")]
    pub vip: Option<std::net::SocketAddr>,
    /// How a VIP connect picks its replica: `least_loaded` or `hrw`.
    #[arg(long, conflicts_with = "file", value_parser = parse_vip_balance)]
    pub vip_balance: Option<sluice_routing::VipBalance>,
}

fn parse_vip_balance(s: &str) -> Result<sluice_routing::VipBalance, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected least_loaded or hrw"))
}

/// `sluice ctl replica ...`
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Create or replace a replica from a file or flags (its server must exist).
    Put(ReplicaPut),
    /// Print a replica as JSON.
    Get {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
    },
    /// Delete a replica.
    Delete {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
    },
    /// Print replicas as a JSON array.
    List {
        /// Only this server's replicas.
        #[arg(long)]
        server: Option<String>,
    },
}

/// `sluice ctl replica put`
#[derive(Debug, Args)]
pub struct ReplicaPut {
    /// A replica spec, JSON or TOML (`-` for stdin).
    #[arg(long, short, conflicts_with_all = ["server", "id", "address"])]
    pub file: Option<PathBuf>,
    /// Server id (without --file).
    #[arg(long, required_unless_present = "file")]
    pub server: Option<String>,
    /// Replica id (without --file).
    #[arg(long, required_unless_present = "file")]
    pub id: Option<String>,
    /// `IP:port` the replica listens on (without --file).
    #[arg(long, required_unless_present = "file")]
    pub address: Option<std::net::SocketAddr>,
    /// `http1` or `h2c`.
    #[arg(long, value_parser = parse_protocol, conflicts_with = "file")]
    pub protocol: Option<Protocol>,
    /// `starting`, `ready` or `draining`.
    #[arg(long, value_parser = parse_state, conflicts_with = "file")]
    pub state: Option<ReplicaState>,
}

/// `sluice ctl token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token with a random secret; prints the secret once (it is stored hashed).
    Create {
        /// Token id (the key header's value).
        #[arg(long)]
        id: String,
        /// Environment the token grants (repeatable or comma-separated; `*` for all).
        #[arg(long = "env", value_delimiter = ',', required = true)]
        environments: Vec<String>,
    },
    /// Print a token's id and environments (never its secret or hash).
    Get {
        /// Token id.
        id: String,
    },
    /// Delete a token.
    Delete {
        /// Token id.
        id: String,
    },
    /// Print every token's id and environments as a JSON array.
    List,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    serde_json::from_value(json!(s)).map_err(|_| format!("{s:?}: expected http1 or h2c"))
}

fn parse_state(s: &str) -> Result<ReplicaState, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| format!("{s:?}: expected starting, ready or draining"))
}

/// Run `sluice ctl` (blocking; owns a small runtime).
pub fn main(args: CtlArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args))
}

async fn run(args: CtlArgs) -> Result<()> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    let cfg =
        EtcdConfig { request_timeout: Duration::from_secs_f64(args.timeout), ..args.etcd.config() };
    let store = connect(&cfg).await?;
    let done = match args.command {
        CtlCommand::Server { command } => server(&store, command).await,
        CtlCommand::Replica { command } => replica(&store, command).await,
        CtlCommand::Token { command } => token(&store, command).await,
        CtlCommand::Apply { file } => apply(&store, &file).await,
    };
    // The client connects lazily, so a TLS or network failure surfaces on the first
    // request: say which store it was.
    done.map_err(|e| {
        let unreachable = e.chain().any(|c| {
            matches!(c.downcast_ref(), Some(EtcdError::Client(_) | EtcdError::Timeout(_)))
        });
        if unreachable { e.context(format!("etcd at {}", cfg.endpoints.join(","))) } else { e }
    })
}

async fn server(store: &EtcdStore, cmd: ServerCommand) -> Result<()> {
    match cmd {
        ServerCommand::Put(put) => {
            let spec = match &put.file {
                Some(path) => read_object::<ServerSpec>(path)?,
                None => {
                    let (Some(id), Some(label)) = (put.id, put.label) else {
                        bail!("give --file, or --id and --label");
                    };
                    let mut s = ServerSpec::new(id, label);
                    if let Some(env) = put.environment {
                        s.environment = env;
                    }
                    s.regions = put.regions;
                    s.custom_domains = put.custom_domains;
                    s.unauthenticated = put.unauthenticated;
                    s.vip = put.vip;
                    s.vip_balance = put.vip_balance.unwrap_or_default();
                    s
                }
            };
            let rev = store.put_server(&spec).await?;
            written(store, &StoreKey::Server(spec.id), rev)
        }
        ServerCommand::Get { id } => match store.get_server(&id).await? {
            Some(s) => print_json(&s),
            None => bail!("server {id:?} not found"),
        },
        ServerCommand::Delete { id } => match store.delete_server(&id).await? {
            Some(rev) => deleted(store, &StoreKey::Server(id), rev),
            None => bail!("server {id:?} not found"),
        },
        ServerCommand::List => {
            let listing = store.list_servers().await?;
            print_listing(&listing, |s| serde_json::to_value(s))
        }
    }
}

async fn replica(store: &EtcdStore, cmd: ReplicaCommand) -> Result<()> {
    match cmd {
        ReplicaCommand::Put(put) => {
            let spec = match &put.file {
                Some(path) => read_object::<ReplicaSpec>(path)?,
                None => {
                    let (Some(server), Some(id), Some(address)) = (put.server, put.id, put.address)
                    else {
                        bail!("give --file, or --server, --id and --address");
                    };
                    let mut r = ReplicaSpec::new(server, id, address);
                    if let Some(p) = put.protocol {
                        r.protocol = p;
                    }
                    if let Some(s) = put.state {
                        r.state = s;
                    }
                    r
                }
            };
            let rev = store.put_replica(&spec).await?;
            let key = StoreKey::Replica { server: spec.server, id: spec.id };
            written(store, &key, rev)
        }
        ReplicaCommand::Get { server, id } => match store.get_replica(&server, &id).await? {
            Some(r) => print_json(&r),
            None => bail!("replica {server}/{id} not found"),
        },
        ReplicaCommand::Delete { server, id } => match store.delete_replica(&server, &id).await? {
            Some(rev) => deleted(store, &StoreKey::Replica { server, id }, rev),
            None => bail!("replica {server}/{id} not found"),
        },
        ReplicaCommand::List { server } => {
            let listing = store.list_replicas(server.as_deref()).await?;
            print_listing(&listing, |r| serde_json::to_value(r))
        }
    }
}

async fn token(store: &EtcdStore, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create { id, environments } => {
            let created = store.create_token(&id, environments).await?;
            eprintln!(
                "token {id:?} created; its secret is printed only this once and is not stored"
            );
            let out = json!({
                "id": created.spec.id,
                "environments": created.spec.environments,
                "secret": created.secret,
                "key": store.key(&StoreKey::Token(id)),
                "revision": created.revision,
            });
            println!("{out}");
            Ok(())
        }
        TokenCommand::Get { id } => match store.get_token(&id).await? {
            Some(t) => print_json(&token_view(&t)),
            None => bail!("token {id:?} not found"),
        },
        TokenCommand::Delete { id } => match store.delete_token(&id).await? {
            Some(rev) => deleted(store, &StoreKey::Token(id), rev),
            None => bail!("token {id:?} not found"),
        },
        TokenCommand::List => {
            let listing = store.list_tokens().await?;
            print_listing(&listing, |t| Ok(token_view(t)))
        }
    }
}

async fn apply(store: &EtcdStore, path: &Path) -> Result<()> {
    let doc: RoutingDoc = read_object(path)?;
    let mut last = 0;
    for s in &doc.servers {
        last = store.put_server(s).await.with_context(|| format!("server {:?}", s.id))?;
    }
    for r in &doc.replicas {
        last =
            store.put_replica(r).await.with_context(|| format!("replica {}/{}", r.server, r.id))?;
    }
    for t in &doc.tokens {
        last = store.put_token(t).await.with_context(|| format!("token {:?}", t.id))?;
    }
    let out = json!({
        "servers": doc.servers.len(),
        "replicas": doc.replicas.len(),
        "tokens": doc.tokens.len(),
        "revision": last,
    });
    println!("{out}");
    Ok(())
}

/// What `token get/list` shows: never the secret, not even its hash.
fn token_view(t: &TokenSpec) -> serde_json::Value {
    json!({ "id": t.id, "environments": t.environments })
}

fn written(store: &EtcdStore, key: &StoreKey, revision: u64) -> Result<()> {
    println!("{}", json!({ "put": store.key(key), "revision": revision }));
    Ok(())
}

fn deleted(store: &EtcdStore, key: &StoreKey, revision: u64) -> Result<()> {
    println!("{}", json!({ "deleted": store.key(key), "revision": revision }));
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Print the valid items as a JSON array on stdout; malformed keys go to stderr.
fn print_listing<T>(
    listing: &Listing<T>,
    view: impl Fn(&T) -> serde_json::Result<serde_json::Value>,
) -> Result<()> {
    for m in &listing.malformed {
        eprintln!("warning: {m}");
    }
    let items = listing.items.iter().map(view).collect::<serde_json::Result<Vec<_>>>()?;
    print_json(&items)
}

/// Read one object (or document) from a JSON or TOML file; `-` reads stdin. The format
/// follows the extension; without one, JSON is tried first, then TOML.
fn read_object<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let name = path.display();
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => {
            serde_json::from_str(&text).with_context(|| format!("parsing {name} as JSON"))
        }
        Some("toml") => toml::from_str(&text).with_context(|| format!("parsing {name} as TOML")),
        _ => match serde_json::from_str(&text) {
            Ok(v) => Ok(v),
            Err(json_err) => toml::from_str(&text).map_err(|toml_err| {
                anyhow!("{name} is neither valid JSON ({json_err}) nor valid TOML ({toml_err})")
            }),
        },
    }
}
