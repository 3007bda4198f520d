//! The etcd flags `sluice ctl` and `sluice autoscale` share: where the store is, and the
//! TLS and user credentials it wants, each with an environment fallback.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sluice_store::etcd::{
    DEFAULT_ENDPOINT, DEFAULT_PREFIX, EtcdAuth, EtcdConfig, EtcdStore, EtcdTls,
};

/// How to reach etcd from the command line.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (`https://` with the TLS flags).
    #[arg(long, value_delimiter = ',', env = "SLUICE_ETCD_ENDPOINTS", default_value = DEFAULT_ENDPOINT)]
    pub endpoints: Vec<String>,
    /// Key prefix sluice's state lives under.
    #[arg(long, env = "SLUICE_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// PEM CA that signs etcd's certificate (turns TLS on).
    #[arg(long, env = "SLUICE_ETCD_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for etcd's client-certificate auth (with --key-file).
    #[arg(long, env = "SLUICE_ETCD_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM key of --cert-file.
    #[arg(long, env = "SLUICE_ETCD_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// etcd user (with --password-file).
    #[arg(long, env = "SLUICE_ETCD_USER", requires = "password_file")]
    pub user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "SLUICE_ETCD_PASSWORD_FILE", requires = "user")]
    pub password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The store config these flags describe; other settings at their defaults.
    pub fn config(&self) -> EtcdConfig {
        let tls = (self.ca_file.is_some() || self.cert_file.is_some()).then(|| EtcdTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            server_name: None,
        });
        let auth = match (&self.user, &self.password_file) {
            (Some(user), Some(file)) => {
                Some(EtcdAuth { user: user.clone(), password_file: file.clone() })
            }
            _ => None,
        };
        // Blank entries (a set-but-empty variable, `a,,b`, spaces after commas) name no
        // endpoint; with none left the default applies.
        let mut endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            endpoints.push(DEFAULT_ENDPOINT.to_owned());
        }
        EtcdConfig { endpoints, prefix: self.prefix.clone(), tls, auth, ..EtcdConfig::default() }
    }
}

/// Connects the store writer, naming the endpoints on failure.
pub async fn connect(cfg: &EtcdConfig) -> Result<EtcdStore> {
    EtcdStore::connect(cfg)
        .await
        .with_context(|| format!("connecting to etcd at {}", cfg.endpoints.join(",")))
}
