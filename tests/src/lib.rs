//! Shared helpers for sluice's integration tests.

pub mod etcd;
pub mod netns;
pub mod pebble;
pub mod privilege;
pub mod process;
pub mod proxy_harness;
pub mod replica;
pub mod tls;
