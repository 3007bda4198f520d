//! P9: instructions and heap allocations per proxied request, counted by valgrind's
//! callgrind rather than timed, so the numbers reproduce on a noisy VM.
//!
//! Each proxy runs under `valgrind --tool=callgrind`, pinned like the others. h2load sends
//! a fixed number of requests (not a duration), first a warm-up, then per run and
//! protocol two loads of the same shape but `SMALL` and `LARGE` requests, with a
//! `callgrind_control --dump` after each (a dump holds what ran since the previous one).
//! The per-request figure is the difference of the two loads' costs over the difference
//! of their request counts, which cancels what a load costs whatever its length
//! (connection set-up and tear-down, timers firing while it runs).
//!
//! Allocations are counted from the same profile: callgrind records every call, so the
//! calls into the allocator's entry points (mimalloc's `mi_*alloc*`, which sluice links as
//! its `#[global_allocator]` and valgrind's malloc replacement cannot see, and glibc's
//! `malloc` family, which the peers and older sluice binaries use) made from outside the
//! allocator are the heap allocations. No preload, feature or symbol-specific set-up is
//! needed, and the same rule counts every system.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{
    Ctx,
    load::{self, At},
    procs,
    results::{Better, Metric},
    systems::{self, Kind},
};

/// Requests of the shorter measured load.
const SMALL: u32 = 2_000;
/// Requests of the longer measured load.
const LARGE: u32 = 4_000;
/// Requests of the warm-up load per protocol (fills pools, grows buffers).
const WARM: u32 = 500;
/// Runs at most: the counts barely move from run to run, and valgrind is slow.
const MAX_RUNS: usize = 3;

/// The allocator's entry points: mimalloc's (what `mimalloc::MiMalloc` calls) and
/// glibc's.
const ALLOC_ENTRIES: [&str; 14] = [
    "mi_malloc",
    "mi_malloc_aligned",
    "mi_zalloc",
    "mi_zalloc_aligned",
    "mi_calloc",
    "mi_realloc",
    "mi_realloc_aligned",
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
];

/// Whether `f` (a callgrind function name) is one of [`ALLOC_ENTRIES`].
fn is_entry(f: &str) -> bool {
    ALLOC_ENTRIES.contains(&base_name(f))
}

/// Whether `f` is inside an allocator (its calls to an entry point are not new
/// allocations, e.g. an aligned variant forwarding to the plain one).
fn inside_allocator(f: &str) -> bool {
    let f = base_name(f);
    is_entry(f) || f.starts_with("mi_") || f.starts_with("_mi_") || f.starts_with("_int_")
}

/// `f` without callgrind's recursion (`'2`) suffix.
fn base_name(f: &str) -> &str {
    f.split('\'').next().unwrap_or(f)
}

/// What one callgrind dump counted.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Cost {
    /// Instructions executed (Ir).
    instructions: u64,
    /// Calls into the allocator from outside it.
    allocs: u64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost { instructions: self.instructions + o.instructions, allocs: self.allocs + o.allocs }
    }
}

/// Parses one callgrind output file (with or without name compression).
fn parse(text: &str) -> Result<Cost> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut name = |s: &str| -> String {
        // `(id) name` defines id, `(id)` refers to it, a bare name is uncompressed.
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('(')
            && let Some((id, tail)) = rest.split_once(')')
        {
            let tail = tail.trim();
            if !tail.is_empty() {
                names.insert(id.to_string(), tail.to_string());
            }
            return names.get(id).cloned().unwrap_or_default();
        }
        s.to_string()
    };
    let (mut caller, mut callee) = (String::new(), String::new());
    let mut cost = Cost::default();
    let mut total = None;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("fn=") {
            caller = name(f);
        } else if let Some(f) = line.strip_prefix("cfn=") {
            callee = name(f);
        } else if let Some(c) = line.strip_prefix("calls=") {
            let n: u64 = c.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            if is_entry(&callee) && !inside_allocator(&caller) {
                cost.allocs += n;
            }
        } else if let Some(t) =
            line.strip_prefix("totals:").or_else(|| line.strip_prefix("summary:"))
        {
            total = t.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    cost.instructions = total.context("no totals line in the callgrind output")?;
    Ok(cost)
}

