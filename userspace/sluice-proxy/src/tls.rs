//! TLS: rustls (ring provider), TLS 1.2+, ALPN `h2` and `http/1.1`, certificates chosen
//! by SNI: exact names first (a server's certificate from the routing state, then the
//! listener's), then the listener's `*.domain` wildcards (one label deep), then its
//! default (the first certificate).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sluice_routing::RoutingTable;
pub use sluice_routing::cert::CertSummary;
use sluice_routing::cert::{self, CertError};

use crate::config::TlsConfig;
use crate::error::ConfigError;

/// ALPN id for HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// ALPN id for HTTP/1.1.
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The ring crypto provider sluice uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates by SNI name.
#[derive(Debug, Default)]
pub(crate) struct SniResolver {
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

    /// The certificate for an SNI name: exact, then wildcard, then the default (the
    /// first certificate), so a name without its own certificate still completes the
    /// handshake (the client decides whether it trusts what it got). The live resolver
    /// reads the canonical form directly; tests ask through this.
    #[cfg(test)]
    fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        match sni {
            Some(sni) => self.lookup_canonical(&canonical_sni(sni)),
            None => self.default.clone(),
        }
    }

    fn lookup_canonical(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(k) = self.exact.get(sni) {
            return Some(k.clone());
        }
        sni.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .or(self.default.as_ref())
            .cloned()
    }
}

/// Loads a PEM chain and key into a rustls signing key.
pub(crate) fn load_certified_key(
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<CertifiedKey, ConfigError> {
    // Read here so that a missing file stays a read error naming the path, not a TLS one.
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })
    };
    let (chain, key) = (read(cert_pem)?, read(key_pem)?);
    cert::parse_pem(&chain, &key).map_err(|e| match e {
        CertError::NoPrivateKey => {
            ConfigError::Tls(format!("{}: no private key", key_pem.display()))
        }
        e => ConfigError::Tls(format!("{}: {e}", cert_pem.display())),
    })
}

/// A TLS listener's certificate resolver: per handshake, the exact SNI name (a server's
/// certificate from the routing state, then the listener's), then the listener's
/// wildcard, then its default.
///
/// The listener's set sits behind an `ArcSwap` so a config reload can replace it; the
/// routing state's is read from the current snapshot. Both are lock-free loads: a
/// handshake in flight keeps the `Arc` it resolved, so a swap never fails it.
#[derive(Debug)]
pub(crate) struct LiveResolver {
    routing: Option<RoutingTable>,
    listener: Arc<ArcSwap<SniResolver>>,
}

impl LiveResolver {
    /// A resolver over the routing state's certificates (if `routing` is given) and
    /// `listener`'s.
    pub fn new(routing: Option<RoutingTable>, listener: Arc<ArcSwap<SniResolver>>) -> Self {
        LiveResolver { routing, listener }
    }

    /// The certificate for an SNI name.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let listener = self.listener.load();
        let Some(raw) = sni else {
            return listener.default.clone();
        };
        let name = canonical_sni(raw);
        if let Some(routing) = &self.routing
            && let Some(k) = routing.load().certificate(&name)
        {
            return Some(k.clone());
        }
        listener.lookup_canonical(&name)
    }
}

impl ResolvesServerCert for LiveResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// An SNI name lowercased without its trailing dot, borrowed when it already is.
fn canonical_sni(sni: &str) -> std::borrow::Cow<'_, str> {
    let sni = sni.strip_suffix('.').unwrap_or(sni);
    if sni.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(sni.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(sni)
    }
}

/// Builds the rustls server config of a TLS listener, with a summary of each certificate.
pub fn load_listener(
    tls: &TlsConfig,
) -> Result<(Arc<ServerConfig>, Vec<CertSummary>), ConfigError> {
    let (resolver, summaries) = load_resolver(tls)?;
    let live = LiveResolver::new(None, Arc::new(ArcSwap::from_pointee(resolver)));
    Ok((server_config_with(Arc::new(live))?, summaries))
}

/// Loads a listener's certificates into a resolver, with a summary of each.
pub(crate) fn load_resolver(
    tls: &TlsConfig,
) -> Result<(SniResolver, Vec<CertSummary>), ConfigError> {
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
    Ok((resolver, summaries))
}

/// Builds a rustls server config around a certificate resolver.
pub(crate) fn server_config_with(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::PrivateKeyDer;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let der = PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
        Arc::new(cert::certified_key(vec![c.cert.der().clone()], der).unwrap())
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
        // Names no certificate covers get the default (the first added).
        assert!(Arc::ptr_eq(&r.lookup(Some("x.b.example.com")).unwrap(), &a));
        assert!(Arc::ptr_eq(&r.lookup(Some("example.com.")).unwrap(), &a));
        assert!(Arc::ptr_eq(&r.lookup(None).unwrap(), &a));
    }
}
