//! `sluice run --config FILE`.

use std::path::Path;

use anyhow::Result;

/// Runs sluice from a config file until SIGTERM/SIGINT.
pub fn main(config: &Path, require_ebpf: bool) -> Result<()> {
    let _ = (config, require_ebpf);
    anyhow::bail!("`sluice run` arrives with the proxy core; see README.md")
}
