use super::*;

fn policy() -> Policy {
    Policy {
        ready_timeout: 1_000,
        drain_timeout: 5_000,
        alive: AliveRule::Explicit,
        stop_signal: Signal::SIGTERM,
        max_draining: 2,
        max_waiting: 4,
        notify_ready: true,
        probe: false,
        on_crash: OnCrash::Exit,
        idle_wait: 1_000,
        steered: false,
    }
}

/// A supervisor with generation 1 (pid 100) serving.
fn serving(policy: Policy) -> Supervisor {
    let mut s = Supervisor::new(policy);
    assert_eq!(
        s.act(0, Event::Start),
        [Action::Spawn {
            generation: 1,
            take_over: true
        }]
    );
    let probing = s.policy.probe;
    let out = s.act(
        0,
        Event::Spawned {
            generation: 1,
            pid: 100,
        },
    );
    assert_eq!(out.is_empty(), !probing, "{out:?}");
    let mut out = s.act(10, Event::ProbePassed { generation: 1 });
    out.retain(|a| *a != Action::EndProbe { generation: 1 });
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
    assert_eq!(s.act(now, Event::RestartSignal), [Action::ReExec]);
    let out = s.act(now, Event::Adopted);
    let [Action::Spawn { generation, .. }] = out[..] else {
        panic!("{out:?}")
    };
    assert!(s.act(now, Event::Spawned { generation, pid }).is_empty());
    generation
}

