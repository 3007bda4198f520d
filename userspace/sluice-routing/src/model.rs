//! The routing model: what a file or the store holds (servers, replicas, tokens) and the
//! node's own configuration.
//!
//! Every type deserializes from TOML and JSON with `deny_unknown_fields`, so a typo in a
//! field name is an error rather than a silently ignored setting. Durations accept either a
//! whole number of seconds (`30`) or a humantime string (`"30s"`, `"5m"`, `"1h 30m"`) and
//! serialize as humantime strings.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Default `target_concurrency`: in-flight requests per replica the autoscaler aims for.
pub const DEFAULT_TARGET_CONCURRENCY: u32 = 100;
/// Default `max_replicas`.
pub const DEFAULT_MAX_REPLICAS: u32 = 100;
/// Default `scale_up_window`.
pub const DEFAULT_SCALE_UP_WINDOW: Duration = Duration::from_secs(60);
/// Default `scale_down_window`.
pub const DEFAULT_SCALE_DOWN_WINDOW: Duration = Duration::from_secs(300);
/// Default `environment`.
pub const DEFAULT_ENVIRONMENT: &str = "default";
/// Default mirror tee buffer (`mirror.max_buffer_bytes`).
pub const DEFAULT_MIRROR_BUFFER_BYTES: u64 = 1024 * 1024;

/// How sluice speaks to a replica (the upstream leg only; clients are independent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/2 over cleartext TCP with prior knowledge.
    H2c,
    /// HTTP/1.1. The default, because every HTTP server speaks it.
    #[default]
    Http1,
}

/// Kernel splicing of a server's upgraded streams (`splice = "..."`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpliceMode {
    /// Per stream, from observed message sizes and rates: latency-bound streams (small
    /// messages) are spliced, bulk stays on the userspace relay, which is faster for it.
    #[default]
    Auto,
    /// Splice every plaintext stream right after the upgrade.
    Always,
    /// Never splice: relay in userspace.
    Never,
}

impl SpliceMode {
    /// The mode's config spelling.
    pub fn name(self) -> &'static str {
        match self {
            SpliceMode::Auto => "auto",
            SpliceMode::Always => "always",
            SpliceMode::Never => "never",
        }
    }
}

/// How connects to a server's virtual address pick a replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VipBalance {
    /// Every new connection goes to the replica with the fewest in-flight requests,
    /// re-chosen periodically by sluice.
    #[default]
    LeastLoaded,
    /// Rendezvous hashing on the connecting process, so one client keeps its replica
    /// while others come and go.
    Hrw,
}

impl VipBalance {
    /// Whether this is the default (`least_loaded`).
    pub fn is_default(&self) -> bool {
        *self == VipBalance::default()
    }
}

/// A replica's lifecycle state as the orchestrator reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Scheduled but not yet serving: never routed.
    Starting,
    /// Serving: routed once its port accepts connections (the node's health checker, `sluice_node::health`, probes it).
    /// The default, so hand-written files stay short.
    #[default]
    Ready,
    /// Going away: no new requests; in-flight ones may finish until `drain_deadline`.
    Draining,
}

/// This node's view of the world: which base domains it answers for and which regions it
/// routes for. Fixed for the lifetime of a [`crate::RoutingTable`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Base domains, e.g. `["run.example.com"]`; a server is reachable at
    /// `<label>.<region>.<base>` for each of them.
    pub base_domains: Vec<String>,
    /// Routing regions this node serves, e.g. `["us-east1"]`.
    pub regions: Vec<String>,
}

/// The routing document: what a file (or a directory of files) or the store holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingDoc {
    /// Servers (`[[servers]]` in TOML).
    pub servers: Vec<ServerSpec>,
    /// Replicas (`[[replicas]]`).
    pub replicas: Vec<ReplicaSpec>,
    /// Proxy-auth tokens (`[[tokens]]`).
    pub tokens: Vec<TokenSpec>,
}

