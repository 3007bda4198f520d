//! `cargo xtask bench [SCENARIO…]`: sluice against a direct connection, nginx and
//! HAProxy, on this machine, in one run, reported as ratios.
//!
//! Every system forwards to the same upstream program (a single-threaded hyper server
//! this binary runs as a child, `__upstream`): nginx and HAProxy share one instance; the
//! main sluice has a second of its own, a local replica in a cgroup of the run's with its
//! local-replica redirect on, as replicas on its node are (`--no-local-redirect` turns
//! that off). Every system runs with one worker, and is pinned with
//! `taskset` in two placements: A = proxy alone on CPU 1, load generator + upstream on
//! CPU 0; B = everything on CPU 0. (A wake-up across vCPUs costs tens of µs here, so an
//! unpinned run flips between modes.) Each number is min / median / max over several
//! runs, interleaved across systems so drift hits them all alike. Nothing here is
//! pass/fail; CI never runs it.
//!
//! Scenarios: P1 added latency at 2k req/s; P2 saturation throughput, CPU per request,
//! peak RSS; P3 TLS 1.3 + h2 termination; P4 upgraded streams through sluice (64 B round
//! trip, 1 KiB / 16 KiB stream throughput: direct vs userspace vs spliced vs auto); P5
//! route churn; P6 memory per idle connection; P7 SSE streaming under load; P8
//! new-connection rate with and without the kernel programs (XDP guard + steering); P9
//! instructions and allocations per proxied request (callgrind).

mod connrate;
mod counts;
mod idle;
mod load;
mod procs;
mod report;
mod results;
mod scenarios;
mod sse;
mod svg;
mod systems;
mod upgrade;
mod upstream;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::Parser;

use self::{
    procs::{Cpus, Guard},
    results::Results,
    systems::{Env, Kind, Running},
};

/// Options of `cargo xtask bench`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench",
    about = "Benchmarks sluice against direct, nginx and HAProxy"
)]
pub struct Opts {
    /// Scenarios to run (default: all): P1 added latency, P2 saturation throughput, P3 TLS
    /// termination, P4 upgraded streams (userspace vs spliced vs auto), P5 route churn, P6
    /// memory per idle connection, P7 SSE streaming, P8 new-connection rate with and
    /// without the kernel programs, P9 instructions and allocations per request.
    pub scenarios: Vec<String>,
    /// Short run (3 runs, 1 s loads, placement A only, 1k idle connections): under 2 min.
    #[arg(long)]
    pub quick: bool,
    /// Runs per scenario and system (default 5, or 3 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Placements to measure: A, B or AB (default AB, or A with --quick).
    #[arg(long)]
    pub placements: Option<String>,
    /// Systems to measure, comma-separated (default: direct,nginx,haproxy,sluice).
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Do not run scripts/setup.sh --bench first.
    #[arg(long)]
    pub no_setup: bool,
    /// Write docs/benchmarks.md and docs/bench/*.svg even with --quick.
    #[arg(long)]
    pub write: bool,
    /// Do not write docs/benchmarks.md and the plots.
    #[arg(long, conflicts_with = "write")]
    pub no_write: bool,
    /// Re-render docs/benchmarks.md and the plots from a saved docs/bench/results.json
    /// (measures nothing).
    #[arg(long, value_name = "RESULTS_JSON")]
    pub replot: Option<PathBuf>,
    /// Use this sluice binary instead of building `-p sluice` in release mode.
    #[arg(long)]
    pub sluice_bin: Option<PathBuf>,
    /// P9 also measures this (older) sluice binary, as `sluice-baseline`: the "before"
    /// of a change, e.g. one built from an earlier commit in another worktree.
    #[arg(long, value_name = "PATH")]
    pub baseline_bin: Option<PathBuf>,
    /// Measure sluice without its local-replica redirect: the main sluice then forwards
    /// to the shared upstream over loopback TCP, like nginx and HAProxy.
    #[arg(long)]
    pub no_local_redirect: bool,
    /// Keep the run's scratch directory (configs, logs, P9's callgrind profiles) to read
    /// after the run, e.g. with `callgrind_annotate`.
    #[arg(long)]
    pub keep_scratch: bool,
}

