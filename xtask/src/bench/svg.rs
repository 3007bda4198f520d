//! Hand-written SVG bar charts: horizontal bars (median) with min–max whiskers, one
//! colour per system, grouped by what was measured. No dependencies, readable diffs.

use std::fmt::Write as _;

use super::systems::Kind;

/// One bar: a system's median and spread.
pub struct Bar {
    /// Whose.
    pub kind: Kind,
    /// Median (bar length).
    pub median: f64,
    /// Minimum (whisker start).
    pub min: f64,
    /// Maximum (whisker end).
    pub max: f64,
}

/// Bars that belong together (one metric in one placement).
pub struct Group {
    /// Label above the bars.
    pub label: String,
    /// The bars, one per system.
    pub bars: Vec<Bar>,
}

/// A chart.
pub struct Chart<'a> {
    /// Title.
    pub title: &'a str,
    /// Second line: what the axis means and which way is better.
    pub subtitle: &'a str,
    /// Unit printed after values.
    pub unit: &'a str,
    /// A dashed vertical line (e.g. 1.0 = direct for ratios).
    pub reference: Option<(f64, &'a str)>,
    /// Logarithmic axis (for values spanning decades, like tail latencies).
    pub log: bool,
    /// Groups, top to bottom.
    pub groups: Vec<Group>,
}

/// The colour of a system's bars.
pub fn colour(kind: Kind) -> &'static str {
    match kind {
        Kind::Direct => "#9aa0a6",
        Kind::Nginx => "#2f9e44",
        Kind::Haproxy => "#1c7ed6",
        Kind::Sluice => "#e8590c",
        Kind::SluiceUserspace => "#f59f00",
        Kind::SluiceSpliced => "#c2255c",
        Kind::SluiceAuto => "#7048e8",
        Kind::NoPrograms => "#9aa0a6",
        Kind::GuardSteer => "#e8590c",
        Kind::XdpPass => "#1c7ed6",
        Kind::SluiceBaseline => "#adb5bd",
    }
}

