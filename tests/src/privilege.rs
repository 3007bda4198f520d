//! Kernel-tier tests need root. Without it they skip loudly, except in CI (`CI=true`),
//! where a skip would hide a broken kernel path, so not being root fails the test.

/// Whether this process runs as root (uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether tests that need privilege must run (CI) rather than skip.
pub fn must_run() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Returns from the calling test with a loud SKIPPED line when not root; in CI, fails
/// instead.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privilege::is_root() {
            assert!(!$crate::privilege::must_run(), "kernel-tier tests must run as root in CI");
            eprintln!("SKIPPED (kernel tier): {} needs root", module_path!());
            return;
        }
    };
}