/// Where processes run.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// `A` or `B`.
    pub name: &'static str,
    /// CPUs of the proxy.
    pub proxy: Cpus,
    /// CPUs of the load generator (the upstream is always on CPU 0).
    pub load: Cpus,
    /// In words.
    pub what: &'static str,
}

/// Proxy alone on CPU 1; load generator and upstream share CPU 0.
pub const A: Placement = Placement {
    name: "A",
    proxy: "1",
    load: "0",
    what: "proxy alone on CPU 1; load generator + upstream on CPU 0",
};
/// Everything on CPU 0.
pub const B: Placement = Placement {
    name: "B",
    proxy: "0",
    load: "0",
    what: "everything (proxy, load, upstream) on CPU 0",
};

/// Nice value of every measured process (the harness and all it starts).
const NICE: i32 = -15;

/// CPU of the upstream, the in-process clients and the harness itself.
pub const HOME_CPU: Cpus = "0";

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Runs per system in each scenario.
    pub runs: usize,
    /// Seconds of each saturation load (P2, P3).
    pub load_secs: f64,
    /// Seconds of each open-loop latency run (P1).
    pub latency_secs: f64,
    /// Idle connections per protocol (P6).
    pub idle_conns: usize,
    /// Open-file limit in force (caps P6's connections).
    pub nofile: u64,
    /// Seconds of each streaming run (P7).
    pub sse_secs: f64,
    /// Placements measured.
    pub placements: Vec<Placement>,
    /// Whether this is a `--quick` run.
    pub quick: bool,
}

/// State shared by the scenarios.
pub struct Ctx {
    /// What to measure.
    pub plan: Plan,
    /// Paths, upstream, certs, binaries.
    pub env: Env,
    /// Started systems, direct first.
    pub systems: Vec<Running>,
    /// The oha binary, or why there is none.
    pub oha: Result<PathBuf, String>,
    /// What was measured.
    pub results: Results,
    /// Systems requested (for scenarios that restart proxies).
    pub wanted: Vec<Kind>,
    /// The upstream's pid (for placement notes).
    pub upstream_pid: u32,
    /// Placements whose warm-up already ran.
    pub warmed: Vec<&'static str>,
    /// An older sluice binary P9 measures too (`--baseline-bin`).
    pub baseline: Option<PathBuf>,
    /// Keep what a run writes for reading afterwards (`--keep-scratch`).
    pub keep_scratch: bool,
}

