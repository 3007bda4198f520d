//! Proxy configuration: listeners, TLS, limits, timeouts, admin, request ids.
//!
//! Every field has a safe default so an empty `[proxy]` table (or `ProxyConfig::default()`)
//! is a working config; durations accept `"30s"`, `"250ms"`, `"5m"` or a number of seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The whole proxy configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Client-facing listeners (plaintext h1 + h2c, or TLS with ALPN).
    pub listeners: Vec<ListenerConfig>,
    /// Admin listener (`/livez`, `/readyz`, `/metrics`).
    pub admin: AdminConfig,
    /// Size and count limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Request-id header handling.
    pub request_id: RequestIdConfig,
    /// Status for a domain no server claims: 503 (default, same as "no replica") or 404.
    pub unknown_domain_status: u16,
    /// Upstream (replica-side) connection settings.
    pub upstream: UpstreamConfig,
    /// Proxy auth header names and the handling of rejected request bodies.
    pub auth: AuthConfig,
    /// Load balancing: the default session header and the optional bounded load.
    pub lb: LbConfig,
    /// The autoscaler stream (`GET /autoscaler/stream` on the admin listener).
    pub autoscaler: AutoscalerConfig,
    /// The access log (`[access_log]`), off by default.
    pub access_log: crate::access_log::AccessLogConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listeners: vec![ListenerConfig::new(SocketAddr::from(([127, 0, 0, 1], 8080)))],
            admin: AdminConfig::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            request_id: RequestIdConfig::default(),
            unknown_domain_status: 503,
            upstream: UpstreamConfig::default(),
            auth: AuthConfig::default(),
            lb: LbConfig::default(),
            autoscaler: AutoscalerConfig::default(),
            access_log: crate::access_log::AccessLogConfig::default(),
        }
    }
}

impl ProxyConfig {
    /// Checks cross-field invariants that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.unknown_domain_status != 503 && self.unknown_domain_status != 404 {
            return Err(ConfigError::Invalid(format!(
                "unknown_domain_status must be 503 or 404, not {}",
                self.unknown_domain_status
            )));
        }
        if http::HeaderName::from_bytes(self.request_id.header.as_bytes()).is_err() {
            return Err(ConfigError::Invalid(format!(
                "request_id.header {:?} is not a valid header name",
                self.request_id.header
            )));
        }
        for edge in &self.request_id.trusted_edges {
            Cidr::parse(edge).map_err(|e| {
                ConfigError::Invalid(format!("request_id.trusted_edges {edge:?}: {e}"))
            })?;
        }
        for l in &self.listeners {
            for p in &l.trusted_proxies {
                Cidr::parse(p).map_err(|e| {
                    ConfigError::Invalid(format!("listener {} trusted_proxies {p:?}: {e}", l.addr))
                })?;
            }
            // A PROXY header is only believed from a trusted peer: with nobody trusted
            // the setting could never take effect, which is surely a mistake.
            if l.proxy_protocol != ProxyProtocol::Off && l.trusted_proxies.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "listener {} has proxy_protocol = {:?} but no trusted_proxies \
                     (use [\"0.0.0.0/0\", \"::/0\"] to require it from every peer)",
                    l.addr,
                    l.proxy_protocol.as_str()
                )));
            }
            if let Some(tls) = &l.tls
                && tls.certs.is_empty()
            {
                return Err(ConfigError::Invalid(format!(
                    "listener {} has a [tls] table without certs",
                    l.addr
                )));
            }
        }
        self.auth.headers()?;
        if http::HeaderName::from_bytes(self.lb.session_header.as_bytes()).is_err() {
            return Err(ConfigError::Invalid(format!(
                "lb.session_header {:?} is not a valid header name",
                self.lb.session_header
            )));
        }
        if let Some(c) = self.lb.bounded_load
            && !(c >= 1.0 && c.is_finite())
        {
            return Err(ConfigError::Invalid(format!(
                "lb.bounded_load must be a number >= 1.0, not {c}"
            )));
        }
        if self.autoscaler.interval < Duration::from_millis(10) {
            return Err(ConfigError::Invalid("autoscaler.interval must be at least 10ms".into()));
        }
        if self.limits.h2_max_send_buffer < 16 * 1024 {
            return Err(ConfigError::Invalid(
                "limits.h2_max_send_buffer must be at least 16384 (one frame)".into(),
            ));
        }
        self.access_log.validate()?;
        if self.limits.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "limits.max_header_bytes must be at least 8192".into(),
            ));
        }
        Ok(())
    }
}