#[test]
fn restart_hands_over_then_drains_the_old_generation() {
    let mut s = serving(policy());
    let generation = restart_to_spawn(&mut s, 100, 200);
    assert_eq!(generation, 2);
    let out = s.act(150, Event::ProbePassed { generation: 2 });
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
    assert_eq!(s.s.current, Some(2));
    assert_eq!(
        state(&s, 1),
        GenState::Draining {
            kill_at: 5_150,
            killed: false
        }
    );
    // The old one takes too long: its whole group is killed at the drain deadline.
    assert!(s.act(5_149, Event::Tick).is_empty());
    assert_eq!(s.act(5_150, Event::Tick), [Action::KillGroup { pgid: 100 }]);
    assert!(
        s.act(
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
    let out = s.act(
        120,
        Event::Exited {
            pid: 200,
            code: 3,
            group_empty: true,
        },
    );
    // Its group is known empty: no kill (the pgid could be anyone's by now).
    assert_eq!(
        out,
        [Action::Report(Outcome::RolledBack {
            generation: 2,
            reason: "exited with status 3".into()
        })]
    );
    assert_eq!(s.s.current, Some(1));
    assert_eq!(
        state(&s, 1),
        GenState::Ready,
        "the old generation is untouched"
    );
    assert_eq!(s.s.phase, Phase::Idle);
}

#[test]
fn a_new_generation_that_is_never_ready_is_rolled_back_at_the_timeout() {
    let mut s = serving(policy());
    restart_to_spawn(&mut s, 100, 200);
    assert_eq!(s.next_deadline(), Some(1_100));
    assert!(s.act(1_099, Event::Tick).is_empty());
    let out = s.act(1_100, Event::Tick);
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
    assert_eq!(s.act(6_100, Event::Tick), [Action::KillGroup { pgid: 200 }]);
    // Readiness arriving late is ignored.
    assert!(
        s.act(1_200, Event::ProbePassed { generation: 2 })
            .is_empty()
    );
    assert_eq!(s.s.current, Some(1));
    // Never retried by itself.
    assert!(
        s.act(
            10_000,
            Event::Exited {
                pid: 200,
                code: 137,
                group_empty: true
            }
        )
        .is_empty()
    );
    assert!(s.act(20_000, Event::Tick).is_empty());
}

#[test]
fn restarts_during_a_restart_coalesce_into_one() {
    let mut s = serving(policy());
    restart_to_spawn(&mut s, 100, 200);
    for _ in 0..20 {
        assert!(s.act(110, Event::RestartSignal).is_empty());
    }
    let out = s.act(150, Event::ProbePassed { generation: 2 });
    assert_eq!(
        out.iter().filter(|a| **a == Action::ReExec).count(),
        1,
        "{out:?}"
    );
    assert!(!s.s.pending_restart);
    assert_eq!(s.s.phase, Phase::ReExec);
}

#[test]
fn draining_generations_are_capped_oldest_first() {
    let mut s = serving(policy());
    for (i, pid) in [200, 300, 400].into_iter().enumerate() {
        let generation = restart_to_spawn(&mut s, 100 * i as u64 + 100, pid);
        let out = s.act(100 * i as u64 + 150, Event::ProbePassed { generation });
        if i == 2 {
            assert!(out.contains(&Action::KillGroup { pgid: 100 }), "{out:?}");
        }
    }
    let draining =
        s.s.gens
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
    assert!(s.act(700, Event::Tick).contains(&Action::Signal {
        pid: 100,
        signal: Signal::SIGTERM
    }));

    let mut s = serving(Policy {
        alive: AliveRule::Auto(500),
        ..policy()
    });
    s.s.seen_notify = true;
    restart_to_spawn(&mut s, 100, 200);
    assert!(s.act(700, Event::Tick).is_empty(), "must wait for READY=1");
    assert!(!s.act(800, Event::ProbePassed { generation: 2 }).is_empty());
}

#[test]
fn stop_drains_everything_and_exits_zero_when_honoured() {
    let mut s = serving(policy());
    let out = s.act(100, Event::StopSignal(Signal::SIGTERM));
    assert_eq!(
        out,
        [
            Action::Stopping,
            Action::Signal {
                pid: 100,
                signal: Signal::SIGTERM
            }
        ]
    );
    assert!(
        s.act(100, Event::RestartSignal).is_empty(),
        "no restart while stopping"
    );
    let out = s.act(
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
    s.act(100, Event::StopSignal(Signal::SIGTERM));
    assert_eq!(
        s.act(110, Event::StopSignal(Signal::SIGTERM)),
        [Action::KillGroup { pgid: 100 }]
    );
    assert_eq!(
        s.act(
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
    let out = s.act(
        100,
        Event::Exited {
            pid: 100,
            code: 7,
            group_empty: true,
        },
    );
    assert_eq!(out, [Action::Stopping, Action::Exit(7)]);
    // Workers left behind are killed with the group.
    let mut s = serving(policy());
    let out = s.act(
        100,
        Event::Exited {
            pid: 100,
            code: 7,
            group_empty: false,
        },
    );
    assert_eq!(out, [Action::KillGroup { pgid: 100 }, Action::Stopping]);
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
        s.act(
            now,
            Event::Exited {
                pid,
                code: 1,
                group_empty: true,
            },
        );
        let Phase::Backoff { respawn_at } = s.s.phase else {
            panic!("{:?}", s.s.phase)
        };
        assert_eq!(
            respawn_at - now,
            (BACKOFF_FIRST << (crash - 1)).min(BACKOFF_MAX)
        );
        now = respawn_at;
        let out = s.act(now, Event::Tick);
        let [Action::Spawn { generation, .. }] = out[..] else {
            panic!("{out:?}")
        };
        pid += 1;
        s.act(now, Event::Spawned { generation, pid });
        let out = s.act(now, Event::ProbePassed { generation });
        assert!(matches!(
            out[..],
            [Action::Report(Outcome::Ready {
                cause: Cause::Crash,
                ..
            })]
        ));
    }
    let out = s.act(
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
    s.act(0, Event::Start);
    let out = s.act(
        0,
        Event::SpawnFailed {
            generation: 1,
            reason: "not found".into(),
            code: 127,
        },
    );
    assert_eq!(out, [Action::Stopping, Action::Exit(127)]);

    let mut s = Supervisor::new(policy());
    s.act(0, Event::Start);
    s.act(
        0,
        Event::Spawned {
            generation: 1,
            pid: 100,
        },
    );
    s.act(
        0,
        Event::Exited {
            pid: 100,
            code: 2,
            group_empty: true,
        },
    );
    assert_eq!(
        s.s.phase,
        Phase::Stopping {
            kill_at: 5_000,
            forced: false
        }
    );
    assert!(s.s.gens.is_empty());
    assert_eq!(s.s.exit_code, 2);
}

#[test]
fn a_reexec_failure_is_reported_and_keeps_serving() {
    let mut s = serving(policy());
    assert_eq!(s.act(100, Event::RestartSignal), [Action::ReExec]);
    let out = s.act(100, Event::ReExecFailed("binary missing".into()));
    assert_eq!(
        out,
        [Action::Report(Outcome::Failed {
            reason: "binary missing".into()
        })]
    );
    assert_eq!(s.s.phase, Phase::Idle);
    assert_eq!(s.s.current, Some(1));
}

#[test]
fn a_reexec_failure_during_a_crash_backoff_keeps_the_crash_policy_going() {
    let mut s = serving(Policy {
        on_crash: OnCrash::Restart,
        ..policy()
    });
    s.act(
        100,
        Event::Exited {
            pid: 100,
            code: 1,
            group_empty: true,
        },
    );
    assert!(matches!(s.s.phase, Phase::Backoff { .. }));
    assert_eq!(s.act(110, Event::RestartSignal), [Action::ReExec]);
    s.act(110, Event::ReExecFailed("binary missing".into()));
    let Phase::Backoff { respawn_at } = s.s.phase else {
        panic!("left idle with nothing serving: {:?}", s.s.phase);
    };
    let out = s.act(respawn_at, Event::Tick);
    assert!(matches!(out[..], [Action::Spawn { .. }]), "{out:?}");
}

#[test]
fn a_crash_during_a_rolled_back_restart_exits_with_the_crashed_status() {
    let mut s = serving(policy());
    restart_to_spawn(&mut s, 100, 200);
    s.act(
        110,
        Event::Exited {
            pid: 100,
            code: 7,
            group_empty: true,
        },
    );
    assert_eq!(s.s.current, None);
    let out = s.act(1_100, Event::Tick);
    assert!(
        out.contains(&Action::Signal {
            pid: 200,
            signal: Signal::SIGTERM
        }),
        "{out:?}"
    );
    let out = s.act(
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
        s.act(5, Event::Forward(Signal::SIGHUP)),
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
    s.act(150, Event::ProbePassed { generation });
    s.act(
        200,
        Event::Exited {
            pid: 100,
            code: 0,
            group_empty: false,
        },
    );
    assert!(s.generation(1).is_some());
    assert_eq!(s.act(5_150, Event::Tick), [Action::KillGroup { pgid: 100 }]);
    s.act(5_200, Event::GroupGone { generation: 1 });
    assert!(s.generation(1).is_none());
}

impl Supervisor {
    /// `step` without the log lines.
    fn act(&mut self, now: Millis, event: Event) -> Vec<Action> {
        let mut out = self.step(now, event);
        // Steering is asserted where it matters, through `step`.
        out.retain(|a| !matches!(a, Action::Log(..) | Action::Steer { .. }));
        out
    }
}

fn control(s: &mut Supervisor, now: Millis, client: ClientId, request: Request) -> Vec<Action> {
    s.act(now, Event::Control { client, request })
}

fn reply(client: ClientId, line: &str) -> Action {
    Action::Reply {
        client,
        line: line.into(),
        hold: false,
    }
}

#[test]
fn a_restart_client_gets_the_outcome_of_the_restart_that_includes_it() {
    let mut s = serving(policy());
    assert_eq!(control(&mut s, 100, 7, Request::Restart), [Action::ReExec]);
    // Asked while it runs: merged into the next one, and answered by that one.
    assert!(control(&mut s, 100, 8, Request::Restart).is_empty());
    assert!(s.act(100, Event::Adopted).contains(&Action::Spawn {
        generation: 2,
        take_over: false
    }));
    s.act(
        100,
        Event::Spawned {
            generation: 2,
            pid: 200,
        },
    );
    let out = s.act(150, Event::ProbePassed { generation: 2 });
    assert!(
        out.contains(&reply(7, "ok generation=2 pid=200")),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Reply { client: 8, .. }))
    );
    assert!(out.contains(&Action::ReExec), "the merged restart follows");
    s.act(150, Event::Adopted);
    s.act(
        150,
        Event::Spawned {
            generation: 3,
            pid: 300,
        },
    );
    let out = s.act(
        160,
        Event::Exited {
            pid: 300,
            code: 3,
            group_empty: true,
        },
    );
    assert!(
        out.contains(&reply(8, "failed generation 3 exited with status 3")),
        "{out:?}"
    );
}

#[test]
fn restart_clients_are_capped_and_refused_while_stopping() {
    let mut s = serving(policy());
    for client in 0..4 {
        control(&mut s, 100, client, Request::Restart);
    }
    assert_eq!(
        control(&mut s, 100, 9, Request::Restart),
        [reply(
            9,
            "failed too many clients waiting for a restart (4)"
        )]
    );
    // A stop answers every waiting client, and later ones are refused.
    let out = control(&mut s, 110, 10, Request::Stop);
    assert_eq!(
        out[0],
        Action::Reply {
            client: 10,
            line: "stopping".into(),
            hold: true
        }
    );
    for client in 0..4 {
        assert!(
            out.contains(&reply(client, "failed grace is stopping")),
            "{out:?}"
        );
    }
    assert_eq!(
        control(&mut s, 120, 11, Request::Restart),
        [reply(11, "failed grace is stopping")]
    );
    assert_eq!(
        control(&mut s, 120, 12, Request::StatusText),
        [Action::Status {
            client: 12,
            text: true
        }]
    );
}

#[test]
fn notify_counts_only_where_the_ready_mode_says_so() {
    // A probe mode: READY=1 is noted (auto would wait for it later) but the probe decides.
    let mut s = serving(Policy {
        notify_ready: false,
        probe: true,
        ..policy()
    });
    assert_eq!(s.act(100, Event::RestartSignal), [Action::ReExec]);
    s.act(100, Event::Adopted);
    assert_eq!(
        s.act(
            100,
            Event::Spawned {
                generation: 2,
                pid: 200
            }
        ),
        [Action::Probe {
            generation: 2,
            pid: 200
        }]
    );
    let ready = Event::Notify {
        pid: 201,
        generation: Some(2),
        ready: true,
    };
    assert!(s.act(110, ready).is_empty());
    assert!(s.s.seen_notify);
    assert_eq!(
        state(&s, 2),
        GenState::Starting {
            deadline: 1_100,
            alive_at: None
        }
    );
    // A failed check is the rollback's reason.
    s.act(
        120,
        Event::ProbeFailed {
            generation: 2,
            error: "GET /health answered 503".into(),
        },
    );
    let out = s.act(1_100, Event::Tick);
    assert!(out.contains(&Action::EndProbe { generation: 2 }), "{out:?}");
    assert!(out.contains(&Action::Report(Outcome::RolledBack {
        generation: 2,
        reason: "was not ready within 1s (last check: GET /health answered 503)".into()
    })));
    // A datagram from outside every generation: a rate-limited warning, nothing else.
    let out = s.step(
        1_200,
        Event::Notify {
            pid: 999,
            generation: None,
            ready: true,
        },
    );
    assert!(
        matches!(&out[..], [Action::Log(Level::Untrusted, line)] if line.contains("pid 999")),
        "{out:?}"
    );
}

#[test]
fn a_leader_reaped_in_the_same_wakeup_as_a_stop_is_never_signalled() {
    // The loop hands over the reaped exit before the signal of the same wake-up.
    let mut s = serving(policy());
    let exited = Event::Exited {
        pid: 100,
        code: 0,
        group_empty: false,
    };
    let mut out = s.act(100, exited);
    out.extend(s.act(100, Event::StopSignal(Signal::SIGTERM)));
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Signal { pid: 100, .. })),
        "{out:?}"
    );
    // Its workers are still there: only their group is killed.
    assert!(out.contains(&Action::KillGroup { pgid: 100 }), "{out:?}");

    // Same for a drain: the old leader is gone before the new generation is ready.
    let mut s = serving(Policy {
        on_crash: OnCrash::Restart,
        ..policy()
    });
    let generation = restart_to_spawn(&mut s, 100, 200);
    let mut out = s.act(
        110,
        Event::Exited {
            pid: 100,
            code: 0,
            group_empty: true,
        },
    );
    out.extend(s.act(110, Event::ProbePassed { generation }));
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Signal { pid: 100, .. })),
        "{out:?}"
    );
    // Forwarded signals skip a reaped leader too.
    let mut s = serving(policy());
    s.act(
        100,
        Event::Exited {
            pid: 100,
            code: 0,
            group_empty: false,
        },
    );
    assert!(s.act(100, Event::Forward(Signal::SIGHUP)).is_empty());
}

