//! `sluice bpf ...`: what the kernel offers and what sluice has loaded.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use sluice_dataplane::{DEFAULT_PIN_DIR, live, pins, probe};

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
        /// Admin listener of the running sluice, asked which server owns each VIP.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
    },
}

/// Runs a `sluice bpf` subcommand.
pub fn main(command: BpfCommand) -> Result<()> {
    match command {
        BpfCommand::Status { json, pin_dir, admin } => status(json, &pin_dir, admin),
    }
}

fn status(json: bool, pin_dir: &std::path::Path, admin: std::net::SocketAddr) -> Result<()> {
    let report = probe::probe();
    let behaviour = sluice_node::kernel::behaviour_standalone(&report);
    let pinned = pins::list(pin_dir);
    let mut state = live::read(pin_dir);
    sluice_node::vip::name_servers(&mut state.vips, admin);
    if json {
        let doc = serde_json::json!({
            "probe": report,
            "behaviour": behaviour,
            "pin_dir": pin_dir,
            "pinned": pinned,
            "live": state,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print!("{}", report.table());
    println!();
    print_behaviour(behaviour.as_ref());
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
        print_live(&state);
    }
    if let Some(missing) = report.summary_of_missing() {
        println!();
        println!("sluice serves these paths in userspace: {missing}");
    }
    Ok(())
}

fn print_live(s: &live::LiveState) {
    println!();
    if let Some(r) = &s.redirect {
        println!(
            "redirect: {} sockets tracked, {} messages, {} bytes redirected, {} without peer, {} insert failures",
            r.socks_tracked, r.messages, r.bytes_redirected, r.no_peer, r.track_failed
        );
    }
    if let Some(g) = &s.guard {
        let ports: Vec<String> = s.guard_ports.iter().map(u16::to_string).collect();
        let rate = s
            .guard_config
            .filter(|c| c.syn_rate_per_sec > 0)
            .map(|c| format!("{}/s burst {}", c.syn_rate_per_sec, c.syn_burst))
            .unwrap_or_else(|| "off".into());
        println!(
            "guard: ports [{}], SYN limit {rate}; {} inspected, {} dropped (denied), {} dropped (SYN rate)",
            ports.join(", "),
            g.inspected,
            g.dropped_denied,
            g.dropped_syn_rate
        );
        for i in &s.guard_interfaces {
            println!("  attached to {:<16} {} XDP (ifindex {})", i.interface, i.mode, i.ifindex);
        }
        for d in &s.denied {
            match d.expires_in_s {
                Some(secs) => println!("  banned {:<40} expires in {secs}s", d.prefix),
                None => println!("  denied {:<40} permanent", d.prefix),
            }
        }
    }
    if let Some(v) = &s.vip {
        println!(
            "vips: {} connects, {} rewritten, {} without replica",
            v.connects, v.rewritten, v.no_backend
        );
        for vip in &s.vips {
            let replicas: Vec<String> = vip.replicas.iter().map(ToString::to_string).collect();
            println!(
                "  {:<28} {:<16} {:<8} selected {} -> [{}]",
                vip.vip,
                vip.server.as_deref().unwrap_or("server ?"),
                vip.mode,
                vip.selected,
                replicas.join(", ")
            );
        }
    }
    if let Some(cfg) = &s.steering {
        let st = s.steer.unwrap_or_default();
        println!(
            "steering: slots {}..{} active; {} selected, {} migrated, {} fallback",
            cfg.base,
            cfg.base + cfg.count,
            st.selected,
            st.migrated,
            st.fallback
        );
    }
}

/// The behaviour section of `sluice bpf status`'s table output.
fn print_behaviour(b: Option<&sluice_dataplane::BehaviourReport>) {
    let Some(b) = b else {
        println!("splice behaviour: not probed (sk_skb verdict unavailable)");
        println!();
        return;
    };
    println!("{:<18} {:<10} DETAIL", "SPLICE CHECK", "STATUS");
    for c in &b.checks {
        let status = match c.status {
            sluice_dataplane::CheckStatus::Passed => "ok",
            sluice_dataplane::CheckStatus::Failed => "FAILED",
            sluice_dataplane::CheckStatus::Skipped => "skipped",
        };
        println!("{:<18} {:<10} {}", c.check, status, c.detail);
    }
    if b.passed() {
        println!("splice: enabled (upgraded streams may be spliced in the kernel)");
    } else {
        let failed: Vec<&str> = b.failed().map(|c| c.check).collect();
        println!(
            "splice: DISABLED: behaviour check failed: {}; upgraded streams relay in userspace",
            failed.join(", ")
        );
    }
    println!();
}
