//! `sluice`: the node-level data plane binary. Wires the proxy, the routing state and
//! the kernel data plane together; errors become `anyhow` only here, at the edge.
#![forbid(unsafe_code)]

mod bpf;
mod ctl;
mod demo;
mod kernel;
mod run;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Node-level data plane for serverless HTTP servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy from a config file.
    Run {
        /// Path to the sluice config (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Exit if the kernel data plane cannot be loaded instead of serving on the
        /// userspace path.
        #[arg(long)]
        require_ebpf: bool,
    },
    /// Run on the embedded default config with demo replicas it starts itself.
    Demo,
    /// Read and write the routing state in etcd (servers, replicas, tokens).
    Ctl(ctl::CtlArgs),
    /// Inspect the kernel data plane.
    Bpf {
        #[command(subcommand)]
        command: bpf::BpfCommand,
    },
}

fn init_tracing() {
    // Kernel programs log through aya-log into the `log` crate; tracing-subscriber's
    // log bridge turns those records into events whose target is the kernel crate's
    // name, so `RUST_LOG=sluice_ebpf=debug` filters them like any other module.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Run { config, require_ebpf } => run::main(&config, require_ebpf),
        Command::Demo => demo::main(),
        Command::Ctl(args) => ctl::main(args),
        Command::Bpf { command } => bpf::main(command),
    }
}