#[test]
fn refused_restarts_during_a_crash_backoff_are_not_counted_as_crashes() {
    let mut s = serving(Policy {
        on_crash: OnCrash::Restart,
        ..policy()
    });
    s.act(
        100,
        Event::Exited {
            pid: 100,
            code: 1,
            group_empty: true,
        },
    );
    for i in 0..MAX_CRASHES as u64 + 2 {
        assert_eq!(s.act(110 + i, Event::RestartSignal), [Action::ReExec]);
        let out = s.act(110 + i, Event::ReExecFailed("binary missing".into()));
        assert!(!out.iter().any(|a| matches!(a, Action::Exit(_))), "{out:?}");
    }
    assert_eq!(s.s.crashes.len(), 1);
    assert!(matches!(s.s.phase, Phase::Backoff { .. }));
    assert!(matches!(
        s.act(200, Event::Tick)[..],
        [Action::Spawn { .. }]
    ));
}

fn steered() -> Policy {
    Policy {
        steered: true,
        ..policy()
    }
}

/// Restart to ready with steered sockets: generation 2 (pid 200) serves, 1 (pid 100) finishes.
fn switched(now: Millis) -> Supervisor {
    let mut s = serving(steered());
    let generation = restart_to_spawn(&mut s, now, 200);
    let out = s.step(now, Event::ProbePassed { generation });
    assert!(out.contains(&Action::Steer { generation: 2 }), "{out:?}");
    assert!(
        !out.iter().any(|a| matches!(a, Action::Signal { .. })),
        "no stop signal at the switch: {out:?}"
    );
    s
}

