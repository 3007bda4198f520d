//! The process's tracing setup, with a filter the admin listener can replace at run
//! time (`PUT /logging?level=...`) so a node can be debugged without a restart.

use std::sync::OnceLock;

use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the subscriber: `$RUST_LOG`, else `info`, to stderr; one JSON object per
/// line when `$SLUICE_LOG_FORMAT` is `json` (for log pipelines), text otherwise.
pub fn init() {
    // Kernel programs log through aya-log into the `log` crate; tracing-subscriber's
    // log bridge turns those records into events whose target is the kernel crate's
    // name, so `RUST_LOG=sluice_ebpf=debug` filters them like any other module.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a terminal: container and journald logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // The two layers differ in type; boxed, either fits the one subscriber stack.
    let fmt =
        if json { fmt.json().with_current_span(true).boxed() } else { fmt.with_ansi(ansi).boxed() };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let _ = FILTER.set(handle);
}

/// The filter in force, in `RUST_LOG` syntax; `None` before [`init`].
pub fn current() -> Option<String> {
    FILTER.get()?.with_current(|f| f.to_string()).ok()
}

/// Replaces the filter with `spec` (`RUST_LOG` syntax) and returns the one now in force.
pub fn set(spec: &str) -> Result<String, String> {
    let handle = FILTER.get().ok_or("logging is not initialised")?;
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("{spec:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    current().ok_or_else(|| "logging is not initialised".to_owned())
}
