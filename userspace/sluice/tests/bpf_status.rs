//! `sluice bpf status` through the real binary: with full privilege every feature is
//! available; with the BPF capabilities dropped (in a child, via capsh) it names what
//! is missing and why, and still exits 0 so sluice can serve on its userspace path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn status_json(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("run sluice bpf status");
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn feature<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["probe"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == name)
        .unwrap_or_else(|| panic!("feature {name} not reported"))
}

#[test]
fn status_as_root_reports_every_feature_available() {
    sluice_tests::require_root!();
    let doc =
        status_json(Command::new(env!("CARGO_BIN_EXE_sluice")).args(["bpf", "status", "--json"]));
    for f in doc["probe"]["features"].as_array().unwrap() {
        assert_eq!(f["status"], "available", "{f}");
    }
    // The table form is what operators read.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["bpf", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sockhash_sk_msg") && text.contains("ok"), "{text}");
}

#[test]
fn status_without_bpf_capabilities_names_what_is_missing() {
    sluice_tests::require_root!();
    if Command::new("capsh").arg("--help").output().is_err() {
        panic!("capsh not found: run scripts/setup.sh (Debian package libcap2-bin)");
    }
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let doc = status_json(Command::new("capsh").args([
        "--drop=cap_bpf,cap_perfmon,cap_sys_admin,cap_net_admin",
        "--",
        "-c",
        &format!("exec {sluice} bpf status --json"),
    ]));
    let missing: Vec<&str> = doc["probe"]["missing_capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"] {
        assert!(missing.contains(&cap), "{cap} not reported missing: {missing:?}");
    }
    let load = feature(&doc, "object_load");
    assert_eq!(load["status"], "missing");
    let reason = load["reason"].as_str().unwrap();
    assert!(reason.contains("CAP_BPF") && reason.contains("permission denied"), "{reason}");
    for name in ["sockhash_sk_msg", "sk_skb_verdict", "xdp", "sk_reuseport", "cgroup_sock_addr"] {
        assert_eq!(feature(&doc, name)["status"], "missing", "{name}");
    }
    // Reading kernel facts needs no capability.
    assert_eq!(feature(&doc, "cgroup_v2")["status"], "available");
}
