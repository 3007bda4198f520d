//! The results table (stdout), docs/benchmarks.md and the plots in docs/bench/.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use super::{
    Plan,
    results::{Better, Metric, Results, Series, summary},
    svg::{self, Bar, Chart, Group},
    systems::Kind,
};

/// The machine a run was on.
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model name.
    pub model: String,
    /// Kernel release.
    pub kernel: String,
    /// Commit (short hash, `+dirty` if the tree has changes).
    pub commit: String,
    /// UTC date and time.
    pub date: String,
    /// Versions of the peers and tools.
    pub tools: Vec<String>,
}

fn sh(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text.trim().to_string())
}

impl Machine {
    /// Reads the machine's description (before the harness pins itself).
    pub fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim())
            })
            .unwrap_or("unknown")
            .to_string();
        let kernel =
            fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let root = super::super::root();
        let root = root.display().to_string();
        let mut commit = sh("git", &["-C", &root, "rev-parse", "--short", "HEAD"])
            .unwrap_or_else(|| "unknown".into());
        if sh("git", &["-C", &root, "status", "--porcelain"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str("+dirty");
        }
        let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
        let first = |s: Option<String>| {
            s.and_then(|s| s.lines().next().map(str::to_string)).unwrap_or_default()
        };
        let tools = vec![
            first(sh("nginx", &["-v"])),
            first(sh("haproxy", &["-v"])).split(" - ").next().unwrap_or("").to_string(),
            first(sh("wrk", &["-v"])).split(" Copyright").next().unwrap_or("").to_string(),
            first(sh("h2load", &["--version"])),
            first(sh(&super::oha_root().join("bin/oha").display().to_string(), &["--version"])),
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
        Self { cpus, model, kernel, commit, date, tools }
    }
}

/// What the report says about the run as a whole (rendered text, so a saved run can be
/// re-plotted without the objects that produced it).
pub struct Meta {
    /// UTC date and time.
    pub date: String,
    /// Commit.
    pub commit: String,
    /// CPUs, model, kernel.
    pub machine: String,
    /// Versions of peers and tools.
    pub tools: Vec<String>,
    /// Runs, durations, placements, wall time.
    pub plan: String,
    /// Nice value and load average.
    pub conditions: String,
    /// The placement headline numbers come from.
    pub first_placement: String,
    /// Scenarios requested.
    pub scenarios: Vec<&'static str>,
}

impl Meta {
    /// Describes a finished run.
    pub fn new(
        m: Machine,
        plan: &Plan,
        scenarios: Vec<&'static str>,
        elapsed_secs: f64,
        nice: Option<i32>,
        load: (String, String),
    ) -> Self {
        let nice = match nice {
            Some(n) => format!("all measured processes at nice {n}"),
            None => "nice value unchanged (renice failed)".into(),
        };
        Self {
            date: m.date,
            commit: m.commit,
            machine: format!("{} CPUs, {}, kernel {}", m.cpus, m.model, m.kernel),
            tools: m.tools,
            plan: plan_line(plan, elapsed_secs),
            conditions: format!(
                "{nice}; 1-min load average {} before, {} after (anything above ~0 means other \
                 work shared the CPUs)",
                load.0, load.1
            ),
            first_placement: plan.placements.first().map_or("A", |p| p.name).to_string(),
            scenarios,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "date": self.date, "commit": self.commit, "machine": self.machine,
            "tools": self.tools, "plan": self.plan, "conditions": self.conditions,
            "first_placement": self.first_placement, "scenarios": self.scenarios,
        })
    }

    fn from_json(v: &serde_json::Value) -> Self {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let list = |k: &str| -> Vec<String> {
            v[k].as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        Self {
            date: s("date"),
            commit: s("commit"),
            machine: s("machine"),
            tools: list("tools"),
            plan: s("plan"),
            conditions: s("conditions"),
            first_placement: s("first_placement"),
            scenarios: list("scenarios").iter().filter_map(|n| scenario_name(n)).collect(),
        }
    }
}