/// Entry point: `args` are everything after `cargo xtask bench`.
pub fn main(args: &[String]) -> Result<()> {
    // Internal roles: the harness re-runs this binary as the upstream.
    if let [role, bind] = args
        && role == "__upstream"
    {
        return upstream::main(bind.parse().context("__upstream needs an address")?);
    }
    let opts = Opts::try_parse_from(
        std::iter::once("cargo xtask bench".to_string()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| e.exit());
    run(opts)
}

const ALL_SCENARIOS: [&str; 9] = ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9"];

fn run(opts: Opts) -> Result<()> {
    if let Some(saved) = &opts.replot {
        let text =
            fs::read_to_string(saved).with_context(|| format!("reading {}", saved.display()))?;
        let (results, meta) = report::from_json(&text)?;
        println!("{}", report::text(&results, &meta));
        for p in report::write_docs(&super::root(), &results, &meta)? {
            eprintln!("bench: wrote {}", p.display());
        }
        return Ok(());
    }
    let started = Instant::now();
    let mut scenarios: Vec<&'static str> = Vec::new();
    for s in &opts.scenarios {
        let up = s.to_ascii_uppercase();
        let Some(found) = ALL_SCENARIOS.iter().find(|n| **n == up) else {
            bail!("unknown scenario {s:?}: expected one of {}", ALL_SCENARIOS.join(", "));
        };
        scenarios.push(found);
    }
    if scenarios.is_empty() {
        scenarios = ALL_SCENARIOS.to_vec();
    }
    let placements = match opts.placements.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None if opts.quick => vec![A],
        None | Some("AB") | Some("BA") => vec![A, B],
        Some("A") => vec![A],
        Some("B") => vec![B],
        Some(other) => bail!("--placements {other}: expected A, B or AB"),
    };
    let plan = Plan {
        runs: opts.runs.unwrap_or(if opts.quick { 3 } else { 5 }).max(1),
        load_secs: if opts.quick { 1.0 } else { 2.0 },
        latency_secs: if opts.quick { 1.0 } else { 2.0 },
        idle_conns: if opts.quick { 1_000 } else { 10_000 },
        nofile: 0,
        sse_secs: if opts.quick { 1.0 } else { 2.0 },
        placements,
        quick: opts.quick,
    };
    let mut wanted: Vec<Kind> = Vec::new();
    for name in &opts.systems {
        let Some(k) = Kind::ALL.iter().find(|k| k.name() == name.to_ascii_lowercase()) else {
            bail!("unknown system {name:?}: expected direct, nginx, haproxy or sluice");
        };
        wanted.push(*k);
    }
    if wanted.is_empty() {
        wanted = Kind::ALL.to_vec();
    }
    if !wanted.contains(&Kind::Direct) {
        // Every ratio divides by direct.
        wanted.insert(0, Kind::Direct);
    }
    wanted.sort();

    if !opts.no_setup {
        super::setup(false, &["--bench"])?;
    }
    let machine = report::Machine::probe();
    let oha = if scenarios.iter().any(|s| *s == "P1" || *s == "P7") {
        ensure_oha().map_err(|e| format!("{e:#}"))
    } else {
        Err("not needed".into())
    };
    let sluice = if !wanted.contains(&Kind::Sluice) {
        Err("not selected".into())
    } else if let Some(bin) = &opts.sluice_bin {
        Ok(bin.clone())
    } else {
        build_sluice().map_err(|e| format!("{e:#}"))
    };
    // 10k idle connections per protocol need far more than the default 1024 files; the
    // proxies and clients inherit this.
    let nofile = procs::raise_nofile(200_000)?;

    // Each side of 10k connections needs 10k files; the harness holds the client side.
    let mut plan = plan;
    plan.nofile = nofile;
    // HAProxy holds two descriptors per connection, so the limit caps everyone's count
    // (same N for every proxy keeps the comparison fair).
    let cap = (nofile.saturating_sub(200) / 2).saturating_sub(200) as usize;
    if plan.idle_conns > cap {
        plan.idle_conns = cap;
    }
    let scratch = Scratch::new(opts.keep_scratch)?;
    let dir = scratch.0.clone();
    eprintln!("bench: scratch directory {}", dir.display());
    procs::on_interrupt(dir.clone());
    let (cert, key, combined) = write_cert(&dir, "bench.r1.sluice.test")?;
    let exe = release_upstream()?.display().to_string();
    // Niced before the upstream starts so that every measured process inherits it.
    let reniced = procs::renice_self(NICE);
    let load_before = procs::loadavg();
    if load_before.parse::<f64>().is_ok_and(|l| l > 1.0) {
        eprintln!(
            "bench: warning: load average {load_before}: other work shares the CPUs, so \
             numbers will be noisier (tails most)"
        );
    }
    let (mut upstream, up_addr) = Guard::spawn_announcing(
        "upstream",
        HOME_CPU,
        &exe,
        &["bench".into(), "__upstream".into(), "127.0.0.1:0".into()],
        dir.join("upstream.log"),
    )?;
    upstream.check_alive()?;
    // sluice's own replica: the same upstream program, with sluice in a cgroup of this
    // run's own (see `systems::LocalReplica`). Started before the harness pins itself so
    // it is placed exactly like the shared upstream.
    let mut local_replica = None;
    if wanted.contains(&Kind::Sluice) && !opts.no_local_redirect {
        match start_local_replica(&dir, &exe) {
            Ok(l) => local_replica = Some(l),
            Err(e) => eprintln!("bench: sluice's local-replica redirect off: {e:#}"),
        }
    }
    // The harness's own clients (P6, P7) live with the load generators.
    procs::pin_self(HOME_CPU)?;

    let env = Env {
        dir: dir.clone(),
        upstream: up_addr,
        host: "bench.r1.sluice.test".into(),
        region: "r1".into(),
        base: "sluice.test".into(),
        cert,
        key,
        combined,
        sluice,
        nginx: which("nginx"),
        haproxy: which("haproxy"),
        nofile,
    };
    eprintln!("bench: upstream {up_addr}: {}", procs::placement(upstream.pid()));

    let mut results = Results::default();
    match &local_replica {
        Some((cg, l, guard)) => {
            eprintln!(
                "bench: sluice's local replica {}: {}",
                l.upstream,
                procs::placement(guard.pid())
            );
            results.note(
                "all",
                format!(
                    "sluice forwards to a local replica of its own (the upstream program, a \
                     second instance on CPU {HOME_CPU}) with its local-replica redirect on, \
                     both in cgroup {}; nginx and HAProxy use the shared upstream, outside it",
                    cg.path().display()
                ),
            );
        }
        None => results.note(
            "all",
            "sluice forwards to the shared upstream over loopback TCP (local-replica redirect off)",
        ),
    }
    let mut systems = Vec::new();
    for kind in &wanted {
        let started = match (&local_replica, kind) {
            (Some((cg, l, _)), Kind::Sluice) => {
                cg.spawn_inside(|| systems::start_sluice_local(&env, A.proxy, "main", l))
            }
            _ => systems::start(*kind, &env, A.proxy, "main"),
        };
        match started {
            Ok(r) => {
                // Say whether sluice's kernel data plane came up (it serves on the
                // userspace path either way).
                if let Some(g) = r.guard.as_ref().filter(|_| *kind == Kind::Sluice) {
                    for line in g.log_lines("kernel") {
                        let line = line.split_once(" sluice").map_or(line.as_str(), |(_, l)| l);
                        results.note("all", format!("sluice start-up: sluice{}", line.trim_end()));
                    }
                }
                systems.push(r)
            }
            Err(e) => {
                let why = first_lines(&format!("{e:#}"), 3);
                results.note("all", format!("{kind}: not runnable yet: {why}"));
            }
        }
    }
    let upstream_pid = upstream.pid();
    if let Some(b) = &opts.baseline_bin
        && !b.exists()
    {
        bail!("--baseline-bin {}: no such file", b.display());
    }
    let baseline = opts.baseline_bin.clone();
    let mut ctx = Ctx {
        plan,
        env,
        systems,
        oha,
        results,
        wanted,
        upstream_pid,
        warmed: Vec::new(),
        baseline,
        keep_scratch: opts.keep_scratch,
    };
    for s in &scenarios {
        let t = Instant::now();
        eprintln!("bench: === {s} ===");
        if let Err(e) = scenarios::run(&mut ctx, s) {
            ctx.results.note(s, format!("failed: {e:#}"));
        }
        eprintln!("bench: {s} took {:.0} s", t.elapsed().as_secs_f64());
        upstream.check_alive()?;
        if let Some((_, _, g)) = local_replica.as_mut() {
            g.check_alive()?;
        }
    }
    let meta = report::Meta::new(
        machine,
        &ctx.plan,
        scenarios.clone(),
        started.elapsed().as_secs_f64(),
        reniced.then_some(NICE),
        (load_before, procs::loadavg()),
    );
    println!("{}", report::text(&ctx.results, &meta));
    let write = if opts.quick { opts.write } else { !opts.no_write };
    if write {
        let written = report::write_docs(&super::root(), &ctx.results, &meta)?;
        for p in written {
            eprintln!("bench: wrote {}", p.display());
        }
    }
    drop(ctx);
    drop(upstream);
    drop(local_replica);
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Creates the run's cgroup for sluice and starts sluice's own replica inside it.
fn start_local_replica(
    dir: &Path,
    exe: &str,
) -> Result<(procs::RunCgroup, systems::LocalReplica, Guard)> {
    let cg = procs::RunCgroup::create(&format!("sluice-bench-{}", std::process::id()))?;
    let (guard, addr) = cg.spawn_inside(|| {
        Guard::spawn_announcing(
            "sluice's local replica",
            HOME_CPU,
            exe,
            &["bench".into(), "__upstream".into(), "127.0.0.1:0".into()],
            dir.join("local-replica.log"),
        )
    })?;
    let local = systems::LocalReplica { upstream: addr, cgroup: cg.path().to_path_buf() };
    Ok((cg, local, guard))
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().filter(|l| !l.trim().is_empty()).take(n).collect::<Vec<_>>().join(" | ")
}

/// The run's scratch directory, removed at the end unless kept (`--keep-scratch`).
struct Scratch(PathBuf, bool);

impl Scratch {
    fn new(keep: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Self(dir, keep))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("bench: kept the scratch directory {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
        // The run's bpffs pin directories (what the stopped sluices left: the listener
        // steering maps outlive a process by design).
        let prefix = systems::bench_pin_prefix();
        if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
            for e in entries.flatten() {
                if e.path().display().to_string().starts_with(&prefix) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

fn which(name: &str) -> Result<PathBuf, String> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!("{name} not installed (scripts/setup.sh --bench installs it)"))
}

/// A self-signed certificate for the TLS listeners (ECDSA P-256), written as PEM.
fn write_cert(dir: &Path, host: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let names = vec![host.to_string(), "*.r1.sluice.test".into(), "localhost".into()];
    let ck = rcgen::generate_simple_self_signed(names).context("rcgen")?;
    let (cert_pem, key_pem) = (ck.cert.pem(), ck.key_pair.serialize_pem());
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let combined = dir.join("combined.pem");
    fs::write(&cert, &cert_pem)?;
    fs::write(&key, &key_pem)?;
    fs::write(&combined, format!("{cert_pem}{key_pem}"))?;
    Ok((cert, key, combined))
}

/// Where the oha binary is cached (gitignored).
fn oha_root() -> PathBuf {
    super::root().join(".bench-cache")
}

/// oha from crates.io, built once into `.bench-cache/` (latest that builds on the
/// workspace's rustc, with its lockfile).
fn ensure_oha() -> Result<PathBuf> {
    let bin = oha_root().join("bin/oha");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("bench: building oha into {} (once, a few minutes)", oha_root().display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "oha", "--version", OHA_VERSION, "--locked", "--root"])
        .arg(oha_root())
        .status()
        .context("cannot run cargo install oha")?;
    if !status.success() || !bin.exists() {
        bail!("cargo install oha {OHA_VERSION} failed");
    }
    Ok(bin)
}

/// The oha release known to build with rustc 1.95.
const OHA_VERSION: &str = "1.16.0";

/// The upstream every system forwards to is this binary's `__upstream` role, and it must
/// be an optimised build: `cargo xtask` runs a debug build, whose hyper server costs
/// about four times the CPU per request, so the upstream (sharing CPU 0 with the load
/// generator) and not the proxy would set every throughput figure.
fn release_upstream() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    if me.parent().and_then(|d| d.file_name()).is_some_and(|d| d == "release") {
        return Ok(me);
    }
    release_build(&["-p", "xtask"], "xtask")
}

/// Builds the release sluice binary and returns its path.
fn build_sluice() -> Result<PathBuf> {
    // The binary embeds the kernel object; build it only if missing (as `demo` would).
    let object = super::root().join("target/ebpf/bpfel-unknown-none/release/sluice-ebpf");
    if std::env::var_os("SLUICE_EBPF_OBJECT").is_none() && !object.exists() {
        super::build_ebpf()?;
    }
    release_build(&["-p", "sluice"], "sluice")
}

/// `cargo build --release <args>` in the workspace; returns `target/release/<bin>`.
pub(crate) fn release_build(args: &[&str], bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("bench: $ cargo build --release {}", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(super::root())
        .args(["build", "--release", "-q"])
        .args(args)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release {} failed", args.join(" "));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::root().join("target"));
    let path = target.join("release").join(bin);
    if !path.exists() {
        bail!("{} missing after the build", path.display());
    }
    Ok(path)
}