fn measure(s: &mut Supervisor, now: Millis, wait: Wait, count: usize) -> Vec<Action> {
    let out = s.act(now, Event::Tick);
    assert_eq!(
        out,
        [Action::Measure {
            generation: 1,
            pid: 100,
            wait
        }]
    );
    s.act(
        now,
        Event::Measured {
            generation: 1,
            wait,
            count,
        },
    )
}

#[test]
fn a_steered_handover_waits_for_the_queue_then_for_idle_then_stops() {
    let mut s = switched(100);
    assert!(matches!(
        state(&s, 1),
        GenState::Finishing {
            wait: Wait::Queue,
            ..
        }
    ));
    // Three still queued: looked at again a little later, not stopped.
    assert!(measure(&mut s, 100, Wait::Queue, 3).is_empty());
    let deadline = s.next_deadline().unwrap();
    assert!(deadline > 100 && deadline <= 100 + CHECK_MAX, "{deadline}");
    assert!(s.act(deadline - 1, Event::Tick).is_empty());
    assert!(measure(&mut s, deadline, Wait::Queue, 0).is_empty());
    assert!(matches!(
        state(&s, 1),
        GenState::Finishing {
            wait: Wait::Idle,
            ..
        }
    ));
    let t = s.next_deadline().unwrap();
    assert_eq!(
        measure(&mut s, t, Wait::Idle, 0),
        [Action::Signal {
            pid: 100,
            signal: Signal::SIGTERM
        }]
    );
    assert!(matches!(
        state(&s, 1),
        GenState::Draining { killed: false, .. }
    ));
}

