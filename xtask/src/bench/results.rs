//! Measurements as series (one per scenario × metric × placement), each holding every
//! run's value per system; summaries are min / median / max and ratios of medians.

use std::collections::BTreeMap;

use super::systems::Kind;

/// Which way is better for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Throughput.
    Higher,
    /// Latency, CPU, memory.
    Lower,
}

/// One metric of one scenario in one placement.
#[derive(Debug, Clone)]
pub struct Series {
    /// `P1` … `P7`.
    pub scenario: &'static str,
    /// What was measured, e.g. `rps, wrk HTTP/1.1`.
    pub metric: String,
    /// Unit, e.g. `req/s`, `µs`.
    pub unit: &'static str,
    /// Direction.
    pub better: Better,
    /// Placement label (`A`, `B`, or `-` where it does not apply).
    pub placement: &'static str,
    /// Every run's value per system.
    pub values: BTreeMap<Kind, Vec<f64>>,
}

/// min, median, max of a non-empty sample.
pub fn summary(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    Some((s[0], median, s[n - 1]))
}

impl Series {
    /// The median of `kind`'s runs.
    pub fn median(&self, kind: Kind) -> Option<f64> {
        summary(self.values.get(&kind)?).map(|(_, m, _)| m)
    }

    /// `kind`'s median divided by `reference`'s; none unless both are positive (an
    /// "added" latency at or below zero is noise, and a ratio of noise says nothing).
    pub fn ratio(&self, kind: Kind, reference: Kind) -> Option<f64> {
        let (m, r) = (self.median(kind)?, self.median(reference)?);
        (m > 0.0 && r > 0.0).then(|| m / r)
    }
}

/// Names a series: scenario, metric, unit, direction, placement.
#[derive(Debug, Clone)]
pub struct Metric {
    /// `P1` … `P7`.
    pub scenario: &'static str,
    /// What was measured.
    pub name: String,
    /// Unit.
    pub unit: &'static str,
    /// Direction.
    pub better: Better,
    /// Placement label.
    pub placement: &'static str,
}

impl Metric {
    /// A metric of `scenario` in `placement`.
    pub fn new(
        scenario: &'static str,
        placement: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        better: Better,
    ) -> Self {
        Self { scenario, name: name.into(), unit, better, placement }
    }
}

/// Everything one `cargo xtask bench` measured, plus notes (placements, skips).
#[derive(Default)]
pub struct Results {
    /// Measured series in the order they were first recorded.
    pub series: Vec<Series>,
    /// Per-scenario notes: what was skipped and why, where processes ran.
    pub notes: Vec<(&'static str, String)>,
}

impl Results {
    /// Records one run's value of `m` for `kind`.
    pub fn add(&mut self, m: &Metric, kind: Kind, value: f64) {
        let pos = self.series.iter().position(|s| {
            s.scenario == m.scenario && s.metric == m.name && s.placement == m.placement
        });
        let idx = match pos {
            Some(i) => i,
            None => {
                self.series.push(Series {
                    scenario: m.scenario,
                    metric: m.name.clone(),
                    unit: m.unit,
                    better: m.better,
                    placement: m.placement,
                    values: BTreeMap::new(),
                });
                self.series.len() - 1
            }
        };
        self.series[idx].values.entry(kind).or_default().push(value);
    }

    /// Adds a note to a scenario and prints it.
    pub fn note(&mut self, scenario: &'static str, text: impl Into<String>) {
        let text = text.into();
        eprintln!("bench: {scenario}: {text}");
        self.notes.push((scenario, text));
    }

    /// [`Results::note`], unless the scenario has that note already: for what every run
    /// would repeat.
    pub fn note_once(&mut self, scenario: &'static str, text: impl Into<String>) {
        let text = text.into();
        if !self.notes.iter().any(|(s, t)| *s == scenario && *t == text) {
            self.note(scenario, text);
        }
    }

    /// The series of `scenario` named `metric` in `placement`.
    pub fn find(&self, scenario: &str, metric: &str, placement: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.scenario == scenario && s.metric == metric && s.placement == placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_ratio() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5, 4.0)));
        assert_eq!(summary(&[f64::NAN]), None);
        let mut r = Results::default();
        let m = Metric::new("P2", "A", "rps", "req/s", Better::Higher);
        for v in [100.0, 110.0, 90.0] {
            r.add(&m, Kind::Direct, v);
        }
        for v in [40.0, 41.0, 39.0] {
            r.add(&m, Kind::Nginx, v);
        }
        let s = r.find("P2", "rps", "A").unwrap();
        assert_eq!(s.ratio(Kind::Nginx, Kind::Direct), Some(0.4));
        assert_eq!(s.ratio(Kind::Sluice, Kind::Direct), None);
    }
}
