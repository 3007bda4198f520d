//! sluice's L7 proxy core.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (TLS with ALPN, or h2c prior knowledge); each request
//! goes through explicit phases (docs/proxy.md): hygiene, authority, route (a
//! [`sluice_routing::RoutingTable`] snapshot), proxy auth, replica selection
//! ([`sluice_routing::lb`]) under per-server caps, mirroring ([`mirror`]), forwarding over
//! sluice-owned h2c or HTTP/1.1 connections, with bodies streamed both ways. Upgrades become
//! opaque streams handed to an [`OpaqueStreamHandoff`].
//!
//! ```no_run
//! # async fn f() -> Result<(), sluice_proxy::ProxyError> {
//! use sluice_proxy::{ProxyConfig, Server};
//! use sluice_routing::{NodeConfig, RoutingTable};
//! let routing = RoutingTable::new(NodeConfig::default());
//! let server = Server::bind(ProxyConfig::default(), routing).await?;
//! server.run(sluice_proxy::shutdown::signal()).await
//! # }
//! ```

pub mod access_log;
pub mod acme;
pub mod admin;
pub mod autoscaler;
pub mod body;
pub mod client;
mod coldstart;
pub mod config;
pub mod demo;
pub mod error;
mod h1proxy;
pub mod h1scan;
mod h2streams;
pub mod handover;
pub mod headers;
mod idle;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod mirror;
mod proxy;
pub mod proxy_header;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod upgrade;
pub mod upstream;

pub use admin::{AdminHandler, AdminRoutes, StreamError, admin_get, follow_autoscaler_stream};
pub use config::ProxyConfig;
pub use error::{ConfigError, ProxyError, RequestError};
pub use metrics::Metrics;
pub use server::{AuthRejectedHook, ListenerCerts, PreparedCerts, Server};
pub use upgrade::{OpaqueStream, OpaqueStreamHandoff, UserspaceRelay, into_tcp};
