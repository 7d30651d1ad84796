//! Scenarios 9-11: what the steered handover is for. Servers whose own drain loses requests
//! behind a shared socket, under grace and under the alternatives; a new version that accepts
//! connections but never becomes ready; and what the old generation's idle wait costs grace
//! when it holds many connections.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::Env;
use crate::load::{self, Mode};
use crate::procs::{self, Proc, ProcSample, free_port, loopback};
use crate::report::{Json, LoadResult, Report, Section, Verdict};
use crate::restarts::{Grace, StartServer, kill_and_start, shown, under_load, zero_failures};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the Go tutorial server (standard library only) into the scratch directory.
fn go_server(env: &Env) -> anyhow::Result<PathBuf> {
    let go = env.go.clone().map_err(anyhow::Error::msg)?;
    let dir = env.work.0.join("go");
    let out = dir.join("go_tutorial_server");
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir)?;
    println!("building the Go tutorial server: go build");
    let built = Command::new(go)
        .args(["build", "-o"])
        .arg(&out)
        .arg(env.fixtures.join("go_tutorial_server.go"))
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("gopath"))
        .env("HOME", &dir)
        .env("GO111MODULE", "off")
        .output()
        .context("running go build")?;
    if !built.status.success() {
        bail!("go build: {}", String::from_utf8_lossy(&built.stderr));
    }
    Ok(out)
}

/// One server, and how each tool runs it on `port`.
struct Server {
    name: &'static str,
    /// grace's options besides `--listen`.
    grace_args: Vec<&'static str>,
    /// The command, binding `port` itself (kill-and-start, and grace through `--inject`), or
    /// taking fd 3 when `fd3`.
    command: Box<dyn Fn(u16) -> Vec<OsString>>,
    /// Whether it takes its socket at fd 3 (then start_server can run it too).
    fd3: bool,
    /// Its command for kill-and-start when that differs (fd-3 servers bind `127.0.0.1:PORT`).
    bind_command: Box<dyn Fn(u16) -> Vec<OsString>>,
}

fn servers(env: &Env) -> Vec<Result<Server, String>> {
    let mut out = Vec::new();
    out.push(go_server(env).map_err(|e| format!("{e:#}")).map(|go| {
        let bind = go.clone();
        Server {
            name: "Go net/http, tutorial Shutdown",
            grace_args: vec!["--ready", "http:/"],
            command: Box::new(move |_| vec![go.clone().into()]),
            fd3: true,
            bind_command: Box::new(move |port| {
                vec![bind.clone().into(), format!("127.0.0.1:{port}").into()]
            }),
        }
    }));
    let script = env.fixtures.join("no_handler_server.js");
    out.push(env.node.clone().map(|node| {
        let command = move |port: u16| -> Vec<OsString> {
            vec![
                node.clone().into(),
                script.clone().into(),
                port.to_string().into(),
            ]
        };
        Server {
            name: "Node http, no signal handler",
            grace_args: vec!["--ready", "http:/"],
            command: Box::new(command.clone()),
            fd3: false,
            bind_command: Box::new(command),
        }
    }));
    let dir = env.work.0.join("www");
    out.push(env.python.clone().and_then(|python| {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("index.html"), "hello\n").map_err(|e| e.to_string())?;
        let command = move |port: u16| -> Vec<OsString> {
            let mut c: Vec<OsString> = vec![python.clone().into()];
            c.extend(["-m", "http.server"].map(OsString::from));
            c.push(port.to_string().into());
            c.extend(["--bind", "127.0.0.1", "--directory"].map(OsString::from));
            c.push(dir.clone().into());
            c
        };
        Ok(Server {
            name: "python3 -m http.server",
            grace_args: vec!["--ready", "tcp"],
            command: Box::new(command.clone()),
            fd3: false,
            bind_command: Box::new(command),
        })
    }));
    out
}

