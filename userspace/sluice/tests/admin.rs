//! The binary's admin routes over real sockets: the log filter changed at run time,
//! the JSON endpoints' content type, and `/metrics` in both exposition formats.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use sluice_tests::process::SluiceProcess;

/// One request on a fresh connection: status, the response head (lower-cased) and body.
fn call(addr: SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    call_with(addr, method, target, "")
}

/// [`call`] with extra header lines (each ending in CRLF).
fn call_with(addr: SocketAddr, method: &str, target: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {target} HTTP/1.1\r\nhost: admin\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[test]
fn log_filter_changes_at_run_time_and_json_endpoints_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path(), "");
    let admin = sluice.admin;

    let (code, _, before) = call(admin, "GET", "/logging");
    assert_eq!(code, 200);
    assert!(!before.trim().is_empty());

    // `info,sluice=debug`, percent-encoded as a client would send it.
    let (code, _, now) = call(admin, "PUT", "/logging?level=info%2Csluice%3Ddebug");
    assert_eq!((code, now.trim()), (200, "sluice=debug,info"), "{now}");
    let (_, _, shown) = call(admin, "GET", "/logging");
    assert_eq!(shown, now);

    // A filter that does not parse changes nothing.
    let (code, _, err) = call(admin, "PUT", "/logging?level=sluice%3Dloud");
    assert_eq!(code, 400, "{err}");
    assert_eq!(call(admin, "GET", "/logging").2, now);

    let (code, head, _) = call(admin, "DELETE", "/logging");
    assert_eq!(code, 405);
    assert!(head.contains("allow: get, head, put"), "{head}");

    for path in ["/bpf", "/state", "/vips"] {
        let (code, head, body) = call(admin, "GET", path);
        assert_eq!(code, 200, "{path}: {body}");
        assert!(head.contains("content-type: application/json"), "{path}: {head}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap();
    }
    let (_, head, _) = call(admin, "GET", "/metrics");
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    let (_, _, index) = call(admin, "GET", "/");
    for path in ["/logging", "/bpf", "/generation", "/metrics"] {
        assert!(index.contains(path), "{path} missing from\n{index}");
    }
}

#[test]
fn metrics_are_openmetrics_when_asked_and_carry_build_and_process_families() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = SluiceProcess::start(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path(), "");
    let admin = sluice.admin;

    // What Prometheus sends by default.
    let accept = "accept: application/openmetrics-text;version=1.0.0;q=0.75,\
                  text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";
    let (code, head, open) = call_with(admin, "GET", "/metrics", accept);
    assert_eq!(code, 200, "{open}");
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(open.ends_with("# EOF\n"), "an OpenMetrics scrape ends in # EOF:\n{open}");
    assert_eq!(open.matches("# EOF").count(), 1);
    assert!(open.contains("# TYPE sluice_responses counter\n"), "{open}");
    // Every collector (proxy, node, store) names its own families: no family twice.
    let mut families: Vec<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let all = families.len();
    families.sort_unstable();
    families.dedup();
    assert_eq!(families.len(), all, "a family encoded twice:\n{open}");

    let (code, head, text) = call(admin, "GET", "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{head}");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(text.contains("# TYPE sluice_responses_total counter\n"), "{text}");

    for scrape in [&open, &text] {
        let version = format!("sluice_build_info{{version=\"{}\"", env!("CARGO_PKG_VERSION"));
        let info = scrape.lines().find(|l| l.starts_with(&version));
        assert!(info.is_some_and(|l| l.ends_with(" 1")), "{version} ... 1 missing:\n{scrape}");
        for family in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            let line = scrape.lines().find(|l| l.starts_with(family));
            let value = line.and_then(|l| l[family.len()..].parse::<f64>().ok());
            assert!(value.is_some_and(|v| v >= 0.0), "{family}missing:\n{scrape}");
        }
    }
}
