//! Results: summaries of samples, the terminal tables, the PASS/FAIL targets and the JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::load::{Mode, Sample};

/// A restart (or broken deploy) as the load saw it: from the signal to the outcome, in µs since
/// the run's epoch.
#[derive(Clone, Debug)]
pub struct Window {
    pub start_us: u64,
    pub end_us: u64,
    /// The new version took over (false: rolled back, refused, or never came).
    pub took_over: bool,
}

/// Requests started this long after a window ends still count as "during the restart": the old
/// generation is draining then.
pub const TAIL_US: u64 = 250_000;

/// Counts and latencies of a set of requests (latencies over the successful ones).
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub requests: usize,
    pub failed: usize,
    pub retried: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub errors: BTreeMap<String, usize>,
}

impl Phase {
    pub fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Phase {
        let mut phase = Phase::default();
        let mut latencies = Vec::new();
        for s in samples {
            phase.requests += 1;
            phase.retried += s.retried as usize;
            match s.failure {
                None => latencies.push(s.latency_us as u64),
                Some(f) => {
                    phase.failed += 1;
                    *phase.errors.entry(f.name()).or_default() += 1;
                }
            }
        }
        latencies.sort_unstable();
        phase.p50_us = percentile(&latencies, 50.0);
        phase.p99_us = percentile(&latencies, 99.0);
        phase.max_us = latencies.last().copied().unwrap_or(0);
        phase
    }

    fn json(&self) -> Json {
        Json::obj([
            ("requests", Json::from(self.requests)),
            ("failed", Json::from(self.failed)),
            ("retried", Json::from(self.retried)),
            ("p50_ms", Json::ms(self.p50_us)),
            ("p99_ms", Json::ms(self.p99_us)),
            ("max_ms", Json::ms(self.max_us)),
            (
                "errors",
                Json::Obj(
                    self.errors
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(*v)))
                        .collect(),
                ),
            ),
        ])
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median_f(values: &[f64]) -> f64 {
    percentile_f(values, 50.0)
}

pub fn percentile_f(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One run of load against one target, split into steady state and restarts.
pub struct LoadResult {
    pub scenario: String,
    pub target: String,
    pub mode: Mode,
    pub duration_s: f64,
    pub steady: Phase,
    pub restart: Phase,
    pub windows: Vec<Window>,
    pub notes: Vec<String>,
}

impl LoadResult {
    pub fn new(
        scenario: &str,
        target: &str,
        mode: Mode,
        samples: &[Sample],
        windows: Vec<Window>,
    ) -> LoadResult {
        let during = |s: &Sample| {
            windows
                .iter()
                .any(|w| s.end_us() >= w.start_us && s.start_us <= w.end_us + TAIL_US)
        };
        let duration_s = match (samples.first(), samples.iter().map(Sample::end_us).max()) {
            (Some(first), Some(last)) => (last - first.start_us) as f64 / 1e6,
            _ => 0.0,
        };
        LoadResult {
            scenario: scenario.to_owned(),
            target: target.to_owned(),
            mode,
            duration_s,
            steady: Phase::of(samples.iter().filter(|s| !during(s))),
            restart: Phase::of(samples.iter().filter(|s| during(s))),
            windows,
            notes: Vec::new(),
        }
    }

    pub fn failed(&self) -> usize {
        self.steady.failed + self.restart.failed
    }

    pub fn requests(&self) -> usize {
        self.steady.requests + self.restart.requests
    }

    fn restart_ms(&self) -> Vec<f64> {
        self.windows
            .iter()
            .map(|w| (w.end_us - w.start_us) as f64 / 1000.0)
            .collect()
    }

    fn json(&self) -> Json {
        let restart_ms = self.restart_ms();
        Json::obj([
            ("scenario", Json::from(self.scenario.as_str())),
            ("target", Json::from(self.target.as_str())),
            ("mode", Json::from(self.mode.name())),
            ("duration_s", Json::Num(self.duration_s)),
            ("requests", Json::from(self.requests())),
            ("failed", Json::from(self.failed())),
            ("steady", self.steady.json()),
            ("during_restarts", self.restart.json()),
            ("restarts", Json::from(self.windows.len())),
            (
                "restarts_took_over",
                Json::from(self.windows.iter().filter(|w| w.took_over).count()),
            ),
            (
                "restart_ms",
                Json::Arr(restart_ms.iter().map(|&v| Json::Num(v)).collect()),
            ),
            (
                "notes",
                Json::Arr(self.notes.iter().map(|n| Json::from(n.as_str())).collect()),
            ),
        ])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A peer's result, shown for comparison: not a target for grace.
    Info,
    /// Could not be measured (a peer is not installed, or the scenario failed to run).
    Missing,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Info => "info",
            Verdict::Missing => "MISSING",
        }
    }
}

