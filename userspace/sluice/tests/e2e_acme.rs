//! ACME end to end: a real ACME server (Debian's pebble) on loopback, a real etcd and
//! two `sluice run` processes with `[acme]` on. A server's custom domain without a
//! certificate gets one from pebble (HTTP-01, validated against sluice's plain listener,
//! the answer read from etcd), stored in etcd, served by every node's SNI resolver; one
//! node at a time holds the ordering lock, and the other takes over when it goes.
//! Short-lived certificates are renewed (also after the CA forgot the account), a refused
//! domain is counted and backed off, and a detached domain's kept certificate is
//! forgotten.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_tests::etcd::Etcd;
use sluice_tests::pebble::Pebble;
use sluice_tests::process::{SluiceProcess, free_port, http_get};
use sluice_tests::tls::served_chain;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const DOMAIN: &str = "shop.custom.test";

/// Polls `f` until it returns `Some`, for at most `limit`.
fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(s: &SluiceProcess) -> String {
    http_get(s.admin, "admin", "/metrics").map(|(_, b)| b).unwrap_or_default()
}

fn metric(s: &SluiceProcess, series: &str) -> Option<u64> {
    metrics(s).lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Whether the leaf sluice serves for `DOMAIN` at `tls` was issued by pebble (its
/// intermediate's name is in the leaf's issuer).
fn pebble_issued(tls: SocketAddr) -> Option<Vec<u8>> {
    let chain = served_chain(tls, DOMAIN)?;
    let leaf = chain.first()?;
    let needle = b"Pebble Intermediate CA";
    leaf.windows(needle.len()).any(|w| w == needle).then(|| leaf.clone())
}

/// A node: the first (plain) listener pebble validates against, a TLS listener with a
/// default certificate for another name, `[etcd]` and `[acme]` pointing at pebble,
/// and `acme` (e.g. `check_interval`) appended to the `[acme]` section.
fn node(dir: &Path, etcd: &str, pebble: &Pebble, tls_port: u16, acme: &str) -> SluiceProcess {
    let c = rcgen::generate_simple_self_signed(vec!["default.example.test".to_owned()]).unwrap();
    std::fs::write(dir.join("default.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("default-key.pem"), c.key_pair.serialize_pem()).unwrap();
    let rest = format!(
        r#"
[[listeners]]
addr = "127.0.0.1:{tls_port}"
tls = {{ certs = [{{ names = ["default.example.test"], cert_pem = "default.pem", key_pem = "default-key.pem" }}] }}
[node]
base_domains = ["example.test"]
regions = ["r1"]
[etcd]
endpoints = ["{etcd}"]
backoff_max = "1s"
[acme]
enabled = true
directory = "{directory}"
email = "ops@example.test"
ca_file = "{ca}"
{acme}
lease_ttl = "30s"
retry_initial = "200ms"
retry_max = "1s"
order_timeout = "30s"
"#,
        directory = pebble.directory,
        ca = pebble.ca.display(),
    );
    SluiceProcess::start(Path::new(BIN), dir, &rest)
}

/// Runs `sluice ctl`; its standard output.
fn ctl(etcd: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["ctl", "--endpoints", etcd])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the stored spec of server `shop` carries an ACME certificate.
fn stored_acme_cert(etcd: &str) -> bool {
    let spec: serde_json::Value =
        serde_json::from_str(&ctl(etcd, &["server", "get", "shop"])).unwrap();
    spec["certificates"].as_array().is_some_and(|c| c.iter().any(|c| c["acme"] == true))
}

#[test]
fn custom_domain_gets_a_certificate_from_pebble_and_the_lock_moves() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    // Pebble validates HTTP-01 on one port for every node: both nodes' plain listeners
    // cannot share it, so pebble is pointed at node A's, which answers from etcd
    // whichever node orders. Until pebble runs, ACME attempts fail and are retried.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (tls_a, tls_b) = (free_port(), free_port());
    let mut pebble = Pebble::prepare();
    // An hour between periodic passes: issuance and re-attaching below happen because
    // the server's domains changed.
    let a = node(dir_a.path(), &ep, &pebble, tls_a, "check_interval = \"1h\"");
    pebble.start(a.proxy.port(), tls_a);
    let b = node(dir_b.path(), &ep, &pebble, tls_b, "check_interval = \"1h\"");

    // A token sluice did not issue is routed like any request (here: a domain no server
    // has yet, the unknown-domain status); sluice's own are answered before routing,
    // which pebble's validation below shows.
    let (status, _) = http_get(a.proxy, DOMAIN, "/.well-known/acme-challenge/nope").unwrap();
    assert_eq!(status, 503);

    ctl(&ep, &["server", "put", "--id", "shop", "--label", "shop", "--domain", DOMAIN]);
    let leaf = until("a certificate from pebble on node A", Duration::from_secs(60), || {
        pebble_issued(([127, 0, 0, 1], tls_a).into())
    });
    // The same certificate reaches the other node through etcd.
    let leaf_b = until("the certificate on node B", Duration::from_secs(20), || {
        pebble_issued(([127, 0, 0, 1], tls_b).into())
    });
    assert_eq!(leaf, leaf_b, "one order, one certificate for the region\n{}", pebble.log());

    // A writer that replaces the spec without the certificate (as `ctl server put` does)
    // does not cost an order: the kept certificate is attached again.
    ctl(&ep, &["server", "put", "--id", "shop", "--label", "shop", "--domain", DOMAIN]);
    until("the kept certificate back in the spec", Duration::from_secs(20), || {
        stored_acme_cert(&ep).then_some(())
    });
    let again = until("the kept certificate on node A", Duration::from_secs(20), || {
        pebble_issued(([127, 0, 0, 1], tls_a).into())
    });
    assert_eq!(again, leaf);

    // Exactly one node holds the lock and made the order.
    let held = |s: &SluiceProcess| metric(s, "sluice_acme_lock_held").unwrap_or(0);
    let issued = |s: &SluiceProcess| metric(s, "sluice_acme_orders_total{result=\"issued\"}");
    let (ha, hb) = (held(&a), held(&b));
    assert_eq!(ha + hb, 1, "lock held by A {ha}, B {hb}");
    assert_eq!(issued(&a).unwrap() + issued(&b).unwrap(), 1);
    // `/state` names it as ACME's.
    let (_, state) = http_get(a.admin, "admin", "/state").unwrap();
    let compact: String = state.split_whitespace().collect();
    assert!(compact.contains(r#""source":"acme""#), "{state}");
    // The certificate metrics see it like any store certificate.
    let m = metrics(&a);
    assert!(
        m.contains(&format!("sluice_tls_certificate_expiry_timestamp_seconds{{name=\"{DOMAIN}\"")),
        "{m}"
    );

    // The holder goes; the other node takes the lock within a few lease TTLs.
    let (holder, other) = if ha == 1 { (a, b) } else { (b, a) };
    let passes = |s: &SluiceProcess| metric(s, "sluice_acme_passes_total").unwrap_or(0);
    let (issued_before, passes_before) = (issued(&other), passes(&other));
    // A holder that shuts down revokes its lease: the lock moves well before its 30 s
    // TTL would have run out.
    drop(holder);
    until("the lock moves to the other node", Duration::from_secs(20), || {
        (held(&other) == 1).then_some(())
    });
    // Its first pass finds the certificate valid and orders nothing.
    until("a pass on the new holder", Duration::from_secs(20), || {
        (passes(&other) > passes_before).then_some(())
    });
    assert_eq!(issued(&other), issued_before, "no second order");
    drop(other);
    drop(pebble);
}

#[test]
fn renewal_failures_and_detached_domains() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let tls = free_port();
    // 12 s certificates: due for renewal when a third of that (4 s) is left. Orders for
    // one other domain are refused.
    let mut pebble = Pebble::prepare().with_validity(12).blocking("blocked.custom.test");
    let a =
        node(dir.path(), &ep, &pebble, tls, "check_interval = \"200ms\"\nkeep_detached = \"0s\"");
    pebble.start(a.proxy.port(), tls);
    ctl(&ep, &["server", "put", "--id", "shop", "--label", "shop", "--domain", DOMAIN]);
    ctl(
        &ep,
        &[
            "server",
            "put",
            "--id",
            "blocked",
            "--label",
            "blocked",
            "--domain",
            "blocked.custom.test",
        ],
    );
    let addr: SocketAddr = ([127, 0, 0, 1], tls).into();
    let first = until("a certificate from pebble", Duration::from_secs(60), || pebble_issued(addr));
    let renewed = until("a renewed certificate", Duration::from_secs(30), || {
        pebble_issued(addr).filter(|l| *l != first)
    });
    assert_ne!(renewed, first);
    // A CA that forgets the account (pebble keeps no state across a restart): the stored
    // account is replaced and renewals go on.
    pebble.restart(a.proxy.port(), tls);
    until("a renewal from the restarted CA", Duration::from_secs(40), || {
        pebble_issued(addr).filter(|l| *l != first && *l != renewed)
    });
    let n = metric(&a, "sluice_acme_orders_total{result=\"renewed\"}").unwrap_or(0);
    assert!(n >= 1, "renewals counted: {}", metrics(&a));
    assert_eq!(metric(&a, "sluice_acme_orders_total{result=\"issued\"}"), Some(1));
    // The refused domain is counted as failed (and retried with backoff) and gets no
    // certificate, while the other one went on.
    let failed = metric(&a, "sluice_acme_orders_total{result=\"failed\"}").unwrap_or(0);
    assert!(failed >= 1, "failures counted: {}", metrics(&a));
    let blocked = served_chain(addr, "blocked.custom.test").unwrap();
    assert!(!blocked[0].windows(6).any(|w| w == b"Pebble"), "no certificate for it");
    // The server goes; with `keep_detached = "0s"` its kept certificate (a private key)
    // leaves etcd at the next pass.
    let kept = || {
        let out = Command::new("etcdctl")
            .args(["--endpoints", &ep, "get", "--prefix", "--keys-only", "/sluice/acme/certs/"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(DOMAIN)
    };
    assert!(kept(), "kept while attached");
    ctl(&ep, &["server", "delete", "shop"]);
    until("the kept certificate forgotten", Duration::from_secs(20), || (!kept()).then_some(()));
}
