//! sluice's L7 proxy core.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (TLS with ALPN, or h2c prior knowledge); each request
//! goes through explicit phases (docs/proxy.md): hygiene, authority, route (a
//! [`sluice_routing::RoutingTable`] snapshot), proxy auth, replica selection
//! ([`sluice_routing::lb`]) under per-server caps, mirroring (`mirror`), forwarding over
//! sluice-owned h2c or HTTP/1.1 connections, with bodies streamed both ways. Upgrades become
//! opaque streams handed to an [`OpaqueStreamHandoff`].
//!
//! ```no_run
//! # async fn f() -> Result<(), sluice_proxy::ProxyError> {
//! use sluice_proxy::{ProxyConfig, Proxy};
//! use sluice_routing::{NodeConfig, RoutingTable};
//! let routing = RoutingTable::new(NodeConfig::default());
//! let server = Proxy::bind(ProxyConfig::default(), routing).await?;
//! server.run(sluice_proxy::shutdown::signal()).await
//! # }
//! ```

mod access_log;
mod acme;
pub mod admin;
mod body;
mod client;
mod coldstart;
pub mod config;
mod error;
mod h1proxy;
mod h1scan;
mod h2streams;
pub mod handover;
mod headers;
mod idle;
mod io;
mod listener;
pub mod metrics;
mod mirror;
mod proxy;
mod proxy_header;
mod server;
pub mod shutdown;
pub mod tls;
mod upgrade;
mod upstream;

pub use access_log::AccessLogConfig;
pub use acme::{CHALLENGE_PREFIX, ChallengeAnswers, valid_token};
pub use admin::{AdminHandler, AdminRoutes, StreamError, admin_get, follow_autoscaler_stream};
pub use body::{BoxError, ProxyBody, full};
pub use client::BanList;
pub use config::ProxyConfig;
pub use error::{ConfigError, ProxyError, RequestError};
pub use headers::RequestIds;
pub use metrics::{Metrics, RetryReason};
pub use proxy_header::{encode_v1, encode_v2};
pub use server::{AuthRejectedHook, ListenerCerts, PreparedCerts, Proxy};
pub use upgrade::{OpaqueStream, OpaqueStreamHandoff, UserspaceRelay, into_tcp};
pub use upstream::REPLAY_BODY_BYTES;
