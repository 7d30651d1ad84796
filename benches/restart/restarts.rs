//! Scenarios 1-5: restarts under load, through grace and through the alternatives.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::Env;
use crate::load::{self, Load, Mode};
use crate::procs::{self, Proc, free_port, loopback};
use crate::report::{LoadResult, Report, Verdict, Window};

/// How long one restart may take before the scenario gives up on it.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `grace run --listen 127.0.0.1:0 ARGS -- COMMAND`, started and serving.
pub struct Grace {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Grace {
    pub fn start(
        env: &Env,
        label: &str,
        args: &[&str],
        command: &[OsString],
        log: &str,
    ) -> anyhow::Result<Grace> {
        Self::start_on(env, label, "127.0.0.1:0", args, command, log)
    }

    /// The same on `listen` (a server that binds its own port needs it known in advance).
    pub fn start_on(
        env: &Env,
        label: &str,
        listen: &str,
        args: &[&str],
        command: &[OsString],
        log: &str,
    ) -> anyhow::Result<Grace> {
        let mut cmd = Command::new(&env.grace);
        cmd.args(["run", "--listen", listen])
            .args(args)
            .arg("--")
            .args(command)
            .env("GRACE_LOG", log);
        let mut proc = Proc::start(label, cmd)?;
        let (_, line) = proc.wait_line(0, &["listening on tcp "], START_TIMEOUT)?;
        let addr: SocketAddr = line
            .text
            .split("listening on tcp ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in {:?}", line.text))?;
        proc.wait_line(0, &[") is serving"], START_TIMEOUT)?;
        Ok(Grace { proc, addr })
    }

    /// SIGUSR2, then the outcome: Ok(true) when the new generation serves, Ok(false) when the
    /// restart failed (rolled back).
    pub fn restart(&mut self) -> anyhow::Result<bool> {
        let from = self.proc.mark();
        self.proc.signal(Signal::SIGUSR2)?;
        let (which, _) =
            self.proc
                .wait_line(from, &[") is serving", "restart failed"], RESTART_TIMEOUT)?;
        Ok(which == 0)
    }
}

/// `start_server --port 127.0.0.1:PORT[=FD] -- sh -c SCRIPT`, started and answering.
pub struct StartServer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl StartServer {
    pub fn start(env: &Env, fd: Option<u32>, script: &str) -> anyhow::Result<StartServer> {
        let start_server = env.start_server.clone().map_err(anyhow::Error::msg)?;
        let port = free_port()?;
        let addr = loopback(port);
        let spec = match fd {
            Some(fd) => format!("--port=127.0.0.1:{port}={fd}"),
            None => format!("--port=127.0.0.1:{port}"),
        };
        let mut cmd = Command::new(start_server);
        cmd.arg(spec).args(["--", "sh", "-c", script]);
        let mut proc = Proc::start("start_server", cmd)?;
        proc.wait_line(0, &["starting new worker"], START_TIMEOUT)?;
        load::wait_answering(addr, START_TIMEOUT)
            .with_context(|| proc.tail(15))
            .context("start_server's first worker")?;
        Ok(StartServer { proc, addr })
    }

    /// SIGHUP, then wait until start_server has a new worker running and has signalled the old.
    pub fn restart(&mut self) -> anyhow::Result<bool> {
        let from = self.proc.mark();
        self.proc.signal(Signal::SIGHUP)?;
        self.proc
            .wait_line(from, &["killing old workers"], RESTART_TIMEOUT)?;
        Ok(true)
    }
}

/// Runs load against `addr`, with `restarts` restarts separated by steady load. `restart(i)`
/// carries out restart `i` and says whether the new version took over.
pub fn under_load(
    env: &Env,
    addr: SocketAddr,
    mode: Mode,
    restarts: usize,
    mut restart: impl FnMut(usize) -> anyhow::Result<bool>,
) -> anyhow::Result<(Vec<load::Sample>, Vec<Window>)> {
    let epoch = Instant::now();
    let load = Load::start(addr, env.clients, mode, epoch, env.max_run());
    load.wait_more(100, Duration::from_secs(30))
        .context("load before the first restart")?;
    procs::sleep(env.gap())?;
    let mut windows = Vec::new();
    for i in 1..=restarts {
        let start_us = epoch.elapsed().as_micros() as u64;
        let took_over = restart(i)?;
        let end_us = epoch.elapsed().as_micros() as u64;
        windows.push(Window {
            start_us,
            end_us,
            took_over,
        });
        procs::sleep(env.gap())?;
    }
    Ok((load.finish(), windows))
}

