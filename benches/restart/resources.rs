//! Scenarios 7 and 8: how long a restart takes inside grace, and what grace costs to keep around
//! (memory, CPU, wake-ups), beside start_server.

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::Signal;

use crate::Env;
use crate::procs::{self, Line, Proc, ProcSample, clock_ticks, log_time_us, wall_us};
use crate::report::{Json, Report, Section, Verdict, median_f, percentile_f};
use crate::restarts::{Grace, StartServer};

/// Grace's log lines for one restart from generation `n - 1` to `n`, as µs timestamps.
struct Timeline {
    signal_sent: i64,
    requested: i64,
    reexecuting: i64,
    reexecuted: i64,
    started: i64,
    notified: i64,
    /// New connections go to the new generation (the handover).
    switched: i64,
    /// The old generation has finished its queue and connections and gets its stop signal.
    draining: i64,
}

impl Timeline {
    fn parse(signal_sent: i64, lines: &[Line], n: usize) -> anyhow::Result<Timeline> {
        let at = |needle: &str, after: usize| -> anyhow::Result<(usize, i64)> {
            lines
                .iter()
                .enumerate()
                .skip(after)
                .find(|(_, l)| l.text.contains(needle))
                .and_then(|(i, l)| Some((i, log_time_us(&l.text)?)))
                .with_context(|| format!("no timestamped log line {needle:?} for generation {n}"))
        };
        let (i, requested) = at("SIGUSR2: restart requested", 0)?;
        let (i, reexecuting) = at("re-executing ", i)?;
        let (i, reexecuted) = at("re-executed;", i)?;
        let (i, started) = at(&format!("started generation {n}:"), i)?;
        let (i, notified) = at("READY=1", i)?;
        let (i, switched) = at(&format!("new connections go to generation {n}"), i)?;
        let (_, draining) = at(&format!("draining generation {}", n - 1), i)?;
        Ok(Timeline {
            signal_sent,
            requested,
            reexecuting,
            reexecuted,
            started,
            notified,
            switched,
            draining,
        })
    }
}

/// Scenario 7: SIGUSR2 to the new generation spawned, to the switch and to the old one signalled,
/// own log timestamps (GRACE_LOG=debug), with the example server, which sends READY=1 at once.
pub fn restart_latency(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let count = env.count(50, 200);
    let command = [env.server.clone().into_os_string()];
    let mut grace = Grace::start(env, "grace (debug log)", &[], &command, "debug")?;
    let mut timelines = Vec::new();
    let mut cpu_ms = Vec::new();
    let pid = grace.proc.pid();
    for n in 2..=count + 1 {
        let from = grace.proc.mark();
        let before = ProcSample::read(pid)?;
        let sent = wall_us(SystemTime::now());
        grace.proc.signal(Signal::SIGUSR2)?;
        let timeout = Duration::from_secs(30);
        let (which, _) =
            grace
                .proc
                .wait_line(from, &[") is serving", "restart failed"], timeout)?;
        if which != 0 {
            bail!("restart {n} failed:\n{}", grace.proc.tail(20));
        }
        // One restart at a time: wait for the old generation to be gone before the next.
        procs::wait_for("the old generation's exit line", timeout, || {
            Ok(grace
                .proc
                .lines_from(from)
                .iter()
                .any(|l| {
                    l.text.contains(&format!("generation {} (pid", n - 1))
                        && l.text.contains("exited")
                })
                .then_some(()))
        })?;
        let after = ProcSample::read(pid)?;
        cpu_ms.push((after.sched_ns - before.sched_ns) as f64 / 1e6);
        timelines.push(Timeline::parse(sent, &grace.proc.lines_from(from), n)?);
    }
    grace.proc.stop(Duration::from_secs(10));

    let ms = |f: &dyn Fn(&Timeline) -> i64| -> Vec<f64> {
        timelines.iter().map(|t| f(t) as f64 / 1000.0).collect()
    };
    // Up to the switch: what follows is the old generation's own time to finish (its queue, then
    // its connections: the steered handover's deliberate waits), shown on its own.
    let overhead = ms(&|t| (t.switched - t.signal_sent) - (t.notified - t.started));
    let metrics: Vec<(&str, Vec<f64>)> = vec![
        (
            "signal -> new generation spawned",
            ms(&|t| t.started - t.signal_sent),
        ),
        (
            "signal -> old generation signalled",
            ms(&|t| t.draining - t.signal_sent),
        ),
        (
            "  signal -> grace logs it",
            ms(&|t| t.requested - t.signal_sent),
        ),
        (
            "  checking the new binary's handoff version",
            ms(&|t| t.reexecuting - t.requested),
        ),
        (
            "  execve -> new image running",
            ms(&|t| t.reexecuted - t.reexecuting),
        ),
        (
            "  new image -> generation spawned",
            ms(&|t| t.started - t.reexecuted),
        ),
        (
            "  server start-up (spawned -> READY=1)",
            ms(&|t| t.notified - t.started),
        ),
        (
            "  READY=1 -> new connections go to it (the switch)",
            ms(&|t| t.switched - t.notified),
        ),
        (
            "  switch -> old generation finished and signalled (queue and idle waits)",
            ms(&|t| t.draining - t.switched),
        ),
        (
            "grace's own overhead (total - server start-up)",
            overhead.clone(),
        ),
        ("grace's CPU time per restart (schedstat)", cpu_ms),
    ];
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for (name, values) in &metrics {
        let max = values.iter().copied().fold(f64::NAN, f64::max);
        rows.push(vec![
            (*name).to_owned(),
            format!("{:.2}", median_f(values)),
            format!("{:.2}", percentile_f(values, 99.0)),
            format!("{max:.2}"),
        ]);
        json.push(Json::obj([
            ("metric", Json::from(name.trim())),
            ("median_ms", Json::Num(median_f(values))),
            ("p99_ms", Json::Num(percentile_f(values, 99.0))),
            ("max_ms", Json::Num(max)),
        ]));
    }
    let median = median_f(&overhead);
    report.target(
        "7",
        "restart overhead in grace, signal to switch (excluding server start-up), median",
        format!(
            "{median:.2} ms (p99 {:.2} ms)",
            percentile_f(&overhead, 99.0)
        ),
        "< 5 ms",
        median < 5.0,
    );
    report.sections.push(Section {
        title: format!("7 Restart latency over {count} restarts, example server, no load (ms)"),
        header: ["step", "median", "p99", "max"].map(String::from).to_vec(),
        rows,
        notes: vec![
            "from grace's log timestamps at GRACE_LOG=debug; \"signal\" is the bench's clock just before kill(2) (same wall clock)".into(),
            "wall times include waiting for a CPU: on a busy machine they grow, the CPU time does not (it leaves out the version check, a child process: see 8)".into(),
        ],
        json: Json::Arr(json),
    });
    Ok(())
}

