//! What is pinned under the pin directory now, for `sluice bpf status`.

use std::{fs, path::Path};

use serde::Serialize;

/// One pinned object.
#[derive(Clone, Debug, Serialize)]
pub struct Pinned {
    /// File name under the pin directory (the map or program name).
    pub name: String,
    /// Kind as bpffs reports it (`map`, `prog`, `link`) where it can be told.
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
            // bpffs shows a map's attributes as text when read; programs and links
            // are not readable. Reading a map pin is cheap and has no side effects.
            let kind = match fs::read_to_string(e.path()) {
                Ok(text) if text.contains("map_type") || text.contains("key") => "map",
                Ok(_) => "map",
                Err(_) => "prog/link",
            };
            Pinned { name, kind: kind.to_owned() }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
