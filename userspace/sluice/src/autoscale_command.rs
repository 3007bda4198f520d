//! `sluice autoscale`: follow the proxies' `GET /autoscaler/stream`, apply the scaling rule
//! (docs/routing.md, "The rule" and "Windows") and write desired replica counts into the
//! store (etcd `<prefix>desired/<server>`) or a JSON file, for an orchestrator to act on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_node::autoscaler::{AutoscalerSettings, DesiredSink, run_autoscaler};

/// `sluice autoscale --from ADMIN[,ADMIN..] [--file PATH | --endpoints URL,.. --prefix P]`
#[derive(Debug, Args)]
pub struct AutoscaleArgs {
    /// Admin listeners (`host:port`) of the proxies to follow, comma-separated; a server's
    /// in-flight requests are summed over them.
    #[arg(long, value_delimiter = ',', required = true)]
    pub from: Vec<SocketAddr>,
    /// Write the desired counts to this JSON file instead of etcd (for the file source).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Where etcd is and how to authenticate (unless --file).
    #[command(flatten)]
    pub etcd: crate::etcd_args::EtcdArgs,
    /// Ignore a proxy's numbers for a server after this many seconds without a record.
    #[arg(long, default_value_t = 5.0)]
    pub stale_after: f64,
}

/// Runs until SIGTERM/SIGINT.
pub fn main(args: AutoscaleArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args))
}

async fn run(args: AutoscaleArgs) -> Result<()> {
    if !(args.stale_after.is_finite() && args.stale_after > 0.0) {
        bail!("--stale-after must be a positive number of seconds");
    }
    let sink = match args.file {
        Some(path) => DesiredSink::File(path),
        None => {
            let store = crate::etcd_args::connect(&args.etcd.config()).await?;
            DesiredSink::Etcd(Box::new(store))
        }
    };
    let mut settings = AutoscalerSettings::new(args.from);
    settings.stale_after = Duration::from_secs_f64(args.stale_after);
    tracing::info!(nodes = ?settings.nodes, "autoscaler following");
    run_autoscaler(settings, sink, sluice_proxy::shutdown::signal())
        .await
        .context("reading the stored desired counts")?;
    Ok(())
}
