//! `sluice demo` through the binary: it is `sluice run` on its embedded config, so the
//! same admin API answers (`/generation`, `/state`, `/bpf`, `/metrics`) and its
//! replicas serve through the proxy; `--print-config` shows the config it runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use sluice_tests::process::{SluiceProcess, http_get};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

#[test]
fn demo_serves_with_the_run_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let demo = SluiceProcess::start_demo(bin(), dir.path());
    let (status, body) = http_get(demo.proxy, "hello.local.sluice.localhost", "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from replica"), "{body}");
    let (status, _) = http_get(demo.proxy, "private.local.sluice.localhost", "/").unwrap();
    assert_eq!(status, 401, "the private server wants the demo token");
    for path in ["/generation", "/state", "/bpf", "/metrics"] {
        let (status, body) = http_get(demo.admin, "admin", path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, generation) = http_get(demo.admin, "admin", "/generation").unwrap();
    assert!(generation.trim().parse::<u64>().unwrap() > 0, "{generation}");
}

#[test]
fn print_config_shows_a_run_config() {
    let out = Command::new(bin()).args(["demo", "--print-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (node, routes) = text.split_once("# routes.toml\n").expect("both files");
    // The node config is what `sluice check` accepts, once its routes file exists.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sluice.toml"), node).unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes).unwrap();
    sluice_proxy::demo::write_self_signed(&["*.local.sluice.localhost"], dir.path()).unwrap();
    let check = Command::new(bin())
        .args(["check", "--config"])
        .arg(dir.path().join("sluice.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(summary.contains("2 servers, 3 replicas"), "{summary}");
}