/// A user's HTTP server: an autoscaling pool of replicas behind one or more domains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Stable unique id (store key); `[A-Za-z0-9._-]`, 1..=128 chars.
    pub id: String,
    /// DNS label used in `<label>.<region>.<base>`.
    pub label: String,
    /// Regions the server runs in. Empty means every region this node serves.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Environment the server belongs to; tokens are scoped to environments.
    #[serde(default = "default_environment")]
    pub environment: String,
    /// Extra fully-qualified domains that map straight to this server (case-insensitive).
    #[serde(default)]
    pub custom_domains: Vec<String>,
    /// Skip proxy auth for this server.
    #[serde(default)]
    pub unauthenticated: bool,
    /// In-flight requests per replica the autoscaler aims for (>= 1).
    #[serde(default = "default_target_concurrency")]
    pub target_concurrency: u32,
    /// Lower bound on the desired replica count.
    #[serde(default)]
    pub min_replicas: u32,
    /// Upper bound on the desired replica count (>= `min_replicas`).
    #[serde(default = "default_max_replicas")]
    pub max_replicas: u32,
    /// Extra replicas kept on top of the computed demand.
    #[serde(default)]
    pub buffer_replicas: u32,
    /// How long demand must stay higher before scaling up.
    #[serde(default = "default_scale_up_window", with = "duration_serde")]
    pub scale_up_window: Duration,
    /// How long demand must stay lower before scaling down.
    #[serde(default = "default_scale_down_window", with = "duration_serde")]
    pub scale_down_window: Duration,
    /// Header whose value pins a session to a replica (rendezvous hashing); `None` means the
    /// proxy's configured default (`Sluice-Session-Id`).
    #[serde(default)]
    pub session_header: Option<String>,
    /// Virtual address (`ip:port`) that local clients on the node connect to; the
    /// kernel's cgroup connect program rewrites such connects to a replica. `None`: no VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<SocketAddr>,
    /// How a connect to `vip` picks its replica.
    // Left out at its default, like `vip` when unset, so a spec without a VIP
    // serializes as before and older nodes (deny_unknown_fields) still read it.
    #[serde(default, skip_serializing_if = "VipBalance::is_default")]
    pub vip_balance: VipBalance,
    /// Shadow-copy a sampled fraction of requests.
    #[serde(default)]
    pub mirror: Option<MirrorSpec>,
    /// Per-server resource caps (tenant isolation).
    #[serde(default)]
    pub limits: ServerLimits,
    /// Per-server timeouts.
    #[serde(default)]
    pub timeouts: ServerTimeouts,
    /// Whether upgraded streams (WebSockets) of this server are spliced in the kernel:
    /// `auto` (the default) decides per stream from its observed traffic.
    #[serde(default)]
    pub splice: SpliceMode,
    /// How to start a replica of this server on a node (`sluice supervise`, the reference
    /// compute side). `None`: replicas are started by something else (a real scheduler).
    // Left out when unset, so specs without it serialize as before and older nodes
    // (deny_unknown_fields) still read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<LaunchSpec>,
    /// Whether this server's requests go to the node's access log (when the node has one):
    /// `true` or `false` override the node's `access_log.all_servers`; `None` follows it.
    // Left out when unset, for the same reason as `launch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    /// Opt-in cold-start hold: a request that finds no ready replica waits up to this
    /// long for the first one (woken when a snapshot brings one) before the usual `503`.
    /// `None`, the default: the `503` at once (the platform's contract is a fast `503`
    /// its clients retry).
    // Left out when unset, like `launch`, for older nodes.
    #[serde(default, with = "duration_serde::option", skip_serializing_if = "Option::is_none")]
    pub cold_start_hold: Option<Duration>,
    /// Most requests held at once for this server under `cold_start_hold`; beyond it a
    /// request gets the `503` at once. Bounds the memory a burst against a cold server
    /// holds (each held request keeps its head, never its body).
    #[serde(
        default = "default_cold_start_max_held",
        skip_serializing_if = "is_default_cold_start_max_held"
    )]
    pub cold_start_max_held: u32,
    /// Certificates for custom domains (`[[servers.certificates]]`), served by SNI on every
    /// TLS listener ahead of the listener's own. Left out when empty, like `launch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateSpec>,
}

/// A certificate for some of a server's custom domains: a PEM chain and key inline, or
/// the files that hold them (e.g. a mounted Kubernetes Secret's `tls.crt` and `tls.key`,
/// re-read when they change).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// The server's custom domains it is served for (non-empty); it must cover each.
    pub domains: Vec<String>,
    /// PEM certificate chain, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_pem: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), with `cert_pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<SecretPem>,
    /// Absolute path of a PEM chain file, instead of `cert_pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// Absolute path of its PEM key file, with `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// Issued by sluice's ACME client (`[acme]`), which renews it; a certificate without
    /// this mark is the server's own and ACME leaves it alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acme: bool,
}