/// Scenario 9: each server through K restarts under load (a new connection per request) under
/// grace, restarted by hand, and under start_server where it can take an inherited socket.
pub fn imperfect_servers(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    for (n, server) in servers(env).into_iter().enumerate() {
        let id = format!("9{}", ['a', 'b', 'c'][n]);
        let server = match server {
            Ok(s) => s,
            Err(e) => {
                report.check(
                    &id,
                    "server whose drain is imperfect",
                    e,
                    "0 failed",
                    Verdict::Missing,
                );
                continue;
            }
        };
        let scenario = format!("9 {}", server.name);

        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut grace = Grace::start_on(
            env,
            &format!("grace + {}", server.name),
            &listen,
            &server.grace_args,
            &(server.command)(port),
            "info",
        )?;
        load::wait_answering(grace.addr, TIMEOUT)?;
        let (samples, windows) = under_load(env, grace.addr, Mode::Close, env.restarts, |_| {
            grace.restart()
        })?;
        grace.proc.stop(Duration::from_secs(15));
        let result = LoadResult::new(&scenario, "grace", Mode::Close, &samples, windows);
        println!(
            "{}: grace {} failed of {}",
            server.name,
            result.failed(),
            result.requests()
        );
        zero_failures(
            report,
            &id,
            &format!("grace + {}: failed requests", server.name),
            &result,
        );
        report.loads.push(result);

        let port = free_port()?;
        let addr = loopback(port);
        let (samples, windows) = kill_and_start(env, addr, || {
            let argv = (server.bind_command)(port);
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            Proc::start(server.name, cmd)
        })?;
        let result = LoadResult::new(&scenario, "kill-and-start", Mode::Close, &samples, windows);
        println!(
            "{}: kill-and-start {} failed of {}",
            server.name,
            result.failed(),
            result.requests()
        );
        shown(
            report,
            &id,
            &format!("kill-and-start {}: failed requests", server.name),
            &result,
        );
        report.loads.push(result);

        let what = format!("start_server + {}: failed requests", server.name);
        if !server.fd3 {
            report.check(
                &id,
                &what,
                "cannot run: it binds its own port, start_server only passes a socket",
                "shown",
                Verdict::Info,
            );
            continue;
        }
        if let Err(e) = &env.start_server {
            report.check(&id, &what, e.clone(), "shown", Verdict::Missing);
            continue;
        }
        let argv = (server.command)(0);
        let script = format!("exec {}", argv[0].to_string_lossy());
        let mut ss = StartServer::start(env, Some(3), &script)?;
        let (samples, windows) =
            under_load(env, ss.addr, Mode::Close, env.restarts, |_| ss.restart())?;
        ss.proc.stop(Duration::from_secs(15));
        let mut result = LoadResult::new(&scenario, "start_server", Mode::Close, &samples, windows);
        result.notes.push(
            "start_server: the socket at fd 3 (--port=ADDR=3), shared by every worker".into(),
        );
        println!(
            "{}: start_server {} failed of {}",
            server.name,
            result.failed(),
            result.requests()
        );
        shown(report, &id, &what, &result);
        report.loads.push(result);
    }
    Ok(())
}

