//! `grace run`: the event loop. It turns signals, reaped children, notify messages, probes and
//! timers into supervisor events, and carries out the actions that come back.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
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
use crate::control::{self, ControlSocket, Request};
use crate::exit::{self, ExitError};
use crate::handoff::{self, ClientRecord, ControlRecord, Record, SocketRecord};
use crate::inject;
use crate::listen::{BindOptions, Listener, SocketKind, bind_all};
use crate::notify::{NotifySocket, lineage};
use crate::readiness::{self, AUTO_DELAY, PROBE_INTERVAL, ReadyMode};
use crate::signals::{SignalEvent, Signals, classify};
use crate::spawn;
use crate::status;
use crate::supervisor::{
    Action, AliveRule, Cause, Event, GenId, GenState, Millis, Outcome, Phase, Policy, Supervisor,
};
use crate::sys::{self, now};

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
    control: Vec<ControlSocket>,
    /// `grace restart` clients, each waiting for the outcome of restart number `.1`.
    waiting: Vec<(UnixStream, u64)>,
    /// `grace stop` clients: they see end-of-file when grace exits.
    stopping: Vec<UnixStream>,
    /// Restarts started so far; survives re-exec.
    restarts: u64,
    /// The last status written to `--status-file`.
    status_written: String,
    /// Whether STOPPING=1 went to systemd already.
    told_stopping: bool,
    /// A re-exec was decided; it happens once the events of this wake-up are handled.
    reexec_due: bool,
    /// The control sockets are not polled before this (after an accept error).
    control_paused_until: Millis,
}

/// How long the control sockets rest after an accept error (e.g. out of fds).
const CONTROL_PAUSE: Millis = 100;

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    // Block signals first: from here on, nothing that arrives is lost or fatal.
    let signals = Signals::install()?;
    if let Err(e) = sys::become_subreaper() {
        warn!("cannot become a child subreaper: {e}");
    }
    let policy = policy_of(&args);
    let mut sup = Supervisor::new(policy);

    let adopted = std::env::var(handoff::ENV).ok();
    let (listeners, notify, control, waiting, restarts, first) = match adopted {
        Some(text) => {
            let record = Record::decode(&text)
                .map_err(anyhow::Error::msg)
                .context("adopting the previous image's state")?;
            record.restore(&mut sup);
            let (listeners, notify, control, waiting) = adopt(&record).inspect_err(|_| {
                // Exiting now would leave the generations running on their own, holding the
                // sockets with nobody to stop them: take them down with us.
                for g in &record.gens {
                    let _ = killpg(Pid::from_raw(g.pid), Signal::SIGKILL);
                }
            })?;
            info!("re-executed; continuing the restart");
            (
                listeners,
                notify,
                control,
                waiting,
                record.restarts,
                Event::Adopted,
            )
        }
        None => {
            sys::cloexec_inherited_fds();
            inject::check(&args, &spawn::resolve_command(&args.command)?)?;
            let opts = BindOptions {
                backlog: args.backlog,
                socket_mode: args.socket_mode,
            };
            let listeners = bind_all(&args.listen, &opts)?;
            for l in &listeners {
                info!("listening on {} (name {})", l.local, l.name);
            }
            let control = control::open(args.control.as_deref())?;
            let notify = NotifySocket::create()?;
            (listeners, notify, control, Vec::new(), 0, Event::Start)
        }
    };
    let grace_exe = grace_exe();
    if let Some(path) = &args.pid_file {
        match write_pid_file(path) {
            Err(e) if first_is_adopted(&first) => warn!("{e:#}"),
            result => result?,
        }
    }
    let mut rt = Runtime {
        args,
        sup,
        signals,
        listeners,
        notify,
        grace_exe,
        probes: Vec::new(),
        control,
        waiting,
        stopping: Vec::new(),
        restarts,
        status_written: String::new(),
        told_stopping: false,
        reexec_due: false,
        control_paused_until: 0,
    };
    let code = rt.event_loop(first);
    rt.cleanup();
    rt.farewell();
    Ok(code)
}

