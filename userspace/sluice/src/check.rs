//! `sluice check --config FILE`: load and validate the node config, its certificates and
//! the routing document without serving, print what would run, and exit non-zero naming
//! `file:line:col` on an error (as `nginx -t` does).
//!
//! It runs the checks `sluice run` applies before it serves ([`RunConfig::parse`], the
//! proxy config's validation, loading every certificate, loading the routing file), so
//! a config that passes here does not fail start-up on its content.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Deserialize;
use sluice_proxy::ProxyConfig;
use sluice_routing::RoutingTable;
use sluice_store::file::{line_col, load_into};

use crate::run::{NODE_SECTIONS, RunConfig};

/// `sluice check` arguments.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Path to the sluice config (TOML), as given to `sluice run`.
    #[arg(long, short)]
    pub config: PathBuf,
}

/// Checks the config; prints a summary on success, `file:line:col: message` on failure.
pub fn main(args: CheckArgs) -> Result<ExitCode> {
    let path = &args.config;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match check(path, &text) {
        Ok(summary) => {
            print!("{summary}");
            println!("{}: ok", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What would run, or the first error with its place.
fn check(path: &Path, text: &str) -> Result<String, String> {
    let base = path.parent().unwrap_or(Path::new("."));
    let cfg = RunConfig::parse(text, base).map_err(|e| located(path, text, &e))?;
    let at_file = |e: &dyn std::fmt::Display| format!("{}: error: {e}", path.display());
    cfg.proxy.validate().map_err(|e| at_file(&e))?;
    let mut out = String::new();
    for l in &cfg.proxy.listeners {
        match &l.tls {
            Some(tls) => {
                // Loads and matches every certificate with its key, as binding does.
                let (_, certs) = sluice_proxy::tls::load_listener(tls).map_err(|e| at_file(&e))?;
                let names: Vec<&str> =
                    tls.certs.iter().flat_map(|c| c.names.iter().map(String::as_str)).collect();
                out += &format!("listener {} tls [{}]\n", l.addr, names.join(", "));
                for c in certs {
                    out += &format!(
                        "  certificate [{}] serial {} issuer {} expires {}\n",
                        c.names.join(", "),
                        c.serial,
                        c.issuer,
                        expiry(c.not_after)
                    );
                }
            }
            None => out += &format!("listener {} plaintext\n", l.addr),
        }
        // Who may name the client: worth seeing before it runs (a wrong prefix either
        // lets anyone spoof the client or refuses the edge).
        if l.proxy_protocol != sluice_proxy::config::ProxyProtocol::Off
            || !l.trusted_proxies.is_empty()
        {
            out += &format!(
                "  proxy_protocol {} from trusted_proxies [{}]\n",
                l.proxy_protocol.as_str(),
                l.trusted_proxies.join(", ")
            );
        }
    }
    match cfg.proxy.admin.addr {
        Some(addr) => out += &format!("admin {addr}\n"),
        None => out += "admin off\n",
    }
    let log = &cfg.proxy.access_log;
    if log.enabled {
        out += &format!(
            "access log {} sample {} queue {}{}\n",
            log.path,
            log.sample,
            log.queue,
            if log.all_servers { "" } else { ", servers that opt in only" }
        );
    }
    out += &format!(
        "node base domains [{}], regions [{}]\n",
        cfg.node.base_domains.join(", "),
        cfg.node.regions.join(", ")
    );
    if let Some(file) = &cfg.routes.file {
        let table = RoutingTable::new(cfg.node.clone());
        load_into(&table, file).map_err(|e| format!("{e}"))?;
        let snap = table.load();
        let replicas: usize = snap.servers().map(|s| s.replicas.len()).sum();
        out += &format!(
            "routes {}: {} servers, {replicas} replicas\n",
            file.display(),
            snap.server_count()
        );
        // Parsed and checked by the load above, as the running process does.
        let mut certs: Vec<_> = snap.certificates().collect();
        certs.sort_by(|a, b| a.spec.domains.cmp(&b.spec.domains));
        for c in certs {
            match (&c.loaded, &c.error) {
                (_, Some(e)) => {
                    return Err(format!("{}: error: server {:?}: {e}", file.display(), &*c.server));
                }
                (Some(l), None) => {
                    out += &format!(
                        "  certificate [{}] of server {} serial {} issuer {} expires {}\n",
                        c.spec.domains.join(", "),
                        c.server,
                        l.summary.serial,
                        l.summary.issuer,
                        expiry(l.summary.not_after)
                    )
                }
                (None, None) => {}
            }
        }
    } else if let Some(etcd) = &cfg.etcd {
        out += &format!(
            "routes from etcd {} prefix {} (not contacted){}\n",
            etcd.endpoints.join(","),
            etcd.prefix,
            if etcd.tls.is_some() { ", TLS" } else { "" }
        );
    } else {
        out += &format!(
            "no routing source: every domain answers {}\n",
            cfg.proxy.unknown_domain_status
        );
    }
    if cfg.acme.enabled {
        out += &format!(
            "acme: on, directory {}, contact {}, CA {}, check every {}, lock lease {}\n",
            cfg.acme.directory,
            cfg.acme.email.as_deref().unwrap_or("none"),
            cfg.acme.ca_file.as_ref().map_or("system roots".into(), |p| p.display().to_string()),
            humantime::format_duration(cfg.acme.check_interval),
            humantime::format_duration(cfg.acme.lease_ttl),
        );
    } else {
        out += "acme: off\n";
    }
    if !cfg.guard.deny.is_empty() {
        out += &format!("guard deny list: {} prefixes\n", cfg.guard.deny.len());
    }
    Ok(out)
}

/// A Unix time as an RFC 3339 UTC date, or the number when it is out of range.
fn expiry(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| unix.to_string())
}

/// `file:line:col: error: ...` for a parse error. The parse itself works on a detached
/// TOML value, which has no positions, so the failing part is deserialized once more from
/// the text, where the TOML parser knows where each value sits.
fn located(path: &Path, text: &str, err: &anyhow::Error) -> String {
    let offset = span_of_error(text);
    match offset {
        Some(offset) => {
            let (line, col) = line_col(text, offset);
            format!("{}:{line}:{col}: error: {err:#}", path.display())
        }
        None => format!("{}: error: {err:#}", path.display()),
    }
}

/// The byte offset the TOML parser gives for the first error in `text`: a syntax error,
/// an error inside one of the node's own sections, or one in the proxy's top-level keys.
fn span_of_error(text: &str) -> Option<usize> {
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return e.span().map(|s| s.start);
    }
    macro_rules! section {
        ($name:ident: $ty:ty) => {{
            #[derive(Deserialize)]
            struct Only {
                #[serde(default)]
                #[allow(dead_code)]
                $name: Option<$ty>,
            }
            if let Err(e) = toml::from_str::<Only>(text) {
                return e.span().map(|s| s.start);
            }
        }};
    }
    section!(node: sluice_routing::NodeConfig);
    section!(routes: crate::run::RoutesConfig);
    section!(etcd: sluice_store::etcd::EtcdConfig);
    section!(health: crate::run::HealthConfig);
    section!(local_replicas: sluice_node::local_redirect::LocalReplicasConfig);
    section!(splice: sluice_node::splice_policy::SpliceConfig);
    section!(vip: sluice_node::vip::VipConfig);
    section!(guard: sluice_node::guard::GuardConfig);
    section!(acme: sluice_node::acme::AcmeConfig);
    // The proxy's keys are the top level minus the node's sections: blank those lines
    // (keeping offsets) and parse what is left as the proxy config.
    let masked = mask_sections(text, NODE_SECTIONS);
    toml::from_str::<ProxyConfig>(&masked).err().and_then(|e| e.span()).map(|s| s.start)
}

/// `text` with every table whose header names one of `sections` (`[etcd]`,
/// `[etcd.tls]`, `[[guard.x]]`) blanked to spaces.
fn mask_sections(text: &str, sections: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut masking = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            let header = trimmed.trim_start_matches('[').trim_start();
            masking = sections.iter().any(|s| {
                header
                    .strip_prefix(s)
                    .is_some_and(|rest| rest.trim_start().starts_with(']') || rest.starts_with('.'))
            });
        }
        if masking {
            // Same byte length, so offsets into the masked text are offsets into `text`.
            let body = line.trim_end_matches('\n');
            out.extend(std::iter::repeat_n(' ', body.len()));
            out.push_str(&line[body.len()..]);
        } else {
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        check(Path::new("/etc/sluice/sluice.toml"), text).unwrap_err()
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let syntax = err_of("[[listeners]]\naddr = \n");
        assert!(syntax.starts_with("/etc/sluice/sluice.toml:2:"), "{syntax}");
        let in_section = err_of("[node]\nregions = [\"r1\"]\n\n[etcd]\nendpoint = []\n");
        assert!(in_section.starts_with("/etc/sluice/sluice.toml:5:1: error:"), "{in_section}");
        let in_proxy = err_of("[node]\nregions = [\"r1\"]\n[timeouts]\nheader_rd = \"5s\"\n");
        assert!(in_proxy.starts_with("/etc/sluice/sluice.toml:4:1: error:"), "{in_proxy}");
    }

    #[test]
    fn masking_keeps_line_numbers() {
        let text = "a = 1\n[etcd]\nx = 2\n[etcd.tls]\ny = 3\n[timeouts]\nz = 4\n";
        let masked = mask_sections(text, &["etcd"]);
        assert_eq!(masked.len(), text.len());
        assert_eq!(masked, "a = 1\n      \n     \n          \n     \n[timeouts]\nz = 4\n");
    }
}
