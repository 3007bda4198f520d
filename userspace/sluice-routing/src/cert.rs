//! Certificates in the routing state: a server's custom domains may carry a certificate
//! (chain and key inline in the spec, or files it names, such as a mounted Kubernetes
//! Secret).
//!
//! They are parsed into rustls signing keys when the snapshot that holds them is built, by
//! the routing table's single writer: never on the handshake path, which only looks a
//! name up in the current snapshot. A certificate that does not parse, whose key does not
//! match, or that does not cover every domain it is attached to is refused with a
//! [`CertError`] naming it, and the last good snapshot (with its certificate) stays.
//!
//! Files are re-read when they change: [`crate::RoutingTable::refresh_certificate_files`] compares
//! their identity (device, inode, size, modification time, following symlinks, so the
//! `..data` swap of a Secret update counts) with the one the snapshot was built from. The
//! polling task that calls it lives with the other sources, in `sluice-store`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;

use crate::model::CertificateSpec;

/// Why a certificate was refused. The message never contains key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// A certificate or key file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The chain or the key is not valid PEM / DER, or the key type is unsupported.
    #[error("{0}")]
    Parse(String),
    /// The key text holds no private key.
    #[error("no private key")]
    NoPrivateKey,
    /// The key is not the certificate's.
    #[error("the private key does not match the certificate ({0})")]
    KeyMismatch(String),
    /// The certificate is not valid for a domain it is attached to.
    #[error("the certificate does not cover {0:?}")]
    NotCovered(String),
}

/// Every [`CertError::reason`], in the order of [`CertCounters`]' error counters.
pub const ERROR_REASONS: [&str; 4] = ["read", "parse", "key_mismatch", "name_mismatch"];

impl CertError {
    /// The metric label of this kind of refusal (one of [`ERROR_REASONS`]).
    pub fn reason(&self) -> &'static str {
        ERROR_REASONS[self.reason_index()]
    }

    fn reason_index(&self) -> usize {
        match self {
            CertError::Read { .. } => 0,
            CertError::Parse(_) | CertError::NoPrivateKey => 1,
            CertError::KeyMismatch(_) => 2,
            CertError::NotCovered(_) => 3,
        }
    }
}

/// Certificate loads and refusals since the table was made, shared by every snapshot of
/// one table (the listeners' certificates count here too).
#[derive(Debug, Default)]
pub struct CertCounters {
    loads: AtomicU64,
    errors: [AtomicU64; ERROR_REASONS.len()],
}

impl CertCounters {
    /// One certificate parsed, checked and accepted.
    pub fn record_load(&self) {
        self.loads.fetch_add(1, Ordering::Relaxed);
    }

    /// One certificate refused.
    pub fn record_error(&self, e: &CertError) {
        self.errors[e.reason_index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Certificates accepted so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Refusals so far, by reason (in [`ERROR_REASONS`] order).
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ERROR_REASONS.iter().zip(&self.errors).map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
    }
}

/// Builds a signing key from DER parts, refusing a key that is not the leaf's.
pub fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, CertError> {
    if certs.is_empty() {
        return Err(CertError::Parse("empty certificate chain".into()));
    }
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Parse(format!("unsupported key: {e}")))?;
    let ck = CertifiedKey::new(certs, signer);
    // A key of another certificate would load fine and fail every handshake later.
    ck.keys_match().map_err(|e| CertError::KeyMismatch(e.to_string()))?;
    Ok(ck)
}

/// Parses a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn parse_pem(chain: &[u8], key: &[u8]) -> Result<CertifiedKey, CertError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Parse(format!("certificate chain: {e}")))?;
    // The key's own parse errors are summarised, not quoted: they may echo its text.
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoPrivateKey,
        _ => CertError::Parse("the private key is not valid PEM".into()),
    })?;
    certified_key(certs, key)
}

/// Checks that the leaf of `key` is valid for every name in `domains` (exact or by a
/// one-label wildcard SAN, as clients check it).
pub fn check_covers(key: &CertifiedKey, domains: &[String]) -> Result<(), CertError> {
    let leaf = key.end_entity_cert().map_err(|e| CertError::Parse(e.to_string()))?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| CertError::Parse(format!("leaf certificate: {e}")))?;
    for d in domains {
        let name = ServerName::try_from(d.as_str())
            .map_err(|_| CertError::NotCovered(d.clone()))?
            .to_owned();
        ee.verify_is_valid_for_subject_name(&name).map_err(|_| CertError::NotCovered(d.clone()))?;
    }
    Ok(())
}