/// A proxy under callgrind and the dumps taken so far.
struct Profiled {
    running: systems::Running,
    /// Where callgrind writes (`cg.<pid>` plus `.<n>` per dump).
    out: PathBuf,
    /// Keep each dump (renamed `dump.<seq>.<pid>.<n>`, in the order taken) rather than
    /// removing it once read.
    keep: bool,
    /// Dumps taken so far.
    seq: usize,
}

impl Profiled {
    /// Asks every callgrind process of the proxy (nginx's master and worker) to dump, and
    /// returns what they counted since the previous dump.
    fn dump(&mut self) -> Result<Cost> {
        let pid = self.running.pid().context("no proxy process")?;
        let mut sum = Cost::default();
        let mut found = false;
        for p in procs::tree(pid) {
            let status = Command::new("callgrind_control")
                .args(["--dump", &p.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("cannot run callgrind_control")?;
            if !status.success() {
                continue;
            }
            // A forked child (nginx's worker) keeps its parent's `%p` in the file name, so
            // take whatever dump files appeared, one process at a time; the files are
            // large and only their sums are kept.
            for e in fs::read_dir(&self.out)?.flatten() {
                let path = e.path();
                // `cg.<pid>.<n>`; `cg.<pid>` is the profile written at exit.
                let name = e.file_name().to_string_lossy().into_owned();
                let parts: Vec<&str> = name.split('.').collect();
                let is_dump = parts.len() == 3
                    && parts[2].bytes().all(|b| b.is_ascii_digit())
                    && !parts[2].is_empty();
                if !is_dump {
                    continue;
                }
                let text = fs::read_to_string(&path)?;
                sum = sum + parse(&text).with_context(|| path.display().to_string())?;
                found = true;
                if self.keep {
                    let kept = format!("dump.{:02}.{}.{}", self.seq, parts[1], parts[2]);
                    let _ = fs::rename(&path, self.out.join(kept));
                } else {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        if !found {
            bail!("callgrind_control --dump {pid} produced no profile");
        }
        self.seq += 1;
        Ok(sum)
    }
}

/// The valgrind command line every proxy of P9 runs under.
fn callgrind(out: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--compress-strings=no".into(),
        "--compress-pos=no".into(),
        format!("--callgrind-out-file={}/cg.%p", out.display()),
    ]
}

/// Runs P9 in the first placement.
pub fn p9(ctx: &mut Ctx) -> Result<()> {
    for tool in ["valgrind", "callgrind_control"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            ctx.results.note("P9", format!("skipped: {tool} not installed"));
            return Ok(());
        }
    }
    let Some(p) = ctx.plan.placements.first().copied() else { return Ok(()) };
    let runs = ctx.plan.runs.min(MAX_RUNS);
    // The proxies measured: every requested one (direct has no proxy to count), then the
    // older sluice binary if one was given.
    let mut targets: Vec<(Kind, Kind, systems::Env)> = ctx
        .wanted
        .iter()
        .filter(|k| **k != Kind::Direct)
        .map(|k| (*k, *k, ctx.env.clone()))
        .collect();
    if let Some(bin) = &ctx.baseline {
        let mut env = ctx.env.clone();
        env.sluice = Ok(bin.clone());
        targets.push((Kind::SluiceBaseline, Kind::Sluice, env));
        ctx.results.note("P9", format!("sluice-baseline is {}", bin.display()));
    }
    let metric = |what: &str, proto: &str, unit: &'static str| {
        Metric::new("P9", p.name, format!("{what} per request, {proto}"), unit, Better::Lower)
    };
    let protos = [("HTTP/1.1 keep-alive", true), ("h2c", false)];
    for (label, kind, env) in targets {
        let out = ctx.env.dir.join(format!("callgrind-{label}"));
        fs::create_dir_all(&out)?;
        let started =
            systems::start_under(kind, &env, p.proxy, &format!("p9-{label}"), &callgrind(&out));
        let running = match started {
            Ok(r) => r,
            Err(e) => {
                ctx.results.note("P9", format!("{label}: cannot start under callgrind: {e:#}"));
                continue;
            }
        };
        if kind == Kind::Sluice
            && let Some(g) = &running.guard
        {
            for line in g.log_lines("kernel").into_iter().take(2) {
                let line = line.split_once(" sluice").map_or(line.as_str(), |(_, l)| l);
                ctx.results.note("P9", format!("{label} under valgrind: sluice{}", line.trim()));
            }
        }
        let mut prof = Profiled { running, out, keep: ctx.keep_scratch, seq: 0 };
        if let Err(e) = measure(ctx, p.load, &mut prof, label, runs, &protos, &metric) {
            ctx.results.note("P9", format!("{label}: {e:#}"));
        }
        if let Some(Err(e)) = prof.running.guard.as_mut().map(|g| g.check_alive()) {
            ctx.results.note("P9", format!("{label} died under callgrind: {e:#}"));
        }
        // Dropping the guard stops the proxy; callgrind writes a final profile nobody
        // reads, and the scratch directory goes at the end of the run.
        drop(prof);
    }
    ctx.results.note(
        "P9",
        format!(
            "valgrind --tool=callgrind, proxy pinned to CPU {}, h2load on CPU {}; per run and \
             protocol two loads of {SMALL} and {LARGE} requests after a {WARM}-request \
             warm-up, per request = (cost of the {LARGE} - cost of the {SMALL}) / their \
             difference in succeeded requests; user-space instructions only (the kernel's \
             share of each syscall is not counted); allocations = calls into malloc / calloc / \
             realloc / aligned variants (glibc and mimalloc) from outside the allocator",
            p.proxy, p.load
        ),
    );
    Ok(())
}

/// The warm-up and the measured runs of one proxy.
fn measure(
    ctx: &mut Ctx,
    load_cpus: procs::Cpus,
    prof: &mut Profiled,
    label: Kind,
    runs: usize,
    protos: &[(&str, bool)],
    metric: &dyn Fn(&str, &str, &'static str) -> Metric,
) -> Result<()> {
    let url = |h1: bool, r: &systems::Running| format!("http://{}/", if h1 { r.h1 } else { r.h2c });
    let at = At { cpus: load_cpus, dir: &ctx.env.dir, host: &ctx.env.host };
    for (_, h1) in protos {
        load::h2load_count(&at, &url(*h1, &prof.running), WARM, *h1)?;
    }
    prof.dump()?;
    for _ in 0..runs {
        for (proto, h1) in protos {
            let mut costs = Vec::new();
            for n in [SMALL, LARGE] {
                let at = At { cpus: load_cpus, dir: &ctx.env.dir, host: &ctx.env.host };
                let o = load::h2load_count(&at, &url(*h1, &prof.running), n, *h1)?;
                let cost = prof.dump()?;
                if o.bad > 0.0 || o.requests < f64::from(n) {
                    ctx.results.note(
                        "P9",
                        format!(
                            "{label}: {proto}: run discarded: {} of {n} requests succeeded, {} \
                             bad",
                            o.requests, o.bad
                        ),
                    );
                    break;
                }
                costs.push((o.requests, cost));
            }
            let [(n0, c0), (n1, c1)] = costs[..] else { continue };
            let dn = n1 - n0;
            if c1.instructions <= c0.instructions {
                // nginx's forked worker does not answer callgrind_control here, and the
                // master alone costs nothing per request: no figure beats a false zero.
                ctx.results.note_once(
                    "P9",
                    format!("{label}: {proto}: no per-request cost seen (worker not profiled)"),
                );
                continue;
            }
            let per = |a: u64, b: u64| (b as f64 - a as f64) / dn;
            ctx.results.add(
                &metric("instructions", proto, "instr"),
                label,
                per(c0.instructions, c1.instructions),
            );
            ctx.results.add(
                &metric("allocations", proto, "allocs"),
                label,
                per(c0.allocs, c1.allocs),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_into_the_allocator_from_outside_it() {
        let text = "events: Ir\nsummary: 1000\n\
                    fn=(1) app::handle\n10 5\ncfn=(2) mi_malloc_aligned\ncalls=3 0\n10 30\n\
                    cfn=(3) malloc\ncalls=2 0\n11 20\n\
                    fn=(2)\ncfn=(4) mi_malloc\ncalls=3 0\n1 9\n\
                    fn=(5) tokio::poll\ncfn=(2)\ncalls=4 0\n2 8\n\
                    cfn=(6) mi_free\ncalls=9 0\n3 9\n\
                    totals: 1000\n";
        assert_eq!(parse(text).unwrap(), Cost { instructions: 1000, allocs: 9 });
        let plain = "events: Ir\nfn=h\ncfn=realloc'2\ncalls=5 1\n1 1\ntotals: 7\n";
        assert_eq!(parse(plain).unwrap(), Cost { instructions: 7, allocs: 5 });
        assert!(parse("fn=x\n").is_err());
    }
}