impl CertificateSpec {
    /// An inline certificate for `domains`.
    pub fn inline(
        domains: impl IntoIterator<Item = impl Into<String>>,
        cert_pem: impl Into<String>,
        key_pem: impl Into<String>,
    ) -> Self {
        CertificateSpec {
            domains: domains.into_iter().map(Into::into).collect(),
            cert_pem: Some(cert_pem.into()),
            key_pem: Some(SecretPem(key_pem.into())),
            cert_file: None,
            key_file: None,
            acme: false,
        }
    }

    /// A certificate read from files.
    pub fn files(
        domains: impl IntoIterator<Item = impl Into<String>>,
        cert_file: impl Into<std::path::PathBuf>,
        key_file: impl Into<std::path::PathBuf>,
    ) -> Self {
        CertificateSpec {
            domains: domains.into_iter().map(Into::into).collect(),
            cert_pem: None,
            key_pem: None,
            cert_file: Some(cert_file.into()),
            key_file: Some(key_file.into()),
            acme: false,
        }
    }
}

// By hand: the key must never reach a log, and the chain is only noise there.
impl std::fmt::Debug for CertificateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateSpec")
            .field("domains", &self.domains)
            .field("cert_pem", &self.cert_pem.as_ref().map(|p| format!("<{} bytes>", p.len())))
            .field("key_pem", &self.key_pem)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("acme", &self.acme)
            .finish()
    }
}

/// Private key text: serialized as itself (the store must hold it), never shown by
/// `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretPem(pub String);

impl SecretPem {
    /// The key text, for parsing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Default `cold_start_max_held`.
pub const DEFAULT_COLD_START_MAX_HELD: u32 = 64;

fn default_cold_start_max_held() -> u32 {
    DEFAULT_COLD_START_MAX_HELD
}

fn is_default_cold_start_max_held(n: &u32) -> bool {
    *n == DEFAULT_COLD_START_MAX_HELD
}

impl ServerSpec {
    /// A server with the given id and label and every other field at its default.
    pub fn new(id: impl Into<String>, label: impl Into<String>) -> Self {
        ServerSpec {
            id: id.into(),
            label: label.into(),
            regions: Vec::new(),
            environment: default_environment(),
            custom_domains: Vec::new(),
            unauthenticated: false,
            target_concurrency: DEFAULT_TARGET_CONCURRENCY,
            min_replicas: 0,
            max_replicas: DEFAULT_MAX_REPLICAS,
            buffer_replicas: 0,
            scale_up_window: DEFAULT_SCALE_UP_WINDOW,
            scale_down_window: DEFAULT_SCALE_DOWN_WINDOW,
            session_header: None,
            vip: None,
            vip_balance: VipBalance::default(),
            mirror: None,
            limits: ServerLimits::default(),
            timeouts: ServerTimeouts::default(),
            splice: SpliceMode::default(),
            launch: None,
            access_log: None,
            cold_start_hold: None,
            cold_start_max_held: DEFAULT_COLD_START_MAX_HELD,
            certificates: Vec::new(),
        }
    }
}

impl Default for ServerSpec {
    /// Defaults with an empty id and label (which do not validate): for `..Default::default()`.
    fn default() -> Self {
        ServerSpec::new("", "")
    }
}

/// Default `launch.port_env`.
pub const DEFAULT_PORT_ENV: &str = "PORT";
/// Default `launch.startup_timeout`.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `launch.exit_grace_period`.
pub const DEFAULT_EXIT_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// How to start one replica process (`[servers.launch]`), for `sluice supervise`.
///
/// The supervisor picks a free loopback port, passes it in the `port_env` variable and
/// registers the replica at `127.0.0.1:<port>` with `protocol`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// Program and arguments (non-empty); run directly, not through a shell.
    pub argv: Vec<String>,
    /// Extra environment variables (on top of the supervisor's own environment).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// The variable that tells the replica which port to listen on.
    #[serde(default = "default_port_env")]
    pub port_env: String,
    /// How sluice speaks to the replica.
    #[serde(default)]
    pub protocol: Protocol,
    /// A replica whose port does not accept connections within this long is killed and
    /// replaced.
    #[serde(default = "default_startup_timeout", with = "duration_serde")]
    pub startup_timeout: Duration,
    /// On scale-down: the longest a replica drains before SIGTERM (it gets it sooner, once
    /// the proxy has nothing in flight to it); also its `drain_deadline`.
    #[serde(default = "default_exit_grace_period", with = "duration_serde")]
    pub exit_grace_period: Duration,
}

