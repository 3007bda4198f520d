//! P8: new-connection rate with and without sluice's kernel programs (the XDP
//! guard and listener steering must cost at most 2 %).
//!
//! `sluice run` does not attach the guard from its config on every branch yet, so this
//! measures the kernel's cost where it is incurred: the `conn_rate` example of the
//! `sluice-tests` crate (network namespaces, veth links, an accept loop with and without
//! the programs that `sluice_dataplane::Dataplane` attaches; see its header). It is
//! built in release mode like P5's `apply_bench` and reports one JSON line per run.
//!
//! A third side runs the bare accept loop with an XDP program that only passes packets
//! (compiled here from a few lines of LLVM IR): a native XDP program on a veth moves the
//! veth's receive onto NAPI, which any XDP program pays there and a NIC driver's XDP
//! does not, so `guard+steer ÷ xdp-pass` separates the guard's own checks and steering
//! from that.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{
    Ctx,
    results::{Better, Metric, summary},
    systems::Kind,
};

/// Concurrent connector threads.
const CONNECTORS: usize = 8;
/// The budget for the programs' cost: they must stay cheap next to a connection.
const GOAL: f64 = 0.02;

/// A BPF program that passes every packet, in LLVM IR (no C compiler needed: `llc`
/// from the LLVM that builds the kernel crate turns it into an object).
const XDP_PASS_IR: &str = r#"target datalayout = "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128"
target triple = "bpfel"

@_license = dso_local global [4 x i8] c"GPL\00", section "license", align 1
@llvm.used = appending global [2 x ptr] [ptr @_license, ptr @xdp_pass], section "llvm.metadata"

define dso_local i32 @xdp_pass(ptr nocapture readnone %ctx) section "xdp" {
  ret i32 2
}
"#;

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
    let mut cmd = Command::new(&bin);
    cmd.args(["--placements", &placements.join(",")])
        .args(["--runs", &ctx.plan.runs.to_string()])
        .args(["--secs", &secs.to_string()])
        .args(["--connectors", &CONNECTORS.to_string()]);
    match xdp_pass_object(&ctx.env.dir) {
        Ok(obj) => {
            cmd.arg("--xdp-baseline").arg(obj);
        }
        Err(e) => ctx.results.note("P8", format!("no xdp-pass baseline: {e:#}")),
    }
    let out = cmd.output().with_context(|| format!("running {}", bin.display()))?;
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
    // Rates in run order per placement and side, to pair each run's measurements.
    let mut runs: Vec<(&'static str, Kind, f64)> = Vec::new();
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
        let kind = match v["side"].as_str() {
            Some("none") => Kind::NoPrograms,
            Some("xdp-pass") => Kind::XdpPass,
            Some("programs") => Kind::GuardSteer,
            _ => continue,
        };
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
        runs.push((placement, kind, rate));
    }
    if failed > 0 {
        ctx.results.note("P8", format!("{failed} connection(s) failed over all runs (runs with more than 0.1 % failed are discarded)"));
    }
    for p in ctx.plan.placements.clone() {
        for (what, base) in [
            ("the programs cost", Kind::NoPrograms),
            (
                "beyond a pass-everything XDP program, the guard's checks and steering cost",
                Kind::XdpPass,
            ),
        ] {
            if let Some(line) = verdict(ctx, &runs, p.name, what, base) {
                ctx.results.note("P8", line);
            }
        }
    }
    ctx.results.note(
        "P8",
        format!(
            "each connection: a fresh TCP connect over a veth link between network namespaces, \
             one small HTTP/1.1 request and response, close; {CONNECTORS} connector threads, \
             {secs} s per run, the sides' order rotating from run to run"
        ),
    );
    Ok(())
}

/// `guard+steer ÷ base` in placement `placement` against the goal, as a note.
fn verdict(
    ctx: &Ctx,
    runs: &[(&'static str, Kind, f64)],
    placement: &str,
    what: &str,
    base: Kind,
) -> Option<String> {
    let s = ctx.results.find("P8", "new connections per second", placement)?;
    let ratio = s.ratio(Kind::GuardSteer, base)?;
    // Each run measures every side back to back, so the ratio within a run cancels slow
    // drift of the machine; their median is the steadier estimate.
    let side = |k: Kind| -> Vec<f64> {
        runs.iter().filter(|(pl, kind, _)| *pl == placement && *kind == k).map(|r| r.2).collect()
    };
    let ratios: Vec<f64> =
        side(Kind::GuardSteer).iter().zip(&side(base)).map(|(w, o)| w / o).collect();
    let (lo, med, hi) = summary(&ratios)?;
    let cost = 1.0 - med;
    let verdict = if cost <= GOAL { "within" } else { "over" };
    Some(format!(
        "placement {placement}: {} ÷ {base} = {ratio:.3} (ratio of medians); per-run ratios \
         {lo:.3} … {hi:.3}, median {med:.3}: {what} {:.1} % of the connection rate, {verdict} \
         the {:.0} % goal (a benchmark, not a test: on a busy machine the noise can exceed the \
         goal)",
        Kind::GuardSteer,
        cost * 100.0,
        GOAL * 100.0
    ))
}

/// Compiles [`XDP_PASS_IR`] into `dir` with the LLVM of the eBPF toolchain.
fn xdp_pass_object(dir: &Path) -> Result<PathBuf> {
    let ir = dir.join("xdp_pass.ll");
    let obj = dir.join("xdp_pass.o");
    fs::write(&ir, XDP_PASS_IR)?;
    for llc in ["llc-22", "/usr/lib/llvm-22/bin/llc", "llc"] {
        let status = Command::new(llc)
            .args(["-march=bpfel", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&ir)
            .stderr(std::process::Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) {
            return Ok(obj);
        }
    }
    bail!("no llc (LLVM 22, installed by scripts/setup.sh for bpf-linker) compiled it")
}

/// Builds the example and returns its path.
fn build() -> Result<PathBuf> {
    super::release_build(&["-p", "sluice-tests", "--example", "conn_rate"], "examples/conn_rate")
}
