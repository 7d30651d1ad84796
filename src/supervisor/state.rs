//! The supervisor's whole state, and its lines in the handoff record.
//!
//! `encode` destructures the state and `decode` builds it field by field with no `..Default`: a
//! field added to [`State`] does not compile until both know it, so nothing can silently reset at
//! a restart.

use std::fmt::Write as _;

use super::{Cause, GenId, GenState, Generation, Millis, Outcome, Phase, Wait, Waiter};
use crate::fields::{Fields, esc, flag, opt, opt_text};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub(super) gens: Vec<Generation>,
    pub(super) next_gen: GenId,
    pub(super) current: Option<GenId>,
    pub(super) phase: Phase,
    pub(super) pending_restart: bool,
    pub(super) seen_notify: bool,
    pub(super) crashes: Vec<Millis>,
    /// The status `grace run` exits with once everything is gone.
    pub(super) exit_code: i32,
    pub(super) last_outcome: Option<Outcome>,
    pub(super) restarts: u64,
    pub(super) waiting: Vec<Waiter>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            gens: Vec::new(),
            next_gen: 1,
            current: None,
            phase: Phase::Idle,
            pending_restart: false,
            seen_notify: false,
            crashes: Vec::new(),
            exit_code: 0,
            last_outcome: None,
            restarts: 0,
            waiting: Vec::new(),
        }
    }
}

/// The keys of the lines [`State::encode`] writes.
pub const KEYS: &[&str] = &[
    "generation",
    "next_gen",
    "current",
    "phase",
    "pending_restart",
    "seen_notify",
    "crash",
    "exit_code",
    "outcome",
    "restarts",
    "waiter",
];

impl State {
    pub fn encode(&self, s: &mut String) {
        let State {
            gens,
            next_gen,
            current,
            phase,
            pending_restart,
            seen_notify,
            crashes,
            exit_code,
            last_outcome,
            restarts,
            waiting,
        } = self;
        for g in gens {
            let Generation {
                id,
                pid,
                state,
                started,
                leader_status,
                last_check,
            } = g;
            let state = match state {
                GenState::Starting { deadline, alive_at } => {
                    format!("starting {deadline} {}", opt(*alive_at))
                }
                GenState::Ready => "ready - -".to_string(),
                GenState::Draining { kill_at, killed } => {
                    format!("draining {kill_at} {}", flag(*killed))
                }
                // The next check is made at once in the new image.
                GenState::Finishing {
                    wait,
                    since,
                    deadline,
                    check_at: _,
                } => format!("{} {deadline} {since}", wait.as_str()),
            };
            let _ = writeln!(
                s,
                "generation {id} {pid} {started} {} {state} {}",
                opt(*leader_status),
                opt_text(last_check.as_deref())
            );
        }
        let _ = writeln!(s, "next_gen {next_gen}");
        if let Some(c) = current {
            let _ = writeln!(s, "current {c}");
        }
        let phase = match phase {
            Phase::Idle => "idle".to_string(),
            Phase::ReExec => "reexec".to_string(),
            Phase::Starting { generation, cause } => {
                format!("starting {generation} {}", cause_name(*cause))
            }
            Phase::Backoff { respawn_at } => format!("backoff {respawn_at}"),
            Phase::Stopping { kill_at, forced } => format!("stopping {kill_at} {}", flag(*forced)),
        };
        let _ = writeln!(s, "phase {phase}");
        let _ = writeln!(s, "pending_restart {}", flag(*pending_restart));
        let _ = writeln!(s, "seen_notify {}", flag(*seen_notify));
        for t in crashes {
            let _ = writeln!(s, "crash {t}");
        }
        let _ = writeln!(s, "exit_code {exit_code}");
        match last_outcome {
            Some(Outcome::Ready {
                generation,
                pid,
                cause,
            }) => {
                let _ = writeln!(s, "outcome ready {generation} {pid} {}", cause_name(*cause));
            }
            Some(Outcome::RolledBack { generation, reason }) => {
                let _ = writeln!(s, "outcome rolled_back {generation} {}", esc(reason));
            }
            Some(Outcome::Failed { reason }) => {
                let _ = writeln!(s, "outcome failed {}", esc(reason));
            }
            None => {}
        }
        let _ = writeln!(s, "restarts {restarts}");
        for Waiter { client, target } in waiting {
            let _ = writeln!(s, "waiter {client} {target}");
        }
    }

