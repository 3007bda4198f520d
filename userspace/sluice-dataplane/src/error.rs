//! Typed errors of the data plane.

use std::{io, path::PathBuf};

/// Why a data plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The embedded object could not be loaded into the kernel.
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object (a build mismatch).
    #[error("program {0} is not in the eBPF object")]
    MissingProgram(&'static str),
    /// A map is missing from the object (a build mismatch).
    #[error("map {0} is not in the eBPF object")]
    MissingMap(&'static str),
    /// A map has an unexpected type or an operation on it failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
    /// A program failed to load or attach.
    #[error("program {name}: {source}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Pinning a map failed.
    #[error("pinning {name} at {path}: {source}")]
    Pin {
        /// The map's name.
        name: &'static str,
        /// Where it was to be pinned.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: aya::pin::PinError,
    },
    /// A filesystem or syscall step failed.
    #[error("{what}: {source}")]
    Io {
        /// The step that failed.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks something the caller required.
    #[error("{0}")]
    Unsupported(String),
}

impl DataplaneError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        DataplaneError::Io { what: what.into(), source }
    }
}

/// Wraps an aya map error with the map's name.
pub(crate) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Wraps an aya program error with the program's name.
pub(crate) fn prog_err(
    name: &'static str,
) -> impl Fn(aya::programs::ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program { name, source }
}