pub struct Check {
    pub id: String,
    pub what: String,
    pub measured: String,
    pub want: String,
    pub verdict: Verdict,
}

/// A table of other measurements (throughput, restart latency, resources).
pub struct Section {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
    pub json: Json,
}

#[derive(Default)]
pub struct Report {
    pub machine: Vec<(String, String)>,
    pub options: Vec<(String, String)>,
    pub loads: Vec<LoadResult>,
    pub sections: Vec<Section>,
    pub checks: Vec<Check>,
    pub errors: Vec<(String, String)>,
}

impl Report {
    pub fn check(
        &mut self,
        id: &str,
        what: &str,
        measured: impl Into<String>,
        want: &str,
        verdict: Verdict,
    ) {
        self.checks.push(Check {
            id: id.to_owned(),
            what: what.to_owned(),
            measured: measured.into(),
            want: want.to_owned(),
            verdict,
        });
    }

    /// A target that holds when `ok`.
    pub fn target(
        &mut self,
        id: &str,
        what: &str,
        measured: impl Into<String>,
        want: &str,
        ok: bool,
    ) {
        let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
        self.check(id, what, measured, want, verdict);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.loads.is_empty() {
            let _ = writeln!(
                out,
                "\n== Requests under restarts (latency of successful requests; \"restart\" = from the signal to the outcome, +{} ms) ==",
                TAIL_US / 1000
            );
            let header = [
                "scenario",
                "target",
                "mode",
                "req/s",
                "phase",
                "requests",
                "failed",
                "retried",
                "p50",
                "p99",
                "max",
                "restarts",
                "restart time (median / max)",
            ];
            let mut rows = Vec::new();
            for l in &self.loads {
                let ms = l.restart_ms();
                let took = l.windows.iter().filter(|w| w.took_over).count();
                let rate = l.requests() as f64 / l.duration_s.max(1e-9);
                let mut first = vec![
                    l.scenario.clone(),
                    l.target.clone(),
                    l.mode.name().to_owned(),
                    format!("{rate:.0}"),
                ];
                for (name, p) in [("steady", &l.steady), ("restart", &l.restart)] {
                    // The run's own columns only on its first line.
                    let mut row = std::mem::replace(&mut first, vec![String::new(); 4]);
                    let tail = [
                        format!("{took}/{} took over", l.windows.len()),
                        format!(
                            "{:.0} / {:.0} ms",
                            median_f(&ms),
                            ms.iter().copied().fold(0.0, f64::max)
                        ),
                    ];
                    row.extend([
                        name.to_owned(),
                        p.requests.to_string(),
                        p.failed.to_string(),
                        p.retried.to_string(),
                        fmt_ms(p.p50_us),
                        fmt_ms(p.p99_us),
                        fmt_ms(p.max_us),
                    ]);
                    if name == "steady" {
                        row.extend(tail);
                    }
                    rows.push(row);
                }
            }
            out.push_str(&table(&header, &rows));
            for l in &self.loads {
                let errors: BTreeMap<&String, usize> =
                    l.steady.errors.iter().chain(&l.restart.errors).fold(
                        BTreeMap::new(),
                        |mut m, (k, v)| {
                            *m.entry(k).or_default() += v;
                            m
                        },
                    );
                if !errors.is_empty() {
                    let list: Vec<String> =
                        errors.iter().map(|(k, v)| format!("{v} {k}")).collect();
                    let _ = writeln!(
                        out,
                        "  {} / {} / {}: failures: {}",
                        l.scenario,
                        l.target,
                        l.mode.name(),
                        list.join(", ")
                    );
                }
                for note in &l.notes {
                    let _ = writeln!(out, "  {} / {}: {note}", l.scenario, l.target);
                }
            }
        }
        for s in &self.sections {
            let _ = writeln!(out, "\n== {} ==", s.title);
            let header: Vec<&str> = s.header.iter().map(String::as_str).collect();
            out.push_str(&table(&header, &s.rows));
            for note in &s.notes {
                let _ = writeln!(out, "  {note}");
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\n== Scenarios that could not run ==");
            for (scenario, e) in &self.errors {
                let _ = writeln!(out, "{scenario}: {e}");
            }
        }
        let _ = writeln!(out, "\n== Targets ==");
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.id.clone(),
                    c.what.clone(),
                    c.measured.clone(),
                    c.want.clone(),
                    c.verdict.name().to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["#", "what", "measured", "target", "result"],
            &rows,
        ));
        let count = |v| self.checks.iter().filter(|c| c.verdict == v).count();
        let _ = writeln!(
            out,
            "{} PASS, {} FAIL, {} MISSING, {} info",
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Missing),
            count(Verdict::Info)
        );
        out
    }

    pub fn json(&self) -> Json {
        let pairs = |v: &[(String, String)]| {
            Json::Obj(
                v.iter()
                    .map(|(k, v)| (k.clone(), Json::from(v.as_str())))
                    .collect(),
            )
        };
        Json::obj([
            ("machine", pairs(&self.machine)),
            ("options", pairs(&self.options)),
            ("restart_tail_ms", Json::from((TAIL_US / 1000) as usize)),
            (
                "loads",
                Json::Arr(self.loads.iter().map(LoadResult::json).collect()),
            ),
            (
                "sections",
                Json::Obj(
                    self.sections
                        .iter()
                        .map(|s| (s.title.clone(), s.json.clone()))
                        .collect(),
                ),
            ),
            (
                "targets",
                Json::Arr(
                    self.checks
                        .iter()
                        .map(|c| {
                            Json::obj([
                                ("id", Json::from(c.id.as_str())),
                                ("what", Json::from(c.what.as_str())),
                                ("measured", Json::from(c.measured.as_str())),
                                ("target", Json::from(c.want.as_str())),
                                ("result", Json::from(c.verdict.name())),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "errors",
                Json::Obj(
                    self.errors
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(v.as_str())))
                        .collect(),
                ),
            ),
        ])
    }
}

pub fn fmt_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths.get(i).copied().unwrap_or(0);
            let _ = write!(s, "{cell:<pad$}  ");
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    out.push_str(&line(
        widths
            .iter()
            .map(|&w| "-".repeat(w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Just enough JSON to write the results file.
#[derive(Clone, Debug)]
pub enum Json {
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::Str(s.to_owned())
    }
}

impl From<usize> for Json {
    fn from(n: usize) -> Json {
        Json::Num(n as f64)
    }
}

impl From<u64> for Json {
    fn from(n: u64) -> Json {
        Json::Num(n as f64)
    }
}

impl From<bool> for Json {
    fn from(b: bool) -> Json {
        Json::Bool(b)
    }
}

impl Json {
    pub fn obj<const N: usize>(pairs: [(&str, Json); N]) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Microseconds shown as milliseconds.
    pub fn ms(us: u64) -> Json {
        Json::Num(us as f64 / 1000.0)
    }

    pub fn write(&self, out: &mut String, indent: usize) {
        let pad = "  ".repeat(indent + 1);
        match self {
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) if n.is_finite() => {
                if n.fract() == 0.0 && n.abs() < 1e15 {
                    let _ = write!(out, "{}", *n as i64);
                } else {
                    let _ = write!(out, "{:.4}", n);
                }
            }
            Json::Num(_) => out.push_str("null"),
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) if items.iter().all(|i| matches!(i, Json::Num(_))) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, indent);
                }
                out.push(']');
            }
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&pad);
                    item.write(out, indent + 1);
                }
                if !items.is_empty() {
                    out.push('\n');
                    out.push_str(&"  ".repeat(indent));
                }
                out.push(']');
            }
            Json::Obj(pairs) => {
                out.push('{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&pad);
                    Json::Str(k.clone()).write(out, indent + 1);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                }
                if !pairs.is_empty() {
                    out.push('\n');
                    out.push_str(&"  ".repeat(indent));
                }
                out.push('}');
            }
        }
    }
}
