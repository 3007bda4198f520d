//! TLS: rustls (ring provider), TLS 1.2+, ALPN `h2` and `http/1.1`, certificates chosen
//! by SNI with exact names first, then `*.domain` wildcards (one label deep).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::ConfigError;

/// ALPN id for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id for HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The ring crypto provider sluice uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates by SNI name.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the wildcard's parent domain (`example.com` for `*.example.com`).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// Adds a certificate for `names`; the first certificate added also serves no-SNI clients.
    pub fn add(&mut self, names: &[String], key: Arc<CertifiedKey>) -> Result<(), ConfigError> {
        for name in names {
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            if let Some(parent) = name.strip_prefix("*.") {
                if parent.is_empty() || parent.contains('*') {
                    return Err(ConfigError::Tls(format!("bad wildcard name {name:?}")));
                }
                self.wildcard.insert(parent.to_owned(), key.clone());
            } else if name.is_empty() || name.contains('*') {
                return Err(ConfigError::Tls(format!("bad certificate name {name:?}")));
            } else {
                self.exact.insert(name, key.clone());
            }
        }
        if self.default.is_none() {
            self.default = Some(key);
        }
        Ok(())
    }

    /// The certificate for an SNI name.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = sni else {
            return self.default.clone();
        };
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&sni) {
            return Some(k.clone());
        }
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// Loads a PEM chain and key into a rustls signing key.
pub fn load_certified_key(cert_pem: &Path, key_pem: &Path) -> Result<CertifiedKey, ConfigError> {
    // Opened here rather than by `from_pem_file` so that a missing file stays a read error
    // naming the path, not a TLS one.
    let read = |p: &Path| {
        File::open(p).map_err(|source| ConfigError::Read { path: p.display().to_string(), source })
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_reader_iter(read(cert_pem)?)
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::Tls(format!("{}: {e}", cert_pem.display())))?;
    let key = PrivateKeyDer::from_pem_reader(read(key_pem)?).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            ConfigError::Tls(format!("{}: no private key", key_pem.display()))
        }
        e => ConfigError::Tls(format!("{}: {e}", key_pem.display())),
    })?;
    certified_key(certs, key).map_err(|e| ConfigError::Tls(format!("{}: {e}", cert_pem.display())))
}

/// Builds a signing key from DER parts.
pub fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, ConfigError> {
    if certs.is_empty() {
        return Err(ConfigError::Tls("empty certificate chain".into()));
    }
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| ConfigError::Tls(format!("unsupported key: {e}")))?;
    let ck = CertifiedKey::new(certs, signer);
    // A key of another certificate would load fine and fail every handshake later.
    ck.keys_match().map_err(|e| {
        ConfigError::Tls(format!("the private key does not match the certificate ({e})"))
    })?;
    Ok(ck)
}

/// What an operator may see of a certificate: never key material.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertSummary {
    /// The SNI names it is configured for.
    pub names: Vec<String>,
    /// The leaf certificate's issuer (distinguished name).
    pub issuer: String,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// When the leaf expires: seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertSummary {
    /// Reads the leaf of `key`'s chain.
    pub fn of(key: &CertifiedKey, names: &[String]) -> Result<CertSummary, ConfigError> {
        let leaf = key.end_entity_cert().map_err(|e| ConfigError::Tls(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| ConfigError::Tls(format!("certificate for {names:?}: {e}")))?;
        Ok(CertSummary {
            names: names.to_vec(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// Builds the rustls server config of a TLS listener.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    load_listener(tls).map(|(cfg, _)| cfg)
}

/// Builds the rustls server config of a TLS listener, with a summary of each certificate.
pub fn load_listener(
    tls: &TlsConfig,
) -> Result<(Arc<ServerConfig>, Vec<CertSummary>), ConfigError> {
    let mut resolver = SniResolver::default();
    let mut summaries = Vec::with_capacity(tls.certs.len());
    for c in &tls.certs {
        let key = load_certified_key(&c.cert_pem, &c.key_pem)?;
        summaries.push(
            CertSummary::of(&key, &c.names)
                .map_err(|e| ConfigError::Tls(format!("{}: {e}", c.cert_pem.display())))?,
        );
        resolver.add(&c.names, Arc::new(key))?;
    }
    Ok((server_config_with(resolver)?, summaries))
}

/// Builds a rustls server config around a resolver.
pub fn server_config_with(resolver: SniResolver) -> Result<Arc<ServerConfig>, ConfigError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let der = PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
        Arc::new(certified_key(vec![c.cert.der().clone()], der).unwrap())
    }

    #[test]
    fn sni_lookup() {
        let mut r = SniResolver::default();
        let a = key("a.example.com");
        let w = key("*.example.com");
        r.add(&["a.example.com".into()], a.clone()).unwrap();
        r.add(&["*.example.com".into()], w.clone()).unwrap();
        assert!(Arc::ptr_eq(&r.lookup(Some("A.example.com")).unwrap(), &a));
        assert!(Arc::ptr_eq(&r.lookup(Some("b.example.com")).unwrap(), &w));
        assert!(r.lookup(Some("x.b.example.com")).is_none());
        assert!(r.lookup(Some("example.com")).is_none());
        assert!(Arc::ptr_eq(&r.lookup(None).unwrap(), &a));
    }
}
