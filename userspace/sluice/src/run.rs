//! `sluice run --config FILE`.
//!
//! The config file is TOML: the proxy settings at the top level (see
//! `sluice_proxy::ProxyConfig`: `[[listeners]]`, `[limits]`, `[timeouts]`, `[admin]`, ...),
//! plus `[node]` (base domains, regions) and `[routes] file = "routes.toml"` (the routing
//! document, watched for changes; relative paths are relative to the config file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Deserialize;
use sluice_proxy::{ProxyConfig, Server};
use sluice_routing::source::file::{FileSource, load_into};
use sluice_routing::{NodeConfig, RoutingTable};
use tokio::sync::Notify;

/// Where the routing document comes from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// A TOML routing document (or a directory of them), watched for changes.
    pub file: Option<PathBuf>,
}

/// The whole `sluice run` config file.
#[derive(Debug, Default)]
pub struct RunConfig {
    /// This node's base domains and regions.
    pub node: NodeConfig,
    /// The routing source.
    pub routes: RoutesConfig,
    /// Proxy settings (top-level keys).
    pub proxy: ProxyConfig,
}

impl RunConfig {
    /// Parses a config file's text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        // `[node]` and `[routes]` are split off by hand so the rest is deserialized as a
        // `ProxyConfig` directly, where unknown keys (typos) are errors; serde's `flatten`
        // would silently ignore them.
        let mut table: toml::Table = toml::from_str(text)?;
        let node = match table.remove("node") {
            Some(v) => NodeConfig::deserialize(v).context("in [node]")?,
            None => NodeConfig::default(),
        };
        let routes = match table.remove("routes") {
            Some(v) => RoutesConfig::deserialize(v).context("in [routes]")?,
            None => RoutesConfig::default(),
        };
        let proxy = ProxyConfig::deserialize(toml::Value::Table(table))?;
        let mut cfg = RunConfig { node, routes, proxy };
        if let Some(f) = &cfg.routes.file
            && f.is_relative()
        {
            cfg.routes.file = Some(base_dir.join(f));
        }
        for l in &mut cfg.proxy.listeners {
            if let Some(tls) = &mut l.tls {
                for c in &mut tls.certs {
                    if c.cert_pem.is_relative() {
                        c.cert_pem = base_dir.join(&c.cert_pem);
                    }
                    if c.key_pem.is_relative() {
                        c.key_pem = base_dir.join(&c.key_pem);
                    }
                }
            }
        }
        Ok(cfg)
    }
}

/// Runs sluice from a config file until SIGTERM/SIGINT.
pub fn main(config: &Path, require_ebpf: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new("."));
    let cfg = RunConfig::parse(&text, base).with_context(|| format!("in {}", config.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let res = rt.block_on(serve(cfg, require_ebpf));
    // Connections past the drain deadline are cut here instead of holding the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res
}

async fn serve(cfg: RunConfig, require_ebpf: bool) -> Result<()> {
    // Kept alive for the whole run: dropping it detaches the kernel programs.
    let kernel = crate::kernel::start(require_ebpf, None)?;
    tracing::info!(loaded = kernel.dataplane.is_some(), "kernel data plane");
    let bpf_report = serde_json::to_string_pretty(&kernel.report).unwrap_or_default();
    let table = RoutingTable::new(cfg.node.clone());
    let stop = Arc::new(Notify::new());
    if let Some(file) = &cfg.routes.file {
        // Load once up front so a broken routing file fails start-up loudly; the watcher
        // then keeps the table in sync.
        let generation = load_into(&table, file)
            .with_context(|| format!("loading routes from {}", file.display()))?;
        tracing::info!(path = %file.display(), generation, "routing loaded");
        let s = stop.clone();
        FileSource::new(file.clone()).spawn(table.clone(), async move { s.notified().await });
    } else {
        tracing::warn!(
            "no [routes] file: every domain answers {}",
            cfg.proxy.unknown_domain_status
        );
    }
    let mut server = Server::bind(cfg.proxy, table).await?;
    server.admin_route(
        "/bpf",
        Arc::new(move |_req| {
            let body = format!("{bpf_report}\n");
            async move { sluice_proxy::admin::text(http::StatusCode::OK, body) }
        }),
    );
    // The kernel splice plugs in here: server.set_handoff(Arc::new(..)).
    server.run(sluice_proxy::shutdown::signal()).await?;
    stop.notify_waiters();
    drop(kernel);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_proxy_config() {
        let text = r#"
unknown_domain_status = 404
[[listeners]]
addr = "127.0.0.1:8080"
[[listeners]]
addr = "[::1]:8443"
tls = { certs = [{ names = ["*.example.com"], cert_pem = "c.pem", key_pem = "k.pem" }] }
[timeouts]
header_read = "5s"
[node]
base_domains = ["example.com"]
regions = ["r1"]
[routes]
file = "routes.toml"
"#;
        let cfg = RunConfig::parse(text, Path::new("/etc/sluice")).unwrap();
        assert_eq!(cfg.proxy.unknown_domain_status, 404);
        assert_eq!(cfg.proxy.listeners.len(), 2);
        assert_eq!(cfg.node.regions, vec!["r1".to_owned()]);
        assert_eq!(cfg.routes.file.as_deref(), Some(Path::new("/etc/sluice/routes.toml")));
        let tls = cfg.proxy.listeners[1].tls.as_ref().unwrap();
        assert_eq!(tls.certs[0].cert_pem, Path::new("/etc/sluice/c.pem"));
        assert_eq!(cfg.proxy.timeouts.header_read, std::time::Duration::from_secs(5));
        assert!(RunConfig::parse("bogus = 1", Path::new("/")).is_err());
    }
}
