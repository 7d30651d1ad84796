//! `cargo bench --bench restart [-- --quick] [--restarts K] [--clients N] [--json PATH] [--only 1,7]`
//!
//! What grace's restarts cost, measured on real servers under real load and set beside the tools
//! and habits it replaces:
//!
//! 1. grace + the example server, K restarts under load (close and keep-alive clients);
//! 2. grace + gunicorn, K restarts;
//! 3. the same gunicorn under start_server (Server::Starter), K HUP restarts;
//! 4. the same gunicorn restarted by hand: SIGTERM, wait, start again;
//! 5. a broken deploy (the new release's app fails to import) under grace `--ready http:/`,
//!    under start_server, and under grace `--ready auto` (to show why the probe matters);
//! 6. throughput through grace against the server bound directly (keep-alive and close);
//! 7. restart latency from grace's own log timestamps: signal to new generation spawned, and to
//!    old generation signalled, with a server that is ready at once;
//! 8. grace's memory, CPU and wake-ups, idle and across many restarts, beside start_server's;
//! 9. servers whose own drain is imperfect (Go's tutorial `Shutdown`, Node with no signal
//!    handler, `python3 -m http.server`) under grace, kill-and-start and start_server;
//! 10. a new version that accepts connections but never becomes ready: the clients it gets;
//! 11. grace's CPU in an old generation's idle wait while it holds 10,000 idle connections;
//! 12. bind substitution: SIGUSR2 to spawn with node beside the example server, a substituted
//!     bind, 10,000 binds on unheld addresses under the filter and without grace.
//!
//! Prints tables and a PASS/FAIL list of targets, and writes the same as JSON (default
//! `target/bench-restart.json`). Peers missing from the machine are installed by
//! `benches/setup.sh` (run automatically as root) or reported as MISSING, never skipped silently.
//! Traffic stays on 127.0.0.1; every loop is bounded; every process started is killed on the way
//! out, whatever the way.

mod drains;
mod load;
mod procs;
mod report;
mod resources;
mod restarts;
mod substitution;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::report::{Report, Verdict};

const USAGE: &str = "\
usage: cargo bench --bench restart [-- OPTIONS]

  --quick         short runs (about a minute) instead of the full ones (a few minutes)
  --restarts K    restarts per load scenario (default 3 quick, 10 full)
  --clients N     concurrent client threads (default 4)
  --json PATH     where to write the results (default <target dir>/bench-restart.json)
  --only LIST     run only these scenarios, e.g. --only 1,6,7 (1-12)
  --no-setup      do not run benches/setup.sh for missing peers; report them as MISSING";

/// Everything a scenario needs to know: options, binaries, and a scratch directory.
pub struct Env {
    pub quick: bool,
    pub restarts: usize,
    pub clients: usize,
    pub grace: PathBuf,
    pub server: PathBuf,
    pub fixtures: PathBuf,
    pub gunicorn: Result<PathBuf, String>,
    pub start_server: Result<PathBuf, String>,
    pub wrk: Result<PathBuf, String>,
    /// The servers whose own drain is imperfect (scenarios 9-11) run on these.
    pub go: Result<PathBuf, String>,
    pub node: Result<PathBuf, String>,
    pub python: Result<PathBuf, String>,
    pub work: WorkDir,
}

impl Env {
    /// A duration for quick runs and one for full runs.
    pub fn pick(&self, quick: Duration, full: Duration) -> Duration {
        if self.quick { quick } else { full }
    }

