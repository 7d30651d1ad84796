//! The processes the bench starts: their output, timestamped line by line as it arrives; signals;
//! bounded waits; and a guard that kills every process a run left behind, on every way out (normal
//! end, error, panic, Ctrl-C).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, killpg, sigaction};
use nix::unistd::{Pid, getpgid, getpgrp};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag that every wait checks, so that Ctrl-C unwinds
/// through the guards (which kill what we started) instead of leaving servers running: each one
/// is in its own process group, out of reach of the terminal's Ctrl-C.
pub fn catch_interrupts() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; children get
        // the default disposition back at exec, as for every caught signal.
        unsafe { sigaction(signal, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, in slices, giving up early on Ctrl-C.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Polls `f` every 5 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A loopback port that was free a moment ago, for peers that cannot bind port 0 and say which.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One line of a child's stdout or stderr.
#[derive(Clone, Debug)]
pub struct Line {
    pub text: String,
}

/// A started process (its own process group) with its output collected.
pub struct Proc {
    pub label: String,
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn start(label: &str, mut cmd: Command) -> anyhow::Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {label}: {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for pipe in pipes {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for text in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(Line { text });
                }
            });
        }
        Ok(Proc {
            label: label.to_owned(),
            child,
            lines,
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.pid()), signal)
            .with_context(|| format!("sending {signal} to {} ({})", self.label, self.pid()))
    }

    /// How many lines have arrived: a mark to search from.
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn lines_from(&self, from: usize) -> Vec<Line> {
        let lines = self.lines.lock().unwrap();
        lines[from.min(lines.len())..].to_vec()
    }

    pub fn count_from(&self, from: usize, needle: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines[from.min(lines.len())..]
            .iter()
            .filter(|l| l.text.contains(needle))
            .count()
    }

    /// The first line from `from` on that contains one of `needles`: (which needle, the line).
    /// Fails after `timeout`, or soon after the process exits without printing it.
    pub fn wait_line(
        &mut self,
        from: usize,
        needles: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(usize, Line)> {
        let deadline = Instant::now() + timeout;
        let mut exited_at: Option<Instant> = None;
        loop {
            check_interrupted()?;
            {
                let lines = self.lines.lock().unwrap();
                for line in &lines[from.min(lines.len())..] {
                    if let Some(i) = needles.iter().position(|n| line.text.contains(n)) {
                        return Ok((i, line.clone()));
                    }
                }
            }
            if self.exited().is_some() {
                // Give the reader threads a moment to deliver the last lines.
                let since = *exited_at.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(200) {
                    bail!(
                        "{} exited ({}) before printing {needles:?}\n{}",
                        self.label,
                        self.status.expect("exited"),
                        self.tail(15)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {} to print {needles:?}\n{}",
                    self.label,
                    self.tail(15)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let label = self.label.clone();
        wait_for(&format!("{label} to exit"), timeout, || Ok(self.exited()))
    }

    /// Asks for a graceful stop (SIGTERM), waits up to `timeout`, then kills what is left.
    pub fn stop(&mut self, timeout: Duration) {
        if self.exited().is_none() {
            let _ = self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + timeout;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill_tree();
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap();
        let start = lines.len().saturating_sub(n);
        let body: Vec<&str> = lines[start..].iter().map(|l| l.text.as_str()).collect();
        format!("--- last lines of {}:\n{}", self.label, body.join("\n"))
    }

    /// SIGKILL to the process, its process group, and every descendant and its group: grace puts
    /// each generation in a group of its own, so the leader's group alone is not enough.
    fn kill_tree(&mut self) {
        let pid = self.pid();
        let own_group = getpgrp().as_raw();
        let mut groups = BTreeSet::from([pid]);
        let mut tree = Vec::new();
        // Once reaped, the pid may be reused: then only its group (which cannot be reused while a
        // member lives) is still safe to signal.
        if self.exited().is_none() {
            tree = descendants(pid);
            groups.extend(
                tree.iter()
                    .filter_map(|&p| getpgid(Some(Pid::from_raw(p))).ok())
                    .map(Pid::as_raw),
            );
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for group in groups {
            if group > 1 && group != own_group {
                let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
            }
        }
        for p in tree {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_tree();
    }
}

/// Direct children of `pid`, from every thread's /proc children list.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for c in children_of(p) {
            if !out.contains(&c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// What /proc says about one process at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Time on the CPU from the scheduler's own accounting (ns): finer than clock ticks.
    pub sched_ns: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub voluntary: u64,
    pub involuntary: u64,
}

impl ProcSample {
    pub fn read(pid: i32) -> anyhow::Result<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name, which may hold spaces: state is field 3, utime 14,
        // stime 15.
        let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|f| f.parse().ok()).unwrap_or(0) };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let value = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let sched_ns = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        Ok(ProcSample {
            cpu_ticks: field(14) + field(15),
            sched_ns,
            rss_kib: value("VmRSS:"),
            hwm_kib: value("VmHWM:"),
            voluntary: value("voluntary_ctxt_switches:"),
            involuntary: value("nonvoluntary_ctxt_switches:"),
        })
    }
}

/// Clock ticks per second, the unit of utime and stime in /proc.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Microseconds since the Unix epoch: the clock grace's log timestamps use.
pub fn wall_us(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// The timestamp that starts a grace log line (`2026-01-02T03:04:05.123456Z  INFO …`), in
/// microseconds since the Unix epoch.
pub fn log_time_us(line: &str) -> Option<i64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (year, month, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hour, minute) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let seconds = t.next()?;
    let (secs, frac) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let secs: i64 = secs.parse().ok()?;
    // The fraction to microseconds, whatever its number of digits.
    let digits: String = frac.chars().chain("000000".chars()).take(6).collect();
    let micros: i64 = digits.parse().ok()?;
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000_000 + secs * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