fn first_is_adopted(first: &Event) -> bool {
    matches!(first, Event::Adopted)
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

type Adopted = (
    Vec<Listener>,
    NotifySocket,
    Vec<ControlSocket>,
    Vec<(UnixStream, u64)>,
);

fn adopt(record: &Record) -> anyhow::Result<Adopted> {
    let take = |fd: i32, what: &str| -> anyhow::Result<std::os::fd::OwnedFd> {
        let owned = sys::adopt_fd(fd).with_context(|| format!("adopting fd {fd} ({what})"))?;
        sys::set_cloexec(owned.as_fd(), true)?;
        Ok(owned)
    };
    let mut listeners = Vec::new();
    for s in &record.sockets {
        let kind = if s.stream {
            SocketKind::Stream
        } else {
            SocketKind::Datagram
        };
        listeners.push(Listener::from_parts(
            take(s.fd, &s.local)?,
            s.name.clone(),
            kind,
            s.local.clone(),
            s.unix_path.as_ref().map(PathBuf::from),
            s.spec.clone(),
        ));
    }
    let notify = NotifySocket::from_fd(
        take(record.notify_fd, "notify socket")?,
        record.notify_name.clone(),
    )?;
    let mut controls = Vec::new();
    for c in &record.controls {
        let fd = take(c.fd, &c.display)?;
        controls.push(control::adopt(
            fd,
            c.display.clone(),
            c.path.as_ref().map(PathBuf::from),
        )?);
    }
    let mut waiting = Vec::new();
    for c in &record.clients {
        waiting.push((UnixStream::from(take(c.fd, "restart client")?), c.target));
    }
    // Running generations load the socket library by this number: not worth killing them for.
    if let Some(fd) = record.preload_fd {
        match take(fd, "socket library") {
            Ok(fd) => inject::adopt_library(fd),
            Err(e) => warn!("{e:#}"),
        }
    }
    Ok((listeners, notify, controls, waiting))
}

fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    status::write_atomically(path, &format!("{}\n", std::process::id()))
        .with_context(|| format!("writing pid file {}", path.display()))
}