impl LaunchSpec {
    /// A launch spec for `argv` with every other field at its default.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        LaunchSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Default::default(),
            port_env: default_port_env(),
            protocol: Protocol::default(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            exit_grace_period: DEFAULT_EXIT_GRACE_PERIOD,
        }
    }
}

fn default_port_env() -> String {
    DEFAULT_PORT_ENV.to_owned()
}
fn default_startup_timeout() -> Duration {
    DEFAULT_STARTUP_TIMEOUT
}
fn default_exit_grace_period() -> Duration {
    DEFAULT_EXIT_GRACE_PERIOD
}

/// Mirroring: a sampled fraction of requests (headers and full body) is copied to a shadow
/// target; the responses are discarded and the primary never waits for the mirror.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    /// Where the copies go.
    pub address: SocketAddr,
    /// How to speak to the mirror.
    #[serde(default)]
    pub protocol: Protocol,
    /// Fraction of requests mirrored, in `0.0..=1.0`.
    pub fraction: f64,
    /// Bound on the tee buffer per mirrored request; when the mirror falls this far behind
    /// its copy is dropped (and counted).
    #[serde(default = "default_mirror_buffer")]
    pub max_buffer_bytes: u64,
}

/// Per-server caps, so one tenant cannot starve another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Largest request body accepted (`413` above it); `None` = unlimited.
    pub max_body_bytes: Option<u64>,
    /// Most concurrent in-flight requests for the whole server (`503` above it);
    /// `None` = unlimited.
    pub max_in_flight: Option<u32>,
    /// Most bytes the proxy may hold in buffers for this server at once (mirror tee
    /// buffers, body buffering), summed over its requests; `None` = unlimited. A request
    /// that cannot get buffer space is not mirrored / not buffered, never stalled.
    pub max_buffered_bytes: Option<u64>,
}

/// Per-server timeouts. There is no request deadline by design (long requests stream).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTimeouts {
    /// Fail an exchange with no bytes moving in either direction (request body to the
    /// replica, response from it) for this long: 504 before the response head, a reset
    /// stream after it. Reset on every chunk, so a slow but steady upload or stream never
    /// trips it. `None` = proxy default (`timeouts.upstream_idle`).
    #[serde(with = "duration_serde::option")]
    pub idle: Option<Duration>,
    /// Longest wait for the response head after the request's last byte went to the
    /// replica (504 then); `None` = proxy default (`timeouts.upstream_first_byte`).
    #[serde(with = "duration_serde::option")]
    pub first_byte: Option<Duration>,
    /// Give up connecting to a replica after this long; `None` = proxy default.
    #[serde(with = "duration_serde::option")]
    pub connect: Option<Duration>,
}

/// One replica of a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// Id of the server this replica belongs to.
    pub server: String,
    /// Replica id, unique within its server; `[A-Za-z0-9._-]`, 1..=128 chars.
    pub id: String,
    /// Where the replica listens (an IP literal: no DNS on the request path).
    pub address: SocketAddr,
    /// How to speak to it.
    #[serde(default)]
    pub protocol: Protocol,
    /// Lifecycle state.
    #[serde(default)]
    pub state: ReplicaState,
    /// When draining: the end of the grace period for in-flight requests. Accepts unix
    /// seconds or an RFC 3339 timestamp; serialized as RFC 3339.
    #[serde(default, with = "system_time_serde")]
    pub drain_deadline: Option<SystemTime>,
}

impl ReplicaSpec {
    /// A ready HTTP/1.1 replica at `address`.
    pub fn new(server: impl Into<String>, id: impl Into<String>, address: SocketAddr) -> Self {
        ReplicaSpec {
            server: server.into(),
            id: id.into(),
            address,
            protocol: Protocol::default(),
            state: ReplicaState::default(),
            drain_deadline: None,
        }
    }
}

/// A proxy-auth token: the id travels in one header, the secret in another.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// Token id (the key header's value); `[A-Za-z0-9._-]`, 1..=128 chars.
    pub id: String,
    /// `sha256:<64 lowercase hex>` of the secret; see [`crate::hash_secret`].
    pub secret_hash: String,
    /// Environments the token grants access to (non-empty); `"*"` grants all.
    pub environments: Vec<String>,
}

