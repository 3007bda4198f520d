//! What is pinned under the pin directory now, for `sluice bpf status`.

use std::{fs, path::Path};

use serde::Serialize;

/// One pinned object.
#[derive(Clone, Debug, Serialize)]
pub struct Pinned {
    /// File name under the pin directory (the map or program name).
    pub name: String,
    /// Kind: sluice pins only maps; anything else under the directory is `other`.
    pub kind: String,
}

/// Lists the objects pinned directly under `dir`; empty when the directory is absent.
pub fn list(dir: &Path) -> Vec<Pinned> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Pinned> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Every name sluice pins is one of its maps (see sluice_abi::names).
            let kind = if name.starts_with("AYA_") || name.contains('.') { "other" } else { "map" };
            Pinned { name, kind: kind.to_owned() }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