fn scenario_name(n: &str) -> Option<&'static str> {
    TITLES.iter().map(|(s, _)| *s).find(|s| *s == n)
}

/// The raw runs as JSON (written next to the plots; `--replot` reads it back).
pub fn to_json(r: &Results, meta: &Meta) -> String {
    let series: Vec<serde_json::Value> = r
        .series
        .iter()
        .map(|s| {
            let values: serde_json::Map<String, serde_json::Value> = s
                .values
                .iter()
                .map(|(k, v)| (k.name().to_string(), serde_json::json!(v)))
                .collect();
            serde_json::json!({
                "scenario": s.scenario, "metric": s.metric, "unit": s.unit,
                "better": if s.better == Better::Higher { "higher" } else { "lower" },
                "placement": s.placement, "values": values,
            })
        })
        .collect();
    let notes: Vec<serde_json::Value> =
        r.notes.iter().map(|(s, n)| serde_json::json!([s, n])).collect();
    let doc = serde_json::json!({ "meta": meta.to_json(), "series": series, "notes": notes });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Reads what [`to_json`] wrote.
pub fn from_json(text: &str) -> Result<(Results, Meta)> {
    let doc: serde_json::Value = serde_json::from_str(text)?;
    let meta = Meta::from_json(&doc["meta"]);
    let mut r = Results::default();
    // Units and placements come from a small fixed set; leaking them keeps the series
    // type simple, and a re-plot is a short one-off process.
    let leak = |v: &serde_json::Value| -> &'static str {
        v.as_str().unwrap_or_default().to_string().leak()
    };
    for s in doc["series"].as_array().into_iter().flatten() {
        let Some(scenario) = s["scenario"].as_str().and_then(scenario_name) else { continue };
        let better = if s["better"] == "higher" { Better::Higher } else { Better::Lower };
        let m = Metric::new(
            scenario,
            leak(&s["placement"]),
            s["metric"].as_str().unwrap_or_default(),
            leak(&s["unit"]),
            better,
        );
        for (name, vals) in s["values"].as_object().into_iter().flatten() {
            let Some(kind) = Kind::EVERY.iter().find(|k| k.name() == name) else { continue };
            for v in vals.as_array().into_iter().flatten().filter_map(serde_json::Value::as_f64) {
                r.add(&m, *kind, v);
            }
        }
    }
    for n in doc["notes"].as_array().into_iter().flatten() {
        let scenario = n[0].as_str().and_then(scenario_name).unwrap_or("all");
        r.notes.push((scenario, n[1].as_str().unwrap_or_default().to_string()));
    }
    Ok((r, meta))
}

const TITLES: [(&str, &str); 9] = [
    ("P1", "added latency, HTTP/1.1, 2k req/s open loop (oha, latency-corrected)"),
    ("P2", "saturation throughput, CPU per request, peak RSS"),
    ("P3", "TLS 1.3 + h2 termination (h2load)"),
    (
        "P4",
        "upgraded streams: 64 B round trip and 1 KiB / 16 KiB stream throughput, userspace vs \
         spliced vs auto",
    ),
    ("P5", "route churn"),
    ("P6", "memory per idle connection"),
    (
        "P7",
        "LLM-shaped streaming: 64 SSE streams at 50 events/s over a background at 60 % of the \
         weakest proxy's saturation throughput",
    ),
    ("P8", "new-connection rate with and without the kernel programs (XDP guard + steering)"),
    (
        "P9",
        "instructions and heap allocations per proxied request (callgrind, fixed request counts)",
    ),
];

/// Kinds every other row is also divided by, where a series holds them: the peers,
/// P4's userspace relay (what splicing must beat), P8's runs without programs and with
/// only a pass-everything XDP program, P9's older sluice (`--baseline-bin`).
const PEERS: [Kind; 6] = [
    Kind::Nginx,
    Kind::Haproxy,
    Kind::SluiceUserspace,
    Kind::NoPrograms,
    Kind::XdpPass,
    Kind::SluiceBaseline,
];