/// One client-facing listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind (IPv4 or IPv6; IPv6 sockets are v6-only).
    pub addr: SocketAddr,
    /// TLS settings; absent means plaintext (HTTP/1.1 and h2c prior knowledge).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// PROXY protocol header expected from `trusted_proxies` peers, before anything else
    /// (before TLS): `off` (default), `v1`, `v2` or `any`. A trusted peer must send one;
    /// any other peer that sends one is refused (docs/proxy.md, "Client identity").
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Peers (IPs or CIDRs) trusted to report the client: their PROXY header (when
    /// `proxy_protocol` is on) and their X-Forwarded-For are believed, and they are never
    /// banned. Combined with `request_id.trusted_edges`, which applies to every listener.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Also set RFC 7239 `Forwarded` (`for=`, `host=`, `proto=`) on this listener's
    /// requests to replicas, beside X-Forwarded-*. Off by default, as in nginx and Envoy:
    /// it costs a formatted header per request that most replicas never read. Off or on,
    /// a client's own `Forwarded` reaches a replica only from a trusted peer, and a
    /// trusted peer's is always read for the client's identity.
    #[serde(default)]
    pub forwarded_header: bool,
}

impl ListenerConfig {
    /// A plaintext listener on `addr`, with no PROXY protocol and nobody trusted.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            tls: None,
            proxy_protocol: ProxyProtocol::Off,
            trusted_proxies: Vec::new(),
            forwarded_header: false,
        }
    }
}

/// Which PROXY protocol versions a listener accepts from its trusted peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No PROXY header: every peer speaks HTTP or TLS straight away.
    #[default]
    Off,
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
    /// Either version.
    Any,
}

impl ProxyProtocol {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
            ProxyProtocol::Any => "any",
        }
    }
}

/// TLS settings of a listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates, chosen by SNI. The first one also serves clients that send no SNI.
    pub certs: Vec<CertConfig>,
}

/// One certificate chain and key, and the SNI names it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// SNI names, exact (`api.example.com`) or wildcard (`*.example.com`).
    pub names: Vec<String>,
    /// PEM file with the certificate chain (leaf first).
    pub cert_pem: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: PathBuf,
}

/// Admin listener settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; `None` disables it.
    pub addr: Option<SocketAddr>,
    /// At most this many servers get per-server and per-replica series in `/metrics`
    /// (the ones with the most requests): the bound on the scrape's cardinality.
    pub metrics_max_servers: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { addr: Some(SocketAddr::from(([127, 0, 0, 1], 9090))), metrics_max_servers: 1000 }
    }
}

/// Size and count limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open client connections at once; further accepts wait (the kernel backlog holds them).
    pub max_connections: usize,
    /// Request header block size (HTTP/1.1 buffer and HTTP/2 header list); over → 431.
    pub max_header_bytes: usize,
    /// Request header fields, counted the same over HTTP/1.1 and HTTP/2 (a name sent
    /// twice counts twice); over → 431.
    pub max_headers: usize,
    /// Request-target length; over → 414.
    pub max_uri_bytes: usize,
    /// Concurrent HTTP/2 streams per client connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 per-stream receive window (client side), bytes.
    pub h2_stream_window: u32,
    /// HTTP/2 per-connection receive window (client side), bytes.
    pub h2_connection_window: u32,
    /// Response bytes sluice buffers per HTTP/2 client stream beyond what the client's
    /// window lets it send (hyper's `max_send_buf_size`). A client that reads slowly
    /// holds at most this much of its response in sluice; the rest waits in the
    /// replica's window. At least 16 KiB (one frame).
    pub h2_max_send_buffer: u32,
    /// Default maximum request body, bytes (servers may set their own); `None` = unlimited.
    pub max_body_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            h2_max_concurrent_streams: 100,
            h2_stream_window: 1024 * 1024,
            h2_connection_window: 4 * 1024 * 1024,
            // Two frames: one being written while the next is read from the replica.
            // hyper's default, 400 KiB, held ~180 KiB of RSS per slow reader; this ~100.
            h2_max_send_buffer: 32 * 1024,
            max_body_bytes: None,
        }
    }
}

