//! SIGHUP: re-read `sluice.toml`, validate it as `sluice check` does, apply what can
//! change while sluice serves, and say which changed settings need `sluice upgrade`.
//!
//! Applied live:
//! - the listeners' certificates (`[[listeners]] tls`): the files are read again, and a
//!   changed list of files or names takes effect, for listeners whose address is
//!   unchanged;
//! - `[routes] file`: a new path is loaded (validated; on an error nothing changes) and
//!   watched instead of the old one (not when the routing source is etcd).
//!
//! Everything else (listener addresses and settings other than `tls`, `[etcd]`, `[node]`,
//! limits, timeouts, the kernel sections, ...) is compared with what runs and each
//! changed setting is logged as needing a handover (`sluice upgrade`). An invalid file
//! changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sluice_proxy::ListenerCerts;
use sluice_routing::RoutingTable;
use sluice_store::file::{FileSource, load_into};
use tokio::sync::Notify;

use crate::run::RunConfig;

/// The routing file being watched, and how to stop its watcher.
pub(crate) struct WatchedRoutes {
    pub(crate) path: PathBuf,
    pub(crate) stop: Arc<Notify>,
}

/// Starts watching `path` until `stop` or `global` is notified.
pub(crate) fn watch_routes(
    table: &RoutingTable,
    path: PathBuf,
    global: Arc<Notify>,
) -> WatchedRoutes {
    let stop = Arc::new(Notify::new());
    let own = stop.clone();
    FileSource::new(path.clone()).spawn(table.clone(), async move {
        tokio::select! {
            _ = own.notified() => {}
            _ = global.notified() => {}
        }
    });
    WatchedRoutes { path, stop }
}

/// What a reload needs of the running process.
pub(crate) struct Reloader {
    pub(crate) path: PathBuf,
    /// The config as it runs: the file's top-level table, with the parts applied live
    /// updated after each reload.
    pub(crate) running: toml::Table,
    pub(crate) certs: ListenerCerts,
    pub(crate) table: RoutingTable,
    pub(crate) routes: Option<WatchedRoutes>,
    pub(crate) uses_etcd: bool,
    pub(crate) global_stop: Arc<Notify>,
}

impl Reloader {
    /// Reloads on every SIGHUP until the process ends.
    pub(crate) fn spawn(self) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            let mut reloader = self;
            while hup.recv().await.is_some() {
                // Reading files and loading a routing document are blocking work, kept off
                // the runtime's (possibly only) worker.
                let done = tokio::task::spawn_blocking(move || {
                    let result = reloader.reload();
                    (reloader, result)
                })
                .await;
                let Ok((r, result)) = done else {
                    tracing::error!("config reload task failed; SIGHUP reloads stop");
                    return;
                };
                reloader = r;
                if let Err(e) = result {
                    tracing::error!(
                        path = %reloader.path.display(),
                        error = format!("{e:#}"),
                        "config reload refused; the running config stays"
                    );
                }
            }
        });
        Ok(())
    }

    /// One reload: all of it is validated before anything is applied.
    pub(crate) fn reload(&mut self) -> Result<()> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let base = self.path.parent().unwrap_or(Path::new("."));
        let cfg = RunConfig::parse(&text, base)?;
        cfg.proxy.validate()?;
        let new: toml::Table = toml::from_str(&text)?;
        let certs = self.certs.prepare(&cfg.proxy).context("listener certificates")?;
        let mut applied = Vec::new();
        let new_routes = cfg.routes.file.clone();
        let routes_changed =
            new_routes.as_deref() != self.routes.as_ref().map(|r| r.path.as_path());
        let mut pending = needs_upgrade(&self.running, &new);
        if routes_changed {
            match (&new_routes, self.uses_etcd) {
                (Some(path), false) => {
                    let generation = load_into(&self.table, path)
                        .with_context(|| format!("loading routes from {}", path.display()))?;
                    if let Some(old) = self.routes.take() {
                        old.stop.notify_waiters();
                    }
                    self.routes =
                        Some(watch_routes(&self.table, path.clone(), self.global_stop.clone()));
                    tracing::info!(path = %path.display(), generation, "routing file switched");
                    applied.push("routes.file".to_owned());
                }
                _ => {
                    pending.insert("routes".to_owned());
                }
            }
        }
        let listeners = certs.apply();
        applied.push(format!("certificates of {} TLS listeners", listeners.len()));
        // What now runs: the live parts of the new file, the rest as before.
        if applied.iter().any(|a| a == "routes.file") {
            copy_key(&mut self.running, &new, "routes");
        }
        if !pending.contains("listeners") {
            copy_key(&mut self.running, &new, "listeners");
        }
        tracing::info!(path = %self.path.display(), applied = ?applied, "config reloaded");
        if !pending.is_empty() {
            tracing::warn!(
                settings = ?pending,
                "config reload: these changed settings need `sluice upgrade` to take effect"
            );
        }
        Ok(())
    }
}

fn copy_key(to: &mut toml::Table, from: &toml::Table, key: &str) {
    match from.get(key) {
        Some(v) => to.insert(key.to_owned(), v.clone()),
        None => to.remove(key),
    };
}

/// The top-level settings that differ between what runs and `new`, except the ones a
/// reload applies: listeners' `tls` (when nothing else of the listeners changed) and
/// `routes`.
pub(crate) fn needs_upgrade(running: &toml::Table, new: &toml::Table) -> BTreeSet<String> {
    let keys: BTreeSet<&String> = running.keys().chain(new.keys()).collect();
    let mut out = BTreeSet::new();
    for key in keys {
        let (a, b) = (running.get(key), new.get(key));
        if a == b || key == "routes" {
            continue;
        }
        if key == "listeners" && without_tls(a) == without_tls(b) {
            continue;
        }
        out.insert(key.clone());
    }
    out
}

fn without_tls(listeners: Option<&toml::Value>) -> Option<toml::Value> {
    let mut v = listeners?.clone();
    if let Some(list) = v.as_array_mut() {
        for l in list {
            if let Some(t) = l.as_table_mut() {
                t.remove("tls");
            }
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_cannot_change_live_needs_an_upgrade() {
        let old: toml::Table = toml::from_str(
            "[[listeners]]\naddr = \"127.0.0.1:1\"\ntls = { certs = [] }\n[routes]\nfile = \"a\"\n[limits]\nmax_header_bytes = 9000\n",
        )
        .unwrap();
        let live: toml::Table = toml::from_str(
            "[[listeners]]\naddr = \"127.0.0.1:1\"\ntls = { certs = [{ names = [\"x\"] }] }\n[routes]\nfile = \"b\"\n[limits]\nmax_header_bytes = 9000\n",
        )
        .unwrap();
        assert!(needs_upgrade(&old, &live).is_empty());
        let not: toml::Table = toml::from_str(
            "[[listeners]]\naddr = \"127.0.0.1:2\"\n[routes]\nfile = \"a\"\n[limits]\nmax_header_bytes = 10000\n[node]\nregions = [\"r\"]\n",
        )
        .unwrap();
        let pending: Vec<String> = needs_upgrade(&old, &not).into_iter().collect();
        assert_eq!(pending, ["limits", "listeners", "node"]);
    }
}
