//! The scenarios P1 … P9 (P4, P6, P7, P8 and P9 live in modules of their own). Each one loops placements, then runs, then systems, so the
//! systems' runs interleave and slow drift of the machine hits all of them alike.

use anyhow::{Context, Result};

use super::{
    Ctx, HOME_CPU, Placement,
    load::{self, At, Outcome},
    procs,
    results::{Better, Metric},
    systems::{self, Kind},
    upstream,
};

/// Runs scenario `name` (`P1` … `P9`).
pub fn run(ctx: &mut Ctx, name: &'static str) -> Result<()> {
    match name {
        "P1" => p1(ctx),
        "P2" => p2(ctx),
        "P3" => p3(ctx),
        "P4" => super::upgrade::p4(ctx),
        "P5" => p5(ctx),
        "P6" => super::idle::p6(ctx),
        "P7" => super::sse::p7(ctx),
        "P8" => super::connrate::p8(ctx),
        "P9" => super::counts::p9(ctx),
        _ => Ok(()),
    }
}

/// Pins every proxy for placement `p` and notes it.
pub fn place(ctx: &mut Ctx, scenario: &'static str, p: Placement) -> Result<()> {
    for sys in &ctx.systems {
        if let Some(pid) = sys.pid() {
            procs::repin(pid, p.proxy).with_context(|| format!("pinning {}", sys.kind))?;
        }
    }
    eprintln!("bench: {scenario}: placement {}: {}", p.name, p.what);
    Ok(())
}

/// Notes where every process of placement `p` was allowed to run and last ran.
pub fn note_placement(ctx: &mut Ctx, scenario: &'static str, p: Placement, load: &str) {
    let mut lines = vec![format!(
        "placement {}: {}; upstream {}; load generator {load} pinned to CPU {}",
        p.name,
        p.what,
        procs::placement(ctx.upstream_pid),
        p.load
    )];
    for sys in &mut ctx.systems {
        let placed = sys.placement();
        if let Some(Err(e)) = sys.guard.as_mut().map(|g| g.check_alive()) {
            lines.push(format!("{} died during the scenario: {e:#}", sys.kind));
        } else if sys.kind != Kind::Direct {
            lines.push(format!("placement {}: {}: {placed}", p.name, sys.kind));
        }
    }
    for l in lines {
        ctx.results.note(scenario, l);
    }
}

/// One wrk second per system, once per placement per bench run (the processes and their
/// pools stay up across scenarios).
fn warm_up(ctx: &mut Ctx, p: Placement) {
    if ctx.plan.quick || ctx.warmed.contains(&p.name) {
        return;
    }
    ctx.warmed.push(p.name);
    let at = At { cpus: p.load, dir: &ctx.env.dir, host: &ctx.env.host };
    for sys in &ctx.systems {
        // Fills pools and caches; a failure shows up in the measured runs.
        let _ = load::wrk(&at, sys.h1, 1.0);
    }
}

/// Records `o`'s throughput, or notes why the run does not count.
fn record_rps(ctx: &mut Ctx, m: &Metric, kind: Kind, o: &Result<Outcome>) -> bool {
    match o {
        Ok(o) if o.valid() => {
            ctx.results.add(m, kind, o.rps);
            true
        }
        Ok(o) => {
            ctx.results.note(
                m.scenario,
                format!(
                    "{kind}: {}: run discarded: {} of {} requests failed {}",
                    m.name, o.bad, o.requests, o.detail
                ),
            );
            false
        }
        Err(e) => {
            ctx.results.note(m.scenario, format!("{kind}: {}: run failed: {e:#}", m.name));
            false
        }
    }
}