#[test]
fn every_wait_is_bounded() {
    let stop = [Action::Signal {
        pid: 100,
        signal: Signal::SIGTERM,
    }];
    // The queue never empties: the stop goes at the drain timeout, with no idle wait after it.
    let mut s = switched(100);
    let mut now = 100;
    loop {
        let out = measure(&mut s, now, Wait::Queue, 7);
        if !out.is_empty() {
            assert_eq!(out, stop);
            break;
        }
        now = s.next_deadline().unwrap();
        assert!(
            now <= 100 + 5_000,
            "queue wait past the drain timeout: {now}"
        );
    }
    assert_eq!(now, 100 + 5_000);
    assert!(matches!(state(&s, 1), GenState::Draining { .. }));

    // The queue empties, the connections never close: the stop goes at --idle-wait.
    let mut s = switched(100);
    assert!(measure(&mut s, 300, Wait::Queue, 0).is_empty());
    loop {
        now = s.next_deadline().unwrap();
        assert!(now <= 300 + 1_000, "idle wait past --idle-wait: {now}");
        let out = measure(&mut s, now, Wait::Idle, 12);
        if !out.is_empty() {
            assert_eq!(out, stop);
            break;
        }
    }
    assert_eq!(now, 300 + 1_000);
}

#[test]
fn a_new_handover_or_a_stop_ends_the_wait_at_once() {
    let mut s = switched(100);
    let generation = restart_to_spawn(&mut s, 200, 300);
    let out = s.act(250, Event::ProbePassed { generation });
    assert!(
        out.contains(&Action::Signal {
            pid: 100,
            signal: Signal::SIGTERM
        }),
        "{out:?}"
    );
    assert!(matches!(state(&s, 1), GenState::Draining { .. }));
    assert!(matches!(state(&s, 2), GenState::Finishing { .. }));
    let out = s.act(300, Event::StopSignal(Signal::SIGTERM));
    assert!(
        out.contains(&Action::Signal {
            pid: 200,
            signal: Signal::SIGTERM
        }),
        "{out:?}"
    );
    assert!(matches!(state(&s, 2), GenState::Draining { .. }));
}

