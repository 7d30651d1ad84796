//! The generation state machine, with no processes in it: `step(now, event) -> actions`.
//!
//! The event loop (`run.rs`) turns signals, reaped children, notify messages and timers into
//! [`Event`]s and carries out the [`Action`]s. Keeping the decisions here, pure, lets the tests
//! walk through restarts, rollbacks, drains and stops without starting anything.

use std::time::Duration;

use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::cli::OnCrash;
use crate::duration::format_duration;

/// Milliseconds on the monotonic clock (it keeps counting across `execve`).
pub type Millis = u64;
pub type GenId = u64;

/// How the state machine decides readiness on its own (the rest comes in as [`Event::Ready`]).
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
    pub alive: AliveRule,
    pub stop_signal: Signal,
    pub max_draining: usize,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub id: GenId,
    /// The leader's pid, which is also the process group id.
    pub pid: i32,
    pub state: GenState,
    pub started: Millis,
    /// Set once the leader was reaped; the generation is gone when its group is empty too.
    pub leader_status: Option<i32>,
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
    RestartRequested,
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
    Ready {
        generation: GenId,
    },
    StopRequested,
    Forward(Signal),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ReExec,
    Spawn { generation: GenId },
    Signal { pid: i32, signal: Signal },
    KillGroup { pgid: i32 },
    Report(Outcome),
    Exit(i32),
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    pub policy: Policy,
    pub gens: Vec<Generation>,
    pub next_gen: GenId,
    pub current: Option<GenId>,
    pub phase: Phase,
    pub pending_restart: bool,
    pub seen_notify: bool,
    pub crashes: Vec<Millis>,
    /// The status `grace run` exits with once everything is gone.
    pub exit_code: i32,
    pub last_outcome: Option<Outcome>,
}

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            gens: Vec::new(),
            next_gen: 1,
            current: None,
            phase: Phase::Idle,
            pending_restart: false,
            seen_notify: false,
            crashes: Vec::new(),
            exit_code: 0,
            last_outcome: None,
        }
    }

    pub fn generation(&self, id: GenId) -> Option<&Generation> {
        self.gens.iter().find(|g| g.id == id)
    }

    fn gen_mut(&mut self, id: GenId) -> Option<&mut Generation> {
        self.gens.iter_mut().find(|g| g.id == id)
    }

    /// The generation a process group belongs to.
    pub fn gen_of_pgid(&self, pgid: i32) -> Option<GenId> {
        self.gens.iter().find(|g| g.pid == pgid).map(|g| g.id)
    }

    /// The earliest moment a [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        let gens = self.gens.iter().flat_map(|g| match g.state {
            GenState::Starting { deadline, alive_at } => {
                vec![
                    Some(deadline),
                    alive_at.filter(|_| !self.waits_for_notify()),
                ]
            }
            GenState::Draining { kill_at, killed } => vec![(!killed).then_some(kill_at)],
            GenState::Ready => vec![],
        });
        let phase = match self.phase {
            Phase::Backoff { respawn_at } => Some(respawn_at),
            Phase::Stopping { kill_at, forced } => (!forced).then_some(kill_at),
            _ => None,
        };
        gens.flatten().chain(phase).min()
    }

    fn waits_for_notify(&self) -> bool {
        matches!(self.policy.alive, AliveRule::Auto(_)) && self.seen_notify
    }

    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.spawn_next(Cause::Initial, &mut out),
            Event::Adopted => {
                if self.phase == Phase::ReExec {
                    self.spawn_next(Cause::Restart, &mut out);
                }
            }
            Event::RestartRequested => self.request_restart(&mut out),
            Event::ReExecFailed(reason) => {
                warn!("restart refused: {reason}");
                self.phase = Phase::Idle;
                self.finish(Outcome::Failed { reason }, &mut out);
                if self.current.is_none() && self.phase == Phase::Idle {
                    // It was requested during a crash backoff: nothing serves, so go on with
                    // the crash policy rather than sit idle.
                    self.crashed(self.exit_code, now, &mut out);
                }
            }
            Event::Spawned { generation, pid } => {
                let alive_at = match self.policy.alive {
                    AliveRule::Explicit => None,
                    AliveRule::After(d) | AliveRule::Auto(d) => Some(now + d),
                };
                self.gens.push(Generation {
                    id: generation,
                    pid,
                    state: GenState::Starting {
                        deadline: now + self.policy.ready_timeout,
                        alive_at,
                    },
                    started: now,
                    leader_status: None,
                });
            }
            Event::SpawnFailed {
                generation,
                reason,
                code,
            } => self.start_failed(generation, reason, code, now, &mut out),
            Event::Ready { generation } => self.ready(generation, now, &mut out),
            Event::StopRequested => self.stop(now, &mut out),
            Event::Forward(signal) => match self.current.and_then(|id| self.generation(id)) {
                Some(g) => out.push(Action::Signal { pid: g.pid, signal }),
                None => warn!("no current generation to forward {signal} to"),
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
                    self.gens.retain(|g| g.id != generation);
                }
            }
            Event::Tick => self.tick(now, &mut out),
        }
        self.maybe_exit(&mut out);
        out
    }

    fn spawn_next(&mut self, cause: Cause, out: &mut Vec<Action>) {
        let generation = self.next_gen;
        self.next_gen += 1;
        self.phase = Phase::Starting { generation, cause };
        out.push(Action::Spawn { generation });
    }

    fn request_restart(&mut self, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Idle | Phase::Backoff { .. } => {
                self.phase = Phase::ReExec;
                out.push(Action::ReExec);
            }
            Phase::ReExec | Phase::Starting { .. } => {
                if !self.pending_restart {
                    info!("restart requested during a restart: one more will follow");
                }
                self.pending_restart = true;
            }
            Phase::Stopping { .. } => info!("restart ignored: grace is stopping"),
        }
    }

    /// A restart ended (either way): run the one that was asked for meanwhile.
    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        self.last_outcome = Some(outcome.clone());
        out.push(Action::Report(outcome));
        if self.pending_restart && self.phase == Phase::Idle {
            self.pending_restart = false;
            self.request_restart(out);
        }
    }

    fn ready(&mut self, id: GenId, now: Millis, out: &mut Vec<Action>) {
        let Some(g) = self.gen_mut(id) else { return };
        if !matches!(g.state, GenState::Starting { .. }) {
            return;
        }
        g.state = GenState::Ready;
        let pid = g.pid;
        let cause = match self.phase {
            Phase::Starting { generation, cause } if generation == id => cause,
            _ => Cause::Restart,
        };
        info!("generation {id} is ready");
        if let Some(old) = self.current.replace(id) {
            self.drain(old, now, out);
        }
        if matches!(self.phase, Phase::Starting { generation, .. } if generation == id) {
            self.phase = Phase::Idle;
        }
        self.finish(
            Outcome::Ready {
                generation: id,
                pid,
                cause,
            },
            out,
        );
    }

    fn drain(&mut self, id: GenId, now: Millis, out: &mut Vec<Action>) {
        let (kill_at, signal) = (now + self.policy.drain_timeout, self.policy.stop_signal);
        if let Some(g) = self.gen_mut(id) {
            info!("draining generation {id} with {signal}");
            g.state = GenState::Draining {
                kill_at,
                killed: false,
            };
            if g.leader_status.is_none() {
                out.push(Action::Signal { pid: g.pid, signal });
            }
        }
        // Cap the generations still draining: the oldest go first.
        let draining: Vec<usize> = (0..self.gens.len())
            .filter(|&i| matches!(self.gens[i].state, GenState::Draining { killed: false, .. }))
            .collect();
        let excess = draining.len().saturating_sub(self.policy.max_draining);
        for &i in &draining[..excess] {
            let g = &mut self.gens[i];
            warn!("too many generations draining: killing generation {}", g.id);
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
    /// killed outright; what is left of one that exited is killed at once.
    fn roll_back(&mut self, id: GenId, reason: String, now: Millis, out: &mut Vec<Action>) {
        let (drain_timeout, stop_signal) = (self.policy.drain_timeout, self.policy.stop_signal);
        let Some(g) = self.gen_mut(id) else { return };
        let (pid, leader_alive) = (g.pid, g.leader_status.is_none());
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
            out.push(Action::KillGroup { pgid: pid });
        }
        self.start_failed(id, reason, g_status_code(&self.gens, id), now, out);
    }

    fn start_failed(
        &mut self,
        id: GenId,
        reason: String,
        code: i32,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let cause = match self.phase {
            Phase::Starting { generation, cause } if generation == id => cause,
            _ => return,
        };
        self.phase = Phase::Idle;
        match cause {
            Cause::Initial => {
                warn!("generation {id} failed to start: {reason}");
                self.exit_code = code;
                self.stop(now, out);
            }
            Cause::Restart => {
                warn!("restart rolled back: generation {id} {reason}");
                self.finish(
                    Outcome::RolledBack {
                        generation: id,
                        reason,
                    },
                    out,
                );
                if self.current.is_none() && self.phase == Phase::Idle {
                    // Nothing was serving before either: the current one had crashed, and its
                    // status is the one that counts.
                    self.crashed(self.exit_code, now, out);
                }
            }
            Cause::Crash => {
                warn!("generation {id} failed to start after a crash: {reason}");
                self.crashed(code, now, out);
            }
        }
    }

    fn exited(
        &mut self,
        pid: i32,
        code: i32,
        group_empty: bool,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let Some(g) = self.gens.iter_mut().find(|g| g.pid == pid) else {
            return;
        };
        g.leader_status = Some(code);
        let (id, state) = (g.id, g.state.clone());
        match state {
            GenState::Starting { .. } => {
                self.roll_back(id, format!("exited with status {code}"), now, out);
            }
            GenState::Ready => {
                self.current = None;
                if matches!(self.phase, Phase::Stopping { .. }) {
                    self.exit_code = graceful(code, self.policy.stop_signal);
                } else {
                    warn!("generation {id} (pid {pid}) exited with status {code}");
                    self.exit_code = code;
                    // Leftover workers of a dead generation would hold the sockets: kill them.
                    out.push(Action::KillGroup { pgid: pid });
                    if !matches!(self.phase, Phase::Starting { .. } | Phase::ReExec) {
                        self.crashed(code, now, out);
                    }
                }
            }
            GenState::Draining { .. } => {
                info!("generation {id} (pid {pid}) exited with status {code}");
            }
        }
        if group_empty {
            self.gens.retain(|g| g.id != id);
        }
    }

    fn crashed(&mut self, code: i32, now: Millis, out: &mut Vec<Action>) {
        self.exit_code = code;
        if self.policy.on_crash == OnCrash::Exit {
            self.stop(now, out);
            return;
        }
        self.crashes
            .retain(|&t| now.saturating_sub(t) < CRASH_WINDOW);
        self.crashes.push(now);
        if self.crashes.len() >= MAX_CRASHES {
            warn!(
                "giving up: {} crashes within {}",
                self.crashes.len(),
                format_duration(Duration::from_millis(CRASH_WINDOW))
            );
            self.stop(now, out);
            return;
        }
        let backoff = (BACKOFF_FIRST << (self.crashes.len() - 1)).min(BACKOFF_MAX);
        info!(
            "starting a new generation in {}",
            format_duration(Duration::from_millis(backoff))
        );
        self.phase = Phase::Backoff {
            respawn_at: now + backoff,
        };
    }

    fn stop(&mut self, now: Millis, out: &mut Vec<Action>) {
        if let Phase::Stopping { forced, .. } = &mut self.phase {
            if !*forced {
                warn!("second stop request: killing every generation");
                *forced = true;
                self.kill_all(out);
            }
            return;
        }
        self.pending_restart = false;
        self.phase = Phase::Stopping {
            kill_at: now + self.policy.drain_timeout,
            forced: false,
        };
        let signal = self.policy.stop_signal;
        for g in &mut self.gens {
            match g.state {
                GenState::Draining { killed: true, .. } => {}
                _ if g.leader_status.is_some() => {}
                _ => out.push(Action::Signal { pid: g.pid, signal }),
            }
            if !matches!(g.state, GenState::Draining { .. }) && g.state != GenState::Ready {
                g.state = GenState::Draining {
                    kill_at: now + self.policy.drain_timeout,
                    killed: false,
                };
            }
        }
    }

    fn kill_all(&mut self, out: &mut Vec<Action>) {
        for g in &mut self.gens {
            if !matches!(g.state, GenState::Draining { killed: true, .. })
                || g.leader_status.is_none()
            {
                out.push(Action::KillGroup { pgid: g.pid });
            }
        }
    }

    fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        let waits_for_notify = self.waits_for_notify();
        let mut expired = Vec::new();
        let mut alive = Vec::new();
        for g in &mut self.gens {
            match g.state {
                GenState::Starting { deadline, .. } if now >= deadline => expired.push(g.id),
                GenState::Starting {
                    alive_at: Some(t), ..
                } if now >= t && !waits_for_notify => alive.push(g.id),
                GenState::Draining {
                    kill_at,
                    killed: false,
                } if now >= kill_at => {
                    warn!(
                        "generation {} still running after the drain timeout: killing it",
                        g.id
                    );
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
            self.roll_back(id, format!("was not ready within {timeout}"), now, out);
        }
        match self.phase {
            Phase::Backoff { respawn_at } if now >= respawn_at => {
                self.spawn_next(Cause::Crash, out)
            }
            Phase::Stopping {
                kill_at,
                forced: false,
            } if now >= kill_at => {
                warn!("drain timeout reached while stopping: killing what is left");
                self.phase = Phase::Stopping {
                    kill_at,
                    forced: true,
                };
                self.kill_all(out);
            }
            _ => {}
        }
    }

    fn maybe_exit(&mut self, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Stopping { .. }) && self.gens.is_empty() {
            out.push(Action::Exit(self.exit_code));
        }
    }
}