/// P1: added latency at 2k requests/s, HTTP/1.1, open loop with latency correction.
fn p1(ctx: &mut Ctx) -> Result<()> {
    const RATE: u32 = 2_000;
    const CONNECTIONS: u32 = 16;
    let oha = match &ctx.oha {
        Ok(b) => b.clone(),
        Err(e) => {
            ctx.results.note("P1", format!("skipped: no oha: {e}"));
            return Ok(());
        }
    };
    for p in ctx.plan.placements.clone() {
        place(ctx, "P1", p)?;
        warm_up(ctx, p);
        let abs: Vec<Metric> = ["p50", "p99", "p99.9"]
            .iter()
            .map(|q| Metric::new("P1", p.name, format!("{q} latency"), "µs", Better::Lower))
            .collect();
        let added: Vec<Metric> = ["p50", "p99", "p99.9"]
            .iter()
            .map(|q| Metric::new("P1", p.name, format!("added {q}"), "µs", Better::Lower))
            .collect();
        for _ in 0..ctx.plan.runs {
            let mut direct: Option<[f64; 3]> = None;
            for i in 0..ctx.systems.len() {
                let (kind, to) = (ctx.systems[i].kind, ctx.systems[i].h1);
                let at = At { cpus: p.load, dir: &ctx.env.dir, host: &ctx.env.host };
                let o = load::oha(&oha, &at, to, RATE, CONNECTIONS, ctx.plan.latency_secs);
                let lat = match o {
                    Ok(o) if o.valid() => o.latency_us,
                    Ok(o) => {
                        ctx.results.note(
                            "P1",
                            format!(
                                "{kind}: run discarded: {} of {} requests failed {}",
                                o.bad, o.requests, o.detail
                            ),
                        );
                        None
                    }
                    Err(e) => {
                        ctx.results.note("P1", format!("{kind}: run failed: {e:#}"));
                        None
                    }
                };
                let Some(lat) = lat else { continue };
                for (m, v) in abs.iter().zip(lat) {
                    ctx.results.add(m, kind, v);
                }
                if kind == Kind::Direct {
                    direct = Some(lat);
                } else if let Some(d) = direct {
                    for ((m, v), dv) in added.iter().zip(lat).zip(d) {
                        ctx.results.add(m, kind, v - dv);
                    }
                }
            }
        }
        note_placement(ctx, "P1", p, &format!("oha ({RATE} req/s, {CONNECTIONS} connections)"));
    }
    Ok(())
}

/// P2: saturation throughput (wrk HTTP/1.1, h2load h2c), CPU per request, peak RSS.
fn p2(ctx: &mut Ctx) -> Result<()> {
    let secs = ctx.plan.load_secs;
    for p in ctx.plan.placements.clone() {
        place(ctx, "P2", p)?;
        warm_up(ctx, p);
        for _ in 0..ctx.plan.runs {
            for i in 0..ctx.systems.len() {
                for tool in ["wrk HTTP/1.1", "h2load h2c"] {
                    let (kind, pid) = (ctx.systems[i].kind, ctx.systems[i].pid());
                    let at = At { cpus: p.load, dir: &ctx.env.dir, host: &ctx.env.host };
                    if let Some(pid) = pid {
                        procs::reset_hwm(pid);
                    }
                    let cpu0 = pid.map(procs::cpu_seconds);
                    let conns0 = upstream::accepted(ctx.env.upstream);
                    let o = if tool.starts_with("wrk") {
                        load::wrk(&at, ctx.systems[i].h1, secs)
                    } else {
                        load::h2load(&at, &format!("http://{}/", ctx.systems[i].h2c), secs)
                    };
                    let m =
                        Metric::new("P2", p.name, format!("rps, {tool}"), "req/s", Better::Higher);
                    if !record_rps(ctx, &m, kind, &o) {
                        continue;
                    }
                    let conns1 = upstream::accepted(ctx.env.upstream);
                    if let (Some(c0), Some(c1), Ok(o)) = (conns0, conns1, &o) {
                        let m = Metric::new(
                            "P2",
                            p.name,
                            format!("upstream connections opened per 1k requests, {tool}"),
                            "conn",
                            Better::Lower,
                        );
                        ctx.results.add(
                            &m,
                            kind,
                            c1.saturating_sub(c0) as f64 * 1000.0 / o.requests,
                        );
                    }
                    let (Some(pid), Some(cpu0), Ok(o)) = (pid, cpu0, o) else { continue };
                    let cpu = procs::cpu_seconds(pid) - cpu0;
                    let m = Metric::new(
                        "P2",
                        p.name,
                        format!("CPU per request, {tool}"),
                        "µs",
                        Better::Lower,
                    );
                    ctx.results.add(&m, kind, cpu / o.requests * 1e6);
                    let hwm = procs::status_kib(pid, "VmHWM:") as f64 / 1024.0;
                    let m = Metric::new(
                        "P2",
                        p.name,
                        format!("peak RSS, {tool}"),
                        "MiB",
                        Better::Lower,
                    );
                    ctx.results.add(&m, kind, hwm);
                }
            }
        }
        note_placement(ctx, "P2", p, "wrk / h2load");
    }
    Ok(())
}

