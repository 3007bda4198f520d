//! sluice's node controllers: the parts of `sluice run` that drive the kernel data plane
//! from the node config and the routing snapshot, and hook into the proxy.
//!
//! Each kernel program family has one module here that drives it (the data plane crate
//! only knows maps and attachments):
//!
//! - [`kernel`]: the feature probe, the load, and the splice behaviour probe at start-up,
//!   and the kernel's `/metrics` families (read from the pinned maps);
//! - [`splice`] and [`splice_policy`]: the opaque-stream hand-off to `sluice_splice`,
//!   and the adaptive policy that decides when an `auto` stream is spliced;
//! - [`local_redirect`]: `[local_replicas]`, the sock_ops + sk_msg short-cut to replicas
//!   on the node;
//! - [`guard`]: `[guard]`, the XDP guard and the auth-failure bans;
//! - [`vip`]: `[vip]`, server virtual addresses rewritten at `connect()`;
//! - [`handover`]: process handover between an old and a new `sluice run` (listener
//!   steering generations, the owner record, the channel that moves spliced streams).
//!
//! Beside them, [`acme`] (`[acme]`) orders and renews certificates for custom domains,
//! one node of the region at a time, and answers HTTP-01 challenges; [`supervise`] is
//! the reference replica supervisor (`sluice supervise`, and `sluice demo`'s compute
//! side); [`autoscaler`] is the cluster-side autoscale job (`sluice autoscale`), which
//! follows the proxies' autoscaler streams and writes desired replica counts; [`health`]
//! dials replicas and reports their health to the routing table.
//!
//! Errors are [`NodeError`] ([`acme::AcmeError`] and [`supervise::SuperviseError`] for
//! those two); the binary turns them into `anyhow` at the edge.
#![forbid(unsafe_code)]

pub mod acme;
pub mod autoscaler;
pub mod error;
pub mod guard;
pub mod handover;
pub mod health;
pub mod kernel;
pub mod local_redirect;
pub mod splice;
pub mod splice_policy;
pub mod supervise;
pub mod vip;

pub use error::{NodeError, Result};
