//! `sluice demo`: the embedded default config with demo replicas.

use anyhow::Result;

/// Runs the demo until Ctrl-C.
pub fn main() -> Result<()> {
    anyhow::bail!("`sluice demo` arrives with the proxy core; see README.md")
}
