//! The generation state machine, with no processes in it: `step(now, event) -> actions`.
//!
//! The event loop (`event_loop.rs`) turns signals, reaped children, notify messages, control
//! requests, probe results and timers into [`Event`]s and carries out the [`Action`]s. Every
//! decision is made here, and so is every log line that reports one: the loop decides nothing.
//! Keeping it pure lets the tests walk through restarts, rollbacks, drains and stops without
//! starting anything. The state is private ([`state::State`]) and crosses `execve` whole.

pub(crate) mod state;
#[cfg(test)]
mod tests;

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::OnCrash;
use crate::control::Request;
use crate::duration::format_duration;

pub use state::{KEYS as STATE_KEYS, State};

/// Milliseconds on the monotonic clock (it keeps counting across `execve`).
pub type Millis = u64;
pub type GenId = u64;
/// A control client, numbered by the loop; the number survives re-exec.
pub type ClientId = u64;

/// How the state machine decides readiness on its own (the rest comes in as events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliveRule {
    /// Ready only on an explicit event (notify or probe).
    Explicit,
    /// Ready when still alive after this long.
    After(Millis),
    /// `auto`: like `Explicit` once any generation has sent a notify message, else `After`.
    Auto(Millis),
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub ready_timeout: Millis,
    pub drain_timeout: Millis,
    /// How long an old generation may keep connections open after traffic moved away from it.
    pub idle_wait: Millis,
    /// Whether some listener is steered: an old generation gets no new connections after the
    /// switch, so its queue and connections are waited for before it is stopped. Otherwise (every
    /// socket shared) it is stopped as soon as the new one is ready.
    pub steered: bool,
    pub alive: AliveRule,
    /// Whether `READY=1` makes a generation ready (`auto`, `notify`). With a probe mode the probe
    /// decides: a server may announce READY=1 before it can answer what the probe asks.
    pub notify_ready: bool,
    /// Whether a starting generation is probed (`http`, `tcp`, `exec`).
    pub probe: bool,
    pub stop_signal: Signal,
    pub max_draining: usize,
    /// `grace restart` clients waiting at once, at most.
    pub max_waiting: usize,
    pub on_crash: OnCrash,
}

/// Crashes within [`CRASH_WINDOW`] before `--on-crash restart` gives up.
pub const MAX_CRASHES: usize = 5;
pub const CRASH_WINDOW: Millis = 60_000;
const BACKOFF_FIRST: Millis = 250;
const BACKOFF_MAX: Millis = 8_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenState {
    /// Waiting for the readiness check, rolled back at `deadline`.
    Starting {
        deadline: Millis,
        alive_at: Option<Millis>,
    },
    /// Serving; the current generation.
    Ready,
    /// Asked to stop; its process group is killed at `kill_at` unless `killed` already.
    Draining { kill_at: Millis, killed: bool },
    /// Traffic moved to a newer generation at `since`; this one finishes what it has (`wait`)
    /// until `deadline`, then gets the stop signal. It is looked at again at `check_at`.
    Finishing {
        wait: Wait,
        since: Millis,
        deadline: Millis,
        check_at: Millis,
    },
}

/// What a finishing generation is waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The connections queued for it (and the handshakes in progress at the switch) to be
    /// accepted; bounded by `--drain-timeout`.
    Queue,
    /// The connections it accepted to be closed; bounded by `--idle-wait`.
    Idle,
}

impl Wait {
    pub fn as_str(self) -> &'static str {
        match self {
            Wait::Queue => "finishing-queue",
            Wait::Idle => "finishing-idle",
        }
    }
}

/// Checks of a finishing generation start this often and slow down: a queue check every quarter
/// of the time waited so far, up to [`CHECK_MAX`] (a queue empties fast, and the next generation's
/// clients are not waiting on it); an idle check every half of it, up to [`IDLE_CHECK_MAX`]: a
/// check reads the kernel's whole TCP table and every connection the generation holds (about
/// 15 ms for 10,000 on the benchmark machine), and closing a connection is no race.
const CHECK_MIN: Millis = 5;
const CHECK_MAX: Millis = 250;
const IDLE_CHECK_MAX: Millis = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub id: GenId,
    /// The leader's pid, which is also the process group id.
    pub pid: i32,
    pub state: GenState,
    pub started: Millis,
    /// Set once the leader was reaped; the generation is gone when its group is empty too.
    pub leader_status: Option<i32>,
    /// Why the last readiness check failed, for the rollback's reason.
    pub last_check: Option<String>,
}

