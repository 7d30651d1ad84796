//! Stopping, exit statuses, crashes and signal forwarding.

use std::time::Duration;

use crate::harness::{Grace, alive, example, http_get, served_by, temp_dir};

const T: Duration = Duration::from_secs(20);

fn code(grace: &mut Grace) -> Option<i32> {
    grace.wait_exit(T).code()
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let mut grace = Grace::serve(&[]);
    let addr = grace.addr();
    grace.wait_line(") is serving", T);
    let slow = std::thread::spawn(move || http_get(addr, "/sleep?duration=1s"));
    std::thread::sleep(Duration::from_millis(300));
    grace.signal("TERM");
    let (status, _) = slow.join().unwrap().unwrap();
    assert_eq!(status, 200, "the in-flight request finished");
    assert_eq!(code(&mut grace), Some(0));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing left bound"
    );
}

#[test]
fn sigint_is_a_graceful_stop_too_and_a_second_one_kills() {
    let dir = temp_dir("stop");
    let behavior = dir.join("b");
    std::fs::write(&behavior, "ignore-term").unwrap();
    let server = example("fault_server");
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--",
        server.to_str().unwrap(),
        "--behavior-file",
        behavior.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    let pid = served_by(&http_get(grace.addr(), "/").unwrap().1);
    grace.signal("INT");
    grace.wait_line("SIGINT: stopping", T);
    assert!(
        alive(pid),
        "the server ignores SIGTERM and keeps running for now"
    );
    grace.signal("INT");
    assert_eq!(
        code(&mut grace),
        Some(128 + 9),
        "killed at once by the second stop"
    );
    assert!(!alive(pid));
}

#[test]
fn exit_status_follows_the_server() {
    let server = example("fault_server");
    let server = server.to_str().unwrap();
    for (behavior, expected) in [("exit-immediately", 3), ("crash-after-ready", 4)] {
        let mut grace = Grace::start(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            server,
            "--behavior",
            behavior,
        ]);
        assert_eq!(
            code(&mut grace),
            Some(expected),
            "{behavior}\n{}",
            grace.describe()
        );
    }
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--",
        server,
        "--behavior",
        "exit-code=9",
    ]);
    grace.wait_line(") is serving", T);
    grace.signal("TERM");
    assert_eq!(
        code(&mut grace),
        Some(9),
        "a server that exits non-zero on stop"
    );
}

#[test]
fn killed_by_a_signal_is_128_plus_n() {
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "delay:100ms",
        "--",
        "sh",
        "-c",
        "kill -USR1 $$",
    ]);
    assert_eq!(code(&mut grace), Some(128 + 10));
}

#[test]
fn on_crash_restart_keeps_the_sockets_and_starts_a_new_generation() {
    let dir = temp_dir("crash");
    let behavior = dir.join("b");
    let server = example("fault_server");
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--on-crash",
        "restart",
        "--",
        server.to_str().unwrap(),
        "--behavior-file",
        behavior.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    let addr = grace.addr();
    let first = served_by(&http_get(addr, "/").unwrap().1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // A request sent while nothing serves waits in the queue and is answered by the next one.
    let (status, body) = http_get(addr, "/").unwrap();
    assert_eq!(status, 200);
    assert_ne!(served_by(&body), first);
    grace.wait_line("exited with status 137", T);
}

#[test]
fn on_crash_restart_gives_up_after_repeated_crashes() {
    let server = example("fault_server");
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--on-crash",
        "restart",
        "--",
        server.to_str().unwrap(),
        "--behavior",
        "crash-after-ready",
    ]);
    assert_eq!(grace.wait_exit(Duration::from_secs(60)).code(), Some(4));
    assert!(grace.output().contains("giving up"), "{}", grace.describe());
}

#[test]
fn hup_is_forwarded_to_the_current_generation() {
    let dir = temp_dir("hup");
    let out = dir.join("hup");
    let script = format!(
        "trap 'echo hup > {}' HUP; while :; do sleep 0.05; done",
        out.display()
    );
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "delay:100ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    grace.wait_line(") is serving", T);
    grace.signal("HUP");
    crate::harness::wait_for("the server to get SIGHUP", T, || {
        std::fs::read_to_string(&out).ok()
    });
}
