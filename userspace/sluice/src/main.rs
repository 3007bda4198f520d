//! `sluice`: the node-level data plane binary. Wires the proxy, the routing state and
//! the kernel data plane together; errors become `anyhow` only here, at the edge.
#![forbid(unsafe_code)]

mod admin;
mod autoscale_command;
mod bpf;
mod check;
mod ctl;
mod demo;
mod etcd_args;
mod logging;
mod reload;
mod run;
mod supervise_command;
mod upgrade_command;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc (see `sluice_alloc`): cheaper small allocations on the request path, and
/// the start-up heap given back once the process serves.
#[global_allocator]
static ALLOCATOR: sluice_alloc::Allocator = sluice_alloc::Allocator;

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
        /// Where the kernel maps are pinned for bpftool (on bpffs).
        #[arg(long, default_value = sluice_dataplane::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// This start is meant to take over from a sluice already serving with this
        /// pin dir (SIGUSR2 re-exec, or a new pod beside the old one); without it such
        /// a start is refused.
        #[arg(long)]
        takeover: bool,
        /// After handing over to a new process, stay idle until SIGTERM instead of
        /// exiting (for orchestrators that restart a container that exits).
        #[arg(long)]
        linger_after_handover: bool,
    },
    /// Replace the running `sluice run` without dropping connections: SIGUSR2 to it,
    /// then wait until the new process serves and the old one drained and exited.
    Upgrade(upgrade_command::UpgradeArgs),
    /// Validate a config (node config, certificates, routing file) without serving:
    /// print what would run, or `file:line:col` of the first error and exit non-zero.
    Check(check::CheckArgs),
    /// `sluice run` on an embedded default config, with demo replicas it starts itself.
    Demo(demo::DemoArgs),
    /// One demo replica process (what the demo's supervisor starts for `lazy`).
    #[command(hide = true)]
    DemoReplica(demo::ReplicaArgs),
    /// Read and write the routing state in etcd (servers, replicas, tokens).
    Ctl(ctl::CtlArgs),
    /// Follow the proxies' autoscaler streams and write desired replica counts into the
    /// store for an orchestrator to act on.
    Autoscale(autoscale_command::AutoscaleArgs),
    /// Run replica processes for the desired counts the autoscaler writes, and register
    /// them in the routing state (the reference compute side for one node).
    Supervise(supervise_command::SuperviseArgs),
    /// Inspect the kernel data plane.
    Bpf {
        #[command(subcommand)]
        command: bpf::BpfCommand,
    },
    /// Print a shell completion script to stdout (e.g. `sluice completions bash >
    /// /etc/bash_completion.d/sluice`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff, `sluice.1`) to stdout, e.g. `sluice man | man -l -`.
    Man,
}

/// The roff man page, `.TH` first: clap_mangen opens with the `Aq` string definitions,
/// but man-db's indexer and man-page linters expect the title request on the first line,
/// and the definitions work as well after it.
fn man_page() -> Result<String> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    let page = String::from_utf8(page)?;
    let Some(at) = page.find("\n.TH ") else { return Ok(page) };
    let title_end = page[at + 1..].find('\n').map_or(page.len(), |n| at + 2 + n);
    Ok(format!("{}{}{}", &page[at + 1..title_end], &page[..at + 1], &page[title_end..]))
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    // Both generate from the clap definitions, so they never drift from `--help`.
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sluice", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            std::io::Write::write_all(&mut std::io::stdout(), man_page()?.as_bytes())?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    logging::init();
    let done = match cli.command {
        Command::Check(args) => return check::main(args),
        Command::Run { config, require_ebpf, pin_dir, takeover, linger_after_handover } => {
            let flags =
                sluice_node::handover::HandoverFlags { takeover, linger: linger_after_handover };
            run::main(&config, require_ebpf, pin_dir, flags)
        }
        Command::Upgrade(args) => upgrade_command::main(args),
        Command::Demo(args) => demo::main(args),
        Command::DemoReplica(args) => demo::replica_main(args),
        Command::Ctl(args) => ctl::main(args),
        Command::Autoscale(args) => autoscale_command::main(args),
        Command::Supervise(args) => supervise_command::main(args),
        Command::Bpf { command } => bpf::main(command),
        Command::Completions { .. } | Command::Man => Ok(()),
    };
    done.map(|()| ExitCode::SUCCESS)
}
