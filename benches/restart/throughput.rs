//! Scenario 6: requests per second through grace against the same server bound directly. grace
//! is not a proxy (the server accepts on the socket grace bound), so the ratio should be 1.0.
//!
//! Both targets are loaded at the same time, by the same number of clients: on a machine shared
//! with other work, whatever slows one round slows both sides of it alike, where rounds taken one
//! after the other differed by up to 2x from one second to the next.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::Env;
use crate::load::{self, Load, Mode};
use crate::procs::{self, Proc, ProcSample};
use crate::report::{Json, Report, Section, Verdict, median_f};
use crate::restarts::Grace;

/// Requests in the first moments of a round are not counted (connections opening, threads
/// starting).
const WARM_UP: Duration = Duration::from_millis(200);

pub fn run(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let mut direct_cmd = Command::new(&env.server);
    direct_cmd.args(["--bind", "127.0.0.1:0"]);
    let mut direct = Proc::start("example server (direct)", direct_cmd)?;
    let (_, line) = direct.wait_line(0, &["listening fd="], Duration::from_secs(30))?;
    let direct_addr: SocketAddr = line
        .text
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in {:?}", line.text))?;
    load::wait_answering(direct_addr, Duration::from_secs(30))?;
    let command = [env.server.clone().into_os_string()];
    let grace = Grace::start(env, "grace + example server", &[], &command, "info")?;

    // grace is not in the data path: it should spend no CPU and never wake while the server
    // under it carries all this load.
    let grace_before = ProcSample::read(grace.proc.pid())?;
    let rounds = env.count(4, 6);
    let seconds = env.pick(Duration::from_millis(1500), Duration::from_secs(2));
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for mode in [Mode::KeepAlive, Mode::Close] {
        let targets = [direct_addr, grace.addr];
        let mut bench: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut wrk: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            // Every other round starts grace's clients first, in case going first matters.
            let swap = round % 2 == 1;
            let order = if swap {
                [targets[1], targets[0]]
            } else {
                targets
            };
            let unswap = |[a, b]: [f64; 2]| if swap { [b, a] } else { [a, b] };
            let [d, g] = unswap(rps(order, mode, env.clients, seconds)?);
            bench[0].push(d);
            bench[1].push(g);
            if let Ok(path) = &env.wrk {
                let [d, g] = unswap(wrk_rps(path, order, mode, env.clients, seconds)?);
                wrk[0].push(d);
                wrk[1].push(g);
            }
        }
        let id = if mode == Mode::KeepAlive { "6a" } else { "6b" };
        let ratio = pair_ratio(&bench);
        report.target(
            id,
            &format!(
                "throughput grace/direct, {} clients (both loaded at once)",
                mode.name()
            ),
            format!("{ratio:.3}"),
            ">= 0.98",
            ratio >= 0.98,
        );
        let mut row = |tool: &str, values: &[Vec<f64>; 2]| {
            let (d, g) = (median_f(&values[0]), median_f(&values[1]));
            let ratios: Vec<f64> = values[1]
                .iter()
                .zip(&values[0])
                .map(|(g, d)| g / d)
                .collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            rows.push(vec![
                mode.name().to_owned(),
                tool.to_owned(),
                values[0].len().to_string(),
                format!("{d:.0}"),
                format!("{g:.0}"),
                format!("{:.3}", pair_ratio(values)),
                format!("{lo:.2} - {hi:.2}"),
            ]);
            json.push(Json::obj([
                ("mode", Json::from(mode.name())),
                ("tool", Json::from(tool)),
                ("direct_rps_median", Json::Num(d)),
                ("grace_rps_median", Json::Num(g)),
                ("ratio_median_of_rounds", Json::Num(pair_ratio(values))),
                (
                    "direct_rounds",
                    Json::Arr(values[0].iter().map(|&v| Json::Num(v)).collect()),
                ),
                (
                    "grace_rounds",
                    Json::Arr(values[1].iter().map(|&v| Json::Num(v)).collect()),
                ),
            ]));
        };
        row("bench client", &bench);
        match &env.wrk {
            Ok(_) => {
                row("wrk", &wrk);
                report.check(
                    &format!("{id}w"),
                    &format!("the same, measured by wrk ({} clients)", mode.name()),
                    format!("{:.3}", pair_ratio(&wrk)),
                    ">= 0.98",
                    Verdict::Info,
                );
            }
            Err(e) => report.check(
                &format!("{id}w"),
                "throughput measured by wrk",
                e.clone(),
                "cross-check",
                Verdict::Missing,
            ),
        }
    }
    let grace_after = ProcSample::read(grace.proc.pid())?;
    let grace_cpu_ms = (grace_after.sched_ns - grace_before.sched_ns) as f64 / 1e6;
    let grace_wakeups = grace_after.voluntary - grace_before.voluntary;
    report.check(
        "6c",
        "grace's own CPU time / wake-ups while its server carried the load",
        format!("{grace_cpu_ms:.2} ms / {grace_wakeups}"),
        "0 / 0",
        Verdict::Info,
    );
    direct.stop(Duration::from_secs(10));
    let mut grace = grace;
    grace.proc.stop(Duration::from_secs(10));
    report.sections.push(Section {
        title: "6 Throughput: example server bound directly vs under grace (requests/s, median of rounds)".into(),
        header: [
            "mode",
            "measured by",
            "rounds",
            "direct req/s",
            "grace req/s",
            "ratio",
            "ratio range",
        ]
            .map(String::from)
            .to_vec(),
        rows,
        notes: vec![
            format!(
                "{} clients on each target, both loaded at once (every other round starts grace's first); {rounds} rounds of {:.1} s; ratio = median over rounds of grace/direct in the same round; the load generators share the CPUs with the servers",
                env.clients,
                seconds.as_secs_f64()
            ),
            format!(
                "grace itself during all these rounds: {grace_cpu_ms:.2} ms of CPU, {grace_wakeups} wake-ups (it is not in the data path)"
            ),
        ],
        json: Json::obj([
            ("rounds", Json::Arr(json)),
            ("grace_cpu_ms_during_load", Json::Num(grace_cpu_ms)),
            ("grace_wakeups_during_load", Json::from(grace_wakeups)),
        ]),
    });
    Ok(())
}

