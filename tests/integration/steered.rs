//! The steered handover with servers whose drain is imperfect, none written here for grace: Go's
//! tutorial `Shutdown` pattern, Node with no signal handler, `python3 -m http.server`. Each loses
//! requests behind a shared socket; with a socket per generation, steering and the queue and idle
//! waits, none may fail. And a new version that accepts but never becomes ready is rolled back
//! having seen no client at all.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{Grace, fixture, free_port, http_get, require, served_by, temp_dir, wait_for};
use crate::load::Load;

const T: Duration = Duration::from_secs(60);

/// Four restarts under load (a new connection per request); every request succeeds and every
/// generation is a new process. `answers`: the server's reply names its pid.
pub fn four_restarts_under_load(grace: &Grace, addr: SocketAddr, answers: bool) {
    let load = Load::start(addr, 8, "/");
    load.wait_more(50, T);
    for i in 1..=4 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", i + 1, T);
        if answers {
            let newest = *grace.serving_pids().last().unwrap();
            wait_for(&format!("generation {} to answer", i + 1), T, || {
                let (_, body) = http_get(addr, "/").ok()?;
                (served_by(&body) == newest).then_some(())
            });
        }
        // The old generation finished and was stopped before the next restart.
        grace.wait_line_count("draining generation", i, T);
        load.wait_more(50, T);
    }
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{} of {} failed: {:?}\n{}",
        tally.failed,
        tally.failed + tally.ok,
        &tally.errors[..tally.errors.len().min(10)],
        grace.describe()
    );
    let mut pids = grace.serving_pids();
    assert_eq!(pids.len(), 5, "{}", grace.describe());
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 5, "a new process each time: {pids:?}");
}

pub fn stop(mut grace: Grace) {
    grace.signal("TERM");
    assert!(grace.wait_exit(T).code().is_some(), "{}", grace.describe());
}

#[test]
fn go_tutorial_shutdown_server_loses_nothing() {
    let go = require("/usr/bin/go", "golang-go");
    let dir = temp_dir("steered-go");
    let server = dir.join("server");
    let built = Command::new(go)
        .args(["build", "-o"])
        .arg(&server)
        .arg(fixture("go_tutorial_server.go"))
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("gopath"))
        .env("HOME", &dir)
        .env("GO111MODULE", "off")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "http:/",
        "--",
        server.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    four_restarts_under_load(&grace, grace.addr(), true);
    stop(grace);
}

/// Through `--inject` (it binds its own port; grace substitutes its bind), probed over
/// the real address.
#[test]
fn node_without_a_signal_handler_loses_nothing() {
    let node = require("/usr/bin/node", "nodejs");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let script = fixture("no_handler_server.js");
    let grace = Grace::start(&[
        "run",
        "--listen",
        &listen,
        "--ready",
        "http:/",
        "--",
        node,
        script.to_str().unwrap(),
        &port.to_string(),
    ]);
    grace.wait_line(") is serving", T);
    four_restarts_under_load(&grace, listen.parse().unwrap(), true);
    stop(grace);
}

#[test]
fn python_http_server_loses_nothing() {
    let python = require("/usr/bin/python3", "python3");
    let dir = temp_dir("steered-python");
    std::fs::write(dir.join("index.html"), "hello\n").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let grace = Grace::start(&[
        "run",
        "--listen",
        &listen,
        "--ready",
        "tcp",
        "--",
        python,
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
        dir.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    four_restarts_under_load(&grace, listen.parse().unwrap(), false);
    stop(grace);
}

/// The client connections each pid counted.
fn counts(dir: &Path) -> Vec<(i32, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let n = std::fs::read_to_string(e.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((pid, n))
        })
        .collect()
}

/// A new version that accepts connections and answers them, but whose readiness check never
/// passes: rolled back, having received no client connection (only grace's probes, over the real
/// address), while the old one served every request.
#[test]
fn a_version_that_never_becomes_ready_never_sees_a_client() {
    let python = require("/usr/bin/python3", "python3");
    let dir = temp_dir("steered-never-ready");
    let (mode, counted) = (dir.join("mode"), dir.join("counts"));
    std::fs::create_dir(&counted).unwrap();
    std::fs::write(&mode, "good").unwrap();
    let script = fixture("counting_server.py");
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "http:/health",
        "--ready-timeout",
        "3s",
        "--",
        python,
        script.to_str().unwrap(),
        mode.to_str().unwrap(),
        counted.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    let old = grace.serving_pids()[0];
    let load = Load::start(grace.addr(), 4, "/");
    load.wait_more(50, T);
    std::fs::write(&mode, "never-ready").unwrap();
    grace.signal("USR2");
    // Started, probed (and answering 503) under load, then rolled back.
    grace.wait_line("restart rolled back", T);
    load.wait_more(50, T);
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    let seen = counts(&counted);
    assert_eq!(seen.len(), 2, "two generations started: {seen:?}");
    for (pid, n) in seen {
        if pid == old {
            assert!(n >= 100, "the old one served the load: {n}");
        } else {
            assert_eq!(n, 0, "the never-ready pid {pid} got client connections");
        }
    }
    assert!(
        grace.output().contains("GET /health answered 503"),
        "{}",
        grace.describe()
    );
    stop(grace);
}