/// What an operator may see of a certificate: never key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertSummary {
    /// The SNI names it is configured for.
    pub names: Vec<String>,
    /// The leaf certificate's issuer (distinguished name).
    pub issuer: String,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// When the leaf expires: seconds since the Unix epoch.
    pub not_after: i64,
    /// When the leaf became valid: seconds since the Unix epoch (with `not_after`, its
    /// lifetime, which ACME renewal is timed by).
    pub not_before: i64,
}

impl CertSummary {
    /// Reads the leaf of `key`'s chain.
    pub fn of(key: &CertifiedKey, names: &[String]) -> Result<CertSummary, CertError> {
        let leaf = key.end_entity_cert().map_err(|e| CertError::Parse(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CertError::Parse(format!("certificate for {names:?}: {e}")))?;
        Ok(CertSummary {
            names: names.to_vec(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_after: cert.validity().not_after.timestamp(),
            not_before: cert.validity().not_before.timestamp(),
        })
    }
}

/// A parsed, checked certificate: the signing key the handshake hands to rustls and its
/// summary.
#[derive(Clone)]
pub struct LoadedCert {
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// Names, issuer, serial, expiry.
    pub summary: CertSummary,
}

// By hand: the signing key must never reach a log through `{:?}`.
impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert").field("summary", &self.summary).finish_non_exhaustive()
    }
}

/// The identity of one file: device, inode, size and modification time, following
/// symlinks; `None` when it cannot be read.
pub(crate) type FileStamp = Option<(u64, u64, u64, Option<SystemTime>)>;

fn stamp_of(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok()))
}