/// The median over rounds of grace's rate divided by the direct rate in the same round.
fn pair_ratio(values: &[Vec<f64>; 2]) -> f64 {
    let ratios: Vec<f64> = values[1]
        .iter()
        .zip(&values[0])
        .map(|(g, d)| g / d)
        .collect();
    median_f(&ratios)
}

/// Successful requests per second on both targets, loaded at the same time by `clients`
/// threads each.
fn rps(
    addrs: [SocketAddr; 2],
    mode: Mode,
    clients: usize,
    seconds: Duration,
) -> anyhow::Result<[f64; 2]> {
    let epoch = Instant::now();
    let max_run = seconds + Duration::from_secs(5);
    let loads = addrs.map(|addr| Load::start(addr, clients, mode, epoch, max_run));
    procs::sleep(seconds)?;
    let (from, to) = (WARM_UP.as_micros() as u64, seconds.as_micros() as u64);
    let mut rates = [0.0; 2];
    for (i, load) in loads.into_iter().enumerate() {
        let samples = load.finish();
        let ok = samples
            .iter()
            .filter(|s| s.failure.is_none() && s.end_us() >= from && s.end_us() < to)
            .count();
        let failed = samples.iter().filter(|s| s.failure.is_some()).count();
        if failed > 0 {
            eprintln!(
                "  {failed} failed requests while measuring throughput on {}",
                addrs[i]
            );
        }
        rates[i] = ok as f64 / (seconds - WARM_UP).as_secs_f64();
    }
    Ok(rates)
}

/// Requests per second measured by two wrk processes at once (one thread, `clients`
/// connections each), one per target.
fn wrk_rps(
    wrk: &Path,
    addrs: [SocketAddr; 2],
    mode: Mode,
    clients: usize,
    seconds: Duration,
) -> anyhow::Result<[f64; 2]> {
    procs::check_interrupted()?;
    let mut runs = Vec::new();
    for addr in addrs {
        let mut cmd = Command::new(wrk);
        cmd.args(["-t1", &format!("-c{clients}")])
            // wrk takes whole seconds.
            .arg(format!("-d{}s", seconds.as_secs_f64().round().max(1.0)))
            .args(["--timeout", "10s"]);
        if mode == Mode::Close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://{addr}/"));
        runs.push(Proc::start("wrk", cmd)?);
    }
    let mut rates = [0.0; 2];
    for (i, run) in runs.iter_mut().enumerate() {
        run.wait_exit(seconds + Duration::from_secs(30))?;
        // Let the reader threads take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        let lines = run.lines_from(0);
        for line in &lines {
            let text = line.text.trim();
            if text.starts_with("Socket errors") || text.starts_with("Non-2xx") {
                eprintln!("  wrk on {}: {text}", addrs[i]);
            }
        }
        rates[i] = lines
            .iter()
            .find_map(|l| l.text.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{}", run.tail(20)))?;
    }
    Ok(rates)
}
