//! `SLUICE_LOG_FORMAT=json`: the process logs one JSON object per line, for log
//! pipelines that want fields rather than text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::Command;

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    // A listener address already taken: sluice logs its start-up, then fails to bind and
    // exits, so the test needs no shutdown.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\naddr = \"{}\"\n[admin]\naddr = \"127.0.0.1:0\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--pin-dir")
        .arg(dir.path().join("pins"))
        .env("SLUICE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the taken port should fail the start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!events.is_empty(), "no JSON log lines in:\n{stderr}");
    for e in &events {
        assert!(e["level"].is_string() && e["fields"].is_object(), "{e}");
    }
}