/// Restarts by hand under load: SIGTERM, wait for the exit, start again, until it answers.
pub fn kill_and_start(
    env: &Env,
    addr: SocketAddr,
    mut spawn: impl FnMut() -> anyhow::Result<Proc>,
) -> anyhow::Result<(Vec<load::Sample>, Vec<Window>)> {
    let mut current = Some(spawn()?);
    load::wait_answering(addr, START_TIMEOUT)?;
    let run = under_load(env, addr, Mode::Close, env.restarts, |_| {
        let mut old = current.take().context("nothing running")?;
        old.signal(Signal::SIGTERM)?;
        old.wait_exit(RESTART_TIMEOUT)?;
        drop(old);
        current = Some(spawn()?);
        load::wait_answering(addr, RESTART_TIMEOUT)?;
        Ok(true)
    });
    if let Some(mut p) = current {
        p.stop(Duration::from_secs(15));
    }
    run
}

fn gunicorn(env: &Env) -> anyhow::Result<PathBuf> {
    env.gunicorn.clone().map_err(anyhow::Error::msg)
}

/// gunicorn's arguments after the bind: the fixture app, two sync workers.
fn gunicorn_args(app_dir: &Path) -> Vec<OsString> {
    [
        "--workers",
        "2",
        "--graceful-timeout",
        "10",
        "--log-level",
        "warning",
        "--chdir",
    ]
    .iter()
    .map(OsString::from)
    .chain([app_dir.as_os_str().to_owned(), "wsgi_app:app".into()])
    .collect()
}

/// A string quoted for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn gunicorn_script(gunicorn: &Path, app_dir: &Path) -> String {
    let args: Vec<String> = gunicorn_args(app_dir)
        .iter()
        .map(|a| sh_quote(&a.to_string_lossy()))
        .collect();
    // start_server passes SERVER_STARTER_PORT=127.0.0.1:PORT=FD; gunicorn takes `fd://FD`.
    format!(
        "exec {} --bind \"fd://${{SERVER_STARTER_PORT##*=}}\" {}",
        sh_quote(&gunicorn.to_string_lossy()),
        args.join(" ")
    )
}

pub fn zero_failures(report: &mut Report, id: &str, what: &str, result: &LoadResult) {
    let took = result.windows.iter().filter(|w| w.took_over).count();
    report.target(
        id,
        what,
        format!(
            "{} failed of {} ({took}/{} restarts took over)",
            result.failed(),
            result.requests(),
            result.windows.len()
        ),
        "0 failed",
        result.failed() == 0 && took == result.windows.len(),
    );
}

pub fn shown(report: &mut Report, id: &str, what: &str, result: &LoadResult) {
    report.check(
        id,
        what,
        format!("{} failed of {}", result.failed(), result.requests()),
        "shown",
        Verdict::Info,
    );
}

/// Scenario 1: grace + the example server, K restarts, close and keep-alive clients.
pub fn example_under_grace(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    for mode in [Mode::Close, Mode::KeepAlive] {
        let command = [env.server.clone().into_os_string()];
        let mut grace = Grace::start(env, "grace + example server", &[], &command, "info")?;
        let (samples, windows) =
            under_load(env, grace.addr, mode, env.restarts, |_| grace.restart())?;
        grace.proc.stop(Duration::from_secs(10));
        let result = LoadResult::new("1 example server", "grace", mode, &samples, windows);
        println!(
            "{} mode: {} failed of {}",
            mode.name(),
            result.failed(),
            result.requests()
        );
        zero_failures(
            report,
            &format!("1{}", if mode == Mode::Close { "a" } else { "b" }),
            &format!(
                "grace + example server, {} clients: failed requests",
                mode.name()
            ),
            &result,
        );
        report.loads.push(result);
    }
    Ok(())
}

/// Scenario 2: grace + gunicorn (systemd socket activation), K restarts.
pub fn gunicorn_under_grace(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let what = "grace + gunicorn: failed requests";
    let gunicorn = match gunicorn(env) {
        Ok(g) => g,
        Err(e) => {
            report.check("2", what, e.to_string(), "0 failed", Verdict::Missing);
            return Ok(());
        }
    };
    let mut command = vec![gunicorn.into_os_string()];
    command.extend(gunicorn_args(&env.fixtures));
    let mut grace = Grace::start(env, "grace + gunicorn", &[], &command, "info")?;
    // gunicorn's arbiter says READY=1 before its workers run: wait until one answers.
    load::wait_answering(grace.addr, START_TIMEOUT)?;
    let (samples, windows) = under_load(env, grace.addr, Mode::Close, env.restarts, |_| {
        grace.restart()
    })?;
    grace.proc.stop(Duration::from_secs(15));
    let result = LoadResult::new("2 gunicorn", "grace", Mode::Close, &samples, windows);
    println!("{} failed of {}", result.failed(), result.requests());
    zero_failures(report, "2", what, &result);
    report.loads.push(result);
    Ok(())
}

