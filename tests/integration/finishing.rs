//! Faults while an old generation finishes behind a steered socket: a restart, `grace restart`
//! or SIGTERM in its idle wait ends the wait at once; a generation that dies in it is reaped, no
//! crash; one that stops accepting is stopped at the drain timeout; a stranger's socket in the
//! group is reported and gets no connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{
    Grace, example, fixture, grace_bin, http_get, require, served_by, temp_dir, wait_for,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(30);

/// grace running the fault server with `extra` options and a control socket in `dir`.
fn start(dir: &Path, extra: &[&str]) -> Grace {
    let control = dir.join("ctl");
    let server = example("fault_server");
    let mut args = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.extend(["--", server.to_str().unwrap()]);
    let grace = Grace::start(&args);
    grace.wait_line(") is serving", T);
    grace
}

/// A keep-alive connection that has had one answer; returns it and the pid that answered.
fn keep_alive(addr: SocketAddr) -> (TcpStream, i32) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (conn, served_by(&String::from_utf8_lossy(&body)))
}

fn status(dir: &Path) -> serde_json::Value {
    let out = Command::new(grace_bin())
        .args(["status", "--json", "--control"])
        .arg(dir.join("ctl"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The states of the generations, oldest first.
fn states(dir: &Path) -> Vec<String> {
    status(dir)["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["state"].as_str().unwrap().to_string())
        .collect()
}

fn group_size(dir: &Path) -> u64 {
    status(dir)["listen"][0]["sockets"].as_u64().unwrap()
}

fn grace_restart(dir: &Path) {
    let out = Command::new(grace_bin())
        .args(["restart", "--control"])
        .arg(dir.join("ctl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_restart_or_a_stop_in_the_idle_wait_ends_it_at_once() {
    let dir = temp_dir("finishing");
    // The idle wait would outlast the test: whatever ends it early is what ends it.
    let mut grace = start(&dir, &["--idle-wait", "120s"]);
    let addr = grace.addr();
    let (_held1, pid1) = keep_alive(addr);
    grace.signal("USR2");
    grace.wait_line("generation 1: queue empty", T);
    assert_eq!(states(&dir), ["finishing", "ready"]);
    // A new connection goes to generation 2; generation 1 keeps the one it has.
    let (_held2, pid2) = keep_alive(addr);
    assert_ne!(pid2, pid1);

    // `grace restart`: at generation 3's ready, generation 1's wait ends with the stop signal;
    // generation 2 begins its own.
    let at = Instant::now();
    grace_restart(&dir);
    grace.wait_line(&format!("generation 1 (pid {pid1}) exited"), T);
    assert!(at.elapsed() < Duration::from_secs(20), "{:?}", at.elapsed());
    grace.wait_line("generation 2: queue empty", T);

    // SIGUSR2 does the same for generation 2.
    let at = Instant::now();
    grace.signal("USR2");
    grace.wait_line(&format!("generation 2 (pid {pid2}) exited"), T);
    assert!(at.elapsed() < Duration::from_secs(20), "{:?}", at.elapsed());
    // Generation 3 holds no connection: idle at once.
    grace.wait_line("generation 3 idle after", T);

    // SIGTERM in the idle wait: grace stops everything and exits now, not in two minutes.
    let (_held4, _) = keep_alive(addr);
    grace.signal("USR2");
    grace.wait_line("generation 4: queue empty", T);
    let at = Instant::now();
    grace.signal("TERM");
    assert_eq!(grace.wait_exit(T).code(), Some(0), "{}", grace.describe());
    assert!(at.elapsed() < Duration::from_secs(20), "{:?}", at.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_generation_that_dies_in_its_idle_wait_is_reaped_and_no_crash() {
    let dir = temp_dir("finishing");
    // --on-crash exit: were this taken for a crash, grace would stop.
    let grace = start(&dir, &["--idle-wait", "120s", "--on-crash", "exit"]);
    let addr = grace.addr();
    let (_held, pid1) = keep_alive(addr);
    grace.signal("USR2");
    grace.wait_line("generation 1: queue empty", T);
    assert_eq!(group_size(&dir), 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Reaped: while finishing, or just after, if an idle check saw its connection close as it
    // died (the kernel closes a dead process's sockets before grace reaps it).
    grace.wait_line(
        &format!("generation 1 (pid {pid1}) exited with status 137"),
        T,
    );
    // Its socket closes; generation 2 serves on, and hands over again.
    wait_for("generation 1's socket to close", T, || {
        (group_size(&dir) == 1).then_some(())
    });
    assert_eq!(states(&dir), ["ready"]);
    let (_, body) = http_get(addr, "/").unwrap();
    assert_ne!(served_by(&body), pid1);
    grace_restart(&dir);
    let (_, body) = http_get(addr, "/").unwrap();
    assert!(body.contains("generation=3"), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_generation_that_stops_accepting_is_stopped_at_the_drain_timeout() {
    let dir = temp_dir("finishing");
    let grace = start(&dir, &["--drain-timeout", "2s"]);
    let addr = grace.addr();
    let (_, body) = http_get(addr, "/").unwrap();
    let pid1 = served_by(&body);
    // Generation 1 stops accepting (frozen); clients queue in its socket until the switch.
    let freeze = |signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid1), signal).unwrap();
    };
    freeze(nix::sys::signal::Signal::SIGSTOP);
    // kill(2) returns before the process has stopped: wait until every thread of it has.
    wait_for("generation 1 to be stopped", T, || {
        std::fs::read_dir(format!("/proc/{pid1}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                stat.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    == Some("T")
            })
            .then_some(())
    });
    let queued: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            c
        })
        .collect();
    grace.signal("USR2");
    grace.wait_line("new connections go to generation 2", T);
    // New clients get generation 2 at once; the frozen one's queue never empties.
    let (_, body) = http_get(addr, "/").unwrap();
    assert!(body.contains("generation=2"), "{body}");
    let at = Instant::now();
    let line = grace.wait_line("queued connections after 2s: stopping it anyway", T);
    assert!(line.contains("generation 1 still has 3 queued"), "{line}");
    // Stopped, not resumed: the stop signal waits in a frozen process, SIGKILL does not.
    grace.wait_line(&format!("generation 1 (pid {pid1}) exited"), T);
    assert!(at.elapsed() < Duration::from_secs(15), "{:?}", at.elapsed());
    let (_, body) = http_get(addr, "/").unwrap();
    assert!(body.contains("generation=2"), "{body}");
    assert_eq!(group_size(&dir), 1);
    drop(queued);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_strangers_socket_in_the_group_is_reported_and_gets_no_connection() {
    let python = require("/usr/bin/python3", "python3");
    let dir = temp_dir("finishing");
    let grace = start(&dir, &[]);
    let addr = grace.addr();
    let count = dir.join("stranger-count");
    let mut stranger = Command::new(python)
        .arg(fixture("reuseport_stranger.py"))
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(&count)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped whatever happens below (it holds the test's output pipe open otherwise).
    struct Reaper(std::process::Child);
    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = stranger.stdout.take().unwrap();
    let _reaper = Reaper(stranger);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "bound");
    let load = Load::start(addr, 4, "/");
    load.wait_more(50, T);
    for n in 2..=3 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", n, T);
        load.wait_more(50, T);
    }
    let tally = load.finish();
    grace.wait_line("a socket grace did not create (inode", T);
    // Reported once, not at every handover.
    assert_eq!(grace.count_lines("a socket grace did not create"), 1);
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "0");
    assert_eq!(
        tally.failed,
        0,
        "{:?}\n{}",
        &tally.errors[..tally.errors.len().min(5)],
        grace.describe()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
