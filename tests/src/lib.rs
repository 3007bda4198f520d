//! Shared helpers for sluice's integration tests.

pub mod netns;