const WIDTH: f64 = 820.0;
const LEFT: f64 = 190.0;
const RIGHT: f64 = 110.0;
const BAR: f64 = 16.0;
const GAP: f64 = 4.0;
const GROUP_HEAD: f64 = 22.0;
const GROUP_GAP: f64 = 12.0;
const TOP: f64 = 74.0;
const BOTTOM: f64 = 52.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Number formatting shared with the tables: about 3 significant digits, no exponent.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A tick label with as many decimals as the step needs.
fn tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// A 1-2-5 step giving about `n` ticks over `span`.
fn step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Renders the chart; `None` if it has no bars.
pub fn render(c: &Chart<'_>) -> Option<String> {
    let bars: Vec<&Bar> = c.groups.iter().flat_map(|g| g.bars.iter()).collect();
    if bars.is_empty() {
        return None;
    }
    let mut hi = bars.iter().map(|b| b.max.max(b.median)).fold(0.0f64, f64::max);
    let mut lo = bars.iter().map(|b| b.min.min(b.median)).fold(0.0f64, f64::min);
    if let Some((r, _)) = c.reference {
        hi = hi.max(r);
        lo = lo.min(r);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    let plot_w = WIDTH - LEFT - RIGHT;
    // Axis: (position of a value, tick values, tick labels).
    let (lo, hi, ticks): (f64, f64, Vec<(f64, String)>) = if c.log {
        let positive = bars.iter().flat_map(|b| [b.min, b.median, b.max]).filter(|v| *v > 0.0);
        let min = positive.fold(f64::INFINITY, f64::min);
        let lo = 10f64.powf(min.max(1e-9).log10().floor());
        // The smallest 1-2-5 value at or above the largest one.
        let top = hi.max(lo * 2.0);
        let mag = 10f64.powf(top.log10().floor());
        let hi =
            [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|v| *v >= top).unwrap_or(mag * 10.0);
        let mut ticks = Vec::new();
        let mut decade = lo;
        while decade < hi * 1.001 {
            for m in [1.0, 2.0, 5.0] {
                let t = decade * m;
                if t <= hi * 1.001 {
                    ticks.push((t, num(t)));
                }
            }
            decade *= 10.0;
        }
        (lo, hi, ticks)
    } else {
        let st = step(hi - lo, 6.0);
        let (lo, hi) = ((lo / st).floor() * st, (hi / st).ceil() * st);
        let mut ticks = Vec::new();
        let mut t = lo;
        while t <= hi + st / 2.0 {
            ticks.push((t, tick(t, st)));
            t += st;
        }
        (lo, hi, ticks)
    };
    let x = |v: f64| {
        if c.log {
            let v = v.clamp(lo, hi);
            LEFT + (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_w
        } else {
            LEFT + (v - lo) / (hi - lo) * plot_w
        }
    };
    let body_h: f64 = c
        .groups
        .iter()
        .filter(|g| !g.bars.is_empty())
        .map(|g| GROUP_HEAD + g.bars.len() as f64 * (BAR + GAP) + GROUP_GAP)
        .sum();
    let height = TOP + body_h + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="16" y="24" font-size="16" font-weight="bold">{}</text>"#,
        esc(c.title)
    );
    let _ = writeln!(s, r##"<text x="16" y="44" fill="#555">{}</text>"##, esc(c.subtitle));
    // Grid and axis labels.
    let axis_y = TOP + body_h;
    for (t, label) in &ticks {
        let gx = x(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{axis_y}" stroke="#e5e5e5"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}</text>"##,
            axis_y + 16.0,
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
        LEFT + plot_w / 2.0,
        axis_y + 34.0,
        esc(c.unit)
    );
    let mut y = TOP;
    for g in c.groups.iter().filter(|g| !g.bars.is_empty()) {
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" font-weight="bold">{}</text>"#,
            y + 15.0,
            esc(&g.label)
        );
        y += GROUP_HEAD;
        for b in &g.bars {
            // Bars grow from zero (or the left edge of a log axis).
            let (x0, x1) = (x(if c.log { lo } else { 0f64.clamp(lo, hi) }), x(b.median));
            let (left, w) = if x1 >= x0 { (x0, x1 - x0) } else { (x1, x0 - x1) };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{left:.1}" y="{y:.1}" width="{:.1}" height="{BAR}" fill="{}" rx="2"/>"#,
                LEFT - 8.0,
                y + BAR - 4.0,
                b.kind,
                w.max(1.0),
                colour(b.kind)
            );
            let (wx0, wx1, wy) = (x(b.min), x(b.max), y + BAR / 2.0);
            let _ = writeln!(
                s,
                r##"<line x1="{wx0:.1}" y1="{wy:.1}" x2="{wx1:.1}" y2="{wy:.1}" stroke="#222" stroke-width="1.2"/><line x1="{wx0:.1}" y1="{:.1}" x2="{wx0:.1}" y2="{:.1}" stroke="#222"/><line x1="{wx1:.1}" y1="{:.1}" x2="{wx1:.1}" y2="{:.1}" stroke="#222"/>"##,
                y + 3.0,
                y + BAR - 3.0,
                y + 3.0,
                y + BAR - 3.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                x1.max(wx1) + 6.0,
                y + BAR - 4.0,
                esc(&num(b.median))
            );
            y += BAR + GAP;
        }
        y += GROUP_GAP;
    }
    if let Some((r, label)) = c.reference {
        let rx = x(r);
        let _ = writeln!(
            s,
            r##"<line x1="{rx:.1}" y1="{:.1}" x2="{rx:.1}" y2="{axis_y}" stroke="#444" stroke-dasharray="4 3"/><text x="{rx:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
            TOP - 6.0,
            TOP - 8.0,
            esc(label)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_and_skips_empty() {
        let empty = Chart {
            title: "t",
            subtitle: "s",
            unit: "u",
            reference: None,
            log: false,
            groups: vec![],
        };
        assert!(render(&empty).is_none());
        let c = Chart {
            title: "Throughput <ratio>",
            subtitle: "higher is better",
            unit: "× direct",
            reference: Some((1.0, "direct")),
            log: false,
            groups: vec![Group {
                label: "wrk".into(),
                bars: vec![Bar { kind: Kind::Nginx, median: 0.4, min: 0.38, max: 0.42 }],
            }],
        };
        let svg = render(&c).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("&lt;ratio&gt;"));
        assert!(svg.contains("nginx"));
        assert_eq!(step(1.0, 5.0), 0.2);
        assert_eq!(tick(2.0, 0.5), "2.0");
        assert_eq!(tick(2000.0, 500.0), "2000");
        let log = Chart {
            log: true,
            groups: vec![Group {
                label: "p99".into(),
                bars: vec![Bar { kind: Kind::Direct, median: 300.0, min: 250.0, max: 9000.0 }],
            }],
            ..c
        };
        let svg = render(&log).unwrap();
        assert!(svg.contains(">100<") && svg.contains(">10000<"), "{svg}");
    }
}