    pub fn count(&self, quick: usize, full: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// Steady load between two restarts.
    pub fn gap(&self) -> Duration {
        self.pick(Duration::from_millis(600), Duration::from_secs(1))
    }

    /// An upper bound on one load run: restarts plus gaps plus slack.
    pub fn max_run(&self) -> Duration {
        Duration::from_secs(60) + (self.gap() + Duration::from_secs(10)) * self.restarts as u32
    }
}

/// A scratch directory, removed when dropped.
pub struct WorkDir(pub PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Opts {
    quick: bool,
    restarts: Option<usize>,
    clients: usize,
    json: Option<PathBuf>,
    only: Option<Vec<u32>>,
    setup: bool,
}

impl Opts {
    fn parse() -> anyhow::Result<Opts> {
        let mut opts = Opts {
            quick: false,
            restarts: None,
            clients: 4,
            json: None,
            only: None,
            setup: true,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                // cargo bench passes --bench to targets without the test harness.
                "--bench" => {}
                "--quick" => opts.quick = true,
                "--full" => opts.quick = false,
                "--restarts" => {
                    let k: usize = value()?.parse().context("--restarts: a number")?;
                    opts.restarts = Some(k.clamp(1, 1000));
                }
                "--clients" => {
                    let n: usize = value()?.parse().context("--clients: a number")?;
                    opts.clients = n.clamp(1, 256);
                }
                "--json" => opts.json = Some(PathBuf::from(value()?)),
                "--only" => {
                    let list = value()?
                        .split(',')
                        .map(|s| s.trim().parse::<u32>())
                        .collect::<Result<Vec<_>, _>>()
                        .context("--only: numbers 1-12, comma-separated")?;
                    opts.only = Some(list);
                }
                "--no-setup" => opts.setup = false,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                _ => bail!("unexpected argument {arg:?}\n{USAGE}"),
            }
        }
        Ok(opts)
    }

    fn runs(&self, scenario: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&scenario))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench restart: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let opts = Opts::parse()?;
    procs::catch_interrupts()?;
    let env = prepare(&opts)?;
    let mut report = Report::default();
    describe(&env, &opts, &mut report);
    for (k, v) in &report.machine {
        println!("{k:>14}: {v}");
    }

    type Scenario = fn(&Env, &mut Report) -> anyhow::Result<()>;
    let scenarios: [(u32, &str, Scenario); 12] = [
        (1, "1 grace + example server", restarts::example_under_grace),
        (2, "2 grace + gunicorn", restarts::gunicorn_under_grace),
        (
            3,
            "3 start_server + gunicorn",
            restarts::gunicorn_under_start_server,
        ),
        (
            4,
            "4 gunicorn kill-and-start",
            restarts::gunicorn_kill_and_start,
        ),
        (5, "5 broken deploy", restarts::broken_deploy),
        (6, "6 throughput", throughput::run),
        (7, "7 restart latency", resources::restart_latency),
        (8, "8 memory, CPU, wake-ups", resources::footprint),
        (
            9,
            "9 servers whose drain is imperfect",
            drains::imperfect_servers,
        ),
        (
            10,
            "10 a new version that accepts but is never ready",
            drains::never_ready,
        ),
        (
            11,
            "11 the idle wait with 10,000 idle connections",
            drains::idle_wait_cost,
        ),
        (12, "12 bind substitution", substitution::run),
    ];
    for (n, name, scenario) in scenarios {
        if !opts.runs(n) {
            continue;
        }
        println!("\n--- {name}");
        if let Err(e) = scenario(&env, &mut report) {
            if procs::interrupted() {
                eprintln!("interrupted: stopping (every process started has been killed)");
                return Ok(ExitCode::from(130));
            }
            eprintln!("{name}: {e:#}");
            report.errors.push((name.to_owned(), format!("{e:#}")));
            report.check(
                &n.to_string(),
                name,
                "did not run",
                "runs",
                Verdict::Missing,
            );
        }
    }

    // Other work on the machine skews every number here: say how busy it was.
    let at_end = load_average();
    print!("{}", report.render());
    let at_start = report
        .machine
        .iter()
        .find(|(k, _)| k == "load at start")
        .map_or("", |(_, v)| v.as_str());
    println!("load average (1, 5, 15 min) at start: {at_start}; at end: {at_end}");
    report.machine.push(("load at end".into(), at_end));
    let path = opts
        .json
        .clone()
        .unwrap_or_else(|| target_dir(&env.grace).join("bench-restart.json"));
    let mut text = String::new();
    report.json().write(&mut text, 0);
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("results: {}", path.display());

