//! The one error type of the node controllers.

use std::io;

use sluice_dataplane::DataplaneError;

/// Errors of the node controllers. Each carries what was being done; the cause, when
/// there is one, is its `source`: [`NodeError::report`] (or anyhow's `{:#}`, once the
/// binary wraps it) prints "what: cause".
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A config section is invalid; the message names the field.
    #[error("{0}")]
    Config(String),
    /// A data plane operation failed.
    #[error("{what}")]
    Dataplane {
        /// What was being done.
        what: String,
        /// The data plane's error (boxed: it is large, and errors are the cold path).
        #[source]
        source: Box<DataplaneError>,
    },
    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A thread panicked while holding the shared data plane's lock.
    #[error("data plane lock poisoned")]
    Poisoned,
    /// Start-up refused to go on (a required kernel part is missing, or another sluice
    /// serves this pin directory).
    #[error("{0}")]
    Refused(String),
    /// Another error, with what was being done when it happened.
    #[error("{what}")]
    Context {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: Box<NodeError>,
    },
}

impl NodeError {
    /// Wraps `self` with what was being done (the report reads "what: self").
    pub fn context(self, what: impl Into<String>) -> NodeError {
        NodeError::Context { what: what.into(), source: Box::new(self) }
    }

    /// A data plane error, with what was being done.
    pub fn dataplane(what: impl Into<String>, source: DataplaneError) -> NodeError {
        NodeError::Dataplane { what: what.into(), source: Box::new(source) }
    }

    /// The error and its causes on one line, "what: cause: cause", as anyhow's `{:#}`
    /// prints them (for logs, where the error is not returned).
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            out.push_str(": ");
            out.push_str(&e.to_string());
            source = e.source();
        }
        out
    }

    /// An I/O error, with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> NodeError {
        NodeError::Io { what: what.into(), source }
    }
}

/// Results of the node controllers.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_what_then_each_cause() {
        let e = NodeError::io("opening the cgroup", io::Error::other("no such directory"))
            .context("--require-ebpf");
        assert_eq!(e.to_string(), "--require-ebpf");
        assert_eq!(e.report(), "--require-ebpf: opening the cgroup: no such directory");
        assert_eq!(NodeError::Poisoned.report(), "data plane lock poisoned");
    }
}