/// What one manager costs: idle, then across restarts.
struct Footprint {
    name: String,
    idle: ProcSample,
    after_idle: ProcSample,
    after_restarts: ProcSample,
    idle_for: Duration,
    restarts: usize,
}

impl Footprint {
    fn row(&self, tick_ms: f64) -> Vec<String> {
        let cpu = |a: &ProcSample, b: &ProcSample| {
            format!(
                "{:.0} ms ({:.2} ms)",
                (b.cpu_ticks - a.cpu_ticks) as f64 * tick_ms,
                (b.sched_ns - a.sched_ns) as f64 / 1e6
            )
        };
        let per = (self.after_restarts.sched_ns - self.after_idle.sched_ns) as f64
            / 1e6
            / self.restarts.max(1) as f64;
        vec![
            self.name.clone(),
            format!("{} KiB", self.idle.rss_kib),
            format!("{} KiB", self.after_restarts.rss_kib),
            format!("{} KiB", self.after_restarts.hwm_kib.max(self.idle.hwm_kib)),
            cpu(&self.idle, &self.after_idle),
            format!(
                "{} / {}",
                self.after_idle.voluntary - self.idle.voluntary,
                self.after_idle.involuntary - self.idle.involuntary
            ),
            format!(
                "{} restarts: {}",
                self.restarts,
                cpu(&self.after_idle, &self.after_restarts)
            ),
            format!("{per:.2} ms"),
        ]
    }

    fn json(&self, tick_ms: f64) -> Json {
        Json::obj([
            ("manager", Json::from(self.name.as_str())),
            ("idle_seconds", Json::Num(self.idle_for.as_secs_f64())),
            ("rss_idle_kib", Json::from(self.idle.rss_kib)),
            (
                "rss_after_restarts_kib",
                Json::from(self.after_restarts.rss_kib),
            ),
            (
                "rss_peak_kib",
                Json::from(self.after_restarts.hwm_kib.max(self.idle.hwm_kib)),
            ),
            (
                "idle_cpu_ms_ticks",
                Json::Num((self.after_idle.cpu_ticks - self.idle.cpu_ticks) as f64 * tick_ms),
            ),
            (
                "idle_cpu_ms_sched",
                Json::Num((self.after_idle.sched_ns - self.idle.sched_ns) as f64 / 1e6),
            ),
            (
                "idle_voluntary_switches",
                Json::from(self.after_idle.voluntary - self.idle.voluntary),
            ),
            (
                "idle_involuntary_switches",
                Json::from(self.after_idle.involuntary - self.idle.involuntary),
            ),
            ("restarts", Json::from(self.restarts)),
            (
                "restarts_cpu_ms_ticks",
                Json::Num(
                    (self.after_restarts.cpu_ticks - self.after_idle.cpu_ticks) as f64 * tick_ms,
                ),
            ),
            (
                "restarts_cpu_ms_sched",
                Json::Num((self.after_restarts.sched_ns - self.after_idle.sched_ns) as f64 / 1e6),
            ),
        ])
    }
}