/// Timeouts. There is no overall request deadline: long requests are the norm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Time to receive a complete request header block (slowloris guard); also closes
    /// HTTP/1.1 keep-alive connections idle for that long between requests.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub header_read: Duration,
    /// Time to complete a TLS handshake.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub tls_handshake: Duration,
    /// Time to connect to a replica; over → 502.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub connect: Duration,
    /// A client connection with no request in flight and no bytes moving is closed after this.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub connection_idle: Duration,
    /// A client connection with requests in flight but no bytes moving in either direction
    /// (e.g. a client keeping its window at zero) is closed after this.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub stream_idle: Duration,
    /// Default per-request upstream idle timeout: no bytes moving in either direction
    /// (request body chunks sent, response bytes received) for this long → 504 before
    /// the response head, a reset stream after it. Servers may set their own
    /// (`timeouts.idle`). `None` = none.
    #[serde(with = "sluice_routing::model::duration_serde::option")]
    pub upstream_idle: Option<Duration>,
    /// Default time a replica may take to start its response (its head) after the
    /// request's last byte went to it; over → 504. Servers may set their own
    /// (`timeouts.first_byte`). Five minutes: long enough for a slow inference request
    /// to compute its first token, short enough that a replica that never answers does
    /// not hold a request (and its in-flight slot) forever.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub upstream_first_byte: Duration,
    /// How long graceful shutdown waits for in-flight requests.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub drain: Duration,
    /// Idle pooled upstream connections are closed after this.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub upstream_pool_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            tls_handshake: Duration::from_secs(10),
            connect: Duration::from_secs(2),
            connection_idle: Duration::from_secs(120),
            stream_idle: Duration::from_secs(600),
            upstream_idle: None,
            upstream_first_byte: Duration::from_secs(300),
            drain: Duration::from_secs(30),
            upstream_pool_idle: Duration::from_secs(90),
        }
    }
}

/// Request-id handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestIdConfig {
    /// Header carrying the request id to the replica and back to the client.
    pub header: String,
    /// Peers (IPs or CIDRs) whose request id and X-Forwarded-* headers are kept.
    pub trusted_edges: Vec<String>,
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        Self { header: "x-request-id".into(), trusted_edges: Vec::new() }
    }
}

/// Replica-side connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Idle HTTP/1.1 connections kept per replica.
    pub h1_max_idle_per_replica: usize,
    /// HTTP/2 per-stream receive window towards replicas, bytes: the most of one
    /// response sluice holds while its client reads slowly (the window is handed back
    /// only as the client takes the bytes).
    pub h2_stream_window: u32,
    /// HTTP/2 per-connection receive window towards replicas, bytes: the most sluice
    /// holds for all the streams of one replica connection together.
    pub h2_connection_window: u32,
    /// Cap on streams per upstream h2 connection, below the replica's own advertised limit.
    pub h2_max_streams_per_connection: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            h1_max_idle_per_replica: 256,
            // Replicas are on this node: a round trip is tens of microseconds, so 256 KiB
            // in flight still moves gigabytes a second, and a slow client pins no more.
            h2_stream_window: 256 * 1024,
            h2_connection_window: 2 * 1024 * 1024,
            h2_max_streams_per_connection: 1000,
        }
    }
}

/// Proxy auth settings (docs/routing.md, "Proxy auth").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Header carrying the token id.
    pub key_header: String,
    /// Header carrying the token secret.
    pub secret_header: String,
    /// A rejected (401/403) HTTP/1.1 request's body is read and discarded up to this many
    /// bytes (declared length or not, within 2 s) so the connection can be reused; a larger,
    /// slower or `Expect: 100-continue` body closes the connection instead. Never forwarded.
    pub drain_body_bytes: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            key_header: sluice_routing::proxy_auth::DEFAULT_KEY_HEADER.into(),
            secret_header: sluice_routing::proxy_auth::DEFAULT_SECRET_HEADER.into(),
            drain_body_bytes: 64 * 1024,
        }
    }
}

impl AuthConfig {
    /// The validated header names.
    pub fn headers(&self) -> Result<sluice_routing::AuthHeaders, ConfigError> {
        sluice_routing::AuthHeaders::new(&self.key_header, &self.secret_header)
            .map_err(|e| ConfigError::Invalid(format!("auth: {e}")))
    }
}