impl TokenSpec {
    /// Whether this token may call servers in `environment`.
    pub fn allows_environment(&self, environment: &str) -> bool {
        self.environments.iter().any(|e| e == "*" || e == environment)
    }

    /// Constant-time check of a presented secret against this token's hash.
    pub fn verify(&self, secret: &str) -> bool {
        crate::verify_secret(&self.secret_hash, secret)
    }
}

// Hand-written so the hash never lands in logs through `{:?}`.
impl std::fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSpec")
            .field("id", &self.id)
            .field("secret_hash", &"<redacted>")
            .field("environments", &self.environments)
            .finish()
    }
}

fn default_environment() -> String {
    DEFAULT_ENVIRONMENT.to_owned()
}
fn default_target_concurrency() -> u32 {
    DEFAULT_TARGET_CONCURRENCY
}
fn default_max_replicas() -> u32 {
    DEFAULT_MAX_REPLICAS
}
fn default_scale_up_window() -> Duration {
    DEFAULT_SCALE_UP_WINDOW
}
fn default_scale_down_window() -> Duration {
    DEFAULT_SCALE_DOWN_WINDOW
}
fn default_mirror_buffer() -> u64 {
    DEFAULT_MIRROR_BUFFER_BYTES
}

/// Serde for [`Duration`]: whole seconds or a humantime string in, humantime string out.
pub mod duration_serde {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serialize as a humantime string (`"1m 30s"`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Deserialize from seconds (integer) or a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration: whole seconds or a string like \"30s\", \"5m\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom("a duration cannot be negative"))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v).map_err(|e| E::custom(e.to_string()))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            // A quoted bare number is seconds, like an unquoted one.
            if let Ok(secs) = v.trim().parse::<f64>() {
                return self.visit_f64(secs);
            }
            humantime::parse_duration(v.trim())
                .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
        }
    }

    /// The same for `Option<Duration>` (absent or `null` = `None`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Serialize `Some` as a humantime string and `None` as a unit/none.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Deserialize seconds, a humantime string, or null.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(d)| d))
        }
    }
}

