//! `sluice bpf ...`: what the kernel offers and what sluice has loaded.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use sluice_dataplane::{DEFAULT_PIN_DIR, pins, probe};

/// Subcommands of `sluice bpf`.
#[derive(Subcommand)]
pub enum BpfCommand {
    /// Probe the kernel (by loading and attaching test programs) and list what is
    /// pinned now. Exit status 0 even when features are missing.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Pin directory to list.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Runs a `sluice bpf` subcommand.
pub fn main(command: BpfCommand) -> Result<()> {
    match command {
        BpfCommand::Status { json, pin_dir } => status(json, &pin_dir),
    }
}

fn status(json: bool, pin_dir: &std::path::Path) -> Result<()> {
    let report = probe::probe();
    let pinned = pins::list(pin_dir);
    if json {
        let doc = serde_json::json!({
            "probe": report,
            "pin_dir": pin_dir,
            "pinned": pinned,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print!("{}", report.table());
    println!();
    if pinned.is_empty() {
        println!(
            "pinned under {}: nothing (sluice is not running, or pins nothing)",
            pin_dir.display()
        );
    } else {
        println!("pinned under {}:", pin_dir.display());
        for p in &pinned {
            println!("  {:<20} {}", p.name, p.kind);
        }
        println!("inspect with: bpftool map dump pinned {}/<name>", pin_dir.display());
    }
    if let Some(missing) = report.summary_of_missing() {
        println!();
        println!("sluice serves these paths in userspace: {missing}");
    }
    Ok(())
}
