//! Validation of the model. Every problem names the object and the field, e.g.
//! `server "hello": label: must be a DNS label (a-z0-9-, 1..63 chars)`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use crate::host::check_hostname;
use crate::model::{NodeConfig, ReplicaSpec, RoutingDoc, ServerSpec, TokenSpec};

/// The object a problem is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjectRef {
    /// A server, by id.
    Server(String),
    /// A replica, by server id and replica id.
    Replica {
        /// Server id.
        server: String,
        /// Replica id.
        id: String,
    },
    /// A token, by id.
    Token(String),
    /// The node configuration.
    Node,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Server(id) => write!(f, "server {id:?}"),
            ObjectRef::Replica { server, id } => {
                write!(f, "replica {:?}", format!("{server}/{id}"))
            }
            ObjectRef::Token(id) => write!(f, "token {id:?}"),
            ObjectRef::Node => f.write_str("node config"),
        }
    }
}

/// One problem with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct FieldError {
    /// Which object.
    pub object: ObjectRef,
    /// Which field (dotted path for nested ones, e.g. `mirror.fraction`).
    pub field: String,
    /// What is wrong, in a few words.
    pub message: String,
}

impl FieldError {
    /// Build a field error.
    pub fn new(object: ObjectRef, field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { object, field: field.into(), message: message.into() }
    }
}

/// A document (or object) failed validation: one or more field errors, never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// Every problem found, in document order.
    pub errors: Vec<FieldError>,
}

