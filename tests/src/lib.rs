//! Shared helpers for sluice's integration tests.
