//! `sluice run --config FILE`.
//!
//! The config file is TOML: the proxy settings at the top level (see
//! `sluice_proxy::ProxyConfig`: `[[listeners]]`, `[limits]`, `[timeouts]`, `[admin]`, ...),
//! plus `[node]` (base domains, regions), the routing source — `[routes] file =
//! "routes.toml"` (watched for changes; relative paths are relative to the config file)
//! or `[etcd]` (the distributed store's change stream) — `[health]` (replica checks) and
//! `[guard]` (the XDP guard, see `sluice_node::guard`) and `[acme]` (certificates for custom
//! domains, see `sluice_node::acme`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Deserialize;
use sluice_node::health::{HealthChecker, HealthPolicy};
use sluice_proxy::{Proxy, ProxyConfig};
use sluice_routing::{NodeConfig, RoutingTable};
use sluice_store::etcd::{EtcdConfig, EtcdSource, StatusHandle};
use sluice_store::file::load_into;
use tokio::sync::Notify;

/// Where the routing document comes from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// A TOML routing document (or a directory of them), watched for changes.
    pub file: Option<PathBuf>,
}

/// Active replica health checks (`[health]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds (or "2s") between checks of each replica.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub interval: std::time::Duration,
    /// Connect timeout of one check.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub timeout: std::time::Duration,
    /// Consecutive failures that take a replica out of rotation.
    pub failure_threshold: u32,
    /// A replica is routable only after its port has accepted a connection once.
    pub require_initial_check: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        let p = HealthPolicy::default();
        HealthConfig {
            interval: p.interval,
            timeout: p.timeout,
            failure_threshold: p.failure_threshold,
            require_initial_check: p.require_initial_check,
        }
    }
}

impl HealthConfig {
    fn policy(&self) -> HealthPolicy {
        HealthPolicy {
            interval: self.interval,
            timeout: self.timeout,
            failure_threshold: self.failure_threshold,
            require_initial_check: self.require_initial_check,
            ..HealthPolicy::default()
        }
    }
}

/// The tables of the config file that belong to the node rather than the proxy; the
/// rest of the file is the proxy's config.
pub const NODE_SECTIONS: &[&str] =
    &["node", "routes", "etcd", "health", "local_replicas", "splice", "vip", "guard", "acme"];

/// The whole `sluice run` config file.
#[derive(Debug, Default)]
pub struct RunConfig {
    /// This node's base domains and regions.
    pub node: NodeConfig,
    /// The routing source: a file...
    pub routes: RoutesConfig,
    /// ...or etcd.
    pub etcd: Option<EtcdConfig>,
    /// Replica health checks.
    pub health: HealthConfig,
    /// Proxy ↔ local-replica redirect in the kernel (`[local_replicas]`).
    pub local_replicas: sluice_node::local_redirect::LocalReplicasConfig,
    /// Proxy settings (top-level keys).
    pub proxy: ProxyConfig,
    /// Kernel splicing of upgraded streams (`[splice] mode`).
    pub splice: sluice_node::splice_policy::SpliceConfig,
    /// Server virtual addresses (`[vip]`).
    pub vip: sluice_node::vip::VipConfig,
    /// The XDP guard.
    pub guard: sluice_node::guard::GuardConfig,
    /// ACME for custom domains (needs `[etcd]`).
    pub acme: sluice_node::acme::AcmeConfig,
}