/// Serde for `Option<SystemTime>`: unix seconds or RFC 3339 in, RFC 3339 out.
pub mod system_time_serde {
    use std::fmt;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::de::{self, Visitor};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize `Some` as an RFC 3339 timestamp (second precision).
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_seconds(*t)),
            None => s.serialize_none(),
        }
    }

    /// Deserialize unix seconds, an RFC 3339 string, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        struct Wrap(SystemTime);
        impl<'de> Deserialize<'de> for Wrap {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(TimeVisitor).map(Wrap)
            }
        }
        Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(t)| t))
    }

    struct TimeVisitor;

    impl Visitor<'_> for TimeVisitor {
        type Value = SystemTime;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("unix seconds or an RFC 3339 timestamp")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<SystemTime, E> {
            UNIX_EPOCH
                .checked_add(Duration::from_secs(v))
                .ok_or_else(|| E::custom("timestamp out of range"))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<SystemTime, E> {
            let v = u64::try_from(v).map_err(|_| E::custom("timestamp before 1970"))?;
            self.visit_u64(v)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<SystemTime, E> {
            humantime::parse_rfc3339_weak(v.trim())
                .map_err(|e| E::custom(format!("invalid timestamp {v:?}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_defaults_from_minimal_toml() {
        let doc: RoutingDoc = toml::from_str(
            r#"
            [[servers]]
            id = "s1"
            label = "hello"
            "#,
        )
        .unwrap();
        assert_eq!(doc.servers[0], ServerSpec::new("s1", "hello"));
    }

    #[test]
    fn durations_accept_seconds_and_strings() {
        let doc: RoutingDoc = toml::from_str(
            r#"
            [[servers]]
            id = "s1"
            label = "hello"
            scale_up_window = 30
            scale_down_window = "5m"
            timeouts = { idle = "1m 30s", first_byte = "10m" }
            "#,
        )
        .unwrap();
        let s = &doc.servers[0];
        assert_eq!(s.scale_up_window, Duration::from_secs(30));
        assert_eq!(s.scale_down_window, Duration::from_secs(300));
        assert_eq!(s.timeouts.idle, Some(Duration::from_secs(90)));
        assert_eq!(s.timeouts.first_byte, Some(Duration::from_secs(600)));
        assert_eq!(s.timeouts.connect, None);
        // Round trip through JSON keeps the values.
        let json = serde_json::to_string(&doc).unwrap();
        let back: RoutingDoc = serde_json::from_str(&json).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn toml_round_trip() {
        let mut s = ServerSpec::new("s1", "hello");
        s.timeouts.connect = Some(Duration::from_millis(1500));
        let mut r = ReplicaSpec::new("s1", "r1", "127.0.0.1:1".parse().unwrap());
        r.drain_deadline = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let doc = RoutingDoc { servers: vec![s], replicas: vec![r], tokens: vec![] };
        let text = toml::to_string(&doc).unwrap();
        let back: RoutingDoc = toml::from_str(&text).unwrap();
        assert_eq!(back, doc, "{text}");
    }

    #[test]
    fn vip_fields_round_trip() {
        let doc: RoutingDoc = toml::from_str(
            r#"
            [[servers]]
            id = "s1"
            label = "hello"
            vip = "198.19.255.1:80"
            vip_balance = "hrw"
            "#,
        )
        .unwrap();
        let s = &doc.servers[0];
        assert_eq!(s.vip, Some("198.19.255.1:80".parse().unwrap()));
        assert_eq!(s.vip_balance, VipBalance::Hrw);
        assert_eq!(ServerSpec::new("s", "l").vip_balance, VipBalance::LeastLoaded);
        let back: RoutingDoc = toml::from_str(&toml::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
        let back: RoutingDoc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
        // Without a VIP, neither field is written.
        let plain = serde_json::to_string(&ServerSpec::new("s", "l")).unwrap();
        assert!(!plain.contains("vip"), "{plain}");
    }

    #[test]
    fn launch_defaults_and_round_trip() {
        let doc: RoutingDoc = toml::from_str(
            r#"
            [[servers]]
            id = "s1"
            label = "hello"
            [servers.launch]
            argv = ["/bin/app", "--serve"]
            env = { MODE = "prod" }
            startup_timeout = "5s"
            "#,
        )
        .unwrap();
        let l = doc.servers[0].launch.as_ref().unwrap();
        assert_eq!(l.argv, ["/bin/app", "--serve"]);
        assert_eq!(l.env.get("MODE").map(String::as_str), Some("prod"));
        assert_eq!(l.port_env, "PORT");
        assert_eq!(l.protocol, Protocol::Http1);
        assert_eq!(l.startup_timeout, Duration::from_secs(5));
        assert_eq!(l.exit_grace_period, DEFAULT_EXIT_GRACE_PERIOD);
        let back: RoutingDoc = toml::from_str(&toml::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
        let back: RoutingDoc = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
        // Without a launch spec nothing is written.
        let plain = serde_json::to_string(&ServerSpec::new("s", "l")).unwrap();
        assert!(!plain.contains("launch"), "{plain}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<RoutingDoc>(
            r#"
            [[servers]]
            id = "s1"
            label = "hello"
            lable = "typo"
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("lable"), "{err}");
    }

    #[test]
    fn replica_deadline_accepts_unix_and_rfc3339() {
        let doc: RoutingDoc = toml::from_str(
            r#"
            [[replicas]]
            server = "s1"
            id = "r1"
            address = "127.0.0.1:8080"
            state = "draining"
            drain_deadline = 1700000000
            [[replicas]]
            server = "s1"
            id = "r2"
            address = "[::1]:8080"
            protocol = "h2c"
            drain_deadline = "2023-11-14T22:13:20Z"
            "#,
        )
        .unwrap();
        assert_eq!(doc.replicas[0].drain_deadline, doc.replicas[1].drain_deadline);
        assert_eq!(doc.replicas[0].state, ReplicaState::Draining);
        assert_eq!(doc.replicas[1].state, ReplicaState::Ready);
        assert_eq!(doc.replicas[0].protocol, Protocol::Http1);
        assert_eq!(doc.replicas[1].protocol, Protocol::H2c);
        let json = serde_json::to_string(&doc).unwrap();
        let back: RoutingDoc = serde_json::from_str(&json).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn token_debug_redacts_hash() {
        let t = TokenSpec {
            id: "t".into(),
            secret_hash: crate::hash_secret("s3cret"),
            environments: vec!["default".into()],
        };
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("sha256"), "{dbg}");
        assert!(t.verify("s3cret"));
        assert!(!t.verify("s3cret "));
    }
}