/// Samples `pid` idle for `idle_for`, then across `restarts` done by `restart`.
fn measure(
    name: &str,
    pid: i32,
    idle_for: Duration,
    restarts: usize,
    mut restart: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Footprint> {
    // Let start-up settle (page faults, the first generation's messages) before the idle window.
    procs::sleep(Duration::from_secs(1))?;
    let idle = ProcSample::read(pid)?;
    procs::sleep(idle_for)?;
    let after_idle = ProcSample::read(pid)?;
    for i in 1..=restarts {
        restart(i)?;
    }
    let after_restarts = ProcSample::read(pid)?;
    Ok(Footprint {
        name: name.to_owned(),
        idle,
        after_idle,
        after_restarts,
        idle_for,
        restarts,
    })
}

/// Scenario 8: resident memory, CPU time and idle wake-ups of grace and of start_server, each
/// managing the example server.
pub fn footprint(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let idle_for = env.pick(Duration::from_secs(3), Duration::from_secs(10));
    let grace_restarts = env.count(20, 100);
    let tick_ms = 1000.0 / clock_ticks() as f64;
    let mut results = Vec::new();

    let command = [env.server.clone().into_os_string()];
    let mut grace = Grace::start(env, "grace + example server", &[], &command, "info")?;
    let pid = grace.proc.pid();
    let proc = &mut grace.proc;
    let g = measure("grace", pid, idle_for, grace_restarts, |n| {
        let from = proc.mark();
        proc.signal(Signal::SIGUSR2)?;
        let t = Duration::from_secs(30);
        let (which, _) = proc.wait_line(from, &[") is serving", "restart failed"], t)?;
        if which != 0 {
            bail!("restart {n} failed");
        }
        // The old generation exits before the next restart, so none pile up.
        proc.wait_line(from, &["exited with status"], t)?;
        Ok(())
    })?;
    grace.proc.stop(Duration::from_secs(10));
    let rss = g.idle.rss_kib.max(g.after_restarts.rss_kib);
    report.target(
        "8a",
        "grace resident memory (idle and after restarts)",
        format!("{rss} KiB"),
        "< 4096 KiB",
        rss < 4096,
    );
    let wakeups = g.after_idle.voluntary - g.idle.voluntary;
    report.target(
        "8b",
        &format!(
            "grace wake-ups while idle for {:.0} s",
            idle_for.as_secs_f64()
        ),
        format!("{wakeups} voluntary context switches"),
        "0",
        wakeups == 0,
    );
    let (g_before, g_after) = (g.after_idle, g.after_restarts);
    results.push(g);

    let check = handoff_check_cost(env)?;
    // The version check runs in a child process before a re-exec into a binary other than the
    // running one (these restarts re-execute the same file, which needs none): it is added here,
    // as for an upgrade of grace itself.
    let per_restart = (g_after.sched_ns - g_before.sched_ns) as f64 / 1e6 / grace_restarts as f64;
    let (total, how) = match &check {
        Some((how, ms)) => (
            per_restart + ms,
            format!("{per_restart:.2} ms + {ms:.2} ms for `{how}`"),
        ),
        None => (
            f64::NAN,
            format!("{per_restart:.2} ms + the version check (could not be run apart)"),
        ),
    };
    report.target(
        "8d",
        "grace's CPU per restart, with a new binary's version check",
        format!("{total:.2} ms ({how})"),
        "< 5 ms",
        total < 5.0,
    );

    let ss_restarts = env.count(5, 100);
    match &env.start_server {
        Ok(_) => {
            // The example server takes the socket by socket activation: start_server puts it at
            // fd 3, the wrapper names it.
            let script = format!(
                "export LISTEN_FDS=1 LISTEN_PID=$$; exec '{}'",
                env.server.display()
            );
            let mut ss = StartServer::start(env, Some(3), &script)?;
            let pid = ss.proc.pid();
            let proc = &mut ss.proc;
            let s = measure("start_server", pid, idle_for, ss_restarts, |_| {
                let from = proc.mark();
                proc.signal(Signal::SIGHUP)?;
                let t = Duration::from_secs(30);
                proc.wait_line(from, &["killing old workers"], t)?;
                proc.wait_line(from, &["old worker "], t)?;
                Ok(())
            })?;
            ss.proc.stop(Duration::from_secs(10));
            let wakeups = s.after_idle.voluntary - s.idle.voluntary;
            report.check(
                "8c",
                "start_server (perl) resident memory / idle wake-ups",
                format!(
                    "{} KiB / {wakeups}",
                    s.idle.rss_kib.max(s.after_restarts.rss_kib)
                ),
                "shown",
                Verdict::Info,
            );
            results.push(s);
        }
        Err(e) => report.check(
            "8c",
            "start_server resident memory and wake-ups",
            e.clone(),
            "shown",
            Verdict::Missing,
        ),
    }

    report.sections.push(Section {
        title: "8 Footprint of the manager process itself (not the servers)".into(),
        header: [
            "manager",
            "RSS idle",
            "RSS after restarts",
            "peak RSS",
            "CPU idle: ticks (sched)",
            "idle wake-ups vol / invol",
            "CPU across restarts: ticks (sched)",
            "CPU per restart",
        ]
        .map(String::from)
        .to_vec(),
        rows: results.iter().map(|r| r.row(tick_ms)).collect(),
        notes: vec![
            format!(
                "idle window {:.0} s; CPU = utime+stime from /proc/PID/stat ({tick_ms:.0} ms ticks), in brackets the scheduler's ns count from /proc/PID/schedstat",
                idle_for.as_secs_f64()
            ),
            match &check {
                Some((how, ms)) => format!(
                    "not included for grace: the version check it runs before a re-exec into a new grace binary (`{how}`), a child process: {ms:.2} ms CPU each (measured apart; none when the binary is the running one)"
                ),
                None => "not included for grace: the version check it runs before each re-exec, a child process (could not be run apart: neither known interface answered)".into(),
            },
            "wake-ups = voluntary context switches over the idle window (/proc/PID/status)".into(),
        ],
        json: Json::obj([
            (
                "managers",
                Json::Arr(results.iter().map(|r| r.json(tick_ms)).collect()),
            ),
            (
                "handoff_check_cpu_ms",
                Json::Num(check.as_ref().map_or(f64::NAN, |c| c.1)),
            ),
        ]),
    });
    Ok(())
}

/// grace runs the new binary once before each re-exec, to ask which handoff versions it reads: a
/// child process, whose CPU time is not in grace's own. Runs that check apart, the way this grace
/// binary answers it (two interfaces are known), and returns how, and its CPU time per run.
fn handoff_check_cost(env: &Env) -> anyhow::Result<Option<(String, f64)>> {
    let server = env.server.to_string_lossy().into_owned();
    let variants: [(&str, Vec<&str>, bool); 2] = [
        (
            "grace __handoff-versions",
            vec!["__handoff-versions"],
            false,
        ),
        (
            "GRACE_HANDOFF_CHECK=1 grace run ARGS",
            vec!["run", "--listen", "127.0.0.1:0", "--", &server],
            true,
        ),
    ];
    let command = |args: &[&str], with_env: bool| {
        let mut cmd = Command::new(&env.grace);
        cmd.args(args);
        if with_env {
            cmd.env("GRACE_HANDOFF_CHECK", "1");
        }
        cmd
    };
    for (how, args, with_env) in variants {
        // A binary that does not know this interface may run for real: bounded, and killed.
        let mut probe = Proc::start("grace (version check)", command(&args, with_env))?;
        let answered = match probe.wait_exit(Duration::from_secs(5)) {
            Ok(status) => {
                // Let the reader threads take the output.
                std::thread::sleep(Duration::from_millis(50));
                status.success()
                    && probe.lines_from(0).iter().any(|l| {
                        let mut words = l.text.split_whitespace().peekable();
                        words.peek().is_some() && words.all(|w| w.parse::<u32>().is_ok())
                    })
            }
            Err(_) => false,
        };
        drop(probe);
        if !answered {
            continue;
        }
        let runs = 20;
        let before = getrusage(UsageWho::RUSAGE_CHILDREN)?;
        for _ in 0..runs {
            procs::check_interrupted()?;
            command(&args, with_env)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {how}"))?;
        }
        let after = getrusage(UsageWho::RUSAGE_CHILDREN)?;
        let cpu_us = |u: &nix::sys::resource::Usage| {
            let (a, b) = (u.user_time(), u.system_time());
            (a.tv_sec() * 1_000_000 + a.tv_usec() + b.tv_sec() * 1_000_000 + b.tv_usec()) as f64
        };
        let ms = (cpu_us(&after) - cpu_us(&before)) / 1000.0 / runs as f64;
        return Ok(Some((how.to_owned(), ms)));
    }
    Ok(None)
}