/// Why a generation is starting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Initial,
    Restart,
    Crash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// The driver is re-executing grace; the new image continues with [`Event::Adopted`].
    ReExec,
    Starting {
        generation: GenId,
        cause: Cause,
    },
    /// `--on-crash restart` waits before spawning again.
    Backoff {
        respawn_at: Millis,
    },
    Stopping {
        kill_at: Millis,
        forced: bool,
    },
}

#[derive(Debug)]
pub enum Event {
    Start,
    /// The re-executed image adopted the handoff record: go on with the restart.
    Adopted,
    /// SIGUSR2.
    RestartSignal,
    /// SIGTERM or SIGINT.
    StopSignal(Signal),
    Forward(Signal),
    /// A control client's request.
    Control {
        client: ClientId,
        request: Request,
    },
    ReExecFailed(String),
    Spawned {
        generation: GenId,
        pid: i32,
    },
    SpawnFailed {
        generation: GenId,
        reason: String,
        code: i32,
    },
    /// A notify datagram from `pid`, which belongs to `generation` if any.
    Notify {
        pid: i32,
        generation: Option<GenId>,
        ready: bool,
    },
    ProbePassed {
        generation: GenId,
    },
    ProbeFailed {
        generation: GenId,
        error: String,
    },
    /// A child was reaped. `group_empty`: nothing else is left in a process group it led.
    Exited {
        pid: i32,
        code: i32,
        group_empty: bool,
    },
    /// A generation whose leader is gone has no process left either.
    GroupGone {
        generation: GenId,
    },
    /// What a finishing generation still has ([`Action::Measure`]).
    Measured {
        generation: GenId,
        wait: Wait,
        count: usize,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A generation became the current one.
    Ready {
        generation: GenId,
        pid: i32,
        cause: Cause,
    },
    /// A new generation was rolled back; the previous one (if any) keeps serving.
    RolledBack { generation: GenId, reason: String },
    /// The restart could not even start (re-exec refused).
    Failed { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    /// A warning another local user can provoke: rate-limited.
    Untrusted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Log(Level, String),
    ReExec,
    /// `take_over`: nothing serves, so the generation gets the sockets new connections go to now
    /// (with what queued there) rather than sockets of its own.
    Spawn {
        generation: GenId,
        take_over: bool,
    },
    /// New connections go to this generation's sockets from now on.
    Steer {
        generation: GenId,
    },
    /// How much a finishing generation still has of `wait` (answered by [`Event::Measured`]).
    Measure {
        generation: GenId,
        pid: i32,
        wait: Wait,
    },
    /// Start checking a starting generation's readiness (`http`, `tcp`, `exec`).
    Probe {
        generation: GenId,
        pid: i32,
    },
    /// Stop checking it (ready, rolled back or stopped).
    EndProbe {
        generation: GenId,
    },
    /// To the leader only, never to a reaped one.
    Signal {
        pid: i32,
        signal: Signal,
    },
    /// SIGKILL to the whole process group, never to one known empty.
    KillGroup {
        pgid: i32,
    },
    /// Answer a control client; `hold`: keep it connected until grace exits (`grace stop`).
    Reply {
        client: ClientId,
        line: String,
        hold: bool,
    },
    /// Answer a control client with the status.
    Status {
        client: ClientId,
        text: bool,
    },
    /// The restart or start ended (tell systemd).
    Report(Outcome),
    /// grace is stopping (tell systemd, once).
    Stopping,
    Exit(i32),
}

/// A `grace restart` client waiting for the outcome of restart number `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub client: ClientId,
    pub target: u64,
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    policy: Policy,
    s: State,
}

/// Collects the actions of one step.
struct Out(Vec<Action>);

impl Out {
    fn push(&mut self, action: Action) {
        self.0.push(action);
    }
    fn info(&mut self, line: String) {
        self.0.push(Action::Log(Level::Info, line));
    }
    fn warn(&mut self, line: String) {
        self.0.push(Action::Log(Level::Warn, line));
    }
    fn reply(&mut self, client: ClientId, line: impl Into<String>) {
        self.0.push(Action::Reply {
            client,
            line: line.into(),
            hold: false,
        });
    }
}

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            s: State::default(),
        }
    }

    /// A supervisor that continues from the previous image's state.
    pub fn restore(policy: Policy, state: State) -> Self {
        Self { policy, s: state }
    }

    /// The whole state, for the handoff record.
    pub fn state(&self) -> &State {
        &self.s
    }

    pub fn phase(&self) -> &Phase {
        &self.s.phase
    }

    pub fn generations(&self) -> &[Generation] {
        &self.s.gens
    }

    pub fn current(&self) -> Option<&Generation> {
        self.s.current.and_then(|id| self.generation(id))
    }

    pub fn last_outcome(&self) -> Option<&Outcome> {
        self.s.last_outcome.as_ref()
    }

    /// Restarts started so far (each re-exec is one); survives re-exec.
    pub fn restarts(&self) -> u64 {
        self.s.restarts
    }

    pub fn generation(&self, id: GenId) -> Option<&Generation> {
        self.s.gens.iter().find(|g| g.id == id)
    }

    fn gen_mut(&mut self, id: GenId) -> Option<&mut Generation> {
        self.s.gens.iter_mut().find(|g| g.id == id)
    }

    /// The generation a process group belongs to.
    pub fn gen_of_pgid(&self, pgid: i32) -> Option<GenId> {
        self.s.gens.iter().find(|g| g.pid == pgid).map(|g| g.id)
    }

    /// The earliest moment a [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        let gens = self.s.gens.iter().flat_map(|g| match g.state {
            GenState::Starting { deadline, alive_at } => {
                vec![
                    Some(deadline),
                    alive_at.filter(|_| !self.waits_for_notify()),
                ]
            }
            GenState::Draining { kill_at, killed } => vec![(!killed).then_some(kill_at)],
            GenState::Finishing { check_at, .. } => vec![Some(check_at)],
            GenState::Ready => vec![],
        });
        let phase = match self.s.phase {
            Phase::Backoff { respawn_at } => Some(respawn_at),
            Phase::Stopping { kill_at, forced } => (!forced).then_some(kill_at),
            _ => None,
        };
        gens.flatten().chain(phase).min()
    }

    fn waits_for_notify(&self) -> bool {
        matches!(self.policy.alive, AliveRule::Auto(_)) && self.s.seen_notify
    }

    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Action> {
        let mut out = Out(Vec::new());
        match event {
            Event::Start => self.spawn_next(Cause::Initial, &mut out),
            Event::Adopted => {
                if self.s.phase == Phase::ReExec {
                    self.spawn_next(Cause::Restart, &mut out);
                }
            }
            Event::RestartSignal => {
                out.info("SIGUSR2: restart requested".into());
                self.request_restart(&mut out);
            }
            Event::StopSignal(signal) => {
                out.info(format!("{signal}: stopping"));
                self.stop(now, &mut out);
            }
            Event::Control { client, request } => self.control(client, request, now, &mut out),
            Event::ReExecFailed(reason) => {
                out.warn(format!("restart refused: {reason}"));
                self.s.phase = Phase::Idle;
                self.finish(Outcome::Failed { reason }, &mut out);
                if self.s.current.is_none() && self.s.phase == Phase::Idle {
                    // It was requested during a crash backoff: nothing serves, so go on with
                    // the crash policy rather than sit idle; a refused restart is no crash of
                    // its own, so it is not counted as one.
                    self.s.phase = Phase::Backoff { respawn_at: now };
                }
            }
            Event::Spawned { generation, pid } => self.spawned(generation, pid, now, &mut out),
            Event::SpawnFailed {
                generation,
                reason,
                code,
            } => self.start_failed(generation, reason, code, now, &mut out),
            Event::Notify {
                pid,
                generation,
                ready,
            } => self.notify(pid, generation, ready, now, &mut out),
            Event::ProbePassed { generation } => self.ready(generation, now, &mut out),
            Event::ProbeFailed { generation, error } => {
                if let Some(g) = self.gen_mut(generation) {
                    g.last_check = Some(error);
                }
            }
            Event::Forward(signal) => match self.current() {
                Some(g) if g.leader_status.is_none() => {
                    out.push(Action::Signal { pid: g.pid, signal })
                }
                _ => out.warn(format!("no current generation to forward {signal} to")),
            },
            Event::Exited {
                pid,
                code,
                group_empty,
            } => self.exited(pid, code, group_empty, now, &mut out),
            Event::GroupGone { generation } => {
                if self
                    .generation(generation)
                    .is_some_and(|g| g.leader_status.is_some())
                {
                    self.s.gens.retain(|g| g.id != generation);
                }
            }
            Event::Measured {
                generation,
                wait,
                count,
            } => self.measured(generation, wait, count, now, &mut out),
            Event::Tick => self.tick(now, &mut out),
        }
        self.maybe_exit(&mut out);
        out.0
    }

    fn control(&mut self, client: ClientId, request: Request, now: Millis, out: &mut Out) {
        match request {
            Request::Status => out.push(Action::Status {
                client,
                text: false,
            }),
            Request::StatusText => out.push(Action::Status { client, text: true }),
            Request::Restart if matches!(self.s.phase, Phase::Stopping { .. }) => {
                out.reply(client, "failed grace is stopping")
            }
            Request::Restart if self.s.waiting.len() >= self.policy.max_waiting => out.reply(
                client,
                format!(
                    "failed too many clients waiting for a restart ({})",
                    self.policy.max_waiting
                ),
            ),
            Request::Restart => {
                out.info("control: restart requested".into());
                // The restart that includes this request is the next one to start: the one in
                // progress began before it.
                self.s.waiting.push(Waiter {
                    client,
                    target: self.s.restarts + 1,
                });
                self.request_restart(out);
            }
            Request::Stop => {
                out.info("control: stop requested".into());
                out.push(Action::Reply {
                    client,
                    line: "stopping".into(),
                    hold: true,
                });
                self.stop(now, out);
            }
        }
    }

    fn spawned(&mut self, generation: GenId, pid: i32, now: Millis, out: &mut Out) {
        let alive_at = match self.policy.alive {
            AliveRule::Explicit => None,
            AliveRule::After(d) | AliveRule::Auto(d) => Some(now + d),
        };
        self.s.gens.push(Generation {
            id: generation,
            pid,
            state: GenState::Starting {
                deadline: now + self.policy.ready_timeout,
                alive_at,
            },
            started: now,
            leader_status: None,
            last_check: None,
        });
        if self.policy.probe {
            out.push(Action::Probe { generation, pid });
        }
    }

    fn notify(
        &mut self,
        pid: i32,
        generation: Option<GenId>,
        ready: bool,
        now: Millis,
        out: &mut Out,
    ) {
        let Some(generation) = generation else {
            out.push(Action::Log(
                Level::Untrusted,
                format!("notify message from pid {pid} outside every generation: ignored"),
            ));
            return;
        };
        if !ready {
            return;
        }
        // From now on `auto` waits for READY=1 from every generation.
        self.s.seen_notify = true;
        if self.policy.notify_ready {
            self.ready(generation, now, out);
        }
    }

    fn spawn_next(&mut self, cause: Cause, out: &mut Out) {
        let generation = self.s.next_gen;
        self.s.next_gen += 1;
        self.s.phase = Phase::Starting { generation, cause };
        out.push(Action::Spawn {
            generation,
            take_over: self.s.current.is_none(),
        });
    }

    fn request_restart(&mut self, out: &mut Out) {
        match self.s.phase {
            Phase::Idle | Phase::Backoff { .. } => {
                self.s.phase = Phase::ReExec;
                self.s.restarts += 1;
                out.push(Action::ReExec);
            }
            Phase::ReExec | Phase::Starting { .. } => {
                if !self.s.pending_restart {
                    out.info("restart requested during a restart: one more will follow".into());
                }
                self.s.pending_restart = true;
            }
            Phase::Stopping { .. } => out.info("restart ignored: grace is stopping".into()),
        }
    }

    /// A restart ended (either way): answer the clients it concerns, then run the one that was
    /// asked for meanwhile.
    fn finish(&mut self, outcome: Outcome, out: &mut Out) {
        self.s.last_outcome = Some(outcome.clone());
        let answer = match &outcome {
            Outcome::Ready {
                generation,
                pid,
                cause: Cause::Restart,
            } => Some(format!("ok generation={generation} pid={pid}")),
            Outcome::Ready { .. } => None,
            Outcome::RolledBack { generation, reason } => {
                Some(format!("failed generation {generation} {reason}"))
            }
            Outcome::Failed { reason } => Some(format!("failed {reason}")),
        };
        match &outcome {
            Outcome::RolledBack { generation, reason } => {
                out.warn(format!("restart failed: generation {generation} {reason}"))
            }
            Outcome::Failed { reason } => out.warn(format!("restart failed: {reason}")),
            Outcome::Ready { .. } => {}
        }
        if let Some(line) = answer {
            let done = self.s.restarts;
            let (answered, left) = self.s.waiting.iter().partition(|w| w.target <= done);
            self.s.waiting = left;
            for w in answered {
                out.reply(w.client, line.clone());
            }
        }
        out.push(Action::Report(outcome));
        if self.s.pending_restart && self.s.phase == Phase::Idle {
            self.s.pending_restart = false;
            self.request_restart(out);
        }
    }

    fn ready(&mut self, id: GenId, now: Millis, out: &mut Out) {
        let Some(g) = self.gen_mut(id) else { return };
        if !matches!(g.state, GenState::Starting { .. }) {
            return;
        }
        g.state = GenState::Ready;
        let pid = g.pid;
        let cause = match self.s.phase {
            Phase::Starting { generation, cause } if generation == id => cause,
            _ => Cause::Restart,
        };
        if self.policy.probe {
            out.push(Action::EndProbe { generation: id });
        }
        out.info(format!("generation {id} is ready"));
        out.push(Action::Steer { generation: id });
        // A new handover: a generation still finishing the previous one is stopped at once.
        let finishing: Vec<GenId> = self
            .s
            .gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Finishing { .. }))
            .map(|g| g.id)
            .collect();
        for old in finishing {
            out.info(format!(
                "generation {old}: a newer handover; stopping it now"
            ));
            self.drain(old, now, out);
        }
        if let Some(old) = self.s.current.replace(id) {
            if self.policy.steered {
                self.finishing(old, now, out);
            } else {
                self.drain(old, now, out);
            }
        }
        if matches!(self.s.phase, Phase::Starting { generation, .. } if generation == id) {
            self.s.phase = Phase::Idle;
        }
        out.info(format!("generation {id} (pid {pid}) is serving"));
        self.finish(
            Outcome::Ready {
                generation: id,
                pid,
                cause,
            },
            out,
        );
    }

    /// Traffic moved away from `id`: wait for its queue first.
    fn finishing(&mut self, id: GenId, now: Millis, out: &mut Out) {
        let deadline = now + self.policy.drain_timeout;
        if let Some(g) = self.gen_mut(id) {
            if g.leader_status.is_some() {
                return self.drain(id, now, out);
            }
            g.state = GenState::Finishing {
                wait: Wait::Queue,
                since: now,
                deadline,
                check_at: now,
            };
        }
    }

    fn measured(&mut self, id: GenId, wait: Wait, count: usize, now: Millis, out: &mut Out) {
        let (idle_wait, drain_timeout) = (self.policy.idle_wait, self.policy.drain_timeout);
        let Some(g) = self.gen_mut(id) else { return };
        let GenState::Finishing {
            wait: waiting,
            since,
            deadline,
            ..
        } = g.state
        else {
            return;
        };
        if waiting != wait {
            return;
        }
        let took = format_duration(Duration::from_millis(now.saturating_sub(since)));
        let done = match (wait, count) {
            (Wait::Queue, 0) => {
                out.info(format!("generation {id}: queue empty after {took}"));
                true
            }
            (Wait::Idle, 0) => {
                out.info(format!("generation {id} idle after {took}"));
                true
            }
            (Wait::Queue, n) if now >= deadline => {
                out.warn(format!(
                    "generation {id} still has {n} queued connections after {}: stopping it anyway",
                    format_duration(Duration::from_millis(drain_timeout))
                ));
                true
            }
            (Wait::Idle, n) if now >= deadline => {
                out.info(format!(
                    "generation {id} still has {n} connections after {}: stopping it anyway",
                    format_duration(Duration::from_millis(idle_wait))
                ));
                true
            }
            _ => false,
        };
        if !done {
            let waited = now.saturating_sub(since);
            let interval = match wait {
                Wait::Queue => (waited / 4).clamp(CHECK_MIN, CHECK_MAX),
                Wait::Idle => (waited / 2).clamp(CHECK_MIN, IDLE_CHECK_MAX),
            };
            g.state = GenState::Finishing {
                wait,
                since,
                deadline,
                check_at: (now + interval).min(deadline),
            };
            return;
        }
        // A queue that never emptied has already had the drain timeout: no idle wait after it.
        if wait == Wait::Queue && count == 0 && idle_wait > 0 {
            g.state = GenState::Finishing {
                wait: Wait::Idle,
                since: now,
                deadline: now + idle_wait,
                check_at: now,
            };
            return;
        }
        self.drain(id, now, out);
    }

    fn drain(&mut self, id: GenId, now: Millis, out: &mut Out) {
        let (kill_at, signal) = (now + self.policy.drain_timeout, self.policy.stop_signal);
        if let Some(g) = self.gen_mut(id) {
            let leader_alive = g.leader_status.is_none();
            g.state = GenState::Draining {
                kill_at,
                killed: false,
            };
            out.info(format!("draining generation {id} with {signal}"));
            if leader_alive {
                out.push(Action::Signal { pid: g.pid, signal });
            }
        }
        // Cap the generations still draining: the oldest go first.
        let draining: Vec<usize> = (0..self.s.gens.len())
            .filter(|&i| {
                matches!(
                    self.s.gens[i].state,
                    GenState::Draining { killed: false, .. }
                )
            })
            .collect();
        let excess = draining.len().saturating_sub(self.policy.max_draining);
        for &i in &draining[..excess] {
            let g = &mut self.s.gens[i];
            out.warn(format!(
                "too many generations draining: killing generation {}",
                g.id
            ));
            g.state = GenState::Draining {
                kill_at: now,
                killed: true,
            };
            out.push(Action::KillGroup { pgid: g.pid });
        }
    }

    /// Removes a starting generation that did not make it; the previous one keeps serving. One
    /// that is still running may already have accepted connections from the shared queue, so it is
    /// drained like an old generation (stop signal, SIGKILL at the drain deadline) rather than
    /// killed outright; what is left of one that exited is killed at once, unless nothing is.
    fn roll_back(
        &mut self,
        id: GenId,
        reason: String,
        group_empty: bool,
        now: Millis,
        out: &mut Out,
    ) {
        let (drain_timeout, stop_signal, probe) = (
            self.policy.drain_timeout,
            self.policy.stop_signal,
            self.policy.probe,
        );
        let Some(g) = self.gen_mut(id) else { return };
        let (pid, leader_alive) = (g.pid, g.leader_status.is_none());
        let reason = match &g.last_check {
            Some(check) => format!("{reason} (last check: {check})"),
            None => reason,
        };
        if leader_alive {
            g.state = GenState::Draining {
                kill_at: now + drain_timeout,
                killed: false,
            };
            out.push(Action::Signal {
                pid,
                signal: stop_signal,
            });
        } else {
            g.state = GenState::Draining {
                kill_at: now,
                killed: true,
            };
            if !group_empty {
                out.push(Action::KillGroup { pgid: pid });
            }
        }
        if probe {
            out.push(Action::EndProbe { generation: id });
        }
        let code = self
            .generation(id)
            .and_then(|g| g.leader_status)
            .unwrap_or(crate::exit::FAILURE);
        self.start_failed(id, reason, code, now, out);
    }

    fn start_failed(&mut self, id: GenId, reason: String, code: i32, now: Millis, out: &mut Out) {
        let cause = match self.s.phase {
            Phase::Starting { generation, cause } if generation == id => cause,
            _ => return,
        };
        self.s.phase = Phase::Idle;
        match cause {
            Cause::Initial => {
                out.warn(format!("generation {id} failed to start: {reason}"));
                self.s.exit_code = code;
                self.stop(now, out);
            }
            Cause::Restart => {
                out.warn(format!("restart rolled back: generation {id} {reason}"));
                self.finish(
                    Outcome::RolledBack {
                        generation: id,
                        reason,
                    },
                    out,
                );
                if self.s.current.is_none() && self.s.phase == Phase::Idle {
                    // Nothing was serving before either: the current one had crashed, and its
                    // status is the one that counts.
                    self.crashed(self.s.exit_code, now, out);
                }
            }
            Cause::Crash => {
                out.warn(format!(
                    "generation {id} failed to start after a crash: {reason}"
                ));
                self.crashed(code, now, out);
            }
        }
    }

    fn exited(&mut self, pid: i32, code: i32, group_empty: bool, now: Millis, out: &mut Out) {
        let Some(g) = self.s.gens.iter_mut().find(|g| g.pid == pid) else {
            return;
        };
        g.leader_status = Some(code);
        let (id, state) = (g.id, g.state.clone());
        match state {
            GenState::Starting { .. } => {
                self.roll_back(
                    id,
                    format!("exited with status {code}"),
                    group_empty,
                    now,
                    out,
                );
            }
            GenState::Ready => {
                self.s.current = None;
                if matches!(self.s.phase, Phase::Stopping { .. }) {
                    self.s.exit_code = graceful(code, self.policy.stop_signal);
                } else {
                    out.warn(format!(
                        "generation {id} (pid {pid}) exited with status {code}"
                    ));
                    self.s.exit_code = code;
                    // Leftover workers of a dead generation would hold the sockets: kill them.
                    if !group_empty {
                        out.push(Action::KillGroup { pgid: pid });
                    }
                    match self.s.phase {
                        // The successor has a socket of its own, which no client reaches yet;
                        // the clients wait in the dead generation's. With steering only a
                        // generation that takes that socket over can serve them: roll the
                        // successor back, and the crash policy starts one that does.
                        Phase::Starting {
                            generation,
                            cause: Cause::Restart,
                        } if self.policy.steered && self.policy.on_crash == OnCrash::Restart => {
                            self.roll_back(
                                generation,
                                format!(
                                    "was starting on a socket of its own when generation {id} exited: a new one takes over the socket its clients wait in"
                                ),
                                false,
                                now,
                                out,
                            );
                        }
                        Phase::Starting { .. } | Phase::ReExec => {}
                        _ => self.crashed(code, now, out),
                    }
                }
            }
            GenState::Draining { .. } => {
                out.info(format!(
                    "generation {id} (pid {pid}) exited with status {code}"
                ));
            }
            GenState::Finishing { .. } => {
                out.warn(format!(
                    "generation {id} (pid {pid}) exited with status {code} while finishing"
                ));
                let kill_at = now + self.policy.drain_timeout;
                if let Some(g) = self.gen_mut(id) {
                    g.state = GenState::Draining {
                        kill_at,
                        killed: false,
                    };
                }
            }
        }
        if group_empty {
            self.s.gens.retain(|g| g.id != id);
        }
    }

    fn crashed(&mut self, code: i32, now: Millis, out: &mut Out) {
        self.s.exit_code = code;
        if self.policy.on_crash == OnCrash::Exit {
            self.stop(now, out);
            return;
        }
        self.s
            .crashes
            .retain(|&t| now.saturating_sub(t) < CRASH_WINDOW);
        self.s.crashes.push(now);
        if self.s.crashes.len() >= MAX_CRASHES {
            out.warn(format!(
                "giving up: {} crashes within {}",
                self.s.crashes.len(),
                format_duration(Duration::from_millis(CRASH_WINDOW))
            ));
            self.stop(now, out);
            return;
        }
        let backoff = (BACKOFF_FIRST << (self.s.crashes.len() - 1)).min(BACKOFF_MAX);
        out.info(format!(
            "starting a new generation in {}",
            format_duration(Duration::from_millis(backoff))
        ));
        self.s.phase = Phase::Backoff {
            respawn_at: now + backoff,
        };
    }

    fn stop(&mut self, now: Millis, out: &mut Out) {
        if let Phase::Stopping { forced, .. } = &mut self.s.phase {
            if !*forced {
                *forced = true;
                out.warn("second stop request: killing every generation".into());
                self.kill_all(out);
            }
            return;
        }
        self.s.pending_restart = false;
        self.s.phase = Phase::Stopping {
            kill_at: now + self.policy.drain_timeout,
            forced: false,
        };
        out.push(Action::Stopping);
        for w in std::mem::take(&mut self.s.waiting) {
            out.reply(w.client, "failed grace is stopping");
        }
        let signal = self.policy.stop_signal;
        for g in &mut self.s.gens {
            match g.state {
                GenState::Draining { killed: true, .. } => {}
                _ if g.leader_status.is_some() => {}
                _ => out.0.push(Action::Signal { pid: g.pid, signal }),
            }
            if let GenState::Starting { .. } = g.state
                && self.policy.probe
            {
                out.0.push(Action::EndProbe { generation: g.id });
            }
            if let GenState::Starting { .. } | GenState::Finishing { .. } = g.state {
                g.state = GenState::Draining {
                    kill_at: now + self.policy.drain_timeout,
                    killed: false,
                };
            }
        }
    }

    fn kill_all(&mut self, out: &mut Out) {
        for g in &mut self.s.gens {
            // What is in the list is not known to be empty: a generation leaves it then.
            if !matches!(g.state, GenState::Draining { killed: true, .. })
                || g.leader_status.is_none()
            {
                out.0.push(Action::KillGroup { pgid: g.pid });
            }
        }
    }

    fn tick(&mut self, now: Millis, out: &mut Out) {
        let waits_for_notify = self.waits_for_notify();
        let mut expired = Vec::new();
        let mut alive = Vec::new();
        for g in &mut self.s.gens {
            match g.state {
                GenState::Starting { deadline, .. } if now >= deadline => expired.push(g.id),
                GenState::Starting {
                    alive_at: Some(t), ..
                } if now >= t && !waits_for_notify => alive.push(g.id),
                GenState::Finishing {
                    wait,
                    since,
                    deadline,
                    check_at,
                } if now >= check_at => {
                    out.push(Action::Measure {
                        generation: g.id,
                        pid: g.pid,
                        wait,
                    });
                    // Until the answer comes (in this same wake-up), no second question.
                    g.state = GenState::Finishing {
                        wait,
                        since,
                        deadline,
                        check_at: deadline.max(now + CHECK_MIN),
                    };
                }
                GenState::Draining {
                    kill_at,
                    killed: false,
                } if now >= kill_at => {
                    out.warn(format!(
                        "generation {} still running after the drain timeout: killing it",
                        g.id
                    ));
                    g.state = GenState::Draining {
                        kill_at,
                        killed: true,
                    };
                    out.push(Action::KillGroup { pgid: g.pid });
                }
                _ => {}
            }
        }
        for id in alive {
            self.ready(id, now, out);
        }
        let timeout = format_duration(Duration::from_millis(self.policy.ready_timeout));
        for id in expired {
            let reason = format!("was not ready within {timeout}");
            self.roll_back(id, reason, false, now, out);
        }
        match self.s.phase {
            Phase::Backoff { respawn_at } if now >= respawn_at => {
                self.spawn_next(Cause::Crash, out)
            }
            Phase::Stopping {
                kill_at,
                forced: false,
            } if now >= kill_at => {
                out.warn("drain timeout reached while stopping: killing what is left".into());
                self.s.phase = Phase::Stopping {
                    kill_at,
                    forced: true,
                };
                self.kill_all(out);
            }
            _ => {}
        }
    }

    fn maybe_exit(&mut self, out: &mut Out) {
        if matches!(self.s.phase, Phase::Stopping { .. }) && self.s.gens.is_empty() {
            out.push(Action::Exit(self.s.exit_code));
        }
    }
}

/// A server that exits 0, or dies of the stop signal it was sent, honoured the stop.
fn graceful(code: i32, stop_signal: Signal) -> i32 {
    if code == 128 + stop_signal as i32 {
        0
    } else {
        code
    }
}
