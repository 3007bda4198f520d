//! Load through sluice with nghttp2's h2load (Debian `nghttp2-client`): no failed requests,
//! over h2c and HTTP/1.1 clients, to h2c and HTTP/1.1 replicas. Skips (passes with a note)
//! when `h2load` is not installed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use sluice_routing::Protocol;
use sluice_tests::proxy_harness::*;

fn parse_requests(out: &str) -> Option<(u64, u64, u64, u64)> {
    // "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, 0 timeout"
    let line = out.lines().find(|l| l.starts_with("requests:"))?;
    let num = |key: &str| -> Option<u64> {
        line.split(',')
            .find(|p| p.trim().ends_with(key))?
            .split_whitespace()
            .rev()
            .nth(1)?
            .parse()
            .ok()
    };
    let total = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((total, num("succeeded")?, num("failed")?, num("errored")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_zero_failures() {
    if std::process::Command::new("h2load").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "h2load missing in CI: run scripts/setup.sh"
        );
        eprintln!("h2load not installed (apt-get install nghttp2-client): skipping");
        return;
    }
    let a = hello("a", Protocol::H2c).await;
    let b = hello("b", Protocol::Http1).await;
    let h =
        start(cfg(), doc(&[("a", a.addr, Protocol::H2c), ("b", b.addr, Protocol::Http1)])).await;
    for h1 in [false, true] {
        let mut cmd = tokio::process::Command::new("h2load");
        cmd.args(["-n", "3000", "-c", "8", "-m", "16", "-H", &format!(":authority: {HOST}")]);
        if h1 {
            cmd.arg("--h1");
        }
        cmd.arg(format!("http://{}/", h.addr()));
        let out = tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (total, ok, failed, errored) =
            parse_requests(&text).unwrap_or_else(|| panic!("unparsable h2load output:\n{text}"));
        assert_eq!((total, ok, failed, errored), (3000, 3000, 0, 0), "h1={h1}:\n{text}");
    }
    assert!(a.hits() > 0 && b.hits() > 0, "both replicas served: {} / {}", a.hits(), b.hits());
}