    /// Builds the state from the lines whose key is in [`KEYS`] (in any order).
    pub fn decode<'a>(lines: impl IntoIterator<Item = Fields<'a>>) -> Result<Self, String> {
        let mut gens = Vec::new();
        let mut next_gen = None;
        let mut current = None;
        let mut phase = None;
        let mut pending_restart = false;
        let mut seen_notify = false;
        let mut crashes = Vec::new();
        let mut exit_code = 0;
        let mut last_outcome = None;
        let mut restarts = 0;
        let mut waiting = Vec::new();
        for f in lines {
            match f.key() {
                "generation" => gens.push(Generation {
                    id: f.num(1)?,
                    pid: f.num(2)?,
                    started: f.num(3)?,
                    leader_status: f.opt_num(4)?,
                    state: match f.word(5)? {
                        "starting" => GenState::Starting {
                            deadline: f.num(6)?,
                            alive_at: f.opt_num(7)?,
                        },
                        "ready" => GenState::Ready,
                        "draining" => GenState::Draining {
                            kill_at: f.num(6)?,
                            killed: f.flag(7)?,
                        },
                        word @ ("finishing-queue" | "finishing-idle") => GenState::Finishing {
                            wait: if word == "finishing-queue" {
                                Wait::Queue
                            } else {
                                Wait::Idle
                            },
                            deadline: f.num(6)?,
                            since: f.num(7)?,
                            check_at: 0,
                        },
                        _ => return Err(f.bad()),
                    },
                    last_check: f.opt_text(8)?,
                }),
                "next_gen" => next_gen = Some(f.num(1)?),
                "current" => current = Some(f.num(1)?),
                "phase" => {
                    phase = Some(match f.word(1)? {
                        "idle" => Phase::Idle,
                        "reexec" => Phase::ReExec,
                        "starting" => Phase::Starting {
                            generation: f.num(2)?,
                            cause: cause_of(&f, 3)?,
                        },
                        "backoff" => Phase::Backoff {
                            respawn_at: f.num(2)?,
                        },
                        "stopping" => Phase::Stopping {
                            kill_at: f.num(2)?,
                            forced: f.flag(3)?,
                        },
                        _ => return Err(f.bad()),
                    })
                }
                "pending_restart" => pending_restart = f.flag(1)?,
                "seen_notify" => seen_notify = f.flag(1)?,
                "crash" => crashes.push(f.num(1)?),
                "exit_code" => exit_code = f.num(1)?,
                "outcome" => {
                    last_outcome = Some(match f.word(1)? {
                        "ready" => Outcome::Ready {
                            generation: f.num(2)?,
                            pid: f.num(3)?,
                            cause: cause_of(&f, 4)?,
                        },
                        "rolled_back" => Outcome::RolledBack {
                            generation: f.num(2)?,
                            reason: f.text(3)?,
                        },
                        "failed" => Outcome::Failed { reason: f.text(2)? },
                        _ => return Err(f.bad()),
                    })
                }
                "restarts" => restarts = f.num(1)?,
                "waiter" => waiting.push(Waiter {
                    client: f.num(1)?,
                    target: f.num(2)?,
                }),
                _ => return Err(f.bad()),
            }
        }
        Ok(State {
            gens,
            next_gen: next_gen.ok_or("handoff record: no next_gen")?,
            current,
            phase: phase.ok_or("handoff record: no phase")?,
            pending_restart,
            seen_notify,
            crashes,
            exit_code,
            last_outcome,
            restarts,
            waiting,
        })
    }

    /// Checks what the state says about itself; the pids are checked against the system by the
    /// handoff record.
    pub fn check(&self) -> Result<(), String> {
        let mut ids: Vec<GenId> = self.gens.iter().map(|g| g.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err("handoff record: two generations with the same number".into());
        }
        if let Some(g) = self.gens.iter().find(|g| g.id >= self.next_gen) {
            return Err(format!(
                "handoff record: generation {} is not below next_gen {}",
                g.id, self.next_gen
            ));
        }
        if let Some(c) = self.current
            && !ids.contains(&c)
        {
            return Err(format!("handoff record: current generation {c} is unknown"));
        }
        Ok(())
    }

    /// Whether the state is that of a restart in the middle of its re-exec, the only one a
    /// handoff record holds.
    pub fn mid_reexec(&self) -> bool {
        self.phase == Phase::ReExec
    }

    /// Keeps the generations for which `keep(id, pid, leader_alive)`; returns the others' ids.
    pub fn retain_gens(&mut self, mut keep: impl FnMut(GenId, i32, bool) -> bool) -> Vec<GenId> {
        let mut dropped = Vec::new();
        self.gens.retain(|g| {
            let k = keep(g.id, g.pid, g.leader_status.is_none());
            if !k {
                dropped.push(g.id);
            }
            k
        });
        if self.current.is_some_and(|c| dropped.contains(&c)) {
            self.current = None;
        }
        dropped
    }

    pub fn clients(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.iter().map(|w| w.client)
    }

    pub fn pids(&self) -> impl Iterator<Item = (GenId, i32, bool)> + '_ {
        self.gens
            .iter()
            .map(|g| (g.id, g.pid, g.leader_status.is_none()))
    }
}

fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Initial => "initial",
        Cause::Restart => "restart",
        Cause::Crash => "crash",
    }
}

fn cause_of(f: &Fields<'_>, i: usize) -> Result<Cause, String> {
    match f.word(i)? {
        "initial" => Ok(Cause::Initial),
        "restart" => Ok(Cause::Restart),
        "crash" => Ok(Cause::Crash),
        _ => Err(f.bad()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state with every field away from its default.
    pub fn full() -> State {
        State {
            gens: vec![
                Generation {
                    id: 3,
                    pid: 1200,
                    state: GenState::Draining {
                        kill_at: 9_000,
                        killed: true,
                    },
                    started: 10,
                    leader_status: Some(0),
                    last_check: None,
                },
                Generation {
                    id: 4,
                    pid: 1300,
                    state: GenState::Ready,
                    started: 20,
                    leader_status: None,
                    last_check: Some("GET /health answered 503 - 100% sure\nnext".into()),
                },
                Generation {
                    id: 5,
                    pid: 1400,
                    state: GenState::Starting {
                        deadline: 99,
                        alive_at: Some(55),
                    },
                    started: 30,
                    leader_status: None,
                    last_check: Some(String::new()),
                },
            ],
            next_gen: 6,
            current: Some(4),
            phase: Phase::Starting {
                generation: 5,
                cause: Cause::Crash,
            },
            pending_restart: true,
            seen_notify: true,
            crashes: vec![100, 2_000],
            exit_code: 3,
            last_outcome: Some(Outcome::RolledBack {
                generation: 2,
                reason: "exited with status 3".into(),
            }),
            restarts: 9,
            waiting: vec![
                Waiter {
                    client: 7,
                    target: 10,
                },
                Waiter {
                    client: 8,
                    target: 10,
                },
            ],
        }
    }

    fn round_trip(state: &State) -> State {
        let mut text = String::new();
        state.encode(&mut text);
        State::decode(text.lines().map(Fields::new)).unwrap()
    }

    #[test]
    fn every_field_round_trips() {
        let state = full();
        assert_ne!(state.gens, State::default().gens);
        assert_eq!(round_trip(&state), state);
        assert_eq!(round_trip(&State::default()), State::default());
    }

    #[test]
    fn every_phase_and_outcome_round_trips() {
        let phases = [
            Phase::Idle,
            Phase::ReExec,
            Phase::Backoff { respawn_at: 7 },
            Phase::Stopping {
                kill_at: 8,
                forced: true,
            },
        ];
        for phase in phases {
            let state = State { phase, ..full() };
            assert_eq!(round_trip(&state), state);
        }
        let outcomes = [
            Outcome::Ready {
                generation: 7,
                pid: 77,
                cause: Cause::Initial,
            },
            Outcome::Ready {
                generation: 7,
                pid: 77,
                cause: Cause::Restart,
            },
            Outcome::Failed {
                reason: "grace binary missing".into(),
            },
        ];
        for outcome in outcomes {
            let state = State {
                last_outcome: Some(outcome),
                ..full()
            };
            assert_eq!(round_trip(&state), state);
        }
    }

    #[test]
    fn keys_cover_what_is_written() {
        let mut text = String::new();
        full().encode(&mut text);
        for line in text.lines() {
            let key = line.split(' ').next().unwrap();
            assert!(KEYS.contains(&key), "{key} is missing from KEYS");
        }
    }

    #[test]
    fn inconsistent_states_are_refused() {
        let mut s = full();
        s.gens[1].id = 3;
        assert!(s.check().unwrap_err().contains("same number"));
        let mut s = full();
        s.next_gen = 5;
        assert!(s.check().unwrap_err().contains("next_gen"));
        let mut s = full();
        s.current = Some(42);
        assert!(s.check().unwrap_err().contains("unknown"));
        assert_eq!(full().check(), Ok(()));
    }
}