    let bad = report
        .checks
        .iter()
        .any(|c| matches!(c.verdict, Verdict::Fail | Verdict::Missing));
    Ok(if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The target directory: grace is at `<target>/release/grace`.
fn target_dir(grace: &Path) -> PathBuf {
    grace
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
}

fn prepare(opts: &Opts) -> anyhow::Result<Env> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // cargo bench builds the grace binary with the bench profile (optimised, like release).
    let grace = PathBuf::from(env!("CARGO_BIN_EXE_grace"));
    let server = build_example_server(&manifest_dir, &grace)?;

    let peers = [
        ("gunicorn", "/usr/bin/gunicorn"),
        ("start_server", "/usr/bin/start_server"),
        ("wrk", "/usr/bin/wrk"),
        ("go", "/usr/bin/go"),
        ("node", "/usr/bin/node"),
        ("python3", "/usr/bin/python3"),
    ];
    let missing = || {
        peers
            .iter()
            .filter(|(_, path)| !Path::new(path).exists())
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
    };
    let setup = manifest_dir.join("benches/setup.sh");
    if !missing().is_empty() {
        if opts.setup && nix::unistd::geteuid().is_root() {
            println!(
                "installing missing peers {:?}: {}",
                missing(),
                setup.display()
            );
            let status = Command::new("bash").arg(&setup).status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("{} failed ({status:?})", setup.display());
            }
        } else {
            eprintln!(
                "missing peers {:?}: run `sudo {}`; their scenarios are reported as MISSING",
                missing(),
                setup.display()
            );
        }
    }
    let peer = |name: &str, path: &str| {
        if Path::new(path).exists() {
            Ok(PathBuf::from(path))
        } else {
            Err(format!("{name} is not installed: run {}", setup.display()))
        }
    };
    let work = std::env::temp_dir().join(format!("grace-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let quick = opts.quick;
    Ok(Env {
        quick,
        restarts: opts.restarts.unwrap_or(if quick { 3 } else { 10 }),
        clients: opts.clients,
        grace,
        server,
        fixtures: manifest_dir.join("tests/fixtures"),
        gunicorn: peer(peers[0].0, peers[0].1),
        start_server: peer(peers[1].0, peers[1].1),
        wrk: peer(peers[2].0, peers[2].1),
        go: peer(peers[3].0, peers[3].1),
        node: peer(peers[4].0, peers[4].1),
        python: peer(peers[5].0, peers[5].1),
        work: WorkDir(work),
    })
}

/// The example server, built with the same profile next to the grace binary under test.
fn build_example_server(manifest_dir: &Path, grace: &Path) -> anyhow::Result<PathBuf> {
    let server = grace
        .parent()
        .context("grace binary has no directory")?
        .join("examples/fault_server");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("building the example server: cargo build --release --example fault_server");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "--example", "fault_server"])
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!(
            "building the example server failed ({status}): run `cargo build --release --examples`"
        );
    }
    if !server.exists() {
        bail!(
            "{} is missing after the build (a --target or custom profile layout?): build it with \
             `cargo build --release --examples` into the same target directory",
            server.display()
        );
    }
    Ok(server)
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine and the versions measured, for the report.
fn describe(env: &Env, opts: &Opts, report: &mut Report) {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map_or("unknown".to_owned(), |v| v.trim().to_owned());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let output = |program: &Path, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_default()
    };
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let commit = output(
        Path::new("git"),
        &[
            "-C",
            &manifest_dir.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !output(
        Path::new("git"),
        &[
            "-C",
            &manifest_dir.to_string_lossy(),
            "status",
            "--porcelain",
            "--",
            "src",
        ],
    )
    .is_empty();
    let profile = if cfg!(debug_assertions) {
        "debug (numbers are not representative)"
    } else {
        "optimised (bench/release)"
    };
    let peer_version = |p: &Result<PathBuf, String>, args: &[&str]| match p {
        Ok(path) => output(path, args),
        Err(e) => format!("MISSING: {e}"),
    };
    report.machine = vec![
        ("cpus".into(), nproc.to_string()),
        ("cpu".into(), cpu),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
        ("memory".into(), memory),
        ("load at start".into(), load_average()),
        (
            "grace".into(),
            format!(
                "{} ({profile}), commit {commit}{}",
                env.grace.display(),
                if dirty {
                    " + uncommitted changes in src/"
                } else {
                    ""
                }
            ),
        ),
        ("server".into(), env.server.display().to_string()),
        (
            "gunicorn".into(),
            peer_version(&env.gunicorn, &["--version"]),
        ),
        (
            "start_server".into(),
            peer_version(&env.start_server, &["--version"]),
        ),
        ("wrk".into(), peer_version(&env.wrk, &["-v"])),
    ];
    report.options = vec![
        (
            "mode".into(),
            if env.quick { "quick" } else { "full" }.into(),
        ),
        ("restarts".into(), env.restarts.to_string()),
        ("clients".into(), env.clients.to_string()),
        (
            "only".into(),
            opts.only
                .as_ref()
                .map_or("all".into(), |o| format!("{o:?}")),
        ),
    ];
}