/// Load-balancing settings (docs/routing.md, "Load balancing").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LbConfig {
    /// Session header for servers that do not name their own (`session_header`).
    pub session_header: String,
    /// Bounded load factor `c >= 1` for sticky sessions; absent = pure rendezvous hashing.
    pub bounded_load: Option<f64>,
    /// Consecutive upstream failures (connect errors, resets, timeouts) that take a
    /// replica out of selection; 0 disables passive ejection.
    pub consecutive_failures: u32,
    /// First ejection time; doubles on each repeated ejection.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub base_ejection: Duration,
    /// Longest ejection time.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub max_ejection: Duration,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            session_header: "Sluice-Session-Id".into(),
            bounded_load: None,
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

impl LbConfig {
    /// The passive ejection policy these settings describe.
    pub fn ejection(&self) -> sluice_routing::snapshot::EjectionPolicy {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        sluice_routing::snapshot::EjectionPolicy {
            threshold: self.consecutive_failures,
            base_ms: ms(self.base_ejection),
            max_ms: ms(self.max_ejection),
        }
    }
}

/// Autoscaler stream settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscalerConfig {
    /// One record per server per `interval`.
    #[serde(with = "sluice_routing::model::duration_serde")]
    pub interval: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1) }
    }
}

/// The IP network type every prefix in the config uses.
pub use sluice_abi::Cidr;

#[cfg(test)]
mod tests {
    use super::*;

    /// One duration grammar for the whole config file: the proxy's tables accept what
    /// the node's do (`"1m 30s"`), and the forms they accepted before.
    #[test]
    fn durations() {
        let drain = |v: &str| {
            toml::from_str::<ProxyConfig>(&format!("[timeouts]\ndrain = {v}\n"))
                .map(|c| c.timeouts.drain)
        };
        assert_eq!(drain("\"250ms\"").unwrap(), Duration::from_millis(250));
        assert_eq!(drain("\"30s\"").unwrap(), Duration::from_secs(30));
        assert_eq!(drain("\"1m 30s\"").unwrap(), Duration::from_secs(90));
        assert_eq!(drain("\"7\"").unwrap(), Duration::from_secs(7));
        assert_eq!(drain("7").unwrap(), Duration::from_secs(7));
        assert!(drain("\"x\"").is_err());
    }

    #[test]
    fn empty_toml_is_default() {
        let c: ProxyConfig = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.unknown_domain_status, 503);
        // A replica that never answers is bounded by default; idle stays opt-in.
        assert_eq!(c.timeouts.upstream_first_byte, Duration::from_secs(300));
        assert_eq!(c.timeouts.upstream_idle, None);
        let c: ProxyConfig =
            toml::from_str("unknown_domain_status = 404\n[timeouts]\nheader_read = \"2s\"\n")
                .unwrap();
        assert_eq!(c.timeouts.header_read, Duration::from_secs(2));
        let bad: ProxyConfig = toml::from_str("unknown_domain_status = 500").unwrap();
        assert!(bad.validate().is_err());
    }

    /// The slow-reader bounds (docs/proxy.md, "Memory"): defaults, and a send buffer
    /// below one frame refused (hyper could then never send a DATA frame).
    #[test]
    fn h2_buffer_bounds() {
        let c = ProxyConfig::default();
        assert_eq!(c.limits.h2_max_send_buffer, 32 * 1024);
        assert_eq!(
            (c.upstream.h2_stream_window, c.upstream.h2_connection_window),
            (256 << 10, 2 << 20)
        );
        let c: ProxyConfig = toml::from_str("[limits]\nh2_max_send_buffer = 16384\n").unwrap();
        c.validate().unwrap();
        let c: ProxyConfig = toml::from_str("[limits]\nh2_max_send_buffer = 1024\n").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn listener_identity_settings() {
        let c: ProxyConfig = toml::from_str(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\n\
             trusted_proxies = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.listeners[0].proxy_protocol, ProxyProtocol::V2);
        let plain: ProxyConfig = toml::from_str("[[listeners]]\naddr = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(plain.listeners[0].proxy_protocol, ProxyProtocol::Off);
        let untrusting: ProxyConfig =
            toml::from_str("[[listeners]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = \"any\"\n")
                .unwrap();
        assert!(untrusting.validate().is_err());
        let bad: ProxyConfig = toml::from_str(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/99\"]\n",
        )
        .unwrap();
        assert!(bad.validate().is_err());
        assert!(
            toml::from_str::<ProxyConfig>(
                "[[listeners]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = \"v3\"\n"
            )
            .is_err()
        );
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.1.2.3".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/33").is_err());
    }
}
