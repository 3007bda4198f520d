//! `sluice supervise`: the command line of the reference replica supervisor; the
//! supervisor itself is `sluice_node::supervise`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sluice_node::supervise::{
    AdminApi, FileStore, InFlightSource, NoProxy, run_on_etcd, run_on_files,
};

/// `sluice supervise (--routes PATH --replicas-file FILE --desired-file FILE | --endpoints ..)`
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The proxy's routing file or directory, to read server specs from (file store).
    #[arg(long, requires_all = ["replicas_file", "desired_file"])]
    pub routes: Option<PathBuf>,
    /// Where to write this supervisor's replicas (file store): a `*.toml` inside the
    /// directory `--routes` names, so the proxy merges it in.
    #[arg(long, requires = "routes")]
    pub replicas_file: Option<PathBuf>,
    /// The desired counts `sluice autoscale --file` writes (file store; a missing file
    /// means no counts yet: every server runs `min_replicas`).
    #[arg(long, requires = "routes")]
    pub desired_file: Option<PathBuf>,
    /// Where etcd is and how to authenticate (without --routes).
    #[command(flatten)]
    pub etcd: crate::etcd_args::EtcdArgs,
    /// Replica ids are `<prefix>-<n>`; must be unique per node, since replicas with this
    /// prefix are taken to be this supervisor's own (in etcd, leftovers of an earlier run
    /// are deleted at start).
    #[arg(long, default_value = "sup")]
    pub id_prefix: String,
    /// After SIGTERM, how long a replica has to exit before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub kill_after: Duration,
    /// How often processes, ports and the store are looked at.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// The admin listener of this node's proxy (`http://127.0.0.1:9090` or
    /// `127.0.0.1:9090`): a draining replica gets SIGTERM as soon as the proxy shows
    /// nothing in flight to it. Without it (or while it does not answer), the whole
    /// `exit_grace_period`.
    #[arg(long, value_parser = parse_admin_url)]
    pub proxy_admin: Option<SocketAddr>,
}

/// `http://HOST:PORT[/]` or `HOST:PORT`, HOST an IP address (the proxy's admin listener
/// is on this node).
fn parse_admin_url(s: &str) -> Result<SocketAddr, String> {
    let rest = s.strip_prefix("http://").unwrap_or(s);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.parse().map_err(|_| format!("{s:?}: expected http://IP:PORT (the proxy's admin listener)"))
}

/// Runs until SIGTERM/SIGINT, then deregisters and stops every replica.
pub fn main(args: SuperviseArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args))
}

async fn run(args: SuperviseArgs) -> Result<()> {
    match args.proxy_admin {
        Some(admin) => run_with(args, AdminApi { admin }).await,
        None => run_with(args, NoProxy).await,
    }
}

async fn run_with(args: SuperviseArgs, proxy: impl InFlightSource) -> Result<()> {
    let shutdown = sluice_proxy::shutdown::signal();
    let (prefix, kill_after, interval) = (args.id_prefix, args.kill_after, args.interval);
    match (args.routes, args.replicas_file, args.desired_file) {
        (Some(routes), Some(replicas_file), Some(desired_file)) => {
            let files = FileStore { routes, replicas_file, desired_file };
            run_on_files(files, proxy, prefix, kill_after, interval, shutdown).await?;
        }
        _ => {
            let etcd = crate::etcd_args::connect(&args.etcd.config()).await?;
            run_on_etcd(etcd, proxy, prefix, kill_after, interval, shutdown).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn admin_urls() {
        assert_eq!(parse_admin_url("http://127.0.0.1:9090").unwrap(), addr(9090));
        assert_eq!(parse_admin_url("http://127.0.0.1:9090/").unwrap(), addr(9090));
        assert_eq!(parse_admin_url("127.0.0.1:9090").unwrap(), addr(9090));
        assert!(parse_admin_url("https://127.0.0.1:9090").is_err());
        assert!(parse_admin_url("localhost:9090").is_err());
    }
}
