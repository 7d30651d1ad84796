//! The loop: sleep until something happens, turn what happened into events, let the supervisor
//! step, carry out its actions. It decides nothing itself, and nothing in it waits for anyone:
//! every client, probe and check is non-blocking state in the poll set with a deadline.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::cli::RunArgs;
use crate::exit::{self, ExitError};
use crate::handoff::{self, Record};
use crate::held::Held;
use crate::inject;
use crate::members::Members;
use crate::notify::lineage;
use crate::probe::Probes;
use crate::signals::{SignalEvent, Signals, classify};
use crate::spawn;
use crate::status;
use crate::steer;
use crate::supervisor::{Action, Event, GenId, Level, Phase, Supervisor, Wait};
use crate::sys::{self, now, seccomp};
use crate::systemd;
use crate::throttle::Throttle;

pub struct EventLoop {
    args: RunArgs,
    sup: Supervisor,
    signals: Signals,
    held: Held,
    probes: Probes,
    /// Which processes are each generation's.
    members: Members,
    /// The generations as of the last clean-up of their cgroups.
    known_gens: Vec<GenId>,
    /// The grace binary to re-execute, resolved at start-up.
    grace_exe: PathBuf,
    /// The last status written to `--status-file`.
    status_written: String,
    /// A re-exec was decided; it happens once the events of this wake-up are handled.
    reexec_due: bool,
    /// Warnings another local user can provoke.
    untrusted: Throttle,
    /// How a server's bind of a held address gets grace's socket (chosen once: the kernel's).
    mechanism: inject::Mechanism,
}

impl EventLoop {
    pub fn new(
        args: RunArgs,
        sup: Supervisor,
        signals: Signals,
        held: Held,
        members: Members,
        grace_exe: PathBuf,
    ) -> Self {
        let probes = Probes::new(args.ready.clone());
        let mechanism = inject::mechanism(args.inject);
        Self {
            mechanism,
            args,
            sup,
            signals,
            held,
            probes,
            members,
            known_gens: Vec::new(),
            grace_exe,
            status_written: String::new(),
            reexec_due: false,
            untrusted: Throttle::new(1_000),
        }
    }

    /// Runs until grace is done; returns its exit status.
    pub fn run(&mut self, first: Event) -> i32 {
        let mut events = VecDeque::new();
        if matches!(first, Event::Adopted) {
            // What arrived during the re-exec comes first: a pending SIGTERM cancels the restart,
            // a pending SIGUSR2 is merged into one more, and exits that happened meanwhile are
            // seen before anything is decided.
            self.gather(&mut events);
        }
        events.push_back(first);
        loop {
            while let Some(event) = events.pop_front() {
                for action in self.sup.step(now(), event) {
                    if let Some(code) = self.perform(action, &mut events) {
                        self.publish_status();
                        return code;
                    }
                }
                // Re-exec only with nothing left to handle: the new image gets the state after
                // every event of this wake-up, and a stop handled meanwhile cancels it.
                if events.is_empty()
                    && std::mem::take(&mut self.reexec_due)
                    && *self.sup.phase() == Phase::ReExec
                {
                    let reason = self.reexec();
                    events.push_back(Event::ReExecFailed(reason));
                }
            }
            self.forget_gone_leaders();
            self.publish_status();
            self.wait();
            self.gather(&mut events);
        }
    }