impl RunConfig {
    /// Parses a config file's text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        // The node's own sections are split off by hand so the rest is deserialized as a
        // `ProxyConfig` directly, where unknown keys (typos) are errors; serde's `flatten`
        // would silently ignore them.
        let mut table: toml::Table = toml::from_str(text)?;
        let node: NodeConfig = section(&mut table, "node")?;
        let routes: RoutesConfig = section(&mut table, "routes")?;
        let etcd: Option<EtcdConfig> = section(&mut table, "etcd")?;
        let health: HealthConfig = section(&mut table, "health")?;
        let local_replicas: sluice_node::local_redirect::LocalReplicasConfig =
            section(&mut table, "local_replicas")?;
        local_replicas.parsed_prefixes()?;
        let splice: sluice_node::splice_policy::SpliceConfig = section(&mut table, "splice")?;
        let vip: sluice_node::vip::VipConfig = section(&mut table, "vip")?;
        let guard: sluice_node::guard::GuardConfig = section(&mut table, "guard")?;
        guard.validate().context("in [guard]")?;
        let mut acme: sluice_node::acme::AcmeConfig = section(&mut table, "acme")?;
        if acme.enabled && etcd.is_none() {
            anyhow::bail!(
                "[acme] enabled needs [etcd]: issued certificates and challenges live there"
            );
        }
        if let Some(ca) = &acme.ca_file
            && ca.is_relative()
        {
            acme.ca_file = Some(base_dir.join(ca));
        }
        if etcd.is_some() && routes.file.is_some() {
            anyhow::bail!("[routes] file and [etcd] are two routing sources: configure one");
        }
        debug_assert!(NODE_SECTIONS.iter().all(|s| !table.contains_key(*s)));
        let proxy = ProxyConfig::deserialize(toml::Value::Table(table))?;
        let mut cfg = RunConfig {
            node,
            routes,
            etcd,
            health,
            local_replicas,
            proxy,
            splice,
            vip,
            guard,
            acme,
        };
        if let Some(f) = &cfg.routes.file
            && f.is_relative()
        {
            cfg.routes.file = Some(base_dir.join(f));
        }
        // Like every other path in the file, a relative access log is next to it.
        let log = &mut cfg.proxy.access_log.path;
        if log != "stdout" && Path::new(log.as_str()).is_relative() {
            *log = base_dir.join(&*log).to_string_lossy().into_owned();
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

/// Takes `[name]` out of the config document: its value, or the default when absent.
fn section<T: serde::de::DeserializeOwned + Default>(
    table: &mut toml::Table,
    name: &str,
) -> Result<T> {
    match table.remove(name) {
        Some(v) => T::deserialize(v).with_context(|| format!("in [{name}]")),
        None => Ok(T::default()),
    }
}

/// Runs sluice from a config file until SIGTERM/SIGINT.
pub fn main(
    config: &Path,
    require_ebpf: bool,
    pin_dir: PathBuf,
    flags: sluice_node::handover::HandoverFlags,
) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new("."));
    let cfg = RunConfig::parse(&text, base).with_context(|| format!("in {}", config.display()))?;
    let table = RoutingTable::new(cfg.node.clone());
    block_on(serve_with(cfg, table, require_ebpf, pin_dir, Some((config.to_owned(), text)), flags))
}

/// Runs `fut` on the runtime `sluice run` serves with, then shuts the runtime down.
pub(crate) fn block_on(fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = runtime()?;
    let res = rt.block_on(fut);
    // Connections past the drain deadline are cut here instead of holding the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res
}

/// One worker per CPU this process may run on. On one CPU that is a current-thread
/// runtime: every task, the I/O driver and the timers share the one thread, so a request
/// never pays a cross-thread wake-up or the work-stealing scheduler's bookkeeping.
///
/// Every worker hands its allocator's free pages back when it parks (at most once a
/// second each, see `sluice_alloc::collect_when_idle`): mimalloc keeps a thread's freed
/// pages until that thread collects, so without this the buffers of a burst of
/// connections (slow readers) stayed resident after they closed (docs/proxy.md,
/// "Memory").
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut b = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cpus);
        b
    };
    b.enable_all().on_thread_park(sluice_alloc::collect_when_idle).build()
}

/// Serves `cfg` until SIGTERM/SIGINT (or a handover): what `sluice run` and `sluice demo`
/// both do once they have a config.
///
/// `table` starts empty (`RoutingTable::new(cfg.node)`); the caller may keep a clone to
/// read the live state in-process (the demo's supervisor does).
///
/// With `reload` (the config file's path and the text `cfg` was parsed from), SIGHUP
/// reloads what can change live (see `crate::reload`).
pub(crate) async fn serve(
    cfg: RunConfig,
    table: RoutingTable,
    require_ebpf: bool,
    pin_dir: PathBuf,
    reload: Option<(PathBuf, String)>,
) -> Result<()> {
    let flags = sluice_node::handover::HandoverFlags::default();
    serve_with(cfg, table, require_ebpf, pin_dir, reload, flags).await
}