fn ratio_cell(s: &Series, kind: Kind, reference: Kind) -> String {
    if kind == reference {
        return "1".into();
    }
    s.ratio(kind, reference).map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into())
}

/// Columns: system, min, median, max, then ratios to direct and each peer present.
fn rows(s: &Series) -> (Vec<String>, Vec<Vec<String>>) {
    let mut refs = Vec::new();
    if s.values.contains_key(&Kind::Direct) {
        refs.push(Kind::Direct);
    }
    refs.extend(PEERS.iter().copied().filter(|k| s.values.contains_key(k)));
    let mut head: Vec<String> = ["system", "min", "median", "max"].map(String::from).to_vec();
    head.extend(refs.iter().map(|r| format!("÷ {r}")));
    let mut out = Vec::new();
    for (kind, v) in &s.values {
        let Some((lo, med, hi)) = summary(v) else { continue };
        let mut row = vec![kind.to_string(), svg::num(lo), svg::num(med), svg::num(hi)];
        row.extend(refs.iter().map(|r| ratio_cell(s, *kind, *r)));
        out.push(row);
    }
    (head, out)
}

fn series_title(s: &Series) -> String {
    let dir = match s.better {
        Better::Higher => "higher is better",
        Better::Lower => "lower is better",
    };
    let place =
        if s.placement == "-" { String::new() } else { format!(" · placement {}", s.placement) };
    format!("{}{place} · {} ({dir})", s.metric, s.unit)
}