/// Scenario 3: the same gunicorn under start_server, K HUP restarts.
pub fn gunicorn_under_start_server(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let what = "start_server + gunicorn: failed requests";
    let (gunicorn, _) = match (env.gunicorn.clone(), env.start_server.clone()) {
        (Ok(g), Ok(s)) => (g, s),
        (Err(e), _) | (_, Err(e)) => {
            report.check("3", what, e.to_string(), "shown", Verdict::Missing);
            return Ok(());
        }
    };
    let script = gunicorn_script(&gunicorn, &env.fixtures);
    let mut ss = StartServer::start(env, None, &script)?;
    let (samples, windows) = under_load(env, ss.addr, Mode::Close, env.restarts, |_| ss.restart())?;
    ss.proc.stop(Duration::from_secs(15));
    let mut result = LoadResult::new("3 gunicorn", "start_server", Mode::Close, &samples, windows);
    result.notes.push(
        "start_server signals the old worker a fixed --interval (1 s) after starting the new one, \
         whether it is ready or not"
            .into(),
    );
    println!("{} failed of {}", result.failed(), result.requests());
    shown(report, "3", what, &result);
    report.loads.push(result);
    Ok(())
}

/// Scenario 4: gunicorn restarted by hand: SIGTERM, wait for it to exit, start it again.
pub fn gunicorn_kill_and_start(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let what = "gunicorn kill-and-start: failed requests";
    let gunicorn = match gunicorn(env) {
        Ok(g) => g,
        Err(e) => {
            report.check("4", what, e.to_string(), "shown", Verdict::Missing);
            return Ok(());
        }
    };
    let port = free_port()?;
    let addr = loopback(port);
    let spawn = || -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&gunicorn);
        cmd.arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .args(gunicorn_args(&env.fixtures));
        Proc::start("gunicorn", cmd)
    };
    let (samples, windows) = kill_and_start(env, addr, spawn)?;
    let mut result = LoadResult::new(
        "4 gunicorn",
        "kill-and-start",
        Mode::Close,
        &samples,
        windows,
    );
    result
        .notes
        .push("restart time = SIGTERM until the new gunicorn answers".into());
    println!("{} failed of {}", result.failed(), result.requests());
    shown(report, "4", what, &result);
    report.loads.push(result);
    Ok(())
}

/// The releases of the broken-deploy scenario: `current` is a symlink to `good` or `broken`, and
/// gunicorn runs with `--chdir current`, as deploy tools lay releases out.
struct Releases {
    current: PathBuf,
    good: PathBuf,
    broken: PathBuf,
}

impl Releases {
    fn create(env: &Env, tag: &str) -> anyhow::Result<Releases> {
        let root = env.work.0.join(format!("releases-{tag}"));
        let good = root.join("good");
        let broken = root.join("broken");
        std::fs::create_dir_all(&good)?;
        std::fs::create_dir_all(&broken)?;
        std::fs::copy(env.fixtures.join("wsgi_app.py"), good.join("wsgi_app.py"))
            .context("copying the fixture app")?;
        std::fs::write(
            broken.join("wsgi_app.py"),
            "raise RuntimeError('broken release: this app fails to import')\n",
        )?;
        let releases = Releases {
            current: root.join("current"),
            good,
            broken,
        };
        releases.switch(true)?;
        Ok(releases)
    }

    /// Points `current` at the good or the broken release, atomically (rename over the link).
    fn switch(&self, good: bool) -> anyhow::Result<()> {
        let target = if good { &self.good } else { &self.broken };
        let tmp = self.current.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, &self.current).context("switching the current release")?;
        Ok(())
    }
}

