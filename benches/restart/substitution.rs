//! Scenario 12: what bind substitution costs. The time from SIGUSR2 to the new generation's
//! spawn with node (a 100 MB program) beside the example server; a substituted `bind`; and a
//! server that binds and closes 10,000 sockets on addresses grace does not hold, under the filter
//! and without grace.

use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::Env;
use crate::procs::{free_port, log_time_us, wall_us};
use crate::report::{Json, Report, Section, Verdict, median_f};
use crate::restarts::Grace;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Milliseconds from SIGUSR2 (the bench's clock) to grace's "started generation N" line, over
/// `count` restarts.
fn signal_to_spawn(grace: &mut Grace, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for n in 2..=count + 1 {
        let from = grace.proc.mark();
        let sent = wall_us(SystemTime::now());
        grace.proc.signal(Signal::SIGUSR2)?;
        let (_, line) =
            grace
                .proc
                .wait_line(from, &[&format!("started generation {n}:")], TIMEOUT)?;
        let at = log_time_us(&line.text).context("a log line without a timestamp")?;
        out.push((at - sent) as f64 / 1000.0);
        grace
            .proc
            .wait_line(from, &[&format!("generation {} (pid", n - 1)], TIMEOUT)?;
        grace
            .proc
            .wait_line(from, &[") exited with status"], TIMEOUT)?;
    }
    Ok(out)
}

/// `us_per_bind` from a `bind_bench.py` line.
fn per_bind(text: &str) -> Option<f64> {
    text.split("us_per_bind ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let (node, python) = match (env.node.clone(), env.python.clone()) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(e), _) | (_, Err(e)) => {
            report.check("12", "bind substitution", e, "shown", Verdict::Missing);
            return Ok(());
        }
    };
    let count = env.count(10, 30);
    let mut rows = Vec::new();

    // 12a: SIGUSR2 to spawn, node beside the example server.
    let mut medians = Vec::new();
    for (name, port_arg) in [("example server", false), ("node", true)] {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let command: Vec<OsString> = if port_arg {
            vec![
                node.clone().into(),
                env.fixtures.join("no_handler_server.js").into(),
                port.to_string().into(),
            ]
        } else {
            vec![env.server.clone().into()]
        };
        let mut grace = Grace::start_on(
            env,
            &format!("grace + {name}"),
            &listen,
            &[],
            &command,
            "info",
        )?;
        let ms = signal_to_spawn(&mut grace, count)?;
        grace.proc.stop(Duration::from_secs(10));
        let median = median_f(&ms);
        medians.push(median);
        let size = std::fs::metadata(if port_arg { &node } else { &env.server })
            .map(|m| m.len() as f64 / (1024.0 * 1024.0))
            .unwrap_or(0.0);
        rows.push(vec![
            format!("SIGUSR2 -> generation spawned, {name} ({size:.1} MB program)"),
            format!("{median:.2} ms"),
        ]);
    }
    let ratio = medians[1] / medians[0];
    report.target(
        "12a",
        "SIGUSR2 to the new generation's spawn, node / example server (median)",
        format!("{:.2} ms / {:.2} ms = {ratio:.2}x", medians[1], medians[0]),
        "<= 2x",
        ratio <= 2.0,
    );

    // 12b, 12c: binds, without grace and under its filter.
    let script = env.fixtures.join("bind_bench.py");
    let n = 10_000;
    let direct = Command::new(&python)
        .arg(&script)
        .args([n.to_string().as_str(), "127.0.0.1", "0"])
        .output()
        .context("running bind_bench.py")?;
    let direct = per_bind(&String::from_utf8_lossy(&direct.stdout))
        .context("bind_bench.py printed no figure")?;
    let under = |port: Option<u16>, binds: usize| -> anyhow::Result<f64> {
        let grace_port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let listen = format!("127.0.0.1:{grace_port}");
        let bound = port.map_or(0, |p| p);
        let command: Vec<OsString> = vec![
            python.clone().into(),
            script.clone().into(),
            binds.to_string().into(),
            "127.0.0.1".into(),
            bound.to_string().into(),
            "wait".into(),
        ];
        let mut grace = Grace::start_on(
            env,
            "grace + bind_bench.py",
            &listen,
            &["--ready", "delay:100ms"],
            &command,
            "info",
        )?;
        let (_, line) = grace.proc.wait_line(0, &["us_per_bind"], TIMEOUT)?;
        grace.proc.stop(Duration::from_secs(10));
        per_bind(&line.text).context("no figure")
    };
    let unheld = under(None, n)?;
    let held_port = free_port()?;
    let held = under(Some(held_port), 1_000)?;
    rows.push(vec![
        "bind on an unheld address, without grace".into(),
        format!("{direct:.2} us"),
    ]);
    rows.push(vec![
        "bind on an unheld address, under the filter (the call goes to grace and back)".into(),
        format!("{unheld:.2} us ({:.1}x)", unheld / direct),
    ]);
    rows.push(vec![
        "bind on a held address, substituted (read, match, ADDFD, answer)".into(),
        format!("{held:.2} us"),
    ]);
    report.check(
        "12b",
        "a substituted bind",
        format!("{held:.1} us"),
        "shown",
        Verdict::Info,
    );
    report.check(
        "12c",
        "10,000 binds on unheld addresses under the filter / without grace",
        format!(
            "{unheld:.1} us / {direct:.1} us per bind ({:.1}x)",
            unheld / direct
        ),
        "shown",
        Verdict::Info,
    );
    if !(direct > 0.0 && unheld > 0.0 && held > 0.0) {
        bail!("a bind figure is missing");
    }
    report.sections.push(Section {
        title: "12 Bind substitution".into(),
        header: ["what", "median / per call"].map(String::from).to_vec(),
        rows,
        notes: vec![
            format!("{count} restarts each; times from grace's log timestamps against the bench's clock before kill(2)"),
            "binds timed inside the server (python3, perf_counter around a loop of socket, bind, close): the figures include Python's own cost, the same in every row".into(),
        ],
        json: Json::obj([
            ("spawn_ms_example", Json::Num(medians[0])),
            ("spawn_ms_node", Json::Num(medians[1])),
            ("bind_us_direct", Json::Num(direct)),
            ("bind_us_unheld_filtered", Json::Num(unheld)),
            ("bind_us_substituted", Json::Num(held)),
        ]),
    });
    Ok(())
}