    /// Sleeps until a signal, a notify message, a control client, a probe, or the next deadline.
    fn wait(&mut self) {
        let t = now();
        let deadline = [
            self.sup.next_deadline(),
            self.held.control.next_deadline(t),
            self.probes.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d.saturating_sub(t).min(i32::MAX as u64))
                .unwrap_or(PollTimeout::MAX),
        };
        let mut fds: Vec<PollFd> = [self.signals.as_fd(), self.held.notify.as_fd()]
            .into_iter()
            .chain(self.held.control.poll_fds(t))
            .chain(self.held.substitution.poll_fds())
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .chain(
                self.probes
                    .poll_fds()
                    .into_iter()
                    .map(|(fd, flags)| PollFd::new(fd, flags)),
            )
            .collect();
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => error!("poll: {e}"),
        }
    }

    /// Turns everything that is waiting into events, without blocking. Children are reaped
    /// before the signals of the same wake-up are acted on, so that a stop never goes to a
    /// leader that is already gone.
    fn gather(&mut self, events: &mut VecDeque<Event>) {
        let signals = self.signals.drain();
        self.members.set_checks(self.probes.running_checks());
        // Reap on every wake-up: SIGCHLD signals coalesce, and one may have been consumed by the
        // previous image just before it re-executed.
        self.reap(events);
        for signal in signals {
            match classify(signal) {
                Some(SignalEvent::Restart) => events.push_back(Event::RestartSignal),
                Some(SignalEvent::Stop) => events.push_back(Event::StopSignal(signal)),
                Some(SignalEvent::Forward(s)) => events.push_back(Event::Forward(s)),
                Some(SignalEvent::ChildExited) | None => {}
            }
        }
        // A server's bind waits for this: first.
        self.held
            .substitution
            .service(&self.held.listeners, &self.held.steering);
        let t = now();
        let mut more = Vec::new();
        self.held.control.service(t, &mut more);
        for msg in self.held.notify.receive() {
            let generation = lineage(msg.pid)
                .iter()
                .find_map(|&p| self.sup.gen_of_pgid(p));
            debug!("notify from pid {}: {:?}", msg.pid, msg.text);
            more.push(Event::Notify {
                pid: msg.pid,
                generation,
                ready: msg.has("READY=1"),
            });
        }
        let (steering, listeners) = (&mut self.held.steering, &self.held.listeners);
        self.probes.service(t, &mut more, &mut |generation, port| {
            steering.probe_from(listeners, generation, port)
        });
        events.extend(more);
        events.push_back(Event::Tick);
    }

    fn reap(&mut self, events: &mut VecDeque<Event>) {
        let mut leaders = Vec::new();
        // Check verdicts go after the leaders' exits: a check that passed as its generation
        // died must not make a dead generation current.
        let mut verdicts = Vec::new();
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => status,
            };
            let (Some(pid), Some(code)) = (status.pid(), exit::code_of(status)) else {
                continue;
            };
            let pid = pid.as_raw();
            if let Some(verdict) = self.probes.reaped(pid, code, now()) {
                verdicts.push(verdict);
                continue;
            }
            self.held.pidfds.reaped(pid);
            if self.sup.generations().iter().any(|g| g.pid == pid) {
                leaders.push((pid, code));
            } else {
                debug!("reaped pid {pid} (status {code})");
            }
        }
        // Whether a group is empty is only known once its reparented workers, which the kernel
        // may report after their leader, have been reaped too: hence after the loop.
        for (pid, code) in leaders {
            let group_empty = match self.sup.gen_of_pgid(pid) {
                Some(generation) => self.members.empty(generation, pid),
                None => true,
            };
            events.push_back(Event::Exited {
                pid,
                code,
                group_empty,
            });
        }
        for g in self.sup.generations() {
            if g.leader_status.is_some() && self.members.empty(g.id, g.pid) {
                events.push_back(Event::GroupGone { generation: g.id });
            }
        }
        events.extend(verdicts);
    }

    /// Carries out one action; returns the exit code when grace is done.
    fn perform(&mut self, action: Action, events: &mut VecDeque<Event>) -> Option<i32> {
        match action {
            Action::Log(Level::Info, line) => info!("{line}"),
            Action::Log(Level::Warn, line) => warn!("{line}"),
            Action::Log(Level::Untrusted, line) => self.untrusted.warn(now(), line),
            Action::ReExec => self.reexec_due = true,
            Action::Spawn {
                generation,
                take_over,
            } => {
                // systemd's start/reload timeout may be shorter than ours: ask for the time the
                // readiness gate can take.
                systemd::extend_timeout(self.args.ready_timeout);
                events.push_back(self.spawn(generation, take_over));
            }
            Action::Steer { generation } => {
                info!("new connections go to generation {generation}");
                for line in self
                    .held
                    .steering
                    .steer(&mut self.held.listeners, generation)
                {
                    warn!("{line}");
                }
            }
            Action::Measure {
                generation,
                pid,
                wait,
            } => {
                let count = match wait {
                    Wait::Queue => {
                        let (n, log) = self.held.steering.queued(&self.held.listeners, generation);
                        if let Some(line) = log {
                            info!("{line}");
                        }
                        n
                    }
                    Wait::Idle => {
                        let members = &self.members;
                        let n = self.held.steering.open_connections(generation, || {
                            let pids = members.pids(generation, pid);
                            let held = steer::socket_inodes(&pids);
                            debug!(
                                "generation {generation}: processes {pids:?} hold sockets {held:?}"
                            );
                            held
                        });
                        debug!("generation {generation}: {n} connections open");
                        n
                    }
                };
                events.push_back(Event::Measured {
                    generation,
                    wait,
                    count,
                });
            }
            Action::Probe { generation, pid } => self.probes.start(generation, pid, now()),
            Action::EndProbe { generation } => {
                self.probes.end(generation);
                self.held
                    .steering
                    .end_probe(&self.held.listeners, generation);
            }
            Action::Signal { pid, signal } => self.held.pidfds.signal(pid, signal),
            Action::KillGroup { pgid } => {
                match self.sup.generations().iter().find(|g| g.pid == pgid) {
                    Some(g) => self.members.kill(g.id, pgid, g.leader_status.is_none()),
                    None => warn!("no generation leads process group {pgid}: not killed"),
                }
            }
            Action::Reply { client, line, hold } => self.held.control.reply(client, &line, hold),
            Action::Status { client, text } => {
                let view = status::View {
                    sup: &self.sup,
                    listeners: &self.held.listeners,
                    steering: &self.held.steering,
                    now: now(),
                };
                let line = if text {
                    status::text(&view)
                } else {
                    status::json(&view)
                };
                self.held.control.reply(client, &line, false);
            }
            Action::Report(outcome) => systemd::outcome(&outcome),
            Action::Stopping => systemd::stopping(self.args.drain_timeout),
            Action::Exit(code) => return Some(code),
        }
        None
    }

    fn spawn(&mut self, generation: GenId, take_over: bool) -> Event {
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
        let sockets =
            match self
                .held
                .steering
                .sockets_for(&self.held.listeners, generation, take_over)
            {
                Ok(sockets) => sockets,
                Err(reason) => return failed(reason, exit::FAILURE),
            };
        let steered = self
            .held
            .steering
            .probe_target(&self.held.listeners, generation);
        let probe = match self.probes.prepare(generation, steered) {
            Ok(probe) => probe,
            Err(reason) => return failed(reason, exit::FAILURE),
        };
        let (fds, env) = spawn::layout(
            &self.held.listeners,
            sockets,
            probe,
            &self.held.notify.name,
            generation,
            &self.args.compat,
        );
        let mechanism = self.mechanism;
        let planned = spawn::plan(
            &program,
            &self.args.command,
            env,
            !self.args.no_listen_pid,
            fds,
        );
        // The child sends its filter's notification descriptor over this pair before it execs.
        let channel = match mechanism {
            inject::Mechanism::Seccomp { no_new_privs }
                if self.held.listeners.iter().any(|l| l.local.inet().is_some()) =>
            {
                match nix::sys::socket::socketpair(
                    nix::sys::socket::AddressFamily::Unix,
                    nix::sys::socket::SockType::Datagram,
                    None,
                    nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                ) {
                    Ok(pair) => Some((pair, no_new_privs)),
                    Err(e) => {
                        return failed(
                            format!("a channel for the bind filter: {}", e.desc()),
                            exit::FAILURE,
                        );
                    }
                }
            }
            _ => None,
        };
        let cgroup = self.members.prepare(generation);
        let spawned = match planned {
            Ok(mut plan) => {
                plan.die_with_grace(self.args.stop_signal);
                if let Some(((_, theirs), no_new_privs)) = &channel {
                    plan.filter_binds(theirs.as_fd(), *no_new_privs);
                }
                if let Some((dir, procs)) = &cgroup {
                    plan.join_cgroup(dir.as_fd(), procs.as_fd());
                }
                sys::spawn(&mut plan)
            }
            .map_err(|errno| {
                (
                    format!("cannot execute {}: {}", program.display(), errno.desc()),
                    exit::code_of_exec_errno(errno),
                )
            }),
            Err(reason) => Err((reason, exit::FAILURE)),
        };
        match spawned {
            Ok(pid) => {
                info!("started generation {generation}: {}", program.display());
                if let Some(((ours, _), _)) = &channel {
                    match seccomp::receive_listener(ours.as_fd()) {
                        Ok(fd) => self.held.substitution.add(generation, fd),
                        Err(e) => warn!(
                            "generation {generation}: no bind filter descriptor ({}): its binds are not substituted",
                            e.desc()
                        ),
                    }
                }
                self.held.pidfds.open(pid.as_raw());
                if cgroup.is_some() {
                    self.members.joined(generation, pid.as_raw());
                }
                Event::Spawned {
                    generation,
                    pid: pid.as_raw(),
                }
            }
            Err((reason, code)) => {
                self.probes.end(generation);
                failed(reason, code)
            }
        }
    }

    /// Replaces this process image with the grace binary on disk, handing over the state. Only
    /// returns on failure, with the reason; the sockets and generations are untouched then.
    fn reexec(&mut self) -> String {
        systemd::reloading();
        // The check runs a process (milliseconds; a hung binary gets seconds): the servers'
        // binds are answered while it does.
        let held = &mut self.held;
        let mut wait = |check: &mut [PollFd<'_>], timeout: PollTimeout| {
            let theirs = check.len();
            let mut fds: Vec<PollFd> = check.to_vec();
            fds.extend(
                held.substitution
                    .poll_fds()
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
            );
            poll(&mut fds, timeout)?;
            let ready = |fds: &[PollFd]| {
                fds.iter()
                    .filter(|p| p.revents().is_some_and(|r| !r.is_empty()))
                    .count() as nix::libc::c_int
            };
            let (check_ready, filters_ready) = (ready(&fds[..theirs]), ready(&fds[theirs..]));
            drop(fds);
            if filters_ready > 0 {
                held.substitution.service(&held.listeners, &held.steering);
            }
            Ok(check_ready)
        };
        if let Err(reason) = handoff::check_new_binary(&self.grace_exe, &mut wait) {
            return reason;
        }
        self.forget_gone_leaders();
        let record = Record {
            state: self.sup.state().clone(),
            fds: self.held.record(),
            groups: self.held.steering.record(),
        };
        if let Err(reason) = self.held.keep_across_exec() {
            return reason;
        }
        let argv: Vec<CString> = std::env::args_os()
            .filter_map(|a| CString::new(a.as_bytes()).ok())
            .collect();
        // grace's own environment, minus the previous record and the socket-activation
        // variables it consumed at start-up (the sockets are in the record now).
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| !CONSUMED_ENV.iter().any(|c| OsStr::new(c) == k))
            .filter_map(|(k, v)| spawn::env_entry(&k, &v))
            .collect();
        env.extend(spawn::env_entry(
            OsStr::new(handoff::ENV),
            OsStr::new(&record.encode()),
        ));
        let Ok(exe) = CString::new(self.grace_exe.as_os_str().as_bytes()) else {
            self.held.close_on_exec();
            return "the grace path holds a NUL byte".into();
        };
        info!("re-executing {}", self.grace_exe.display());
        let err = nix::unistd::execve(&exe, &argv, &env).unwrap_err();
        self.held.close_on_exec();
        format!("re-executing {}: {}", self.grace_exe.display(), err.desc())
    }

    /// Drops the pidfds, cgroups and sockets of generations the supervisor no longer has.
    fn forget_gone_leaders(&mut self) {
        let sup = &self.sup;
        self.held
            .pidfds
            .retain(|pid| sup.generations().iter().any(|g| g.pid == pid));
        // What a gone generation leaves (its sockets, its filter, its cgroup) is looked at only
        // when the set of generations changed: not at every wake-up (a server's binds, a
        // client's bytes), since letting go of sockets asks the kernel about their groups.
        let ids: Vec<GenId> = sup.generations().iter().map(|g| g.id).collect();
        if ids != self.known_gens {
            for line in self.held.steering.collect(&self.held.listeners, &ids) {
                self.untrusted.warn(now(), line);
            }
            let mut gone: Vec<GenId> = self.members.on_disk();
            gone.extend(self.known_gens.iter().copied());
            gone.retain(|g| !ids.contains(g));
            gone.sort_unstable();
            gone.dedup();
            for generation in gone {
                self.members.forget(generation);
            }
            self.known_gens = ids;
        }
    }

    /// Rewrites `--status-file` when something in it changed (uptimes aside).
    fn publish_status(&mut self) {
        let Some(path) = &self.args.status_file else {
            return;
        };
        let view = |now| status::View {
            sup: &self.sup,
            listeners: &self.held.listeners,
            steering: &self.held.steering,
            now,
        };
        let key = status::json(&view(0));
        if key == self.status_written {
            return;
        }
        let text = status::json(&view(now())) + "\n";
        match status::write_atomically(path, &text) {
            Ok(()) => self.status_written = key,
            Err(e) => warn!("writing status file {}: {e}", path.display()),
        }
    }

    /// What grace leaves behind on its final exit (never on re-exec): nothing. `grace stop`
    /// clients hear that it is done.
    pub fn finish(mut self) {
        for path in [&self.args.pid_file, &self.args.status_file]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(path);
        }
        self.held.remove_files();
        self.members.remove_all();
        self.held.control.farewell();
    }
}

/// Variables the next image must not see: the previous record, and what systemd passed to the
/// first image (`--listen systemd`), whose sockets travel in the record.
const CONSUMED_ENV: &[&str] = &[
    handoff::ENV,
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
];