/// P3: TLS 1.3 + h2 termination throughput (h2load); direct is h2c to the upstream.
fn p3(ctx: &mut Ctx) -> Result<()> {
    let secs = ctx.plan.load_secs;
    for p in ctx.plan.placements.clone() {
        place(ctx, "P3", p)?;
        for _ in 0..ctx.plan.runs {
            for i in 0..ctx.systems.len() {
                let sys = &ctx.systems[i];
                let kind = sys.kind;
                let url = match (kind, sys.tls) {
                    (Kind::Direct, _) => format!("http://{}/", sys.h2c),
                    (_, Some(tls)) => format!("https://{tls}/"),
                    (_, None) => continue,
                };
                let at = At { cpus: p.load, dir: &ctx.env.dir, host: &ctx.env.host };
                let o = load::h2load(&at, &url, secs);
                if let Ok(o) = &o
                    && kind != Kind::Direct
                    && (o.protocol.as_deref() != Some("h2") || o.tls.as_deref() != Some("TLSv1.3"))
                {
                    ctx.results.note(
                        "P3",
                        format!(
                            "{kind}: negotiated {:?} over {:?}, not h2 over TLSv1.3; run discarded",
                            o.protocol, o.tls
                        ),
                    );
                    continue;
                }
                let m = Metric::new(
                    "P3",
                    p.name,
                    "rps, h2load TLS 1.3 + h2 (direct: h2c)",
                    "req/s",
                    Better::Higher,
                );
                record_rps(ctx, &m, kind, &o);
            }
        }
        note_placement(ctx, "P3", p, "h2load");
    }
    Ok(())
}

/// Starts a fresh `kind` on the proxy CPU of placement A (for scenarios that need a
/// process of their own, like P6's memory readings).
pub fn fresh(ctx: &Ctx, kind: Kind, tag: &str) -> Result<systems::Running> {
    systems::start(kind, &ctx.env, super::A.proxy, tag)
}

/// The CPU of in-process clients.
pub const CLIENT_CPU: &str = HOME_CPU;

/// P5, route churn: 100k servers loaded, 1k changes/s applied through the same
/// `RoutingTable::apply` the etcd and file sources use, with a reader doing lookups the
/// whole time (the request path's view). Measured in process by the routing crate's
/// `apply_bench` example, so the number is the routing layer's own cost; commit→routable
/// through etcd adds the watch round trip (about 2 ms end to end in the e2e test).
fn p5(ctx: &mut Ctx) -> Result<()> {
    let seconds = if ctx.plan.quick { "2" } else { "5" };
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(crate::root())
        .args(["run", "--release", "-q", "-p", "sluice-routing", "--example", "apply_bench", "--"])
        .args(["--servers", "100000", "--rate", "1000", "--seconds", seconds, "--readers", "1"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            for line in text.lines().filter(|l| !l.starts_with('{')) {
                ctx.results.note("P5", line.to_owned());
            }
            Ok(())
        }
        Ok(o) => {
            ctx.results.note(
                "P5",
                format!(
                    "skipped: apply_bench failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
            Ok(())
        }
        Err(e) => {
            ctx.results.note("P5", format!("skipped: cannot run apply_bench: {e}"));
            Ok(())
        }
    }
}