/// The status of a generation whose leader was reaped, else grace's own failure code.
fn g_status_code(gens: &[Generation], id: GenId) -> i32 {
    gens.iter()
        .find(|g| g.id == id)
        .and_then(|g| g.leader_status)
        .unwrap_or(crate::exit::FAILURE)
}

/// A server that exits 0, or dies of the stop signal it was sent, honoured the stop.
fn graceful(code: i32, stop_signal: Signal) -> i32 {
    if code == 128 + stop_signal as i32 {
        0
    } else {
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            ready_timeout: 1_000,
            drain_timeout: 5_000,
            alive: AliveRule::Explicit,
            stop_signal: Signal::SIGTERM,
            max_draining: 2,
            on_crash: OnCrash::Exit,
        }
    }

    /// A supervisor with generation 1 (pid 100) serving.
    fn serving(policy: Policy) -> Supervisor {
        let mut s = Supervisor::new(policy);
        assert_eq!(s.step(0, Event::Start), [Action::Spawn { generation: 1 }]);
        assert!(
            s.step(
                0,
                Event::Spawned {
                    generation: 1,
                    pid: 100
                }
            )
            .is_empty()
        );
        let out = s.step(10, Event::Ready { generation: 1 });
        assert_eq!(
            out,
            [Action::Report(Outcome::Ready {
                generation: 1,
                pid: 100,
                cause: Cause::Initial
            })]
        );
        s
    }

    fn state(s: &Supervisor, id: GenId) -> GenState {
        s.generation(id).unwrap().state.clone()
    }

    /// Restart from a serving supervisor up to the new generation's spawn (as the new image).
    fn restart_to_spawn(s: &mut Supervisor, now: Millis, pid: i32) -> GenId {
        assert_eq!(s.step(now, Event::RestartRequested), [Action::ReExec]);
        let out = s.step(now, Event::Adopted);
        let [Action::Spawn { generation }] = out[..] else {
            panic!("{out:?}")
        };
        assert!(s.step(now, Event::Spawned { generation, pid }).is_empty());
        generation
    }

    #[test]
    fn restart_hands_over_then_drains_the_old_generation() {
        let mut s = serving(policy());
        let generation = restart_to_spawn(&mut s, 100, 200);
        assert_eq!(generation, 2);
        let out = s.step(150, Event::Ready { generation: 2 });
        assert_eq!(
            out,
            [
                Action::Signal {
                    pid: 100,
                    signal: Signal::SIGTERM
                },
                Action::Report(Outcome::Ready {
                    generation: 2,
                    pid: 200,
                    cause: Cause::Restart
                }),
            ]
        );
        assert_eq!(s.current, Some(2));
        assert_eq!(
            state(&s, 1),
            GenState::Draining {
                kill_at: 5_150,
                killed: false
            }
        );
        // The old one takes too long: its whole group is killed at the drain deadline.
        assert!(s.step(5_149, Event::Tick).is_empty());
        assert_eq!(
            s.step(5_150, Event::Tick),
            [Action::KillGroup { pgid: 100 }]
        );
        assert!(
            s.step(
                5_160,
                Event::Exited {
                    pid: 100,
                    code: 137,
                    group_empty: true
                }
            )
            .is_empty()
        );
        assert!(s.generation(1).is_none());
        assert_eq!(s.next_deadline(), None, "idle means no timer");
    }

    #[test]
    fn a_new_generation_that_exits_is_rolled_back() {
        let mut s = serving(policy());
        restart_to_spawn(&mut s, 100, 200);
        let out = s.step(
            120,
            Event::Exited {
                pid: 200,
                code: 3,
                group_empty: true,
            },
        );
        assert_eq!(
            out,
            [
                Action::KillGroup { pgid: 200 },
                Action::Report(Outcome::RolledBack {
                    generation: 2,
                    reason: "exited with status 3".into()
                }),
            ]
        );
        assert_eq!(s.current, Some(1));
        assert_eq!(
            state(&s, 1),
            GenState::Ready,
            "the old generation is untouched"
        );
        assert_eq!(s.phase, Phase::Idle);
    }

    #[test]
    fn a_new_generation_that_is_never_ready_is_rolled_back_at_the_timeout() {
        let mut s = serving(policy());
        restart_to_spawn(&mut s, 100, 200);
        assert_eq!(s.next_deadline(), Some(1_100));
        assert!(s.step(1_099, Event::Tick).is_empty());
        let out = s.step(1_100, Event::Tick);
        assert_eq!(
            out,
            [
                Action::Signal {
                    pid: 200,
                    signal: Signal::SIGTERM
                },
                Action::Report(Outcome::RolledBack {
                    generation: 2,
                    reason: "was not ready within 1s".into()
                }),
            ]
        );
        assert_eq!(
            state(&s, 2),
            GenState::Draining {
                kill_at: 6_100,
                killed: false
            },
            "drained, since it may hold accepted connections"
        );
        assert_eq!(
            s.step(6_100, Event::Tick),
            [Action::KillGroup { pgid: 200 }]
        );
        // Readiness arriving late is ignored.
        assert!(s.step(1_200, Event::Ready { generation: 2 }).is_empty());
        assert_eq!(s.current, Some(1));
        // Never retried by itself.
        assert!(
            s.step(
                10_000,
                Event::Exited {
                    pid: 200,
                    code: 137,
                    group_empty: true
                }
            )
            .is_empty()
        );
        assert!(s.step(20_000, Event::Tick).is_empty());
    }

    #[test]
    fn restarts_during_a_restart_coalesce_into_one() {
        let mut s = serving(policy());
        restart_to_spawn(&mut s, 100, 200);
        for _ in 0..20 {
            assert!(s.step(110, Event::RestartRequested).is_empty());
        }
        let out = s.step(150, Event::Ready { generation: 2 });
        assert_eq!(
            out.iter().filter(|a| **a == Action::ReExec).count(),
            1,
            "{out:?}"
        );
        assert!(!s.pending_restart);
        assert_eq!(s.phase, Phase::ReExec);
    }

    #[test]
    fn draining_generations_are_capped_oldest_first() {
        let mut s = serving(policy());
        for (i, pid) in [200, 300, 400].into_iter().enumerate() {
            let generation = restart_to_spawn(&mut s, 100 * i as u64 + 100, pid);
            let out = s.step(100 * i as u64 + 150, Event::Ready { generation });
            if i == 2 {
                assert!(out.contains(&Action::KillGroup { pgid: 100 }), "{out:?}");
            }
        }
        let draining = s
            .gens
            .iter()
            .filter(|g| matches!(g.state, GenState::Draining { killed: false, .. }))
            .count();
        assert_eq!(draining, 2);
    }

    #[test]
    fn auto_waits_for_notify_once_the_server_spoke_it() {
        let mut s = serving(Policy {
            alive: AliveRule::Auto(500),
            ..policy()
        });
        restart_to_spawn(&mut s, 100, 200);
        assert!(s.step(700, Event::Tick).contains(&Action::Signal {
            pid: 100,
            signal: Signal::SIGTERM
        }));

        let mut s = serving(Policy {
            alive: AliveRule::Auto(500),
            ..policy()
        });
        s.seen_notify = true;
        restart_to_spawn(&mut s, 100, 200);
        assert!(s.step(700, Event::Tick).is_empty(), "must wait for READY=1");
        assert!(!s.step(800, Event::Ready { generation: 2 }).is_empty());
    }

    #[test]
    fn stop_drains_everything_and_exits_zero_when_honoured() {
        let mut s = serving(policy());
        let out = s.step(100, Event::StopRequested);
        assert_eq!(
            out,
            [Action::Signal {
                pid: 100,
                signal: Signal::SIGTERM
            }]
        );
        assert!(
            s.step(100, Event::RestartRequested).is_empty(),
            "no restart while stopping"
        );
        let out = s.step(
            200,
            Event::Exited {
                pid: 100,
                code: 128 + 15,
                group_empty: true,
            },
        );
        assert_eq!(out, [Action::Exit(0)]);
    }

    #[test]
    fn second_stop_kills_at_once() {
        let mut s = serving(policy());
        s.step(100, Event::StopRequested);
        assert_eq!(
            s.step(110, Event::StopRequested),
            [Action::KillGroup { pgid: 100 }]
        );
        assert_eq!(
            s.step(
                120,
                Event::Exited {
                    pid: 100,
                    code: 137,
                    group_empty: true
                }
            ),
            [Action::Exit(137)]
        );
    }

    #[test]
    fn crash_with_exit_policy_exits_with_the_status() {
        let mut s = serving(policy());
        let out = s.step(
            100,
            Event::Exited {
                pid: 100,
                code: 7,
                group_empty: true,
            },
        );
        assert_eq!(out, [Action::KillGroup { pgid: 100 }, Action::Exit(7)]);
    }

    #[test]
    fn crash_with_restart_policy_backs_off_then_gives_up() {
        let mut s = serving(Policy {
            on_crash: OnCrash::Restart,
            ..policy()
        });
        let mut now = 100;
        let mut pid = 100;
        for crash in 1..MAX_CRASHES {
            s.step(
                now,
                Event::Exited {
                    pid,
                    code: 1,
                    group_empty: true,
                },
            );
            let Phase::Backoff { respawn_at } = s.phase else {
                panic!("{:?}", s.phase)
            };
            assert_eq!(
                respawn_at - now,
                (BACKOFF_FIRST << (crash - 1)).min(BACKOFF_MAX)
            );
            now = respawn_at;
            let out = s.step(now, Event::Tick);
            let [Action::Spawn { generation }] = out[..] else {
                panic!("{out:?}")
            };
            pid += 1;
            s.step(now, Event::Spawned { generation, pid });
            let out = s.step(now, Event::Ready { generation });
            assert!(matches!(
                out[..],
                [Action::Report(Outcome::Ready {
                    cause: Cause::Crash,
                    ..
                })]
            ));
        }
        let out = s.step(
            now,
            Event::Exited {
                pid,
                code: 1,
                group_empty: true,
            },
        );
        assert_eq!(
            out.last(),
            Some(&Action::Exit(1)),
            "gives up after {MAX_CRASHES} crashes"
        );
    }

    #[test]
    fn initial_generation_failures_exit_with_its_status() {
        let mut s = Supervisor::new(policy());
        s.step(0, Event::Start);
        let out = s.step(
            0,
            Event::SpawnFailed {
                generation: 1,
                reason: "not found".into(),
                code: 127,
            },
        );
        assert_eq!(out, [Action::Exit(127)]);

        let mut s = Supervisor::new(policy());
        s.step(0, Event::Start);
        s.step(
            0,
            Event::Spawned {
                generation: 1,
                pid: 100,
            },
        );
        s.step(
            0,
            Event::Exited {
                pid: 100,
                code: 2,
                group_empty: true,
            },
        );
        assert_eq!(
            s.phase,
            Phase::Stopping {
                kill_at: 5_000,
                forced: false
            }
        );
        assert!(s.gens.is_empty());
        assert_eq!(s.exit_code, 2);
    }

    #[test]
    fn a_reexec_failure_is_reported_and_keeps_serving() {
        let mut s = serving(policy());
        assert_eq!(s.step(100, Event::RestartRequested), [Action::ReExec]);
        let out = s.step(100, Event::ReExecFailed("binary missing".into()));
        assert_eq!(
            out,
            [Action::Report(Outcome::Failed {
                reason: "binary missing".into()
            })]
        );
        assert_eq!(s.phase, Phase::Idle);
        assert_eq!(s.current, Some(1));
    }

    #[test]
    fn a_reexec_failure_during_a_crash_backoff_keeps_the_crash_policy_going() {
        let mut s = serving(Policy {
            on_crash: OnCrash::Restart,
            ..policy()
        });
        s.step(
            100,
            Event::Exited {
                pid: 100,
                code: 1,
                group_empty: true,
            },
        );
        assert!(matches!(s.phase, Phase::Backoff { .. }));
        assert_eq!(s.step(110, Event::RestartRequested), [Action::ReExec]);
        s.step(110, Event::ReExecFailed("binary missing".into()));
        let Phase::Backoff { respawn_at } = s.phase else {
            panic!("left idle with nothing serving: {:?}", s.phase);
        };
        let out = s.step(respawn_at, Event::Tick);
        assert!(matches!(out[..], [Action::Spawn { .. }]), "{out:?}");
    }

    #[test]
    fn a_crash_during_a_rolled_back_restart_exits_with_the_crashed_status() {
        let mut s = serving(policy());
        restart_to_spawn(&mut s, 100, 200);
        s.step(
            110,
            Event::Exited {
                pid: 100,
                code: 7,
                group_empty: true,
            },
        );
        assert_eq!(s.current, None);
        let out = s.step(1_100, Event::Tick);
        assert!(
            out.contains(&Action::Signal {
                pid: 200,
                signal: Signal::SIGTERM
            }),
            "{out:?}"
        );
        let out = s.step(
            1_200,
            Event::Exited {
                pid: 200,
                code: 143,
                group_empty: true,
            },
        );
        assert_eq!(out, [Action::Exit(7)]);
    }

    #[test]
    fn forwarded_signals_go_to_the_current_generation() {
        let mut s = serving(policy());
        assert_eq!(
            s.step(5, Event::Forward(Signal::SIGHUP)),
            [Action::Signal {
                pid: 100,
                signal: Signal::SIGHUP
            }]
        );
    }

    #[test]
    fn a_draining_leader_that_leaves_workers_behind_stays_until_its_group_is_gone() {
        let mut s = serving(policy());
        let generation = restart_to_spawn(&mut s, 100, 200);
        s.step(150, Event::Ready { generation });
        s.step(
            200,
            Event::Exited {
                pid: 100,
                code: 0,
                group_empty: false,
            },
        );
        assert!(s.generation(1).is_some());
        assert_eq!(
            s.step(5_150, Event::Tick),
            [Action::KillGroup { pgid: 100 }]
        );
        s.step(5_200, Event::GroupGone { generation: 1 });
        assert!(s.generation(1).is_none());
    }
}