impl Runtime {
    fn event_loop(&mut self, first: Event) -> i32 {
        let mut events = VecDeque::new();
        if first_is_adopted(&first) {
            // What arrived during the re-exec comes first: a pending SIGTERM cancels the restart,
            // a pending SIGUSR2 is merged into one more, and exits that happened meanwhile are
            // seen before anything is decided.
            self.gather(&mut events);
        }
        events.push_back(first);
        loop {
            while let Some(event) = events.pop_front() {
                let actions = self.sup.step(now(), event);
                for action in actions {
                    if let Some(code) = self.perform(action, &mut events) {
                        self.answer_all("failed grace exited");
                        self.publish_status();
                        return code;
                    }
                }
                // Re-exec only with nothing left to handle: the new image gets the state after
                // every event of this wake-up, and a stop handled meanwhile cancels it.
                if events.is_empty() && self.reexec_due {
                    self.reexec_due = false;
                    if self.sup.phase == Phase::ReExec {
                        let reason = self.reexec();
                        events.push_back(Event::ReExecFailed(reason));
                    }
                }
            }
            self.prune_probes();
            self.publish_status();
            if matches!(self.sup.phase, Phase::Stopping { .. }) && !self.told_stopping {
                self.told_stopping = true;
                self.answer_all("failed grace is stopping");
                tell_systemd(&[sd_notify::NotifyState::Stopping]);
                extend_systemd_timeout(self.args.drain_timeout);
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
            .chain((self.control_paused_until > now()).then_some(self.control_paused_until))
            .min();
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t.saturating_sub(now()).min(i32::MAX as u64))
                .unwrap_or(PollTimeout::MAX),
        };
        let control_on = now() >= self.control_paused_until;
        let mut fds: Vec<PollFd> = [self.signals.as_fd(), self.notify.as_fd()]
            .into_iter()
            .chain(
                self.control
                    .iter()
                    .filter(|_| control_on)
                    .map(|c| c.as_fd()),
            )
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => error!("poll: {e}"),
        }
        let control_ready: Vec<bool> = fds[2..].iter().map(|f| f.any().unwrap_or(false)).collect();
        drop(fds);
        for (i, ready) in control_ready.into_iter().enumerate() {
            if ready {
                self.serve_control(i, events);
            }
        }
        self.gather(events);
    }

    /// Turns everything that is waiting (signals, exited children, notify messages, probe
    /// results) into events, without blocking.
    fn gather(&mut self, events: &mut VecDeque<Event>) {
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

    /// Takes every pending request on control socket `i`.
    fn serve_control(&mut self, i: usize, events: &mut VecDeque<Event>) {
        loop {
            let (stream, request) = match control::accept(&self.control[i]) {
                Ok(Some(client)) => client,
                Ok(None) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // EMFILE and the like: the socket stays readable, so polling it again at
                    // once would spin. Leave the clients in the queue for a moment.
                    warn!("control: accept: {e}");
                    self.control_paused_until = now() + CONTROL_PAUSE;
                    break;
                }
            };
            match request {
                Request::Status => control::reply(&stream, &self.status_json()),
                Request::StatusText => control::reply(&stream, &self.status_text()),
                Request::Restart if matches!(self.sup.phase, Phase::Stopping { .. }) => {
                    control::reply(&stream, "failed grace is stopping")
                }
                Request::Restart => {
                    info!("control: restart requested");
                    // The restart that includes this request: the next one to start.
                    self.waiting.push((stream, self.restarts + 1));
                    events.push_back(Event::RestartRequested);
                }
                Request::Stop => {
                    info!("control: stop requested");
                    control::reply(&stream, "stopping");
                    self.stopping.push(stream);
                    events.push_back(Event::StopRequested);
                }
            }
        }
    }

    /// Tells `grace stop` clients that grace is done, and gives them up to a second to hang up
    /// first: as PID 1, grace's exit kills every process left in the namespace, the client included.
    fn farewell(&mut self) {
        for stream in &self.stopping {
            control::reply(stream, "stopped");
        }
        let deadline = now() + 1000;
        while !self.stopping.is_empty() && now() < deadline {
            let mut fds: Vec<PollFd> = self
                .stopping
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            let left =
                PollTimeout::try_from(deadline.saturating_sub(now())).unwrap_or(PollTimeout::ZERO);
            if poll(&mut fds, left).unwrap_or(0) == 0 {
                break;
            }
            let hung_up: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(true)).collect();
            drop(fds);
            let mut i = 0;
            self.stopping.retain(|_| {
                i += 1;
                !hung_up[i - 1]
            });
        }
    }

    /// Drops the probes of generations that are no longer starting (ready, rolled back, stopped),
    /// with their sockets, and kills a check still running for one.
    fn prune_probes(&mut self) {
        let sup = &self.sup;
        self.probes.retain(|p| {
            let starting = sup
                .generation(p.generation)
                .is_some_and(|g| matches!(g.state, GenState::Starting { .. }));
            if !starting && let Some(pid) = p.exec_pid {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            starting
        });
    }

    /// Answers the `grace restart` clients whose restart has ended.
    fn answer_restarts(&mut self, line: &str) {
        let done = self.restarts;
        self.waiting.retain(|(stream, target)| {
            if *target <= done {
                control::reply(stream, line);
                false
            } else {
                true
            }
        });
    }

    fn answer_all(&mut self, line: &str) {
        for (stream, _) in self.waiting.drain(..) {
            control::reply(&stream, line);
        }
    }

    fn status_json(&self) -> String {
        status::json(&status::View {
            sup: &self.sup,
            listeners: &self.listeners,
            now: now(),
            restarts: self.restarts,
        })
    }

    fn status_text(&self) -> String {
        status::text(&status::View {
            sup: &self.sup,
            listeners: &self.listeners,
            now: now(),
            restarts: self.restarts,
        })
    }

    /// Rewrites `--status-file` when something in it changed (uptimes aside).
    fn publish_status(&mut self) {
        let Some(path) = &self.args.status_file else {
            return;
        };
        let view = status::View {
            sup: &self.sup,
            listeners: &self.listeners,
            now: 0,
            restarts: self.restarts,
        };
        let key = status::json(&view);
        if key == self.status_written {
            return;
        }
        let text = self.status_json() + "\n";
        match status::write_atomically(path, &text) {
            Ok(()) => self.status_written = key,
            Err(e) => warn!("writing status file {}: {e}", path.display()),
        }
    }

    fn probing(&self) -> bool {
        matches!(
            self.args.ready,
            ReadyMode::Http(_) | ReadyMode::Tcp | ReadyMode::Exec(_)
        )
    }

    fn reap(&mut self, events: &mut VecDeque<Event>) {
        let mut leaders = Vec::new();
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
                    // Passed: no further check for this generation.
                    probe.next_at = Millis::MAX;
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
                leaders.push((pid, code));
            } else {
                debug!("reaped pid {pid} (status {code})");
            }
        }
        // Whether a group is empty is only known once its reparented workers, which the kernel
        // may report after their leader, have been reaped too: hence after the loop.
        let group_empty = |pgid: i32| killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH);
        for (pid, code) in leaders {
            events.push_back(Event::Exited {
                pid,
                code,
                group_empty: group_empty(pid),
            });
        }
        for g in &self.sup.gens {
            if g.leader_status.is_some() && group_empty(g.pid) {
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
            if !msg.has("READY=1") {
                continue;
            }
            // From now on `auto` waits for READY=1 from every generation.
            self.sup.seen_notify = true;
            // With a probe mode the probe decides: a server may announce READY=1 before it can
            // actually answer what the probe asks.
            if matches!(self.args.ready, ReadyMode::Auto | ReadyMode::Notify) {
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
                (ReadyMode::Tcp, Some((listener, addr))) => readiness::probe_tcp(*addr, listener),
                (ReadyMode::Http(path), Some((_, addr))) => readiness::probe_http(*addr, path),
                (ReadyMode::Exec(argv), _) => {
                    let pid = self
                        .sup
                        .generation(probe.generation)
                        .map(|g| g.pid)
                        .unwrap_or(0);
                    match spawn::ready_check(argv, probe.generation, pid) {
                        // Reaped by `reap` like every other child.
                        Ok(check) => {
                            probe.exec_pid = Some(check);
                            continue;
                        }
                        Err(e) => Err(e),
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
            Action::Spawn { generation } => {
                // systemd's start/reload timeout may be shorter than ours: ask for the time the
                // readiness gate can take.
                extend_systemd_timeout(self.args.ready_timeout);
                events.push_back(self.spawn(generation));
            }
            Action::ReExec => self.reexec_due = true,
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

    /// Logs the outcome, answers the `grace restart` clients it concerns and tells systemd.
    fn report(&mut self, outcome: &Outcome) {
        use sd_notify::NotifyState::{Ready, Status};
        match outcome {
            Outcome::Ready {
                generation,
                pid,
                cause,
            } => {
                info!("generation {generation} (pid {pid}) is serving");
                self.probes.retain(|p| p.generation != *generation);
                let status = format!("serving: generation {generation} (pid {pid})");
                match cause {
                    Cause::Initial | Cause::Restart => tell_systemd(&[Ready, Status(&status)]),
                    Cause::Crash => tell_systemd(&[Status(&status)]),
                }
                if *cause == Cause::Restart {
                    self.answer_restarts(&format!("ok generation={generation} pid={pid}"));
                }
            }
            Outcome::RolledBack { generation, reason } => {
                let last = self
                    .probes
                    .iter()
                    .find(|p| p.generation == *generation)
                    .and_then(|p| p.last_error.clone());
                let reason = match last {
                    Some(check) => {
                        format!("generation {generation} {reason} (last check: {check})")
                    }
                    None => format!("generation {generation} {reason}"),
                };
                warn!("restart failed: {reason}");
                self.probes.retain(|p| p.generation != *generation);
                tell_systemd(&[Ready, Status(&format!("restart failed: {reason}"))]);
                self.answer_restarts(&format!("failed {reason}"));
            }
            Outcome::Failed { reason } => {
                warn!("restart failed: {reason}");
                tell_systemd(&[Ready, Status(&format!("restart failed: {reason}"))]);
                self.answer_restarts(&format!("failed {reason}"));
            }
        }
    }

    fn spawn(&mut self, generation: GenId) -> Event {
        let failed = |reason: String, code: i32| Event::SpawnFailed {
            generation,
            reason,
            code,
        };
        // Re-resolved for every generation, so a newly installed server binary is picked up.
        let program = match spawn::resolve_command(&self.args.command) {
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

        let probe = probe_socket
            .as_ref()
            .map(|(l, addr)| (l.as_raw_fd(), *addr));
        let (fds, mut env) = spawn::layout(
            &self.listeners,
            probe,
            &self.notify.name,
            generation,
            &self.args.compat,
        );
        if let Err(reason) = inject::apply(&self.args, &program, &self.listeners, &mut env) {
            return failed(reason, exit::FAILURE);
        }
        let mut plan = match spawn::plan(
            &program,
            &self.args.command,
            env,
            !self.args.no_listen_pid,
            fds,
        ) {
            Ok(plan) => plan,
            Err(reason) => return failed(reason, exit::FAILURE),
        };
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
        self.restarts += 1;
        if let Ok(usec) = sd_notify::NotifyState::monotonic_usec_now() {
            tell_systemd(&[
                sd_notify::NotifyState::Reloading,
                usec,
                sd_notify::NotifyState::Status("restarting"),
            ]);
        }
        if let Err(reason) = handoff::check_new_binary(&self.grace_exe) {
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
        let mut record = Record::capture(
            &self.sup,
            sockets,
            self.notify.as_fd().as_raw_fd(),
            self.notify.name.clone(),
        );
        record.restarts = self.restarts;
        record.controls = self
            .control
            .iter()
            .map(|c| ControlRecord {
                fd: c.as_fd().as_raw_fd(),
                display: c.display.clone(),
                path: c.path.as_ref().map(|p| p.display().to_string()),
            })
            .collect();
        record.clients = self
            .waiting
            .iter()
            .map(|(stream, target)| ClientRecord {
                fd: stream.as_raw_fd(),
                target: *target,
            })
            .collect();
        record.preload_fd = inject::library_fd().map(|fd| fd.as_raw_fd());
        // Exactly the fds the record names survive the exec.
        let keep: Vec<_> = self
            .listeners
            .iter()
            .map(|l| l.fd.as_fd())
            .chain(std::iter::once(self.notify.as_fd()))
            .chain(self.control.iter().map(|c| c.as_fd()))
            .chain(self.waiting.iter().map(|(stream, _)| stream.as_fd()))
            .chain(inject::library_fd())
            .collect();
        for fd in &keep {
            if let Err(e) = sys::set_cloexec(*fd, false) {
                for fd in &keep {
                    let _ = sys::set_cloexec(*fd, true);
                }
                return format!("preparing fd {} for re-exec: {e}", fd.as_raw_fd());
            }
        }
        let argv: Vec<CString> = std::env::args_os()
            .filter_map(|a| CString::new(a.as_bytes()).ok())
            .collect();
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != handoff::ENV)
            .filter_map(|(k, v)| spawn::env_entry(&k, &v))
            .collect();
        env.extend(spawn::env_entry(
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

    /// What grace leaves behind on its final exit (never on re-exec): nothing.
    fn cleanup(&mut self) {
        for path in [&self.args.pid_file, &self.args.status_file]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(path);
        }
        for l in &self.listeners {
            let _ = l.remove_socket_file();
        }
        for c in &self.control {
            if let Some(path) = &c.path {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Sends `states` to systemd when grace runs under it (`NOTIFY_SOCKET` in grace's own environment);
/// a no-op otherwise.
fn tell_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("sd_notify: {e}");
    }
}

/// Asks systemd for `wait` more (plus a margin for grace's own work) before it times out.
fn extend_systemd_timeout(wait: Duration) {
    let usec = (wait + Duration::from_secs(5))
        .as_micros()
        .min(u32::MAX as u128) as u32;
    tell_systemd(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]);
}
