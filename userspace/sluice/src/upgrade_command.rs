//! `sluice upgrade`: replace the running `sluice run` without dropping connections. The
//! handover itself is `sluice_node::handover`; this command only signals the owner and
//! watches the record until the new process serves and the old one is gone.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_node::handover::read_owner;

/// `sluice upgrade`.
#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The running sluice's pin directory (as passed to `sluice run --pin-dir`).
    #[arg(long, default_value = sluice_dataplane::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Give up waiting after this many seconds (the old process's drain deadline
    /// counts in it).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// Sends SIGUSR2 to the running sluice and waits until the new process is the active
/// one and the old one has exited.
pub fn main(args: UpgradeArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let dir = &args.pin_dir;
    let old = read_owner(dir)
        .with_context(|| format!("no running sluice recorded in {}", dir.display()))?;
    match old.alive() {
        Some(true) => {}
        Some(false) => {
            bail!("sluice pid {} (recorded in {}) is not running", old.pid, dir.display())
        }
        None => {
            bail!("sluice pid {} runs in another pid namespace; send SIGUSR2 from there", old.pid)
        }
    }
    old.request_upgrade()?;
    println!("sent SIGUSR2 to sluice pid {}", old.pid);
    let poll = || std::thread::sleep(Duration::from_millis(50));
    let new = loop {
        if let Some(o) = read_owner(dir).filter(|o| *o != old && o.alive() != Some(false)) {
            break o;
        }
        if old.alive() == Some(false) {
            bail!("sluice pid {} exited without a successor taking over", old.pid);
        }
        if Instant::now() > deadline {
            bail!(
                "no new process took over within {}s; pid {} still serves (see its log)",
                args.timeout,
                old.pid
            );
        }
        poll();
    };
    let steering = sluice_dataplane::live::read(dir).steering.filter(|s| s.count > 0);
    match steering {
        Some(s) => println!(
            "new sluice pid {} is serving; the kernel steers new connections to it (slots {}..{})",
            new.pid,
            s.base,
            s.base + s.count
        ),
        None => println!(
            "new sluice pid {} is serving (no kernel steering: degraded handover)",
            new.pid
        ),
    }
    println!("waiting for pid {} to drain", old.pid);
    while old.alive() == Some(true) {
        if Instant::now() > deadline {
            bail!("pid {} has not exited within {}s (still draining?)", old.pid, args.timeout);
        }
        poll();
    }
    println!("old sluice pid {} drained and exited; upgrade complete", old.pid);
    Ok(())
}
