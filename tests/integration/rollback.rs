//! Broken new versions are rolled back while the old generation keeps serving; drains are
//! bounded; restart storms coalesce.

use std::time::Duration;

use crate::harness::{
    Grace, alive, descendants, example, http_get, proc_state, served_by, served_by_other, temp_dir,
    wait_for,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(20);

/// grace running the example server with a behaviour file that the test rewrites between
/// generations.
fn start(extra: &[&str]) -> (Grace, std::path::PathBuf) {
    let dir = temp_dir("rollback");
    let behavior = dir.join("behavior");
    let server = example("fault_server");
    let mut args = vec!["run", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let behavior_arg = behavior.to_str().unwrap().to_string();
    let server_arg = server.to_str().unwrap().to_string();
    let mut all: Vec<&str> = args;
    all.extend(["--", &server_arg, "--behavior-file", &behavior_arg]);
    let grace = Grace::start(&all).owning(dir);
    grace.wait_line(") is serving", T);
    (grace, behavior)
}

fn assert_rolls_back(extra: &[&str], behavior_words: &str, reason: &str) {
    let (grace, behavior) = start(extra);
    let addr = grace.addr();
    let old = served_by(&http_get(addr, "/").unwrap().1);
    let load = Load::start(addr, 3, "/");
    load.wait_more(50, T);
    std::fs::write(&behavior, behavior_words).unwrap();
    grace.signal("USR2");
    let line = grace.wait_line("restart failed", T);
    assert!(line.contains(reason), "expected {reason:?} in {line:?}");
    load.wait_more(50, T);
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}\n{}",
        &tally.errors[..tally.errors.len().min(5)],
        grace.describe()
    );
    // The broken generation is gone (stopped and reaped), the old one is untouched and serving.
    wait_for("the broken generation to be reaped", T, || {
        (grace.children() == [old]).then_some(())
    });
    assert!(alive(old));
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), old);
    // And a later, good restart still works.
    std::fs::write(&behavior, "").unwrap();
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    served_by_other(addr, old);
}

#[test]
fn a_new_generation_that_exits_at_once_is_rolled_back() {
    assert_rolls_back(&[], "exit-immediately", "exited with status 3");
}

#[test]
fn a_new_generation_that_never_becomes_ready_is_rolled_back() {
    assert_rolls_back(
        &["--ready", "notify", "--ready-timeout", "1s"],
        "never-ready",
        "was not ready within 1s",
    );
}

#[test]
fn a_failing_http_check_is_rolled_back_with_the_last_answer() {
    assert_rolls_back(
        &["--ready", "http:/health", "--ready-timeout", "1s"],
        "unhealthy",
        "GET /health answered 503",
    );
}

#[test]
fn http_and_exec_checks_gate_the_handover() {
    for ready in ["http:/health", "tcp", "exec:true", "delay:300ms"] {
        let (grace, _behavior) = start(&["--ready", ready]);
        let addr = grace.addr();
        let old = served_by(&http_get(addr, "/").unwrap().1);
        grace.signal("USR2");
        grace.wait_line_count(") is serving", 2, T);
        served_by_other(addr, old);
    }
}

#[test]
fn an_old_generation_that_ignores_the_stop_signal_is_killed_after_the_drain_timeout() {
    let (grace, behavior) = start(&["--drain-timeout", "1s"]);
    std::fs::write(&behavior, "ignore-term").unwrap();
    // Generation 2 ignores SIGTERM; generation 3 replaces it.
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    let stubborn = grace.serving_pids()[1];
    std::fs::write(&behavior, "").unwrap();
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 3, T);
    grace.wait_line(
        "still running after the drain timeout",
        Duration::from_secs(5),
    );
    wait_for("the stubborn generation to be reaped", T, || {
        (!alive(stubborn) && proc_state(stubborn).is_none()).then_some(())
    });
    assert_eq!(grace.children().len(), 1);
}

#[test]
fn a_restart_storm_ends_with_one_generation_and_no_leaks() {
    let (grace, _behavior) = start(&[]);
    let addr = grace.addr();
    // Measured after one restart: the first image may hold fds it inherited (close-on-exec).
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    wait_for("the first generation to be reaped", T, || {
        (grace.children().len() == 1).then_some(())
    });
    let fds_before = grace.fd_count();
    let before = grace.count_lines(") is serving");
    let load = Load::start(addr, 2, "/");
    // One burst, back to back (a `kill` process per signal would spread it over many restarts).
    for _ in 0..25 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(grace.pid()),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .unwrap();
    }
    // Coalesced: at least one restart, far fewer than 25, then quiet.
    grace.wait_line_count(") is serving", before + 1, T);
    let settled = wait_for("the storm to settle", Duration::from_secs(30), || {
        let n = grace.count_lines(") is serving");
        std::thread::sleep(Duration::from_millis(1500));
        (grace.count_lines(") is serving") == n && grace.children().len() == 1)
            .then_some(n - before)
    });
    // The first request restarts; every other one lands during it and is merged into one more.
    assert!(
        settled <= 2,
        "{settled} generations for one storm: restarts were not coalesced"
    );
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    let tree = descendants(grace.pid());
    assert_eq!(
        tree.len(),
        1,
        "one serving generation, nothing else: {tree:?}"
    );
    for pid in tree {
        assert_ne!(proc_state(pid), Some('Z'), "zombie {pid}");
    }
    assert_eq!(
        grace.fd_count(),
        fds_before,
        "grace's fds are the same as before the storm"
    );
}

#[test]
fn a_failing_exec_check_is_rolled_back_with_its_status() {
    let dir = temp_dir("exec-check");
    let flag = dir.join("broken");
    let check = format!("exec:test ! -e {}", flag.display());
    let (grace, _behavior) = start(&["--ready", &check, "--ready-timeout", "1s"]);
    let old = served_by(&http_get(grace.addr(), "/").unwrap().1);
    std::fs::write(&flag, "").unwrap();
    grace.signal("USR2");
    let line = grace.wait_line("restart failed", T);
    assert!(line.contains("ready check exited with status 1"), "{line}");
    assert_eq!(served_by(&http_get(grace.addr(), "/").unwrap().1), old);
    std::fs::remove_file(&flag).unwrap();
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    served_by_other(grace.addr(), old);
}

#[test]
fn draining_generations_are_capped_oldest_killed_first() {
    let (grace, behavior) = start(&["--max-draining", "1", "--drain-timeout", "60s"]);
    std::fs::write(&behavior, "ignore-term").unwrap();
    let mut stubborn = Vec::new();
    for n in 2..=3 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", n, T);
        stubborn.push(grace.serving_pids()[n - 1]);
    }
    // Generation 2 drains (forever, it ignores SIGTERM); generation 3 joins it: one too many.
    std::fs::write(&behavior, "").unwrap();
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 4, T);
    grace.wait_line("too many generations draining: killing generation 2", T);
    wait_for("generation 2 to be killed", T, || {
        (!alive(stubborn[0])).then_some(())
    });
    assert!(
        alive(stubborn[1]),
        "generation 3 is still draining, within its timeout"
    );
}
