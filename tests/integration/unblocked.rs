//! Nothing blocks grace's loop: slow, silent and numerous control clients, probes that never get
//! an answer, and handoff records that must not be trusted.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// One `status` request over the control socket, timed from connect to the reply line.
fn status_latency(control: &Path) -> Duration {
    let start = Instant::now();
    let mut stream = UnixStream::connect(control).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    stream.write_all(b"status\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"pid\":"), "{line:?}");
    start.elapsed()
}

/// Ten status requests, spread over `over`: the median must be under 100ms, and none may take
/// the seconds a blocking read or probe would cost.
fn assert_status_prompt(control: &Path, over: Duration, what: &str) {
    let mut samples: Vec<Duration> = (0..10)
        .map(|_| {
            let d = status_latency(control);
            std::thread::sleep(over / 10);
            d
        })
        .collect();
    samples.sort();
    assert!(
        samples[5] < Duration::from_millis(100) && samples[9] < Duration::from_millis(300),
        "{what}: grace status took {samples:?}"
    );
}

fn control_path(dir: &Path) -> PathBuf {
    dir.join("ctl")
}

/// Time from SIGTERM to the server's own "draining" line: grace passed the stop on.
fn sigterm_latency(grace: &Grace) -> Duration {
    let start = Instant::now();
    grace.signal("TERM");
    grace.wait_line("draining pid=", T);
    start.elapsed()
}

#[test]
fn a_slow_client_and_a_silent_one_delay_neither_status_nor_sigterm() {
    let dir = temp_dir("unblocked-slow");
    let control = control_path(&dir);
    let grace = Grace::serve_with_control(&control);
    let _silent = UnixStream::connect(&control).unwrap();
    let slow = std::thread::spawn({
        let control = control.clone();
        move || {
            let mut s = UnixStream::connect(&control).unwrap();
            // One byte every 450ms: within a few bytes grace gives up on it (2s for a request).
            for b in b"status\n" {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(450));
            }
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            reply
        }
    });
    assert_status_prompt(
        &control,
        Duration::from_millis(1_500),
        "a slow client connected",
    );
    let reply = slow.join().unwrap();
    assert_eq!(reply, "failed no request in time\n");
    assert!(
        grace
            .output()
            .contains("dropped a client that sent no request within 2000ms"),
        "{}",
        grace.describe()
    );
    // Another slow one, then SIGTERM: handled at once.
    let mut slow = UnixStream::connect(&control).unwrap();
    slow.write_all(b"s").unwrap();
    let took = sigterm_latency(&grace);
    assert!(took < Duration::from_millis(100), "SIGTERM took {took:?}");
}

#[test]
fn a_new_generation_that_never_answers_its_probe_does_not_slow_grace() {
    let dir = temp_dir("unblocked-probe");
    let control = control_path(&dir);
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "http:/health",
        "--ready-timeout",
        "4s",
        "--control",
        control.to_str().unwrap(),
        "--",
        "python3",
        &fixture("silent_probe_server.py"),
    ]);
    grace.wait_line(") is serving", T);
    grace.signal("USR2");
    grace.wait_line("started generation 2", T);
    assert_status_prompt(
        &control,
        Duration::from_secs(2),
        "probing a silent generation",
    );
    // It is rolled back at the timeout, with the probe's reason.
    let line = grace.wait_line("restart failed", T);
    assert!(line.contains("GET /health: no reply within"), "{line}");
    let took = sigterm_latency_of_python(&mut grace);
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
}

/// The Python fixture prints nothing on SIGTERM: time until grace has exited.
fn sigterm_latency_of_python(grace: &mut Grace) -> Duration {
    let start = Instant::now();
    grace.signal("TERM");
    grace.wait_exit(T);
    start.elapsed()
}

#[test]
fn a_thousand_clients_at_once_are_capped_refused_and_leave_no_fd_behind() {
    let dir = temp_dir("unblocked-flood");
    let control = control_path(&dir);
    let grace = Grace::serve_with_control(&control);
    let addr = grace.addr();
    // With no client connected (a client just answered may not be closed yet).
    let fds = grace.fd_count();
    let mut clients: Vec<UnixStream> = (0..1_000)
        .map(|_| UnixStream::connect(&control).unwrap())
        .collect();
    // The server keeps serving meanwhile.
    let (code, body) = http_get(addr, "/").unwrap();
    assert_eq!(code, 200, "{body}");
    let mut refused = 0;
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut buf = [0u8; 128];
        if let Ok(n) = c.read(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).starts_with("failed too many clients")
        {
            refused += 1;
        }
    }
    assert!(
        (900..=1_000 - 32).contains(&refused),
        "{refused} refused of 1000 (cap 64)"
    );
    drop(clients);
    // Once they are gone (silent ones after their 2s), status answers and the fds are back.
    let deadline = Instant::now() + T;
    while grace.fd_count() != fds {
        assert!(
            Instant::now() < deadline,
            "fds: {} before, {} now: {:?}",
            fds,
            grace.fd_count(),
            std::fs::read_dir(format!("/proc/{}/fd", grace.pid()))
                .unwrap()
                .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(status_latency(&control) < Duration::from_millis(100));
    // Hundreds of refusals, a handful of lines (one per second).
    assert!(
        grace.count_lines("refused a client") < 20,
        "{}",
        grace.describe()
    );
}

/// Runs `grace run` as a re-executed image would start, with `record` as its handoff.
fn adopt(record: &str) -> std::process::Output {
    Command::new(grace_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--", "true"])
        .env("GRACE_HANDOFF", record)
        .output()
        .unwrap()
}

fn record_with_generation(pid: &str) -> String {
    format!(
        "grace-handoff 2\ngeneration 2 {pid} 0 - ready - - -\nnext_gen 3\ncurrent 2\nphase reexec\n\
         fd 0 notify @x\n"
    )
}

#[test]
fn an_untrustworthy_handoff_record_is_refused_and_nothing_is_signalled() {
    // A process that is nobody's generation: were it signalled, it would die.
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = bystander.id().to_string();
    for (pid, why) in [
        ("-1", "generation 2 names pid -1"),
        ("0", "generation 2 names pid 0"),
        ("1", "generation 2 names pid 1"),
        (pid.as_str(), "is not a child of this process"),
    ] {
        let out = adopt(&record_with_generation(pid));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{pid}: {stderr}");
        assert!(
            stderr.contains("handoff record refused") && stderr.contains(why),
            "{stderr}"
        );
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("grace:")).count(),
            1,
            "one line: {stderr}"
        );
    }
    // fd 0 is refused as well (checked after the pids).
    let out = adopt(&record_with_generation("999999999"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a child"));
    assert!(alive(bystander.id() as i32), "the bystander was signalled");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}
