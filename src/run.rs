//! `grace run`: the event loop. It turns signals, reaped children, notify messages, probes and
//! timers into supervisor events, and carries out the actions that come back.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::cli::RunArgs;
use crate::exit::{self, ExitError};
use crate::handoff::{self, Record, SocketRecord};
use crate::listen::{BindOptions, Listener, SocketKind, bind_all};
use crate::notify::{NotifySocket, lineage};
use crate::readiness::{self, AUTO_DELAY, PROBE_INTERVAL, ReadyMode};
use crate::signals::{SignalEvent, Signals, classify};
use crate::supervisor::{Action, AliveRule, Event, GenId, Millis, Outcome, Policy, Supervisor};
use crate::sys::{self, ExecPlan};

/// Variables grace sets for a generation, or that belong to grace itself: never passed through.
const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "GRACE_GENERATION",
    "GRACE_PROBE_ADDR",
    handoff::ENV,
];

/// Milliseconds on CLOCK_MONOTONIC, which keeps counting across `execve` (unlike `Instant`, whose
/// origin is private to one image).
pub fn now() -> Millis {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic clock");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// A starting generation's readiness probe.
struct Probe {
    generation: GenId,
    /// The private loopback socket (`http`/`tcp` modes); grace drops its copy once the generation is
    /// ready.
    socket: Option<(TcpListener, SocketAddr)>,
    next_at: Millis,
    /// The pid of a running `exec:` check.
    exec_pid: Option<i32>,
    last_error: Option<String>,
}

pub struct Runtime {
    args: RunArgs,
    sup: Supervisor,
    signals: Signals,
    listeners: Vec<Listener>,
    notify: NotifySocket,
    /// The grace binary to re-execute, resolved at start-up.
    grace_exe: PathBuf,
    probes: Vec<Probe>,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    // Block signals first: from here on, nothing that arrives is lost or fatal.
    let signals = Signals::install()?;
    if let Err(e) = sys::become_subreaper() {
        warn!("cannot become a child subreaper: {e}");
    }
    let policy = policy_of(&args);
    let mut sup = Supervisor::new(policy);

    let adopted = std::env::var(handoff::ENV).ok();
    let (listeners, notify, first) = match adopted {
        Some(text) => {
            let record = Record::decode(&text)
                .map_err(anyhow::Error::msg)
                .context("adopting the previous image's state")?;
            record.restore(&mut sup);
            let (listeners, notify) = adopt(&record)?;
            info!("re-executed; continuing the restart");
            (listeners, notify, Event::Adopted)
        }
        None => {
            sys::cloexec_inherited_fds();
            resolve_command(&args.command)?;
            let opts = BindOptions {
                backlog: args.backlog,
                socket_mode: args.socket_mode,
            };
            let listeners = bind_all(&args.listen, &opts)?;
            for l in &listeners {
                info!("listening on {} (name {})", l.local, l.name);
            }
            (listeners, NotifySocket::create()?, Event::Start)
        }
    };
    let grace_exe = grace_exe();
    if let Some(path) = &args.pid_file {
        write_pid_file(path)?;
    }
    let mut rt = Runtime {
        args,
        sup,
        signals,
        listeners,
        notify,
        grace_exe,
        probes: Vec::new(),
    };
    let code = rt.event_loop(first);
    rt.cleanup();
    Ok(code)
}

fn policy_of(args: &RunArgs) -> Policy {
    let ms = |d: Duration| d.as_millis() as Millis;
    Policy {
        ready_timeout: ms(args.ready_timeout),
        drain_timeout: ms(args.drain_timeout),
        alive: match &args.ready {
            ReadyMode::Auto => AliveRule::Auto(ms(AUTO_DELAY)),
            ReadyMode::Delay(d) => AliveRule::After(ms(*d)),
            _ => AliveRule::Explicit,
        },
        stop_signal: args.stop_signal,
        max_draining: args.max_draining as usize,
        on_crash: args.on_crash,
    }
}

/// The file to `execve` on restart. Resolved now, from how grace was invoked, so that a binary
/// replaced on disk (or a symlink switched to a new release) is what the next image runs;
/// `/proc/self/exe` would keep pointing at the old, possibly deleted, file.
fn grace_exe() -> PathBuf {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let path = Path::new(&argv0);
    let resolved = if argv0.as_bytes().contains(&b'/') {
        std::path::absolute(path).ok()
    } else {
        which::which(&argv0).ok()
    };
    resolved
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// Finds the command in `PATH` (as a shell would), or fails with 127/126 and one line.
fn resolve_command(command: &[OsString]) -> anyhow::Result<PathBuf> {
    let program = &command[0];
    let shown = program.to_string_lossy();
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match std::fs::metadata(&path) {
            Err(e) => Err(ExitError {
                code: exit::NOT_FOUND,
                message: format!("command {shown:?}: {e}"),
            }
            .into()),
            Ok(m) if m.is_dir() => Err(ExitError {
                code: exit::NOT_EXECUTABLE,
                message: format!("command {shown:?} is a directory"),
            }
            .into()),
            Ok(_) if nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err() => {
                Err(ExitError {
                    code: exit::NOT_EXECUTABLE,
                    message: format!("command {shown:?} is not executable"),
                }
                .into())
            }
            Ok(_) => Ok(path),
        };
    }
    which::which(program).map_err(|_| {
        ExitError {
            code: exit::NOT_FOUND,
            message: format!("command {shown:?} not found in PATH"),
        }
        .into()
    })
}

fn adopt(record: &Record) -> anyhow::Result<(Vec<Listener>, NotifySocket)> {
    let mut listeners = Vec::new();
    for s in &record.sockets {
        let fd = sys::adopt_fd(s.fd)
            .with_context(|| format!("adopting socket fd {} ({})", s.fd, s.local))?;
        sys::set_cloexec(fd.as_fd(), true)?;
        let kind = if s.stream {
            SocketKind::Stream
        } else {
            SocketKind::Datagram
        };
        listeners.push(Listener::from_parts(
            fd,
            s.name.clone(),
            kind,
            s.local.clone(),
            s.unix_path.as_ref().map(PathBuf::from),
            s.spec.clone(),
        ));
    }
    let fd = sys::adopt_fd(record.notify_fd).context("adopting the notify socket")?;
    sys::set_cloexec(fd.as_fd(), true)?;
    Ok((
        listeners,
        NotifySocket::from_fd(fd, record.notify_name.clone())?,
    ))
}

fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing pid file {}", path.display()))
}

