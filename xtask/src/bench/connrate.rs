//! P8: new-connection rate with and without sluice's kernel programs (issue 7: the XDP
//! guard and listener steering must cost at most 2 %).
//!
//! `sluice run` does not attach the guard from its config on every branch yet, so this
//! measures the kernel's cost where it is incurred: the `conn_rate` example of the
//! `sluice-tests` crate (network namespaces, veth links, an accept loop with and without
//! the programs that `sluice_dataplane::Dataplane` attaches; see its header). It is
//! built in release mode like P5's `apply_bench` and reports one JSON line per run.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use super::{
    Ctx,
    results::{Better, Metric, summary},
    systems::Kind,
};

/// Concurrent connector threads.
const CONNECTORS: usize = 8;
/// The budget for the programs' cost.
const GOAL: f64 = 0.02;

/// Runs P8.
pub fn p8(ctx: &mut Ctx) -> Result<()> {
    let secs = if ctx.plan.quick { 1.0 } else { 2.0 };
    let bin = match build() {
        Ok(b) => b,
        Err(e) => {
            ctx.results.note("P8", format!("skipped: cannot build conn_rate: {e:#}"));
            return Ok(());
        }
    };
    let placements: Vec<&str> = ctx.plan.placements.iter().map(|p| p.name).collect();
    let out = Command::new(&bin)
        .args(["--placements", &placements.join(",")])
        .args(["--runs", &ctx.plan.runs.to_string()])
        .args(["--secs", &secs.to_string()])
        .args(["--connectors", &CONNECTORS.to_string()])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        ctx.results.note(
            "P8",
            format!(
                "failed: conn_rate {}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        );
    }
    let mut failed = 0u64;
    // Rates in run order per placement and side, to pair each run's two measurements.
    let mut paired: Vec<(&'static str, bool, f64)> = Vec::new();
    for line in text.lines() {
        if !line.starts_with('{') {
            ctx.results.note("P8", line.to_owned());
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("conn_rate printed {line:?}"))?;
        let placement = match v["placement"].as_str() {
            Some("A") => "A",
            Some("B") => "B",
            _ => continue,
        };
        let kind =
            if v["programs"].as_bool() == Some(true) { Kind::GuardSteer } else { Kind::NoPrograms };
        let (Some(rate), Some(ok)) = (v["rate"].as_f64(), v["ok"].as_u64()) else { continue };
        let bad = v["failed"].as_u64().unwrap_or(0);
        failed += bad;
        if ok == 0 || bad * 1000 > ok {
            ctx.results.note(
                "P8",
                format!("{kind}: run discarded: {bad} of {} connections failed", ok + bad),
            );
            continue;
        }
        let m =
            Metric::new("P8", placement, "new connections per second", "conn/s", Better::Higher);
        ctx.results.add(&m, kind, rate);
        paired.push((placement, kind == Kind::GuardSteer, rate));
    }
    if failed > 0 {
        ctx.results.note("P8", format!("{failed} connections failed over all runs"));
    }
    for p in ctx.plan.placements.clone() {
        let Some(s) = ctx.results.find("P8", "new connections per second", p.name) else {
            continue;
        };
        let Some(ratio) = s.ratio(Kind::GuardSteer, Kind::NoPrograms) else { continue };
        let cost = 1.0 - ratio;
        // Each run measures both sides back to back, so the ratio within a run cancels
        // slow drift of the machine; their median is the steadier estimate.
        let with: Vec<f64> =
            paired.iter().filter(|(pl, w, _)| *pl == p.name && *w).map(|x| x.2).collect();
        let without: Vec<f64> =
            paired.iter().filter(|(pl, w, _)| *pl == p.name && !*w).map(|x| x.2).collect();
        let ratios: Vec<f64> = with.iter().zip(&without).map(|(w, o)| w / o).collect();
        let within_runs = summary(&ratios)
            .map(|(lo, med, hi)| format!("; per-run ratios {lo:.3} … {hi:.3}, median {med:.3}"))
            .unwrap_or_default();
        let verdict = if cost <= GOAL { "within" } else { "over" };
        ctx.results.note(
            "P8",
            format!(
                "placement {}: with ÷ without = {ratio:.3} (ratio of medians{within_runs}): \
                 the programs cost {:.1} % of the connection rate, {verdict} the {:.0} % goal \
                 (a benchmark, not a test: on a busy machine the noise is larger than the goal)",
                p.name,
                cost * 100.0,
                GOAL * 100.0
            ),
        );
    }
    ctx.results.note(
        "P8",
        format!(
            "each connection: a fresh TCP connect over a veth link between network namespaces, \
             one small HTTP/1.1 request and response, close; {CONNECTORS} connector threads, \
             {secs} s per run, runs alternating with and without the programs"
        ),
    );
    Ok(())
}

/// Builds the example and returns its path.
fn build() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("bench: $ cargo build --release -p sluice-tests --example conn_rate");
    let status = Command::new(cargo)
        .current_dir(crate::root())
        .args(["build", "--release", "-q", "-p", "sluice-tests", "--example", "conn_rate"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p sluice-tests --example conn_rate failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"));
    let bin = target.join("release/examples/conn_rate");
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}
