//! sluice's kernel data plane.
//!
//! This is the only crate that talks to the kernel's BPF interfaces (through aya) and
//! the only one allowed `unsafe`. It embeds the object built by `cargo xtask
//! build-ebpf`, probes what the running kernel actually accepts by loading and
//! attaching small programs ([`probe`]), loads and pins the real programs' maps under
//! `/sys/fs/bpf/sluice/` ([`Dataplane`]), and bridges kernel logs into `tracing`.
//!
//! Everything here is optional at runtime: when a feature is missing the caller keeps
//! serving on its userspace path, and the probe report says what is missing and why.
#![allow(unsafe_code)]

pub mod behaviour;
mod error;
pub mod guard;
pub mod live;
mod loader;
mod per_cpu;
pub mod pins;
pub mod probe;
mod sockdiag;
pub mod splice;
mod splice_watch;
mod steer;
pub mod sys;
mod vip;

pub use behaviour::{BehaviourReport, CheckStatus, probe_behaviour};
pub use error::DataplaneError;
pub use guard::GuardAttachment;
pub use loader::{Dataplane, DataplaneOptions, RedirectPath};
pub use probe::{Feature, FeatureStatus, ProbeReport};
pub use sluice_abi::{
    AddrKey, GuardStats, MAX_VIP_BACKENDS, RedirectStats, SockKey, SpliceStats, SteerConfig,
    SteerStats, VipStats, hrw, names,
};
pub use sluice_abi::{Cidr, CidrError};
pub use splice_watch::{DetachedPair, OnSpliceEnd, SpliceEnd, SpliceWatcher};
pub use steer::SteerGeneration;
pub use vip::{VipMode, VipReplica};

/// Default directory for pinned maps; operators inspect it with `bpftool`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";

/// The kernel object, embedded at build time (8-byte aligned as the ELF parser needs).
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(env!("SLUICE_EBPF_OBJECT"))
}

/// Name of the kernel crate; kernel log records carry it as their `tracing` target.
pub const KERNEL_LOG_TARGET: &str = "sluice_ebpf";
