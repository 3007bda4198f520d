//! `/metrics` of the running binary against the metrics table of docs/operations.md, so
//! the table an operator builds alerts from cannot drift from what is served: every
//! family served is documented with its type and marked served, and every row marked
//! served is in the scrape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use sluice_tests::process::{SluiceProcess, http_get};

/// One row of the table: type and status as written.
#[derive(Debug)]
struct Row {
    kind: String,
    status: String,
}

/// The rows of the table under `## Metrics` in docs/operations.md, by metric name.
fn documented() -> BTreeMap<String, Row> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let section = text.split("\n## Metrics\n").nth(1).expect("a ## Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(cells.len() >= 5, "a metrics row needs 5 cells: {line}");
        let name = cells[0].trim_matches('`').to_string();
        let row = Row { kind: cells[1].to_string(), status: cells[3].to_string() };
        assert!(rows.insert(name.clone(), row).is_none(), "{name} documented twice");
    }
    rows
}

/// `# TYPE name kind` lines of a Prometheus text scrape.
fn served(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

#[test]
fn the_documented_metrics_table_is_what_the_binary_serves() {
    let dir = tempfile::tempdir().unwrap();
    let demo = SluiceProcess::start_demo(Path::new(env!("CARGO_BIN_EXE_sluice")), dir.path());
    // Traffic first, so per-server and per-replica series exist: a proxied request, one
    // refused by proxy auth, and an unknown domain.
    for host in ["hello.local.sluice.localhost", "private.local.sluice.localhost", "nowhere.test"] {
        http_get(demo.proxy, host, "/").expect("an answer");
    }
    let (status, scrape) = http_get(demo.admin, "admin", "/metrics").unwrap();
    assert_eq!(status, 200);
    let served = served(&scrape);
    let documented = documented();
    assert!(served.len() > 20, "a scrape with families:\n{scrape}");

    let mut problems = Vec::new();
    for (name, kind) in &served {
        match documented.get(name) {
            None => problems.push(format!("{name} ({kind}) is served but not in the table")),
            Some(row) if row.kind != *kind => {
                problems.push(format!("{name}: served as {kind}, documented as {}", row.kind))
            }
            Some(row) if !row.status.starts_with("served") => {
                problems.push(format!("{name} is served but documented as {:?}", row.status))
            }
            Some(_) => {}
        }
    }
    // "served" without a condition means in every scrape; a conditional row says when
    // ("served when …") and is only checked when present.
    for (name, row) in &documented {
        if row.status == "served" && !served.contains_key(name) {
            problems.push(format!("{name} is documented as served but not in the scrape"));
        }
    }
    assert!(problems.is_empty(), "docs/operations.md vs /metrics:\n{}", problems.join("\n"));
}

/// The Grafana dashboard shipped in deploy/ queries only documented, served families.
#[test]
fn the_dashboard_queries_documented_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let documented = documented();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.extend(target["expr"].as_str().map(str::to_string));
        }
    }
    assert!(!exprs.is_empty());
    let mut problems = Vec::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            // A histogram's series are its family's `_bucket`, `_sum` and `_count`.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| documented.contains_key(*f)))
                .unwrap_or(&name);
            match documented.get(family) {
                None => problems.push(format!("{name} (in {expr}) is not documented")),
                Some(row) if !row.status.starts_with("served") => {
                    problems.push(format!("{name} is queried but {:?}", row.status))
                }
                Some(_) => {}
            }
        }
    }
    assert!(problems.is_empty(), "deploy/grafana-dashboard.json:\n{}", problems.join("\n"));
}

/// The `sluice_…` and `process_…` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = ["sluice_", "process_"].iter().filter_map(|p| rest.find(p)).min() {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}
