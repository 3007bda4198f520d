//! How to reach etcd: endpoints, timeouts, TLS and authentication.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use sluice_routing::model::duration_serde;

use super::keys::Keys;
use super::{EtcdError, bounded};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/sluice/";
/// Default endpoint (etcd's standard client port on loopback).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// How to reach etcd (the `[etcd]` section of the sluice config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix; everything sluice reads and writes lives under it (a missing trailing
    /// `/` is added).
    pub prefix: String,
    /// Bound on establishing a TCP connection to an endpoint.
    #[serde(with = "duration_serde")]
    pub connect_timeout: Duration,
    /// Bound on one request (a list page, a put, creating the watch).
    #[serde(with = "duration_serde")]
    pub request_timeout: Duration,
    /// How often the idle watch is probed (HTTP/2 ping and an etcd progress request). A
    /// silent connection is declared dead after three intervals.
    #[serde(with = "duration_serde")]
    pub keepalive_interval: Duration,
    /// First retry delay after a failure; doubles per failure (with jitter).
    #[serde(with = "duration_serde")]
    pub backoff_initial: Duration,
    /// Cap on the retry delay.
    #[serde(with = "duration_serde")]
    pub backoff_max: Duration,
    /// TLS to etcd (`[etcd.tls]`); endpoints must then be `https://` URLs.
    pub tls: Option<EtcdTls>,
    /// User authentication (`[etcd.auth]`), over TLS or not.
    pub auth: Option<EtcdAuth>,
}

/// TLS to etcd: which CA signs etcd's serving certificate, and the client certificate
/// and key to present where etcd requires client-certificate authentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdTls {
    /// PEM file of the CA certificate(s) that sign etcd's certificate. Without it the
    /// system's roots are not consulted either: etcd clusters use a private CA.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate chain (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (with `cert_file`).
    pub key_file: Option<PathBuf>,
    /// The name to verify etcd's certificate against, when it differs from the
    /// endpoint's host (endpoints given as addresses).
    pub server_name: Option<String>,
}

/// etcd user authentication. The password lives in a file (a mounted Secret), never in
/// the config itself, and is read at each connect so a rotated password is picked up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdAuth {
    /// etcd user name.
    pub user: String,
    /// File whose contents (trailing newline trimmed) are the user's password.
    pub password_file: PathBuf,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            tls: None,
            auth: None,
        }
    }
}

impl EtcdConfig {
    /// A config for these endpoints with every other setting at its default.
    pub fn with_endpoints<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdConfig::default()
        }
    }

    pub(super) fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }
}

/// A client for `cfg`'s endpoints. With `keepalive`, HTTP/2 pings detect a dead peer on an
/// idle connection (the watch); one-shot callers (`sluice ctl`) do without, so a slow ping
/// answer on a loaded machine cannot fail their request.
pub(super) async fn connect(cfg: &EtcdConfig, keepalive: bool) -> Result<Client, EtcdError> {
    let mut opts = ConnectOptions::new().with_connect_timeout(cfg.connect_timeout);
    if keepalive {
        let interval = cfg.keepalive_interval.max(Duration::from_millis(10));
        let timeout = (interval * 2).max(Duration::from_secs(1));
        opts = opts.with_keep_alive(interval, timeout).with_keep_alive_while_idle(true);
    }
    if let Some(tls) = &cfg.tls {
        opts = opts.with_tls(tls_options(tls)?);
    }
    if let Some(auth) = &cfg.auth {
        opts = opts.with_user(auth.user.clone(), read_credential(&auth.password_file, "password")?);
    }
    bounded(cfg.connect_timeout + cfg.request_timeout, Client::connect(&cfg.endpoints, Some(opts)))
        .await
}

/// The client TLS settings for `tls`, reading its files now so a renewed client
/// certificate is used from the next connect on.
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    let mut opts = TlsOptions::new();
    if let Some(ca) = &tls.ca_file {
        opts = opts.ca_certificate(Certificate::from_pem(read_credential(ca, "CA")?));
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let cert = read_credential(cert, "client certificate")?;
            let key = read_credential(key, "client key")?;
            opts = opts.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::Credentials(
                "[etcd.tls] needs both cert_file and key_file, or neither".into(),
            ));
        }
    }
    if let Some(name) = &tls.server_name {
        opts = opts.domain_name(name.clone());
    }
    Ok(opts)
}

/// A credential file's contents, trailing newline trimmed. The error names the file and
/// what it should hold, never the contents.
fn read_credential(path: &Path, what: &str) -> Result<String, EtcdError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim_end_matches(['\r', '\n']).to_owned()),
        Err(e) => Err(EtcdError::Credentials(format!("etcd {what} file {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_durations() {
        let cfg: EtcdConfig =
            toml::from_str("endpoints = [\"http://10.0.0.1:2379\"]\nbackoff_max = \"10s\"\n")
                .unwrap();
        assert_eq!(cfg.prefix, DEFAULT_PREFIX);
        assert_eq!(cfg.backoff_max, Duration::from_secs(10));
        assert_eq!(cfg.request_timeout, EtcdConfig::default().request_timeout);
        assert!(toml::from_str::<EtcdConfig>("endpoint = []").is_err());
    }

    #[test]
    fn tls_and_auth_tables() {
        let cfg: EtcdConfig = toml::from_str(
            "endpoints = [\"https://10.0.0.1:2379\"]\n\
             [tls]\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n\
             [auth]\nuser = \"sluice\"\npassword_file = \"/pw\"\n",
        )
        .unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(tls.server_name, None);
        assert_eq!(cfg.auth.unwrap().user, "sluice");
        assert!(toml::from_str::<EtcdConfig>("[auth]\nuser = \"x\"\npassword = \"p\"\n").is_err());
    }
}