impl Runtime {
    fn event_loop(&mut self, first: Event) -> i32 {
        let mut events = VecDeque::from([first]);
        loop {
            while let Some(event) = events.pop_front() {
                let actions = self.sup.step(now(), event);
                for action in actions {
                    if let Some(code) = self.perform(action, &mut events) {
                        return code;
                    }
                }
            }
            self.wait(&mut events);
        }
    }

    /// Sleeps until something happens: a signal, a notify message, or the next deadline.
    fn wait(&mut self, events: &mut VecDeque<Event>) {
        let deadline = self
            .sup
            .next_deadline()
            .into_iter()
            .chain(
                self.probes
                    .iter()
                    .filter(|p| p.exec_pid.is_none() && self.probing())
                    .map(|p| p.next_at),
            )
            .min();
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t.saturating_sub(now()).min(i32::MAX as u64))
                .unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => error!("poll: {e}"),
        }
        for signal in self.signals.drain() {
            match classify(signal) {
                Some(SignalEvent::Restart) => {
                    info!("SIGUSR2: restart requested");
                    events.push_back(Event::RestartRequested)
                }
                Some(SignalEvent::Stop) => {
                    info!("{signal}: stopping");
                    events.push_back(Event::StopRequested)
                }
                Some(SignalEvent::Forward(s)) => events.push_back(Event::Forward(s)),
                Some(SignalEvent::ChildExited) | None => {}
            }
        }
        // Reap on every wake-up: SIGCHLD signals coalesce, and one may have been consumed by the
        // previous image just before it re-executed.
        self.reap(events);
        self.read_notify(events);
        self.run_probes(events);
        events.push_back(Event::Tick);
    }

    fn probing(&self) -> bool {
        matches!(
            self.args.ready,
            ReadyMode::Http(_) | ReadyMode::Tcp | ReadyMode::Exec(_)
        )
    }

    fn reap(&mut self, events: &mut VecDeque<Event>) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => status,
            };
            let (Some(pid), Some(code)) = (status.pid(), exit::code_of(status)) else {
                continue;
            };
            let pid = pid.as_raw();
            if let Some(probe) = self.probes.iter_mut().find(|p| p.exec_pid == Some(pid)) {
                probe.exec_pid = None;
                if code == 0 {
                    events.push_back(Event::Ready {
                        generation: probe.generation,
                    });
                } else {
                    probe.last_error = Some(format!("ready check exited with status {code}"));
                    probe.next_at = now() + PROBE_INTERVAL.as_millis() as Millis;
                }
                continue;
            }
            if self.sup.gens.iter().any(|g| g.pid == pid) {
                let group_empty = killpg(Pid::from_raw(pid), None) == Err(Errno::ESRCH);
                events.push_back(Event::Exited {
                    pid,
                    code,
                    group_empty,
                });
            } else {
                debug!("reaped pid {pid} (status {code})");
            }
        }
        for g in &self.sup.gens {
            if g.leader_status.is_some() && killpg(Pid::from_raw(g.pid), None) == Err(Errno::ESRCH)
            {
                events.push_back(Event::GroupGone { generation: g.id });
            }
        }
    }

    fn read_notify(&mut self, events: &mut VecDeque<Event>) {
        for msg in self.notify.receive() {
            let line = lineage(msg.pid);
            let Some(generation) = line.iter().find_map(|&p| self.sup.gen_of_pgid(p)) else {
                warn!(
                    "notify message from pid {} outside every generation: ignored",
                    msg.pid
                );
                continue;
            };
            debug!("notify: {:?}", msg.text);
            self.sup.seen_notify = true;
            // With a probe mode the probe decides: a server may announce READY=1 before it can
            // actually answer what the probe asks.
            let counts = matches!(self.args.ready, ReadyMode::Auto | ReadyMode::Notify);
            if counts && msg.has("READY=1") {
                events.push_back(Event::Ready { generation });
            }
        }
    }

    fn run_probes(&mut self, events: &mut VecDeque<Event>) {
        let t = now();
        let mode = self.args.ready.clone();
        for probe in &mut self.probes {
            if probe.exec_pid.is_some() || t < probe.next_at {
                continue;
            }
            probe.next_at = t + PROBE_INTERVAL.as_millis() as Millis;
            let result = match (&mode, &probe.socket) {
                (ReadyMode::Tcp, Some((_, addr))) => readiness::probe_tcp(*addr),
                (ReadyMode::Http(path), Some((_, addr))) => readiness::probe_http(*addr, path),
                (ReadyMode::Exec(argv), _) => {
                    let pid = self
                        .sup
                        .generation(probe.generation)
                        .map(|g| g.pid)
                        .unwrap_or(0);
                    match std::process::Command::new(&argv[0])
                        .args(&argv[1..])
                        .env("GRACE_GENERATION", probe.generation.to_string())
                        .env("GRACE_PID", pid.to_string())
                        .stdin(std::process::Stdio::null())
                        .spawn()
                    {
                        // Reaped by `reap` like every other child; the handle is only dropped.
                        Ok(child) => {
                            probe.exec_pid = Some(child.id() as i32);
                            continue;
                        }
                        Err(e) => Err(format!("running ready check {:?}: {e}", argv[0])),
                    }
                }
                _ => continue,
            };
            match result {
                Ok(()) => events.push_back(Event::Ready {
                    generation: probe.generation,
                }),
                Err(e) => probe.last_error = Some(e),
            }
        }
    }

    /// Carries out one action; returns the exit code when grace is done.
    fn perform(&mut self, action: Action, events: &mut VecDeque<Event>) -> Option<i32> {
        match action {
            Action::Spawn { generation } => events.push_back(self.spawn(generation)),
            Action::ReExec => {
                let reason = self.reexec();
                events.push_back(Event::ReExecFailed(reason));
            }
            Action::Signal { pid, signal } => {
                if let Err(e) = kill(Pid::from_raw(pid), signal) {
                    debug!("signalling pid {pid} with {signal}: {e}");
                }
            }
            Action::KillGroup { pgid } => {
                if let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
                    debug!("killing process group {pgid}: {e}");
                }
            }
            Action::Report(outcome) => self.report(&outcome),
            Action::Exit(code) => return Some(code),
        }
        None
    }

    fn report(&mut self, outcome: &Outcome) {
        let generation = match outcome {
            Outcome::Ready {
                generation, pid, ..
            } => {
                info!("generation {generation} (pid {pid}) is serving");
                *generation
            }
            Outcome::RolledBack { generation, reason } => {
                let last = self
                    .probes
                    .iter()
                    .find(|p| p.generation == *generation)
                    .and_then(|p| p.last_error.clone());
                match last {
                    Some(probe) => warn!(
                        "restart failed: generation {generation} {reason} (last check: {probe})"
                    ),
                    None => warn!("restart failed: generation {generation} {reason}"),
                }
                *generation
            }
            Outcome::Failed { reason } => {
                warn!("restart failed: {reason}");
                return;
            }
        };
        self.probes.retain(|p| p.generation != generation);
    }

    fn spawn(&mut self, generation: GenId) -> Event {
        let failed = |reason: String, code: i32| Event::SpawnFailed {
            generation,
            reason,
            code,
        };
        // Re-resolved for every generation, so a newly installed server binary is picked up.
        let program = match resolve_command(&self.args.command) {
            Ok(p) => p,
            Err(e) => {
                let code = e
                    .downcast_ref::<ExitError>()
                    .map_or(exit::FAILURE, |x| x.code);
                return failed(format!("{e:#}"), code);
            }
        };
        let probe_socket = if self.args.ready.needs_probe_socket() {
            match TcpListener::bind("127.0.0.1:0").and_then(|l| Ok((l.local_addr()?, l))) {
                Ok((addr, l)) => Some((l, addr)),
                Err(e) => return failed(format!("binding its probe socket: {e}"), exit::FAILURE),
            }
        } else {
            None
        };

        let mut fds: Vec<i32> = self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        let mut names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| !RESERVED_ENV.iter().any(|r| OsStr::new(r) == k))
            .filter_map(|(k, v)| env_entry(&k, &v))
            .collect();
        if let Some((l, addr)) = &probe_socket {
            fds.push(l.as_raw_fd());
            names.push("grace-probe");
            env.extend(env_entry(
                OsStr::new("GRACE_PROBE_ADDR"),
                OsStr::new(&addr.to_string()),
            ));
        }
        for (k, v) in [
            ("LISTEN_FDS", fds.len().to_string()),
            ("LISTEN_FDNAMES", names.join(":")),
            ("NOTIFY_SOCKET", self.notify.name.clone()),
            ("GRACE_GENERATION", generation.to_string()),
        ] {
            env.extend(env_entry(OsStr::new(k), OsStr::new(&v)));
        }
        let argv: Vec<CString> = self
            .args
            .command
            .iter()
            .filter_map(|a| CString::new(a.as_bytes()).ok())
            .collect();
        let Ok(program_c) = CString::new(program.as_os_str().as_bytes()) else {
            return failed("the command path holds a NUL byte".into(), exit::FAILURE);
        };
        let mut plan = ExecPlan::new(program_c, argv, env, !self.args.no_listen_pid, fds);
        match sys::spawn(&mut plan) {
            Ok(pid) => {
                info!("started generation {generation}: {}", program.display());
                if self.probing() {
                    self.probes.push(Probe {
                        generation,
                        socket: probe_socket,
                        next_at: now(),
                        exec_pid: None,
                        last_error: None,
                    });
                }
                Event::Spawned {
                    generation,
                    pid: pid.as_raw(),
                }
            }
            Err(errno) => failed(
                format!("cannot execute {}: {}", program.display(), errno.desc()),
                exit::code_of_exec_errno(errno),
            ),
        }
    }

    /// Replaces this process image with the grace binary on disk, handing over the state. Only
    /// returns on failure, with the reason; the sockets and generations are untouched then.
    fn reexec(&mut self) -> String {
        if let Err(reason) = check_new_binary(&self.grace_exe) {
            return reason;
        }
        let sockets: Vec<SocketRecord> = self
            .listeners
            .iter()
            .map(|l| SocketRecord {
                fd: l.fd.as_raw_fd(),
                stream: l.kind == SocketKind::Stream,
                name: l.name.clone(),
                local: l.local.clone(),
                spec: l.spec.clone(),
                unix_path: l.unix_path.as_ref().map(|p| p.display().to_string()),
            })
            .collect();
        let record = Record::capture(
            &self.sup,
            sockets,
            self.notify.as_fd().as_raw_fd(),
            self.notify.name.clone(),
        );
        let keep: Vec<_> = self
            .listeners
            .iter()
            .map(|l| l.fd.as_fd())
            .chain(std::iter::once(self.notify.as_fd()))
            .collect();
        for fd in &keep {
            if let Err(e) = sys::set_cloexec(*fd, false) {
                return format!("preparing fd {} for re-exec: {e}", fd.as_raw_fd());
            }
        }
        let argv: Vec<CString> = std::env::args_os()
            .filter_map(|a| CString::new(a.as_bytes()).ok())
            .collect();
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != handoff::ENV)
            .filter_map(|(k, v)| env_entry(&k, &v))
            .collect();
        env.extend(env_entry(
            OsStr::new(handoff::ENV),
            OsStr::new(&record.encode()),
        ));
        let Ok(exe) = CString::new(self.grace_exe.as_os_str().as_bytes()) else {
            return "the grace path holds a NUL byte".into();
        };
        info!("re-executing {}", self.grace_exe.display());
        let err = nix::unistd::execve(&exe, &argv, &env).unwrap_err();
        for fd in &keep {
            let _ = sys::set_cloexec(*fd, true);
        }
        format!("re-executing {}: {}", self.grace_exe.display(), err.desc())
    }

    fn cleanup(&mut self) {
        if let Some(path) = &self.args.pid_file {
            let _ = std::fs::remove_file(path);
        }
        for l in &self.listeners {
            if let Some(path) = &l.unix_path {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Asks the binary on disk which handoff versions it reads, before betting the process on it.
fn check_new_binary(exe: &Path) -> Result<(), String> {
    let output = std::process::Command::new(exe)
        .arg("__handoff-versions")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let readable = text
        .split_whitespace()
        .any(|v| v == handoff::VERSION.to_string());
    if output.status.success() && readable {
        Ok(())
    } else {
        Err(format!(
            "{} cannot adopt handoff version {} (it reads {:?})",
            exe.display(),
            handoff::VERSION,
            text.trim()
        ))
    }
}

fn env_entry(key: &OsStr, value: &OsStr) -> Option<CString> {
    let mut bytes = key.as_bytes().to_vec();
    bytes.push(b'=');
    bytes.extend_from_slice(value.as_bytes());
    CString::new(bytes).ok()
}