/// The client connections each counting server accepted, by pid (`COUNT_DIR/<pid>`).
fn counts(dir: &Path) -> Vec<(i32, u64)> {
    let mut out: Vec<(i32, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let n = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((pid, n))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Scenario 10: a new version that accepts connections and answers them, but whose health check
/// never passes. Under grace (probed on its own socket, rolled back) and under start_server
/// (which has no readiness check): how many client connections the broken version got.
pub fn never_ready(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let what = "clients that reached a version that never became ready";
    let python = match env.python.clone() {
        Ok(p) => p,
        Err(e) => {
            report.check("10", what, e, "0", Verdict::Missing);
            return Ok(());
        }
    };
    let script = env.fixtures.join("counting_server.py");
    let broken_for = env.pick(Duration::from_secs(3), Duration::from_secs(5));
    for tool in ["grace", "start_server"] {
        let dir = env.work.0.join(format!("never-ready-{tool}"));
        let (mode, counted) = (dir.join("mode"), dir.join("counts"));
        std::fs::create_dir_all(&counted)?;
        std::fs::write(&mode, "good")?;
        let command: Vec<OsString> = vec![
            python.clone().into(),
            script.clone().into(),
            mode.clone().into(),
            counted.clone().into(),
        ];
        let (first, broken, samples, windows) = if tool == "grace" {
            let timeout = format!("{}s", broken_for.as_secs());
            let mut grace = Grace::start(
                env,
                "grace + counting server",
                &["--ready", "http:/health", "--ready-timeout", &timeout],
                &command,
                "info",
            )?;
            let first = counts(&counted);
            let (samples, windows) = under_load(env, grace.addr, Mode::Close, 1, |_| {
                std::fs::write(&mode, "never-ready")?;
                grace.restart()
            })?;
            let broken = counts(&counted);
            grace.proc.stop(Duration::from_secs(10));
            (first, broken, samples, windows)
        } else {
            if let Err(e) = &env.start_server {
                report.check(
                    "10",
                    &format!("{what}, start_server"),
                    e.clone(),
                    "shown",
                    Verdict::Missing,
                );
                continue;
            }
            let argv: Vec<String> = command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let mut ss = StartServer::start(env, Some(3), &format!("exec {}", argv.join(" ")))?;
            let first = counts(&counted);
            let (samples, windows) = under_load(env, ss.addr, Mode::Close, 1, |_| {
                std::fs::write(&mode, "never-ready")?;
                ss.restart()?;
                procs::sleep(broken_for)?;
                Ok(true)
            })?;
            let broken = counts(&counted);
            ss.proc.stop(Duration::from_secs(10));
            (first, broken, samples, windows)
        };
        let old: Vec<i32> = first.iter().map(|&(pid, _)| pid).collect();
        let reached: u64 = broken
            .iter()
            .filter(|(pid, _)| !old.contains(pid))
            .map(|&(_, n)| n)
            .sum();
        let result = LoadResult::new(
            "10 never-ready version",
            tool,
            Mode::Close,
            &samples,
            windows,
        );
        println!(
            "{tool}: the never-ready version got {reached} client connections; {} failed of {}",
            result.failed(),
            result.requests()
        );
        if broken.len() <= first.len() {
            bail!("{tool}: the new version never started ({broken:?})");
        }
        if tool == "grace" {
            report.target(
                "10",
                &format!("{what}, grace"),
                reached.to_string(),
                "0",
                reached == 0,
            );
            report.target(
                "10",
                "never-ready version under grace (rolled back): failed requests",
                format!("{} failed of {}", result.failed(), result.requests()),
                "0 failed",
                result.failed() == 0,
            );
        } else {
            report.check(
                "10",
                &format!("{what}, start_server"),
                reached.to_string(),
                "shown",
                Verdict::Info,
            );
            shown(
                report,
                "10",
                "never-ready version under start_server: failed requests",
                &result,
            );
        }
        report.loads.push(result);
    }
    Ok(())
}

/// `n` keep-alive connections that have each had one answer, held open.
fn hold(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let threads = 8;
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let count = per.min(n.saturating_sub(t * per));
            std::thread::spawn(move || -> anyhow::Result<Vec<TcpStream>> {
                let mut held = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut c = TcpStream::connect(addr)?;
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                    // The Go server's answer is one small packet: headers and body.
                    let mut buf = [0u8; 512];
                    let got = c.read(&mut buf)?;
                    if !buf[..got].starts_with(b"HTTP/1.1 200") {
                        bail!(
                            "unexpected answer: {:?}",
                            String::from_utf8_lossy(&buf[..got])
                        );
                    }
                    held.push(c);
                }
                Ok(held)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    for h in handles {
        held.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    Ok(held)
}

/// Raises this process's soft open-files limit to its hard one (10,000 client sockets).
fn raise_nofile() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// Scenario 11: the old generation (the Go server) holds N idle keep-alive connections through
/// its whole idle wait; grace's CPU from SIGUSR2 to the stop signal, beside the same restart
/// with no connection held (measured in the same run).
pub fn idle_wait_cost(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let what = "grace's CPU in an idle wait with 10,000 idle connections";
    let go = match go_server(env) {
        Ok(g) => g,
        Err(e) => {
            report.check("11", what, format!("{e:#}"), "shown", Verdict::Missing);
            return Ok(());
        }
    };
    let limit = raise_nofile()?;
    let n = 10_000usize.min(limit.saturating_sub(1_000) as usize);
    let idle = env.pick(Duration::from_secs(3), Duration::from_secs(5));
    let idle_arg = format!("{}s", idle.as_secs());
    let mut rows = Vec::new();
    let mut json = Vec::new();
    let mut cpu = Vec::new();
    for held_n in [0, n] {
        let mut grace = Grace::start(
            env,
            "grace + Go server",
            &["--idle-wait", &idle_arg],
            &[go.clone().into()],
            "info",
        )?;
        let held = hold(grace.addr, held_n)?;
        let pid = grace.proc.pid();
        let before = ProcSample::read(pid)?;
        let from = grace.proc.mark();
        let t0 = Instant::now();
        grace.proc.signal(Signal::SIGUSR2)?;
        let needles = ["idle after", "connections after"];
        let (_, line) = grace.proc.wait_line(from, &needles, idle + TIMEOUT)?;
        let wall = t0.elapsed();
        let after = ProcSample::read(pid)?;
        drop(held);
        grace.proc.stop(Duration::from_secs(15));
        let ms = (after.sched_ns - before.sched_ns) as f64 / 1e6;
        cpu.push(ms);
        rows.push(vec![
            held_n.to_string(),
            format!("{:.0}", wall.as_secs_f64() * 1000.0),
            format!("{ms:.2}"),
            line.text
                .split("INFO ")
                .nth(1)
                .unwrap_or(&line.text)
                .to_owned(),
        ]);
        json.push(Json::obj([
            ("held", Json::Num(held_n as f64)),
            ("wall_ms", Json::Num(wall.as_secs_f64() * 1000.0)),
            ("grace_cpu_ms", Json::Num(ms)),
        ]));
    }
    let ratio = cpu[1] / cpu[0].max(0.001);
    report.check(
        "11",
        what,
        format!(
            "{:.1} ms over a {} s wait ({ratio:.1}x the restart with none held: {:.1} ms)",
            cpu[1],
            idle.as_secs(),
            cpu[0]
        ),
        "shown",
        Verdict::Info,
    );
    report.sections.push(Section {
        title: format!("11 An idle wait over held connections (Go server, --idle-wait {idle_arg})"),
        header: ["held", "signal -> end of wait (ms)", "grace CPU (ms)", "grace said"]
            .map(String::from)
            .to_vec(),
        rows,
        notes: vec![
            "CPU from /proc/PID/schedstat, SIGUSR2 to the end of the idle wait: the restart, the queue wait and every idle check".into(),
            "the held connections never close: the wait runs to its bound".into(),
        ],
        json: Json::Arr(json),
    });
    Ok(())
}
