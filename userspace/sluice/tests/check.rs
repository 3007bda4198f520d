//! `sluice check --config FILE` through the binary: a good config prints what would run
//! and exits 0; a broken config, routing file or certificate exits 1 naming the place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sluice check")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

const ROUTES: &str = r#"
[[servers]]
id = "s1"
label = "hello"
unauthenticated = true

[[replicas]]
server = "s1"
id = "a"
address = "127.0.0.1:9001"
"#;

/// `cert.pem` and `key.pem` for `*.r1.example.test`, and `other-key.pem`, which is not
/// its key.
fn write_certs(dir: &Path) {
    sluice_demo::write_self_signed(&["*.r1.example.test"], dir).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("other-key.pem"), other.serialize_pem()).unwrap();
}

fn config(key_file: &str, extra: &str) -> String {
    format!(
        r#"[[listeners]]
addr = "127.0.0.1:0"

[[listeners]]
addr = "127.0.0.1:0"
tls = {{ certs = [{{ names = ["*.r1.example.test"], cert_pem = "cert.pem", key_pem = "{key_file}" }}] }}

[node]
base_domains = ["example.test"]
regions = ["r1"]

[routes]
file = "routes.toml"
{extra}"#
    )
}

#[test]
fn good_config_prints_what_would_run() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, config("key.pem", "")).unwrap();
    let out = check(&cfg);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("tls [*.r1.example.test]"), "{stdout}");
    assert!(stdout.contains("1 servers, 1 replicas"), "{stdout}");
    assert!(stdout.contains("acme: off"), "{stdout}");
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
}

#[test]
fn acme_section_is_shown_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    let node = "[[listeners]]\naddr = \"127.0.0.1:0\"\n[node]\nbase_domains = [\"example.test\"]\n";
    let etcd = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
    let acme = "[acme]\nenabled = true\ndirectory = \"https://127.0.0.1:14000/dir\"\n\
                email = \"ops@example.test\"\nca_file = \"pebble-ca.pem\"\n";
    std::fs::write(&cfg, format!("{node}{etcd}{acme}")).unwrap();
    let out = check(&cfg);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    let want = format!(
        "acme: on, directory https://127.0.0.1:14000/dir, contact ops@example.test, CA {}",
        dir.path().join("pebble-ca.pem").display()
    );
    assert!(stdout.contains(&want), "{stdout}");
    // ACME keeps its state in etcd: without [etcd] it is refused.
    std::fs::write(&cfg, format!("{node}{acme}")).unwrap();
    let stderr = text(&check(&cfg).stderr);
    assert!(stderr.contains("[acme] enabled needs [etcd]"), "{stderr}");
    // A misspelt key is named by line and column (line 8 is `emial`).
    std::fs::write(&cfg, format!("{node}{etcd}[acme]\nemial = \"x\"\n")).unwrap();
    let stderr = text(&check(&cfg).stderr);
    assert!(stderr.contains("sluice.toml:8:1"), "{stderr}");
}

#[test]
fn errors_exit_non_zero_naming_the_place() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
    let cfg = dir.path().join("sluice.toml");
    let cases = [
        // A misspelt key in a node section: line 16 is `intervl`.
        (config("key.pem", "\n[health]\nintervl = \"2s\"\n"), "sluice.toml:16:1"),
        // A key that does not belong to the certificate.
        (config("other-key.pem", ""), "cert.pem"),
    ];
    for (text_cfg, want) in cases {
        std::fs::write(&cfg, text_cfg).unwrap();
        let out = check(&cfg);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{want}: {stderr}");
        assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    }
    // A broken routing document is named by its own file, line and column.
    std::fs::write(&cfg, config("key.pem", "")).unwrap();
    std::fs::write(dir.path().join("routes.toml"), "[[servers]]\nid = \"s1\"\nlabl = \"x\"\n")
        .unwrap();
    let out = check(&cfg);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("routes.toml:3:"), "{stderr}");
}

/// One duration grammar for the whole file: `[timeouts]` (the proxy's table) accepts what
/// `[health]` (the node's) does, and both refuse the same nonsense.
#[test]
fn one_duration_grammar_in_proxy_and_node_sections() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
    let cfg = dir.path().join("sluice.toml");
    let both = |v: &str| {
        format!("\n[timeouts]\ndrain = {v}\n\n[health]\ninterval = {v}\ntimeout = \"2s\"\n")
    };
    for good in ["\"1m 30s\"", "\"250ms\"", "90"] {
        std::fs::write(&cfg, config("key.pem", &both(good))).unwrap();
        let out = check(&cfg);
        assert!(out.status.success(), "{good}: {}", text(&out.stderr));
    }
    // Each table refuses the same nonsense, naming its own line: 16 is `drain`, 18 `interval`.
    let drain_bad = "\n[timeouts]\ndrain = \"1 fortnight\"\n";
    let interval_bad = "\n[health]\n\n\ninterval = \"1 fortnight\"\n";
    for (extra, want) in [(drain_bad, "sluice.toml:16:"), (interval_bad, "sluice.toml:18:")] {
        std::fs::write(&cfg, config("key.pem", extra)).unwrap();
        let out = check(&cfg);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    }
}

/// The example config the repository ships (and the container image uses) stays valid.
#[test]
fn shipped_config_passes() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/sluice.toml");
    let out = check(&cfg);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn listener_client_identity_is_shown_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
    let cfg = dir.path().join("sluice.toml");
    let listener = |extra: &str| {
        format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n{extra}\n[node]\nbase_domains = [\"example.test\"]\n\
             regions = [\"r1\"]\n[routes]\nfile = \"routes.toml\"\n"
        )
    };
    std::fs::write(&cfg, listener("proxy_protocol = \"v2\"\ntrusted_proxies = [\"10.0.0.0/8\"]"))
        .unwrap();
    let out = check(&cfg);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("proxy_protocol v2 from trusted_proxies [10.0.0.0/8]"), "{stdout}");
    // A PROXY header nobody is trusted to send is a mistake, named before it runs.
    std::fs::write(&cfg, listener("proxy_protocol = \"any\"")).unwrap();
    let out = check(&cfg);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("trusted_proxies"), "{}", text(&out.stderr));
}

/// The routing file's certificates are loaded as `sluice run` loads them: a good one is
/// listed (no key material), a refused one exits 1 at its `[[servers.certificates]]`.
#[test]
fn routing_file_certificates_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    let cert = rcgen::generate_simple_self_signed(vec!["api.custom.test".to_owned()]).unwrap();
    let routes = |key: String| {
        format!(
            "{ROUTES}\n[[servers]]\nid = \"c\"\nlabel = \"c\"\ncustom_domains = [\"api.custom.test\"]\n\n\
             [[servers.certificates]]\ndomains = [\"api.custom.test\"]\ncert_pem = {:?}\nkey_pem = {key:?}\n",
            cert.cert.pem()
        )
    };
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, config("key.pem", "")).unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes(cert.key_pair.serialize_pem())).unwrap();
    let out = check(&cfg);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("certificate [api.custom.test] of server c serial"), "{stdout}");
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");

    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes(other.serialize_pem())).unwrap();
    let out = check(&cfg);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    let routes_path = dir.path().join("routes.toml");
    assert!(
        stderr.contains(&format!("{}:17:1: server \"c\": certificates:", routes_path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("does not match"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}