impl ValidationError {
    /// Wrap a list of problems; `Ok(())` if it is empty.
    pub fn check(errors: Vec<FieldError>) -> Result<(), ValidationError> {
        if errors.is_empty() { Ok(()) } else { Err(ValidationError { errors }) }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.as_slice() {
            [] => f.write_str("invalid"),
            [one] => one.fmt(f),
            many => {
                write!(f, "{} problems: ", many.len())?;
                for (i, e) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    e.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ValidationError {}

const DNS_LABEL_MSG: &str = "must be a DNS label (a-z0-9-, 1..63 chars)";
const ID_MSG: &str = "must be 1..128 chars of A-Za-z0-9._-";

/// Whether `s` is a lowercase DNS label: `a-z0-9-`, 1..=63 chars, no leading/trailing `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `s` is a valid object id: 1..=128 chars of `A-Za-z0-9._-`, not `.` or `..`
/// (ids become store key segments).
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `s` is a valid HTTP header name (RFC 9110 token).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `s` is a valid fully-qualified domain for routing: lowercase or not, no port,
/// no trailing dot, at least two labels, `a-z0-9-` labels.
fn is_domain(s: &str) -> bool {
    check_hostname(s).is_ok()
        && s.contains('.')
        && s.split('.').all(|l| is_dns_label(&l.to_ascii_lowercase()))
}

/// Longest `cold_start_hold`: a hold is for a replica's start, not a queue.
const MAX_COLD_START_HOLD: std::time::Duration = std::time::Duration::from_secs(300);

/// Validate one server on its own.
pub fn validate_server(s: &ServerSpec) -> Vec<FieldError> {
    let obj = || ObjectRef::Server(s.id.clone());
    let mut errs = Vec::new();
    let mut err = |field: &str, msg: String| errs.push(FieldError::new(obj(), field, msg));
    if !is_id(&s.id) {
        err("id", ID_MSG.into());
    }
    if !is_dns_label(&s.label) {
        err("label", DNS_LABEL_MSG.into());
    }
    let mut seen = HashSet::new();
    for r in &s.regions {
        if !is_dns_label(r) {
            err("regions", format!("{r:?} {DNS_LABEL_MSG}"));
        } else if !seen.insert(r.as_str()) {
            err("regions", format!("{r:?} listed twice"));
        }
    }
    if !is_id(&s.environment) {
        err("environment", ID_MSG.into());
    }
    let mut seen = HashSet::new();
    for d in &s.custom_domains {
        if !is_domain(d) {
            err(
                "custom_domains",
                format!(
                    "{d:?} must be a domain name (labels of a-z0-9-, no port, no trailing dot)"
                ),
            );
        } else if !seen.insert(d.to_ascii_lowercase()) {
            err("custom_domains", format!("{d:?} listed twice"));
        }
    }
    if s.target_concurrency == 0 {
        err("target_concurrency", "must be at least 1".into());
    }
    if s.min_replicas > s.max_replicas {
        err("min_replicas", format!("{} exceeds max_replicas {}", s.min_replicas, s.max_replicas));
    }
    if let Some(h) = &s.session_header
        && !is_header_name(h)
    {
        err("session_header", format!("{h:?} is not a valid header name"));
    }
    if let Some(vip) = s.vip
        && (vip.port() == 0 || vip.ip().is_unspecified() || vip.ip().is_multicast())
    {
        err("vip", format!("{vip} must be a concrete unicast IP and a non-zero port"));
    }
    if let Some(m) = &s.mirror {
        if !(m.fraction.is_finite() && (0.0..=1.0).contains(&m.fraction)) {
            err("mirror.fraction", "must be between 0.0 and 1.0".into());
        }
        if m.address.port() == 0 || m.address.ip().is_unspecified() {
            err("mirror.address", "must be a concrete IP and a non-zero port".into());
        }
        if m.max_buffer_bytes == 0 {
            err("mirror.max_buffer_bytes", "must be at least 1".into());
        }
    }
    if let Some(l) = &s.launch {
        if l.argv.first().is_none_or(|p| p.is_empty()) {
            err("launch.argv", "must name a program".into());
        }
        // An `=` or NUL would make the variable unreadable to the replica.
        if l.port_env.is_empty() || l.port_env.contains(['=', '\0']) {
            err("launch.port_env", "must be a variable name (no '=' or NUL)".into());
        }
        if l.startup_timeout.is_zero() {
            err("launch.startup_timeout", "must be positive".into());
        }
    }
    if s.limits.max_in_flight == Some(0) {
        err("limits.max_in_flight", "must be at least 1 (omit it for no limit)".into());
    }
    if s.limits.max_buffered_bytes == Some(0) {
        err("limits.max_buffered_bytes", "must be at least 1 (omit it for no limit)".into());
    }
    if s.cold_start_hold.is_some_and(|d| d.is_zero() || d > MAX_COLD_START_HOLD) {
        err("cold_start_hold", "must be positive and at most 5m (omit it for none)".into());
    }
    if s.cold_start_max_held == 0 {
        err("cold_start_max_held", "must be at least 1".into());
    }
    if s.timeouts.idle.is_some_and(|d| d.is_zero()) {
        err("timeouts.idle", "must be positive (omit it for the default)".into());
    }
    if s.timeouts.first_byte.is_some_and(|d| d.is_zero()) {
        err("timeouts.first_byte", "must be positive (omit it for the default)".into());
    }
    if s.timeouts.connect.is_some_and(|d| d.is_zero()) {
        err("timeouts.connect", "must be positive (omit it for the default)".into());
    }
    let custom: HashSet<String> = s.custom_domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    let mut with_cert = HashSet::new();
    for c in &s.certificates {
        if c.domains.is_empty() {
            err("certificates", "a certificate must list the domains it is for".into());
        }
        for d in &c.domains {
            let d = d.to_ascii_lowercase();
            if !custom.contains(&d) {
                err("certificates", format!("{d:?} is not one of the server's custom_domains"));
            } else if !with_cert.insert(d.clone()) {
                err("certificates", format!("{d:?} has two certificates"));
            }
        }
        let inline = (c.cert_pem.is_some(), c.key_pem.is_some());
        let files = (c.cert_file.is_some(), c.key_file.is_some());
        match (inline, files) {
            ((true, true), (false, false)) => {}
            ((false, false), (true, true)) => {
                for p in [&c.cert_file, &c.key_file].into_iter().flatten() {
                    if !p.is_absolute() {
                        err("certificates", format!("{} must be an absolute path", p.display()));
                    }
                }
            }
            _ => err(
                "certificates",
                format!(
                    "certificate for {:?}: give cert_pem and key_pem, or cert_file and key_file",
                    c.domains
                ),
            ),
        }
    }
    errs
}

/// Validate one replica on its own (not whether its server exists).
pub fn validate_replica(r: &ReplicaSpec) -> Vec<FieldError> {
    let obj = || ObjectRef::Replica { server: r.server.clone(), id: r.id.clone() };
    let mut errs = Vec::new();
    if !is_id(&r.server) {
        errs.push(FieldError::new(obj(), "server", ID_MSG));
    }
    if !is_id(&r.id) {
        errs.push(FieldError::new(obj(), "id", ID_MSG));
    }
    if r.address.port() == 0 || r.address.ip().is_unspecified() || r.address.ip().is_multicast() {
        errs.push(FieldError::new(
            obj(),
            "address",
            "must be a concrete unicast IP and a non-zero port",
        ));
    }
    errs
}

/// Validate one token on its own.
pub fn validate_token(t: &TokenSpec) -> Vec<FieldError> {
    let obj = || ObjectRef::Token(t.id.clone());
    let mut errs = Vec::new();
    if !is_id(&t.id) {
        errs.push(FieldError::new(obj(), "id", ID_MSG));
    }
    if !crate::secret_hash::is_valid_secret_hash(&t.secret_hash) {
        // Never echo the value: it might be a plaintext secret pasted by mistake.
        errs.push(FieldError::new(
            obj(),
            "secret_hash",
            "must be \"sha256:\" followed by 64 lowercase hex digits (see `hash_secret`)",
        ));
    }
    if t.environments.is_empty() {
        errs.push(FieldError::new(
            obj(),
            "environments",
            "must list at least one environment (or \"*\")",
        ));
    }
    for e in &t.environments {
        if e != "*" && !is_id(e) {
            errs.push(FieldError::new(obj(), "environments", format!("{e:?} {ID_MSG}")));
        }
    }
    errs
}

/// Validate the node configuration.
pub fn validate_node(n: &NodeConfig) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for b in &n.base_domains {
        if !is_domain(b) {
            errs.push(FieldError::new(
                ObjectRef::Node,
                "base_domains",
                format!(
                    "{b:?} must be a domain name (labels of a-z0-9-, no port, no trailing dot)"
                ),
            ));
        }
    }
    for r in &n.regions {
        if !is_dns_label(r) {
            errs.push(FieldError::new(
                ObjectRef::Node,
                "regions",
                format!("{r:?} {DNS_LABEL_MSG}"),
            ));
        }
    }
    errs
}

/// The domains a server answers on for a node: `<label>.<region>.<base>` for each node base
/// domain and each region in node regions ∩ server regions (all node regions if the server
/// lists none), then its custom domains; all lowercase, without duplicates.
pub fn server_domains(node: &NodeConfig, s: &ServerSpec) -> Vec<String> {
    let mut out = Vec::with_capacity(
        node.base_domains.len() * node.regions.len().max(1) + s.custom_domains.len(),
    );
    for region in &node.regions {
        if !s.regions.is_empty() && !s.regions.iter().any(|r| r == region) {
            continue;
        }
        for base in &node.base_domains {
            out.push(format!("{}.{}.{}", s.label, region, base).to_ascii_lowercase());
        }
    }
    for d in &s.custom_domains {
        out.push(d.to_ascii_lowercase());
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A VIP in the form used to compare them: IPv4-mapped IPv6 as IPv4 (the kernel keys
/// both the same way).
pub fn canonical_vip(vip: SocketAddr) -> SocketAddr {
    SocketAddr::new(vip.ip().to_canonical(), vip.port())
}

/// The error for a server whose VIP another server already has.
pub fn vip_conflict(server: &str, vip: SocketAddr, owner: &str) -> FieldError {
    FieldError::new(
        ObjectRef::Server(server.to_owned()),
        "vip",
        format!("{vip} is also the VIP of server {owner:?} (a VIP belongs to one server)"),
    )
}

/// Validate a whole document against a node configuration: every object, duplicate ids,
/// replicas naming an unknown server, and domains or VIPs claimed by two servers.
pub fn validate_doc(node: &NodeConfig, doc: &RoutingDoc) -> Result<(), ValidationError> {
    let mut errs = validate_node(node);
    let mut server_ids = HashSet::new();
    let mut domain_owner: HashMap<String, &str> = HashMap::new();
    let mut vip_owner: HashMap<SocketAddr, &str> = HashMap::new();
    for s in &doc.servers {
        errs.extend(validate_server(s));
        if !server_ids.insert(s.id.as_str()) {
            errs.push(FieldError::new(
                ObjectRef::Server(s.id.clone()),
                "id",
                "duplicate server id",
            ));
            continue;
        }
        if let Some(vip) = s.vip {
            match vip_owner.get(&canonical_vip(vip)) {
                Some(other) => errs.push(vip_conflict(&s.id, vip, other)),
                None => {
                    vip_owner.insert(canonical_vip(vip), &s.id);
                }
            }
        }
        for d in server_domains(node, s) {
            match domain_owner.get(d.as_str()) {
                Some(other) => errs.push(FieldError::new(
                    ObjectRef::Server(s.id.clone()),
                    if s.custom_domains.iter().any(|c| c.eq_ignore_ascii_case(&d)) {
                        "custom_domains"
                    } else {
                        "label"
                    },
                    format!("domain {d:?} is also claimed by server {other:?}"),
                )),
                None => {
                    domain_owner.insert(d, &s.id);
                }
            }
        }
    }
    let mut replica_ids = HashSet::new();
    for r in &doc.replicas {
        errs.extend(validate_replica(r));
        let obj = || ObjectRef::Replica { server: r.server.clone(), id: r.id.clone() };
        if !server_ids.contains(r.server.as_str()) {
            errs.push(FieldError::new(obj(), "server", format!("unknown server {:?}", r.server)));
        }
        if !replica_ids.insert((r.server.as_str(), r.id.as_str())) {
            errs.push(FieldError::new(obj(), "id", "duplicate replica id within its server"));
        }
    }
    let mut token_ids = HashSet::new();
    for t in &doc.tokens {
        errs.extend(validate_token(t));
        if !token_ids.insert(t.id.as_str()) {
            errs.push(FieldError::new(ObjectRef::Token(t.id.clone()), "id", "duplicate token id"));
        }
    }
    ValidationError::check(errs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MirrorSpec;

    fn node() -> NodeConfig {
        NodeConfig {
            base_domains: vec!["run.example.com".into()],
            regions: vec!["r1".into(), "r2".into()],
        }
    }

    #[test]
    fn label_error_names_object_and_field() {
        let s = ServerSpec::new("hello", "Hello_World");
        let errs = validate_server(&s);
        assert_eq!(
            errs[0].to_string(),
            r#"server "hello": label: must be a DNS label (a-z0-9-, 1..63 chars)"#
        );
    }

    #[test]
    fn launch_checks() {
        let mut s = ServerSpec::new("s", "ok");
        s.launch = Some(crate::model::LaunchSpec::new(["/bin/app"]));
        assert!(validate_server(&s).is_empty());
        let mut bad = crate::model::LaunchSpec::new(Vec::<String>::new());
        bad.port_env = "A=B".into();
        bad.startup_timeout = std::time::Duration::ZERO;
        s.launch = Some(bad);
        let fields: Vec<_> = validate_server(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["launch.argv", "launch.port_env", "launch.startup_timeout"]);
    }

    #[test]
    fn cold_start_checks() {
        use std::time::Duration;
        let mut s = ServerSpec::new("s", "ok");
        s.cold_start_hold = Some(Duration::from_secs(5));
        assert!(validate_server(&s).is_empty());
        s.cold_start_hold = Some(Duration::ZERO);
        s.cold_start_max_held = 0;
        let fields: Vec<_> = validate_server(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["cold_start_hold", "cold_start_max_held"]);
        s.cold_start_hold = Some(Duration::from_secs(301));
        s.cold_start_max_held = 1;
        let fields: Vec<_> = validate_server(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["cold_start_hold"]);
        // Unset, it stays out of the serialized spec (older nodes reject unknown keys).
        let text = toml::to_string(&ServerSpec::new("s", "ok")).unwrap();
        assert!(!text.contains("cold_start"), "{text}");
    }

    #[test]
    fn server_field_checks() {
        let mut s = ServerSpec::new("s", "ok");
        s.regions = vec!["r1".into(), "r1".into(), "R2".into()];
        s.custom_domains = vec!["api.example.com:443".into(), "nodot".into()];
        s.target_concurrency = 0;
        s.min_replicas = 5;
        s.max_replicas = 2;
        s.session_header = Some("bad header".into());
        s.mirror = Some(MirrorSpec {
            address: "127.0.0.1:9".parse().unwrap(),
            protocol: Default::default(),
            fraction: 1.5,
            max_buffer_bytes: 1,
        });
        s.limits.max_in_flight = Some(0);
        let fields: Vec<_> = validate_server(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "regions",
                "regions",
                "custom_domains",
                "custom_domains",
                "target_concurrency",
                "min_replicas",
                "session_header",
                "mirror.fraction",
                "limits.max_in_flight"
            ]
        );
    }

    #[test]
    fn doc_cross_checks() {
        let mut a = ServerSpec::new("a", "same");
        a.regions = vec!["r1".into()];
        let b = ServerSpec::new("b", "same"); // all regions: overlaps a in r1
        let mut c = ServerSpec::new("c", "c");
        c.custom_domains = vec!["API.example.com".into()];
        let mut d = ServerSpec::new("d", "d");
        d.custom_domains = vec!["api.example.com".into()];
        let doc = RoutingDoc {
            servers: vec![a.clone(), b, c, d, a],
            replicas: vec![
                ReplicaSpec::new("nope", "r1", "127.0.0.1:1".parse().unwrap()),
                ReplicaSpec::new("c", "r1", "127.0.0.1:1".parse().unwrap()),
                ReplicaSpec::new("c", "r1", "0.0.0.0:1".parse().unwrap()),
            ],
            tokens: vec![
                TokenSpec { id: "t".into(), secret_hash: "plaintext".into(), environments: vec![] },
                TokenSpec {
                    id: "t".into(),
                    secret_hash: crate::hash_secret("x"),
                    environments: vec!["*".into()],
                },
            ],
        };
        let err = validate_doc(&node(), &doc).unwrap_err();
        let msgs: Vec<String> = err.errors.iter().map(ToString::to_string).collect();
        let want = [
            r#"server "b": label: domain "same.r1.run.example.com" is also claimed by server "a""#,
            r#"server "d": custom_domains: domain "api.example.com" is also claimed by server "c""#,
            r#"server "a": id: duplicate server id"#,
            r#"replica "nope/r1": server: unknown server "nope""#,
            r#"replica "c/r1": address: must be a concrete unicast IP and a non-zero port"#,
            r#"replica "c/r1": id: duplicate replica id within its server"#,
            r#"token "t": secret_hash: must be "sha256:" followed by 64 lowercase hex digits (see `hash_secret`)"#,
            r#"token "t": environments: must list at least one environment (or "*")"#,
            r#"token "t": id: duplicate token id"#,
        ];
        assert_eq!(msgs, want);
        assert!(!err.to_string().contains("plaintext"));
    }

    #[test]
    fn vip_checks() {
        let mut a = ServerSpec::new("a", "a");
        a.vip = Some("198.19.255.1:80".parse().unwrap());
        let mut b = ServerSpec::new("b", "b");
        b.vip = Some("[::ffff:198.19.255.1]:80".parse().unwrap());
        let mut c = ServerSpec::new("c", "c");
        c.vip = Some("198.19.255.2:0".parse().unwrap());
        let doc = RoutingDoc { servers: vec![a, b, c], ..Default::default() };
        let msgs: Vec<String> = validate_doc(&node(), &doc)
            .unwrap_err()
            .errors
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            msgs,
            [
                r#"server "b": vip: [::ffff:198.19.255.1]:80 is also the VIP of server "a" (a VIP belongs to one server)"#,
                r#"server "c": vip: 198.19.255.2:0 must be a concrete unicast IP and a non-zero port"#,
            ]
        );
    }

    #[test]
    fn domains_for_server() {
        let mut s = ServerSpec::new("s", "hello");
        assert_eq!(
            server_domains(&node(), &s),
            ["hello.r1.run.example.com", "hello.r2.run.example.com"]
        );
        s.regions = vec!["r2".into(), "r9".into()];
        s.custom_domains = vec!["Api.Example.com".into()];
        assert_eq!(server_domains(&node(), &s), ["api.example.com", "hello.r2.run.example.com"]);
    }
}