#[test]
fn a_generation_that_dies_while_finishing_is_no_crash() {
    let mut s = switched(100);
    let out = s.act(
        150,
        Event::Exited {
            pid: 100,
            code: 1,
            group_empty: true,
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert!(s.generation(1).is_none());
    assert_eq!(s.current().unwrap().id, 2);
    assert_eq!(*s.phase(), Phase::Idle);
}

#[test]
fn a_finishing_generation_survives_the_handoff_record() {
    let s = switched(100);
    let mut text = String::new();
    s.state().encode(&mut text);
    assert!(text.contains("finishing-queue"), "{text}");
    let back = State::decode(text.lines().map(crate::fields::Fields::new)).unwrap();
    let restored = Supervisor::restore(steered(), back);
    let GenState::Finishing {
        wait,
        deadline,
        check_at,
        ..
    } = restored.generation(1).unwrap().state
    else {
        panic!("{text}")
    };
    assert_eq!((wait, deadline, check_at), (Wait::Queue, 100 + 5_000, 0));
}

#[test]
fn a_crash_while_a_steered_successor_starts_hands_the_queue_to_a_take_over() {
    let mut s = serving(Policy {
        on_crash: OnCrash::Restart,
        ..steered()
    });
    let successor = restart_to_spawn(&mut s, 100, 200);
    // The serving generation dies; its socket holds the clients that queue from now on.
    let out = s.act(
        150,
        Event::Exited {
            pid: 100,
            code: 1,
            group_empty: true,
        },
    );
    assert!(
        out.contains(&Action::Signal {
            pid: 200,
            signal: Signal::SIGTERM
        }),
        "the successor, on a socket no client reaches, is stopped: {out:?}"
    );
    assert!(
        out.iter().any(|a| matches!(a, Action::Report(Outcome::RolledBack { generation, .. }) if *generation == successor)),
        "{out:?}"
    );
    let Phase::Backoff { respawn_at } = s.s.phase else {
        panic!("{:?}", s.s.phase)
    };
    let out = s.act(respawn_at, Event::Tick);
    assert!(
        matches!(
            out[..],
            [Action::Spawn {
                take_over: true,
                ..
            }]
        ),
        "the next one takes the socket over: {out:?}"
    );
}

#[test]
fn a_crash_while_a_shared_socket_successor_starts_lets_it_go_on() {
    let mut s = serving(Policy {
        on_crash: OnCrash::Restart,
        ..policy()
    });
    let successor = restart_to_spawn(&mut s, 100, 200);
    let out = s.act(
        150,
        Event::Exited {
            pid: 100,
            code: 1,
            group_empty: true,
        },
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Signal { .. })),
        "{out:?}"
    );
    assert_eq!(
        *s.phase(),
        Phase::Starting {
            generation: successor,
            cause: Cause::Restart
        }
    );
}
