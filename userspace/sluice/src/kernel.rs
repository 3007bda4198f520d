//! Bringing up the kernel data plane at start-up.
//!
//! The probe runs once; whatever is missing is said once, in one line, and sluice
//! serves the same semantics on its userspace path. `--require-ebpf` makes a missing
//! feature fatal instead.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Result, bail};
use sluice_dataplane::{Dataplane, DataplaneOptions, ProbeReport, probe};
use tracing::{info, warn};

/// What start-up learned and loaded.
pub struct Kernel {
    /// The probe's findings (served by `/readyz` detail and `sluice bpf status`).
    pub report: ProbeReport,
    /// The loaded data plane, when the object loads here (shared with the splice
    /// hand-off and its close watcher).
    pub dataplane: Option<Arc<Mutex<Dataplane>>>,
}

/// Probes the kernel and loads the data plane. Must run inside a Tokio runtime (the
/// kernel log bridge is a task).
pub fn start(require_ebpf: bool, pin_dir: Option<PathBuf>) -> Result<Kernel> {
    let report = probe::probe();
    if let Some(missing) = report.summary_of_missing() {
        if require_ebpf {
            bail!("--require-ebpf: kernel features missing: {missing}");
        }
        warn!(%missing, "kernel data plane incomplete; serving those paths in userspace");
    }
    let options = DataplaneOptions { pin_dir };
    let dataplane = match Dataplane::load(options) {
        Ok(mut dp) => {
            if let Err(e) = dp.start_kernel_logs() {
                warn!(error = %e, "kernel logs will not be forwarded");
            }
            info!(pin_dir = ?dp.pin_dir(), "kernel data plane loaded");
            Some(Arc::new(Mutex::new(dp)))
        }
        Err(e) if require_ebpf => bail!("--require-ebpf: loading the data plane failed: {e}"),
        Err(e) => {
            warn!(error = %e, "kernel data plane not loaded; serving on the userspace path");
            None
        }
    };
    Ok(Kernel { report, dataplane })
}
