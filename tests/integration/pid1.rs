//! grace as a container's init: PID 1 in a new pid namespace (`unshare --pid --fork`).

use std::time::Duration;

use crate::harness::{Grace, example, http_get};

const T: Duration = Duration::from_secs(20);

fn unshare() -> &'static str {
    let path = "/usr/bin/unshare";
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing (util-linux)"
    );
    path
}

#[test]
fn as_pid_1_orphans_are_reaped_and_the_status_propagates() {
    let grace = crate::harness::grace_bin();
    // The command orphans a grandchild (its subshell exits at once), which then belongs to PID 1.
    let mut run = Grace::start_raw(
        unshare(),
        &[
            "--pid",
            "--fork",
            "--mount-proc",
            grace.to_str().unwrap(),
            "run",
            "--listen",
            "127.0.0.1:0",
            "--ready",
            "delay:100ms",
            "--",
            "/bin/sh",
            "-c",
            "(sleep 0.3 &) ; sleep 1; echo pid=$$; exit 7",
        ],
    );
    let status = run.wait_exit(T);
    assert_eq!(status.code(), Some(7), "{}", run.describe());
    let out = run.output();
    assert!(
        out.contains("reaped pid"),
        "the orphaned sleep was reaped by grace:\n{out}"
    );
    assert!(
        out.contains("pid=2"),
        "the server is PID 2, grace is PID 1:\n{out}"
    );
}

#[test]
fn as_pid_1_sigterm_drains_and_restart_works() {
    let grace = crate::harness::grace_bin();
    let server = example("fault_server");
    let run = Grace::start_raw(
        unshare(),
        &[
            "--pid",
            "--fork",
            "--mount-proc",
            grace.to_str().unwrap(),
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            server.to_str().unwrap(),
        ],
    );
    let addr = run.addr();
    run.wait_line(") is serving", T);
    // grace is unshare's only child; signals from outside the namespace reach it because grace
    // blocks them (a PID 1 drops signals it neither handles nor blocks).
    let init = crate::harness::wait_for("grace inside the namespace", T, || {
        run.children().first().copied()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    run.wait_line_count(") is serving", 2, T);
    assert_eq!(http_get(addr, "/").unwrap().0, 200);
    let mut run = run;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(run.wait_exit(T).code(), Some(0), "{}", run.describe());
}