/// [`serve`], with the `sluice run` flags that shape a handover.
async fn serve_with(
    cfg: RunConfig,
    table: RoutingTable,
    require_ebpf: bool,
    pin_dir: PathBuf,
    reload: Option<(PathBuf, String)>,
    flags: sluice_node::handover::HandoverFlags,
) -> Result<()> {
    // Before the pin dir is touched: refuses a second sluice beside a live one.
    let mut handover = sluice_node::handover::Handover::begin(&pin_dir, flags)?;
    // Kept alive for the whole run: dropping it detaches the kernel programs.
    let kernel =
        sluice_node::kernel::start(require_ebpf, Some(pin_dir), handover.replaces_another())?;
    tracing::info!(loaded = kernel.dataplane.is_some(), "kernel data plane");
    let stop = Arc::new(Notify::new());
    // Health gating starts before the first load, so no replica is routable before its
    // port has accepted a connection.
    let health = HealthChecker::spawn(table.clone(), cfg.health.policy());
    let mut store: Option<StatusHandle> = None;
    let mut routes = None;
    // Pending ACME challenges, mirrored by the etcd source for the request path.
    let challenges = sluice_store::etcd::AcmeChallenges::default();
    if let Some(etcd) = cfg.etcd.clone() {
        let mut source = EtcdSource::new(etcd, table.clone());
        if cfg.acme.enabled {
            source = source.with_acme_challenges(challenges.clone());
        }
        store = Some(source.status());
        let s = stop.clone();
        tokio::spawn(source.run(async move { s.notified().await }));
    } else if let Some(file) = &cfg.routes.file {
        // Load once up front so a broken routing file fails start-up loudly; the watcher
        // then keeps the table in sync.
        let generation = load_into(&table, file)
            .with_context(|| format!("loading routes from {}", file.display()))?;
        tracing::info!(path = %file.display(), generation, "routing loaded");
        routes = Some(crate::reload::watch_routes(&table, file.clone(), stop.clone()));
    } else {
        tracing::warn!(
            "no [routes] file or [etcd]: every domain answers {}",
            cfg.proxy.unknown_domain_status
        );
    }
    // Certificates that servers name by file are re-read when their files change.
    let s = stop.clone();
    sluice_store::cert_files::spawn_watcher(
        table.clone(),
        sluice_store::cert_files::DEFAULT_POLL_INTERVAL,
        async move { s.notified().await },
    );
    let routed = cfg.etcd.is_some() || cfg.routes.file.is_some();
    let mut server = Proxy::bind(cfg.proxy, table.clone()).await?;
    if let Some((path, text)) = reload {
        crate::reload::Reloader {
            path,
            running: toml::from_str(&text)?,
            certs: server.listener_certs(),
            table: table.clone(),
            routes,
            uses_etcd: cfg.etcd.is_some(),
            global_stop: stop.clone(),
        }
        .spawn()?;
    }
    let acme = match &cfg.etcd {
        Some(etcd) if cfg.acme.enabled => Some(sluice_node::acme::start(
            cfg.acme.clone(),
            etcd.clone(),
            table.clone(),
            challenges.clone(),
            &mut server,
            stop.clone(),
        )),
        _ => None,
    };
    crate::admin::install(&mut server, &table, store);
    crate::admin::install_logging(&mut server);
    let pins = kernel
        .dataplane
        .as_ref()
        .and_then(|d| d.lock().ok().and_then(|d| d.pin_dir().map(Path::to_path_buf)));
    sluice_node::kernel::install_metrics(&mut server, kernel.report.clone(), pins);
    // Plaintext upgraded streams are spliced in the kernel where it can (probed, and
    // behaving), as each server's splice mode and the adaptive policy say.
    let decisions = Arc::new(sluice_node::splice_policy::Decisions::default());
    sluice_node::kernel::install_splice_admin(&mut server, &kernel, decisions.clone());
    if let Some(dp) = &kernel.dataplane
        && kernel.splice_usable()
    {
        match sluice_node::splice::KernelSplice::new(dp.clone(), cfg.splice, decisions) {
            Ok(splice) => {
                let splice = Arc::new(splice);
                handover.set_splice(splice.clone());
                server.set_handoff(splice);
            }
            Err(e) => {
                tracing::warn!(error = %e, "kernel splice unavailable; relaying in userspace")
            }
        }
    }
    // Proxy ↔ local-replica connections skip the TCP/IP stack where the operator scoped
    // a cgroup for it.
    if cfg.local_replicas.cgroup.is_some() {
        let redirect = match &kernel.dataplane {
            Some(dp) if kernel.report.has(sluice_dataplane::Feature::SockhashSkMsg) => {
                sluice_node::local_redirect::start(&cfg.local_replicas, dp, &table)
                    .map_err(anyhow::Error::from)
            }
            _ => Err(anyhow::anyhow!("sock_ops/sk_msg unavailable on this kernel")),
        };
        match redirect {
            Ok(_) => {}
            Err(e) if require_ebpf => return Err(e.context("--require-ebpf")),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "local-replica redirect off; replica connections use the TCP/IP stack"
            ),
        }
    }
    sluice_node::vip::start(&kernel, &table, cfg.vip, &mut server);
    // Dropped at the end of serve(): detaches the guard.
    let guard = sluice_node::guard::start(
        &cfg.guard,
        kernel.dataplane.as_ref(),
        &mut server,
        require_ebpf,
        handover.replaces_another(),
    )?;
    let mut bpf_doc = kernel.report_json();
    bpf_doc["guard"] = sluice_node::guard::report_json(&guard);
    let bpf_report = serde_json::to_string_pretty(&bpf_doc).unwrap_or_default();
    server.admin_route(
        "/bpf",
        sluice_proxy::admin::endpoint(
            sluice_proxy::admin::READ_ONLY,
            "kernel data plane: probe report and guard, JSON",
            move |_req| {
                let body = format!("{bpf_report}\n");
                async move { sluice_proxy::admin::json(http::StatusCode::OK, body) }
            },
        ),
    );
    handover.ready(&kernel, &server, &table, routed).await;
    // Start-up (the eBPF object, the kernel's BTF, the probes) peaked at tens of MiB on
    // this thread; hand what it freed back before serving.
    sluice_alloc::release_free_memory();
    server.run(handover.until_shutdown()).await?;
    stop.notify_waiters();
    if let Some(acme) = acme {
        // It passes the ordering lock on (one etcd request). Bounded: a task that never
        // got to wait on `stop` would not hear it.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), acme).await;
    }
    health.shutdown().await;
    handover.finish(&kernel).await;
    drop(guard);
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

    #[test]
    fn access_log_section() {
        let base = Path::new("/etc/sluice");
        let cfg = RunConfig::parse("[access_log]\nenabled = true\npath = \"a.log\"\n", base);
        let log = cfg.unwrap().proxy.access_log;
        assert!(log.enabled);
        assert_eq!(log.path, "/etc/sluice/a.log");
        let log = RunConfig::parse("", base).unwrap().proxy.access_log;
        assert!(!log.enabled);
        assert_eq!(log.path, "stdout");
        assert!(RunConfig::parse("[access_log]\nsampel = 0.5\n", base).is_err());
    }

    #[test]
    fn the_run_config_takes_a_splice_section() {
        let cfg = RunConfig::parse(
            "[splice]\nmode = \"never\"\nmax_rate_bytes_per_sec = 1000\n",
            std::path::Path::new("/"),
        )
        .unwrap();
        assert_eq!(cfg.splice.mode, sluice_routing::SpliceMode::Never);
        assert_eq!(cfg.splice.policy().max_rate, 1000);
        assert_eq!(
            cfg.splice.policy().small_read,
            sluice_node::splice_policy::PolicyConfig::default().small_read
        );
        let default = RunConfig::parse("", std::path::Path::new("/")).unwrap();
        assert_eq!(default.splice, sluice_node::splice_policy::SpliceConfig::default());
        assert!(RunConfig::parse("[splice]\nmod = \"x\"\n", std::path::Path::new("/")).is_err());
    }
}