/// Scenario 5: deploy a release whose app fails to import, leave it a while under load, then
/// deploy the fix. Under grace `--ready http:/` (the new generation is probed on its private
/// socket, fails, and is rolled back), under start_server, and under grace `--ready auto`.
pub fn broken_deploy(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let gunicorn = match gunicorn(env) {
        Ok(g) => g,
        Err(e) => {
            report.check(
                "5a",
                "broken deploy",
                e.to_string(),
                "0 failed",
                Verdict::Missing,
            );
            return Ok(());
        }
    };
    let broken_for = env.pick(Duration::from_secs(3), Duration::from_secs(5));

    // Under grace, with each readiness mode.
    for (id, ready) in [("5a", "http:/"), ("5c", "auto")] {
        let releases = Releases::create(env, ready.trim_end_matches(":/"))?;
        let mut command = vec![gunicorn.clone().into_os_string()];
        command.extend(gunicorn_args(&releases.current));
        let label = format!("grace --ready {ready} + gunicorn");
        let mut grace = Grace::start(env, &label, &["--ready", ready], &command, "info")?;
        load::wait_answering(grace.addr, START_TIMEOUT)?;
        let mut notes = Vec::new();
        let (samples, windows) = under_load(env, grace.addr, Mode::Close, 1, |_| {
            let t0 = Instant::now();
            releases.switch(false)?;
            let took = grace.restart()?;
            notes.push(if took {
                format!(
                    "the broken release was taken as ready after {:.0} ms and the old one drained",
                    t0.elapsed().as_secs_f64() * 1000.0
                )
            } else {
                format!(
                    "the broken release was rolled back after {:.0} ms; the old one kept serving",
                    t0.elapsed().as_secs_f64() * 1000.0
                )
            });
            procs::sleep(broken_for.saturating_sub(t0.elapsed()))?;
            releases.switch(true)?;
            if let Some(status) = grace.proc.exited() {
                notes.push(format!(
                    "grace exited ({status}) while broken: nothing serves"
                ));
                return Ok(false);
            }
            let fixed = grace.restart()?;
            notes.push(format!(
                "the fixed release {} {:.0} ms after the broken deploy",
                if fixed { "took over" } else { "failed" },
                t0.elapsed().as_secs_f64() * 1000.0
            ));
            Ok(fixed)
        })?;
        grace.proc.stop(Duration::from_secs(15));
        let mut result = LoadResult::new(
            "5 broken deploy",
            &format!("grace --ready {ready}"),
            Mode::Close,
            &samples,
            windows,
        );
        result.notes = notes;
        println!(
            "grace --ready {ready}: {} failed of {}",
            result.failed(),
            result.requests()
        );
        let what = format!("broken deploy under grace --ready {ready}: failed requests");
        if ready == "auto" {
            report.check(
                id,
                &(what + " (auto trusts gunicorn's early READY=1)"),
                format!("{} failed of {}", result.failed(), result.requests()),
                "shown",
                Verdict::Info,
            );
        } else {
            zero_failures(report, id, &what, &result);
        }
        report.loads.push(result);
    }

    // Under start_server.
    let what = "broken deploy under start_server: failed requests";
    if let Err(e) = &env.start_server {
        report.check("5b", what, e.clone(), "shown", Verdict::Missing);
        return Ok(());
    }
    let releases = Releases::create(env, "start-server")?;
    let script = gunicorn_script(&gunicorn, &releases.current);
    let mut ss = StartServer::start(env, None, &script)?;
    let mut notes = Vec::new();
    let (samples, windows) = under_load(env, ss.addr, Mode::Close, 1, |_| {
        let t0 = Instant::now();
        releases.switch(false)?;
        let from = ss.proc.mark();
        ss.proc.signal(Signal::SIGHUP)?;
        procs::sleep(broken_for.saturating_sub(t0.elapsed()))?;
        let failed = ss.proc.count_from(from, "failed to start");
        let killed_old = ss.proc.count_from(from, "killing old workers");
        notes.push(format!(
            "while broken ({:.0} s): {failed} failed start attempts retried, old workers {}",
            broken_for.as_secs_f64(),
            if killed_old > 0 {
                "signalled (the broken release was taken as started)"
            } else {
                "kept serving"
            }
        ));
        releases.switch(true)?;
        if killed_old == 0 {
            // start_server retries the failed worker every --interval; the next try picks up
            // the fixed release by itself.
            ss.proc
                .wait_line(from, &["killing old workers"], RESTART_TIMEOUT)?;
        } else {
            // The broken release "started": deploy the fix with another HUP.
            let again = ss.proc.mark();
            ss.proc.signal(Signal::SIGHUP)?;
            ss.proc
                .wait_line(again, &["killing old workers"], RESTART_TIMEOUT)?;
        }
        notes.push(format!(
            "the fixed release took over {:.0} ms after the broken deploy",
            t0.elapsed().as_secs_f64() * 1000.0
        ));
        Ok(true)
    })?;
    ss.proc.stop(Duration::from_secs(15));
    let mut result = LoadResult::new(
        "5 broken deploy",
        "start_server",
        Mode::Close,
        &samples,
        windows,
    );
    result.notes = notes;
    println!(
        "start_server: {} failed of {}",
        result.failed(),
        result.requests()
    );
    shown(report, "5b", what, &result);
    report.loads.push(result);
    if samples.is_empty() {
        bail!("no request was sent");
    }
    Ok(())
}