/// The plain-text report printed at the end of a run.
pub fn text(r: &Results, meta: &Meta) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== sluice benchmarks: {} · commit {} ==", meta.date, meta.commit);
    let _ = writeln!(out, "machine: {}", meta.machine);
    let _ = writeln!(out, "{}", meta.plan);
    let _ = writeln!(out, "conditions: {}", meta.conditions);
    for (_, note) in r.notes.iter().filter(|(s, _)| *s == "all") {
        let _ = writeln!(out, "note: {note}");
    }
    if let Some(h) = headline(r, meta) {
        let _ = writeln!(out, "\n## At a glance\n{h}");
    }
    for (scenario, ttl) in TITLES {
        if !meta.scenarios.contains(&scenario) {
            continue;
        }
        let _ = writeln!(out, "\n## {scenario} {ttl}");
        for (_, note) in r.notes.iter().filter(|(s, _)| *s == scenario) {
            let _ = writeln!(out, "  note: {note}");
        }
        for s in r.series.iter().filter(|s| s.scenario == scenario) {
            let _ = writeln!(out, "\n  {}", series_title(s));
            let (head, rows) = rows(s);
            let widths: Vec<usize> = (0..head.len())
                .map(|i| {
                    rows.iter()
                        .map(|r| r[i].chars().count())
                        .chain([head[i].chars().count()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: &[String]| {
                let mut l = String::from("   ");
                for (i, c) in cells.iter().enumerate() {
                    let pad = widths[i] - c.chars().count();
                    if i == 0 {
                        let _ = write!(l, " {c}{}", " ".repeat(pad));
                    } else {
                        let _ = write!(l, "  {}{c}", " ".repeat(pad));
                    }
                }
                l
            };
            let _ = writeln!(out, "{}", line(&head));
            for row in &rows {
                let _ = writeln!(out, "{}", line(row));
            }
        }
    }
    out
}

fn plan_line(p: &Plan, elapsed: f64) -> String {
    let places: Vec<String> =
        p.placements.iter().map(|p| format!("{} = {}", p.name, p.what)).collect();
    format!(
        "{}{} runs per system, interleaved; loads {} s (P2, P3), {} s (P1); {} idle connections (P6); placements: {}; whole run {:.0} s",
        if p.quick { "--quick: " } else { "" },
        p.runs,
        p.load_secs,
        p.latency_secs,
        p.idle_conns,
        places.join("; "),
        elapsed
    )
}

fn md_table(s: &Series) -> String {
    let (head, rows) = rows(s);
    let mut t = String::new();
    let _ = writeln!(t, "| {} |", head.join(" | "));
    let _ = writeln!(t, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let _ = writeln!(t, "| {} |", r.join(" | "));
    }
    t
}

/// Bars of `metric` in every placement, as ratios to direct (`as_ratio`) or raw values.
fn groups(r: &Results, scenario: &str, metrics: &[(&str, &str)], as_ratio: bool) -> Vec<Group> {
    let mut out = Vec::new();
    for placement in ["A", "B", "-"] {
        for (metric, label) in metrics {
            let Some(s) = r.find(scenario, metric, placement) else { continue };
            let base = if as_ratio { s.median(Kind::Direct) } else { Some(1.0) };
            let Some(base) = base.filter(|b| *b != 0.0) else { continue };
            let mut bars = Vec::new();
            for (kind, v) in &s.values {
                if as_ratio && *kind == Kind::Direct {
                    continue;
                }
                let Some((lo, med, hi)) = summary(v) else { continue };
                bars.push(Bar { kind: *kind, median: med / base, min: lo / base, max: hi / base });
            }
            let label = if placement == "-" {
                label.to_string()
            } else {
                format!("{label} · placement {placement}")
            };
            out.push(Group { label, bars });
        }
    }
    out
}

fn charts(r: &Results) -> Vec<(&'static str, &'static str, Option<String>)> {
    let throughput = Chart {
        title: "Throughput through the proxy, as a fraction of direct",
        subtitle: "median of runs, whiskers min–max · higher is better · 1.0 = no proxy",
        unit: "× direct (same load generator, same upstream, no proxy)",
        reference: Some((1.0, "direct")),
        log: false,
        groups: {
            let mut g = groups(
                r,
                "P2",
                &[("rps, wrk HTTP/1.1", "HTTP/1.1 (wrk)"), ("rps, h2load h2c", "h2c (h2load)")],
                true,
            );
            g.extend(groups(
                r,
                "P3",
                &[(
                    "rps, h2load TLS 1.3 + h2 (direct: h2c)",
                    "TLS 1.3 + h2 (h2load; direct = h2c)",
                )],
                true,
            ));
            g
        },
    };
    let latency = Chart {
        title: "Latency at 2k req/s through each proxy (HTTP/1.1, open loop)",
        subtitle: "oha with latency correction; median of runs, whiskers min–max; log scale · lower is better",
        unit: "µs (log scale)",
        reference: None,
        log: true,
        groups: groups(
            r,
            "P1",
            &[("p50 latency", "p50"), ("p99 latency", "p99"), ("p99.9 latency", "p99.9")],
            false,
        ),
    };
    let cpu = Chart {
        title: "CPU time per request at saturation",
        subtitle: "user + system CPU of the proxy's processes / requests; median of runs, \
                   whiskers min–max · lower is better",
        unit: "µs of CPU per request",
        reference: None,
        log: false,
        groups: groups(
            r,
            "P2",
            &[
                ("CPU per request, wrk HTTP/1.1", "HTTP/1.1 (wrk)"),
                ("CPU per request, h2load h2c", "h2c (h2load)"),
            ],
            false,
        ),
    };
    let memory = Chart {
        title: "Memory per idle connection",
        subtitle: "RSS growth of a fresh proxy / connections held open after one request each · lower is better",
        unit: "KiB per connection",
        reference: None,
        log: false,
        groups: groups(
            r,
            "P6",
            &[
                ("memory per idle HTTP/1.1 connection", "HTTP/1.1"),
                ("memory per idle h2c connection", "h2c"),
            ],
            false,
        ),
    };
    let streaming = Chart {
        title: "Streaming: 64 SSE streams at 50 events/s each over a background at 60 % of the \
                weakest proxy's throughput",
        subtitle: "median time to first event; p99 gap between events sent every 20 ms · \
                   median of runs, whiskers min–max · lower is better",
        unit: "ms",
        reference: Some((20.0, "20 ms send interval")),
        log: false,
        groups: groups(
            r,
            "P7",
            &[
                ("time to first event, median", "time to first event"),
                ("inter-event gap, p99 (sent every 20 ms)", "p99 inter-event gap"),
            ],
            false,
        ),
    };
    let upgraded = Chart {
        title: "Upgraded streams: userspace relay, kernel splice and auto, against direct",
        subtitle: "one-way stream throughput as a fraction of direct; median of runs, whiskers \
                   min–max · higher is better",
        unit: "× direct (client straight to the echo replica)",
        reference: Some((1.0, "direct")),
        log: false,
        groups: groups(
            r,
            "P4",
            &[
                ("stream throughput, 1 KiB writes", "1 KiB writes"),
                ("stream throughput, 16 KiB writes", "16 KiB writes"),
            ],
            true,
        ),
    };
    vec![
        ("throughput.svg", "Throughput relative to direct", svg::render(&throughput)),
        ("latency.svg", "Latency at 2k req/s", svg::render(&latency)),
        ("cpu.svg", "CPU per request", svg::render(&cpu)),
        ("memory.svg", "Memory per idle connection", svg::render(&memory)),
        ("streaming.svg", "Streaming", svg::render(&streaming)),
        ("upgraded.svg", "Upgraded streams", svg::render(&upgraded)),
    ]
}

/// Headline rows: (scenario, metric, label, as ratio to direct).
const HEADLINES: [(&str, &str, &str, bool); 11] = [
    ("P2", "rps, wrk HTTP/1.1", "throughput HTTP/1.1 (× direct)", true),
    ("P2", "rps, h2load h2c", "throughput h2c (× direct)", true),
    (
        "P3",
        "rps, h2load TLS 1.3 + h2 (direct: h2c)",
        "throughput TLS 1.3 + h2 (× direct h2c)",
        true,
    ),
    ("P1", "added p50", "added p50 at 2k req/s (µs)", false),
    ("P1", "added p99", "added p99 at 2k req/s (µs)", false),
    ("P1", "added p99.9", "added p99.9 at 2k req/s (µs)", false),
    ("P2", "CPU per request, wrk HTTP/1.1", "CPU per HTTP/1.1 request (µs)", false),
    (
        "P2",
        "upstream connections opened per 1k requests, wrk HTTP/1.1",
        "upstream connections opened per 1k HTTP/1.1 requests",
        false,
    ),
    (
        "P6",
        "memory per idle HTTP/1.1 connection",
        "memory per idle HTTP/1.1 connection (KiB)",
        false,
    ),
    ("P6", "memory per idle h2c connection", "memory per idle h2c connection (KiB)", false),
    ("P7", "added p99 inter-event gap", "added p99 SSE inter-event gap (µs)", false),
];

/// One table of the headline numbers (first placement measured), proxies as columns.
fn headline(r: &Results, meta: &Meta) -> Option<String> {
    let placement = meta.first_placement.as_str();
    let kinds = [Kind::Nginx, Kind::Haproxy, Kind::Sluice];
    let mut rows = Vec::new();
    for (scenario, metric, label, ratio) in HEADLINES {
        let s = r.find(scenario, metric, placement).or_else(|| r.find(scenario, metric, "-"));
        let Some(s) = s else { continue };
        let cells: Vec<String> = kinds
            .iter()
            .map(|k| {
                let v = if ratio { s.ratio(*k, Kind::Direct) } else { s.median(*k) };
                v.map_or_else(
                    || "-".into(),
                    |v| if ratio { format!("{v:.2}") } else { svg::num(v) },
                )
            })
            .collect();
        rows.push(format!("| {label} | {} |", cells.join(" | ")));
    }
    if rows.is_empty() {
        return None;
    }
    let mut t = format!(
        "Medians, placement {placement} (where it applies); details, spreads and placement B below.\n\n\
         | | nginx | HAProxy | sluice |\n|---|---|---|---|\n"
    );
    for row in rows {
        t.push_str(&row);
        t.push('\n');
    }
    Some(t)
}

/// Writes docs/benchmarks.md and docs/bench/*.svg; returns the paths written.
pub fn write_docs(root: &Path, r: &Results, meta: &Meta) -> Result<Vec<PathBuf>> {
    let dir = root.join("docs/bench");
    fs::create_dir_all(&dir)?;
    let mut written = Vec::new();
    let mut plots = Vec::new();
    for (file, alt, svg) in charts(r) {
        let path = dir.join(file);
        match svg {
            Some(svg) => {
                fs::write(&path, svg)?;
                written.push(path);
                plots.push((file, alt));
            }
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "sluice against a direct connection, nginx and HAProxy on one machine, in one run of \
         `cargo xtask bench`. Every number is a median over runs (with min and max), and every \
         comparison is a ratio of medians measured in the same run: absolute numbers depend on \
         the machine, ratios much less. A benchmark is never pass/fail; CI does not run this.\n"
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| date | {} |", meta.date);
    let _ = writeln!(md, "| commit | `{}` |", meta.commit);
    let _ = writeln!(md, "| machine | {} |", meta.machine);
    let _ = writeln!(md, "| tools | {} |", meta.tools.join(", "));
    let _ = writeln!(md, "| plan | {} |", meta.plan);
    let _ = writeln!(md, "| conditions | {} |", meta.conditions);
    for (_, note) in r.notes.iter().filter(|(s, _)| *s == "all") {
        let _ = writeln!(md, "| note | {} |", note.replace('|', "\\|"));
    }
    let _ = writeln!(md);
    if let Some(h) = headline(r, meta) {
        let _ = writeln!(md, "## At a glance\n\n{h}");
    }
    // The hand-written reading of the latest run (targets met and missed, what the
    // profile says) is kept beside the results and carried into every rewrite.
    if let Ok(reading) = fs::read_to_string(root.join("docs/bench/reading.md")) {
        let _ = writeln!(md, "{}", reading.trim_end());
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "{}", METHOD);
    for (file, alt) in &plots {
        let _ = writeln!(md, "![{alt}](bench/{file})\n");
    }
    for (scenario, ttl) in TITLES {
        if !meta.scenarios.contains(&scenario) {
            continue;
        }
        let _ = writeln!(md, "## {scenario}: {ttl}\n");
        let notes: Vec<&String> =
            r.notes.iter().filter(|(s, _)| *s == scenario).map(|(_, n)| n).collect();
        for s in r.series.iter().filter(|s| s.scenario == scenario) {
            let _ = writeln!(md, "**{}**\n", series_title(s));
            let _ = writeln!(md, "{}", md_table(s));
        }
        if !notes.is_empty() {
            let _ = writeln!(md, "Notes:\n");
            for n in notes {
                let _ = writeln!(md, "- {}", n.replace('|', "\\|"));
            }
            let _ = writeln!(md);
        }
    }
    let path = root.join("docs/benchmarks.md");
    fs::write(&path, md)?;
    written.push(path);
    let path = dir.join("results.json");
    fs::write(&path, to_json(r, meta))?;
    written.push(path);
    Ok(written)
}

const METHOD: &str = "## How it is measured

- **Run it:** `cargo xtask bench [P1 … P9] [--quick] [--runs N] [--placements A|B|AB] \
[--systems direct,nginx,haproxy,sluice]`. It installs the peers (`scripts/setup.sh --bench`: nginx, \
HAProxy, wrk, h2load) and builds `oha` once into `.bench-cache/`. The default run takes about 15 \
minutes, `--quick` under 2 (and writes nothing unless `--write`).
- **One upstream for all:** a single-threaded hyper server (HTTP/1.1 and h2c on one port, a fixed \
17-byte body, plus an SSE endpoint) that the harness runs as a child, from a release build of \
xtask (a debug build cost four times the CPU per request and, sharing CPU 0 with the load \
generator, capped every figure; runs before 2026-12-02 had that). `direct` is the load \
generator talking to it with no proxy; every ratio divides by direct in the same placement.
- **Equivalent configs:** one worker each (nginx `worker_processes 1`, HAProxy `nbthread 1`, \
sluice pinned to one CPU), keep-alive to the upstream over HTTP/1.1, access logs off, TLS 1.3 \
only with the same self-signed ECDSA P-256 certificate. The generated configs live in a \
temporary directory with their own pid and log paths; the system nginx and HAProxy are never \
touched. The config templates are in `scripts/bench/` (filled in by \
`xtask/src/bench/systems.rs`).
- **Pinned:** placement A puts the proxy alone on CPU 1 and the load generator and upstream on \
CPU 0; placement B puts everything on CPU 0. The notes under each scenario say where each process \
was allowed to run and the CPU it last ran on.
- **Interleaved runs:** each run measures every system once, in turn, so drift hits all alike; \
runs that saw more than 0.1 % failed or non-2xx answers are discarded and noted.
- **Loads:** wrk 1 thread × 64 connections; h2load 1 thread × 8 connections × 32 streams; oha \
open loop at 2000 req/s over 16 connections with latency correction; CPU per request from the \
proxy processes' `utime + stime` in `/proc/<pid>/stat`; peak RSS from `VmHWM` (reset before each \
run); upstream connections opened per 1k requests from the upstream's own accept count (shows \
whether a proxy reuses its upstream connections); memory per idle connection from the RSS growth of a freshly started proxy, with the \
same number of connections for every proxy (10k, or fewer where the open-file limit cannot \
hold HAProxy's two descriptors per connection).
- **Fair share of a busy machine:** every measured process runs at nice -15 (and its \
scheduler autogroup too), so concurrent builds disturb it less, but not at all only on an \
idle machine: check the load average above. Tail latencies (p99 and beyond) in placement A \
are the first to suffer, since anything else runnable on CPU 1 delays the proxy's wake-ups; \
placement B shows the same proxies without that.
- **P4, upgraded streams:** a sluice of its own serves three servers that differ only in \
their `splice` routing field (`never` = userspace relay, `always` = kernel splice, `auto` = the \
adaptive policy), all in front of one echo replica in the harness; `direct` is the client \
talking to the replica. Every number is a fresh HTTP/1.1 `Upgrade: websocket` stream carrying \
raw bytes: a 64 B ping-pong (median and p99 over every round trip of the run), or one-way \
1 KiB / 16 KiB writes for a fixed time, counted by the replica. sluice's \
`sluice_bpf_splice_bytes_total` is read around every run: a userspace run the kernel touched, \
or a spliced run it did not, is discarded and noted, and the notes say how often `auto` \
spliced. A sluice that does not know the field yet is measured on its default path only.
- **P7, streaming under load:** 64 SSE streams through each proxy, one event every 20 ms from \
the upstream, while oha (64 connections, open loop) pushes HTTP/1.1 background requests through \
the same proxy. The background rate is 60 % of the weakest proxy's saturation throughput: P2's \
median wrk HTTP/1.1 figure from the same run, or, when P2 did not run, a short wrk run of each \
proxy just before (10k req/s only if neither could be measured); the notes give the rate and \
where it came from. Every proxy is then busy but below capacity, so the added time to first \
event and p99 inter-event gap show how a proxy schedules streams under load, not how deep its \
overload queue gets. The same rate is used for direct.
- **P8, new-connection rate:** the budget for the kernel programs is 2 %. Measured at \
the data plane by the `conn_rate` example of `sluice-tests`: a node namespace and a client \
namespace on a veth link; two identical accept loops on SO_REUSEPORT listeners, one bare, one \
behind the XDP guard (on the link during its runs, port protected, SYN limit far above the load, a denylist \
entry) and listener steering (sk_reuseport); 8 connector threads, each connection a fresh \
TCP connect, one small HTTP/1.1 request and response, close. A third side, `xdp-pass`, is the \
bare loop with an XDP program that only passes packets: a native XDP program on a veth moves \
the veth's receive onto NAPI, a cost any XDP program pays there (not on a NIC), so \
`guard+steer ÷ xdp-pass` is what the guard's checks and steering themselves add. The sides run \
in rotating order each run, over the same link; the notes give the ratios (of medians, and \
the per-run ones) and whether the 2 % goal held.
- **P9, instructions and allocations per request:** each proxy (not direct) runs under \
`valgrind --tool=callgrind`, pinned like the others, so its counts reproduce where timings \
do not (valgrind slows it about 50×, which changes no count). h2load sends a fixed number of \
requests in P2's shapes (HTTP/1.1 keep-alive: `--h1`, 64 connections; h2c: 8 connections × 32 \
streams): a warm-up, then per run and protocol 2000 and 4000 requests with a \
`callgrind_control --dump` after each; per request is the difference of the two over the \
difference in requests, which cancels start-up, connection set-up and idle cost. \
Instructions are user space only. Allocations are callgrind's call counts into the \
allocator's entry points (glibc's `malloc` / `calloc` / `realloc` / aligned variants and \
mimalloc's `mi_*alloc*`, which sluice uses as its global allocator and valgrind's malloc \
replacement cannot see) from outside the allocator; frees are not counted. \
`--baseline-bin PATH` adds an older sluice binary as `sluice-baseline`, for a before / after \
of a change. sluice's kernel programs may fail to load under valgrind; it then serves on its \
userspace path, the same HTTP path (the notes say).
- **sluice's worker count:** `sluice run` sizes its Tokio runtime to the CPUs it may use, so \
pinned to one CPU it runs one worker (plus its main and helper threads, shown in the notes).
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_ratios() {
        let mut r = Results::default();
        let m = Metric::new("P2", "A", "rps, wrk HTTP/1.1", "req/s", Better::Higher);
        r.add(&m, Kind::Direct, 200_000.0);
        r.add(&m, Kind::Nginx, 80_000.0);
        let s = r.find("P2", "rps, wrk HTTP/1.1", "A").unwrap();
        let (head, rows) = rows(s);
        assert_eq!(head, ["system", "min", "median", "max", "÷ direct", "÷ nginx"]);
        assert_eq!(rows[1], ["nginx", "80000", "80000", "80000", "0.40", "1"]);
        assert!(!charts(&r).is_empty());
        let meta = Meta {
            date: "d".into(),
            commit: "c".into(),
            machine: "m".into(),
            tools: vec!["t".into()],
            plan: "p".into(),
            conditions: "x".into(),
            first_placement: "A".into(),
            scenarios: vec!["P2"],
        };
        let (back, meta2) = from_json(&to_json(&r, &meta)).unwrap();
        assert_eq!(meta2.scenarios, ["P2"]);
        assert_eq!(text(&back, &meta2), text(&r, &meta));
    }

    #[test]
    fn scenario_variants_divide_by_their_baseline_and_survive_json() {
        let mut r = Results::default();
        let m = Metric::new("P4", "A", "stream throughput, 16 KiB writes", "MB/s", Better::Higher);
        r.add(&m, Kind::Direct, 2000.0);
        r.add(&m, Kind::SluiceUserspace, 800.0);
        r.add(&m, Kind::SluiceSpliced, 1600.0);
        let s = r.find("P4", "stream throughput, 16 KiB writes", "A").unwrap();
        let (head, rows) = rows(s);
        assert_eq!(head, ["system", "min", "median", "max", "÷ direct", "÷ sluice-userspace"]);
        assert_eq!(rows[2], ["sluice-spliced", "1600", "1600", "1600", "0.80", "2.00"]);
        let meta = Meta {
            date: "d".into(),
            commit: "c".into(),
            machine: "m".into(),
            tools: vec![],
            plan: "p".into(),
            conditions: "x".into(),
            first_placement: "A".into(),
            scenarios: vec!["P4", "P8"],
        };
        let (back, _) = from_json(&to_json(&r, &meta)).unwrap();
        assert_eq!(back.series[0].values.len(), 3);
        assert!(charts(&r).iter().any(|(f, _, svg)| *f == "upgraded.svg" && svg.is_some()));
    }
}