/// The stamps of a spec's files (`None` for an inline certificate).
pub(crate) fn stamps(spec: &CertificateSpec) -> Option<[FileStamp; 2]> {
    match (&spec.cert_file, &spec.key_file) {
        (Some(c), Some(k)) => Some([stamp_of(c), stamp_of(k)]),
        _ => None,
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CertError> {
    std::fs::read(path)
        .map_err(|e| CertError::Read { path: path.display().to_string(), message: e.to_string() })
}

/// Loads, parses and checks the certificate `spec` describes (reading its files if it
/// names files).
pub fn load(spec: &CertificateSpec) -> Result<LoadedCert, CertError> {
    let key = match (&spec.cert_pem, &spec.key_pem, &spec.cert_file, &spec.key_file) {
        (Some(c), Some(k), _, _) => parse_pem(c.as_bytes(), k.expose().as_bytes())?,
        (_, _, Some(c), Some(k)) => {
            let (chain, key) = (read(c)?, read(k)?);
            parse_pem(&chain, &key).map_err(|e| match e {
                CertError::Parse(m) => CertError::Parse(format!("{}: {m}", c.display())),
                CertError::NoPrivateKey => {
                    CertError::Parse(format!("{}: no private key", k.display()))
                }
                e => e,
            })?
        }
        // Validation refuses a spec without a complete source; say so if one gets here.
        _ => return Err(CertError::Parse("no certificate and key given".into())),
    };
    let domains: Vec<String> = spec.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    check_covers(&key, &domains)?;
    let summary = CertSummary::of(&key, &domains)?;
    Ok(LoadedCert { key: Arc::new(key), summary })
}

/// A certificate of a server as a snapshot holds it.
pub struct ServedCert {
    /// The server it belongs to.
    pub server: Arc<str>,
    /// Its spec (key material redacted from `Debug`).
    pub spec: CertificateSpec,
    /// The last good load: what the handshake serves. `None` only for a file reference
    /// that has never loaded.
    pub loaded: Option<LoadedCert>,
    /// The last load's error, when it failed (file references only: an inline certificate
    /// that fails refuses its server's change instead).
    pub error: Option<CertError>,
    /// The files' stamps when they were last read.
    pub(crate) stamps: Option<[FileStamp; 2]>,
}

impl fmt::Debug for ServedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedCert")
            .field("server", &self.server)
            .field("domains", &self.spec.domains)
            .field("loaded", &self.loaded)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl ServedCert {
    /// Loads `spec` for `server`. An inline certificate that fails is an error; a file
    /// reference that fails is kept with its error (and `previous`' last good load, when
    /// it served the same domains), to be retried when its files change.
    pub(crate) fn load(
        server: Arc<str>,
        spec: &CertificateSpec,
        previous: Option<&ServedCert>,
        counters: &CertCounters,
    ) -> Result<ServedCert, CertError> {
        let stamps = stamps(spec);
        match load(spec) {
            Ok(loaded) => {
                counters.record_load();
                Ok(ServedCert {
                    server,
                    spec: spec.clone(),
                    loaded: Some(loaded),
                    error: None,
                    stamps,
                })
            }
            Err(e) => {
                counters.record_error(&e);
                if stamps.is_none() {
                    return Err(e);
                }
                let loaded = previous
                    .filter(|p| p.spec.domains == spec.domains)
                    .and_then(|p| p.loaded.clone());
                tracing::error!(
                    server = %server,
                    domains = ?spec.domains,
                    error = %e,
                    serving_previous = loaded.is_some(),
                    "certificate refused; will retry when its files change"
                );
                Ok(ServedCert { server, spec: spec.clone(), loaded, error: Some(e), stamps })
            }
        }
    }

    /// Whether this certificate's files changed since they were read.
    pub(crate) fn files_changed(&self) -> bool {
        self.stamps.is_some() && stamps(&self.spec) != self.stamps
    }
}

/// `GET /state`'s view of a certificate: names, issuer, serial, expiry; never key material.
#[derive(Debug, Serialize)]
pub struct CertView {
    /// Domains it is served for.
    pub domains: Vec<String>,
    /// `inline`, `files`, or `acme` (inline, issued by sluice's ACME client).
    pub source: &'static str,
    /// Issuer of the served leaf, when one is served.
    pub issuer: Option<String>,
    /// Serial of the served leaf (hex).
    pub serial: Option<String>,
    /// Expiry of the served leaf (RFC 3339).
    pub not_after: Option<String>,
    /// Why the last load of its files failed, if it did.
    pub error: Option<String>,
}

impl From<&ServedCert> for CertView {
    fn from(c: &ServedCert) -> Self {
        let s = c.loaded.as_ref().map(|l| &l.summary);
        CertView {
            domains: c.spec.domains.clone(),
            source: match (&c.spec.cert_file, c.spec.acme) {
                (Some(_), _) => "files",
                (None, true) => "acme",
                (None, false) => "inline",
            },
            issuer: s.map(|s| s.issuer.clone()),
            serial: s.map(|s| s.serial.clone()),
            not_after: s.map(|s| rfc3339(s.not_after)),
            error: c.error.as_ref().map(ToString::to_string),
        }
    }
}

/// A Unix time as RFC 3339 (UTC), or the number when out of range.
pub fn rfc3339(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Change, NodeConfig, RoutingDoc, RoutingTable, ServerSpec};

    fn leaf(names: &[&str]) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        (c.cert.pem(), c.key_pair.serialize_pem())
    }

    fn server(certs: Vec<CertificateSpec>) -> ServerSpec {
        let mut s = ServerSpec::new("s", "s");
        s.custom_domains = vec!["api.example.org".into(), "WWW.example.org".into()];
        s.certificates = certs;
        s
    }

    fn table() -> RoutingTable {
        let node = NodeConfig { base_domains: vec!["x.dev".into()], regions: vec!["r1".into()] };
        RoutingTable::from_doc(node, RoutingDoc::default()).unwrap()
    }

    #[test]
    fn refused_certificates_keep_the_last_good_one() {
        let t = table();
        let (c1, k1) = leaf(&["api.example.org"]);
        let good = CertificateSpec::inline(["api.example.org"], &c1, &k1);
        t.apply(vec![Change::PutServer(server(vec![good]))], 2).unwrap();
        let first = t.load().certificate("api.example.org").unwrap().clone();
        assert!(t.load().certificate("www.example.org").is_none());

        let (c2, k2) = leaf(&["api.example.org"]);
        let (other, other_key) = leaf(&["elsewhere.test"]);
        for (spec, want) in [
            (CertificateSpec::inline(["api.example.org"], &c2, &k1), "does not match"),
            (CertificateSpec::inline(["api.example.org"], &other, &other_key), "does not cover"),
            (CertificateSpec::inline(["api.example.org"], "junk", &k2), "empty certificate chain"),
            (CertificateSpec::inline(["api.example.org"], &c2, "junk"), "no private key"),
        ] {
            let errs = t.apply(vec![Change::PutServer(server(vec![spec]))], 3).unwrap_err();
            let text = errs[0].to_string();
            assert!(
                text.contains(r#"server "s": certificates: certificate for api.example.org"#),
                "{text}"
            );
            assert!(text.contains(want), "{text}");
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            let now = t.load().certificate("api.example.org").unwrap().clone();
            assert!(Arc::ptr_eq(&now, &first), "the last good certificate serves");
        }
        let counters = t.load().certificate_counters().errors().collect::<Vec<_>>();
        assert_eq!(
            counters,
            [("read", 0), ("parse", 2), ("key_mismatch", 1), ("name_mismatch", 1)]
        );

        // A wildcard certificate covers a custom domain (case-insensitively), and an
        // unrelated edit of the server does not parse it again.
        let (cw, kw) = leaf(&["*.example.org"]);
        let mut s = server(vec![CertificateSpec::inline(["www.example.org"], &cw, &kw)]);
        t.apply(vec![Change::PutServer(s.clone())], 4).unwrap();
        assert!(t.load().certificate("api.example.org").is_none());
        let loads = t.load().certificate_counters().loads();
        s.min_replicas = 1;
        t.apply(vec![Change::PutServer(s)], 5).unwrap();
        assert_eq!(t.load().certificate_counters().loads(), loads);
        assert!(t.load().certificate("www.example.org").is_some());

        // Deleting the server removes its certificates.
        t.apply(vec![Change::DeleteServer("s".into())], 6).unwrap();
        assert!(t.load().certificate("www.example.org").is_none());
        assert_eq!(t.load().certificates().count(), 0);
    }

    #[test]
    fn a_moved_domain_takes_no_stale_certificate() {
        let t = table();
        let (c, k) = leaf(&["api.example.org"]);
        let mut a = server(vec![CertificateSpec::inline(["api.example.org"], &c, &k)]);
        a.custom_domains.truncate(1);
        t.replace(RoutingDoc { servers: vec![a], ..RoutingDoc::default() }, 2).unwrap();
        assert!(t.load().certificate("api.example.org").is_some());
        // The domain moves to another server, without a certificate, in one document.
        let a = ServerSpec::new("s", "s");
        let mut b = ServerSpec::new("b", "b");
        b.custom_domains = vec!["api.example.org".into()];
        t.replace(RoutingDoc { servers: vec![b, a], ..RoutingDoc::default() }, 3).unwrap();
        assert!(t.load().certificate("api.example.org").is_none());
    }

    #[test]
    fn replace_refuses_a_document_with_a_bad_certificate() {
        let t = table();
        let (c, _) = leaf(&["api.example.org"]);
        let (_, k) = leaf(&["api.example.org"]);
        let doc = RoutingDoc {
            servers: vec![server(vec![CertificateSpec::inline(["api.example.org"], &c, &k)])],
            ..RoutingDoc::default()
        };
        let e = t.replace(doc, 2).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        assert_eq!(t.generation(), 1, "nothing changed");
    }

    #[test]
    fn validation_of_certificate_specs() {
        let (c, k) = leaf(&["api.example.org"]);
        let mut both = CertificateSpec::inline(["api.example.org"], &c, &k);
        both.cert_file = Some("/x.crt".into());
        let specs = [
            (
                CertificateSpec::inline(["other.org"], &c, &k),
                "is not one of the server's custom_domains",
            ),
            (CertificateSpec::inline(Vec::<String>::new(), &c, &k), "must list the domains"),
            (both, "give cert_pem and key_pem, or cert_file and key_file"),
            (
                CertificateSpec::files(["api.example.org"], "rel.crt", "/k"),
                "must be an absolute path",
            ),
        ];
        for (spec, want) in specs {
            let errs = crate::validate::validate_server(&server(vec![spec]));
            assert!(errs.iter().any(|e| e.to_string().contains(want)), "{errs:?}");
        }
        let twice = server(vec![
            CertificateSpec::inline(["api.example.org"], &c, &k),
            CertificateSpec::inline(["API.example.org"], &c, &k),
        ]);
        let errs = crate::validate::validate_server(&twice);
        assert!(errs.iter().any(|e| e.to_string().contains("has two certificates")), "{errs:?}");
    }

    #[test]
    fn key_material_is_never_debug_printed() {
        let (c, k) = leaf(&["api.example.org"]);
        let s = server(vec![CertificateSpec::inline(["api.example.org"], &c, &k)]);
        let t = table();
        t.apply(vec![Change::PutServer(s.clone())], 2).unwrap();
        let snap = t.load();
        for text in [
            format!("{s:?}"),
            format!("{:?}", snap.certificates().collect::<Vec<_>>()),
            serde_json::to_string(&snap.state_view()).unwrap(),
        ] {
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
        }
        // The store still gets the whole spec.
        let json = serde_json::to_string(&s).unwrap();
        let back: ServerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn missing_files_are_kept_with_their_error_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, kp) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let t = table();
        let s = server(vec![CertificateSpec::files(["api.example.org"], &cp, &kp)]);
        t.apply(vec![Change::PutServer(s)], 2).unwrap();
        let snap = t.load_full();
        let c = snap.certificates().next().unwrap();
        assert!(matches!(c.error, Some(CertError::Read { .. })), "{c:?}");
        assert!(snap.certificate("api.example.org").is_none());
        assert_eq!(t.refresh_certificate_files(), 0, "nothing changed");
        let (c, k) = leaf(&["api.example.org"]);
        std::fs::write(&cp, c).unwrap();
        std::fs::write(&kp, k).unwrap();
        assert_eq!(t.refresh_certificate_files(), 1);
        assert!(t.load().certificate("api.example.org").is_some());
        assert_eq!(t.generation(), 2, "a re-read is not a store revision");
    }
}
