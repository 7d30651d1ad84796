//! Trust and isolation: the right grace answers its client, a dead grace leaves no server behind,
//! a rolled-back release is gone whole, nobody can flood the log, files are never written
//! through a symlink.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// This test process's PID namespace, as grace names it.
fn pid_namespace() -> String {
    let link = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let text = link.to_string_lossy().into_owned();
    text.trim_start_matches("pid:[")
        .trim_end_matches(']')
        .to_string()
}

/// A pid that no process has now.
fn dead_pid() -> i32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    pid
}

/// grace as PID 1 of a new PID namespace that shares this network namespace.
fn pid1_grace(dir: &Path) -> (Grace, i32) {
    Grace::as_pid1(&format!("unix:{}", dir.join("app.sock").display()), false)
}

/// `grace ARGS` inside the PID namespace of `init` (as `docker exec` would run it).
fn inside(init: i32, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("/usr/bin/nsenter")
        .args(["--target", &init.to_string(), "--pid"])
        .arg(grace_bin())
        .args(args)
        .output()
        .unwrap();
    text(&out)
}

#[test]
fn two_pid1_graces_in_one_network_namespace_each_answer_only_their_own_client() {
    let (dir_a, dir_b) = (temp_dir("trust-pid1-a"), temp_dir("trust-pid1-b"));
    let (mut a, init_a) = pid1_grace(&dir_a);
    let (mut b, init_b) = pid1_grace(&dir_b);
    for g in [&a, &b] {
        assert!(
            !g.output().contains("unavailable"),
            "both get their control socket:\n{}",
            g.describe()
        );
    }
    let (code, out, err) = inside(init_a, &["restart"]);
    assert_eq!(code, Some(0), "{out}{err}\n{}", a.describe());
    assert!(out.contains("generation 2"), "{out}");
    assert_eq!(a.count_lines("re-executing"), 1);
    assert_eq!(b.count_lines("re-executing"), 0, "{}", b.describe());
    let (code, out, err) = inside(init_b, &["restart"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(b.count_lines("re-executing"), 1);
    assert_eq!(
        a.count_lines("re-executing"),
        1,
        "A was not restarted again"
    );
    for (g, init) in [(&mut a, init_a), (&mut b, init_b)] {
        let (code, out, err) = inside(init, &["stop"]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert_eq!(g.wait_exit(T).code(), Some(0));
    }
}

/// Runs `squatter.py NAME` (as `uid`, if given) and waits until it listens.
fn squat(name: &str, uid: Option<u32>) -> std::process::Child {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(fixture("squatter.py"))
        .arg(name)
        .stdout(Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "bound");
    child
}

#[test]
fn a_squatter_on_the_abstract_name_is_never_taken_for_grace() {
    let dir = temp_dir("trust-squatter");
    let pid_file = dir.join("pid");
    for (uid, why) in [
        (Some(NOBODY), "of uid 65534, not grace's pid"),
        (None, "not grace's pid"),
    ] {
        // A stale pid file, and somebody listening on the name that pid's grace would use.
        let pid = dead_pid();
        std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
        let mut squatter = squat(&format!("grace/control/{}/{pid}", pid_namespace()), uid);
        let out = Command::new(grace_bin())
            .args(["restart", "--pid-file", pid_file.to_str().unwrap()])
            .output()
            .unwrap();
        let (code, out, err) = text(&out);
        assert_eq!(code, Some(1), "{out}{err}");
        assert!(!out.contains("restarted"), "{out}");
        assert!(
            err.starts_with("grace: refusing to talk to @grace/control/") && err.contains(why),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        squatter.kill().unwrap();
        squatter.wait().unwrap();
    }
}

#[test]
fn a_pid_file_older_than_its_process_is_stale() {
    let dir = temp_dir("trust-stale");
    let pid_file = dir.join("pid");
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&pid_file, format!("{}\n", sleeper.id())).unwrap();
    let file = std::fs::File::options()
        .write(true)
        .open(&pid_file)
        .unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let out = Command::new(grace_bin())
        .args(["status", "--pid-file", pid_file.to_str().unwrap()])
        .output()
        .unwrap();
    let (code, _, err) = text(&out);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is stale"), "{err}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn a_grace_killed_with_sigkill_leaves_no_server_holding_the_port() {
    let mut old = Grace::serve(&[]);
    let addr = old.addr();
    let server = old.serving_pids()[0];
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    old.wait_exit(T);
    // The server got the stop signal (its death signal) and drained.
    old.wait_line("draining pid=", T);
    wait_for("the server to exit", T, || (!alive(server)).then_some(()));
    let listen = addr.to_string();
    let fresh = wait_for(
        "a new grace on the same port",
        Duration::from_secs(10),
        || Grace::serve_on(&listen).ok(),
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(http_get(addr, "/").unwrap().0, 200);
    drop(fresh);
}

/// A command whose first generation serves, and whose later ones start a worker in a session of
/// its own (`setsid`) on the same socket, then exit 1: a release that is rolled back while a
/// piece of it lives on.
fn setsid_release(dir: &Path) -> String {
    let script = dir.join("release.sh");
    let server = example("fault_server");
    let server = server.display();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$GRACE_GENERATION\" = 1 ]; then exec {server}; fi\n\
             setsid {server} &\nsleep 0.5\nexit 1\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script.display().to_string()
}

fn rolled_back_worker_is_killed(uid: Option<u32>, tracking: &str) {
    let dir = temp_dir("trust-setsid");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = setsid_release(&dir);
    let grace = Grace::start_with(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--no-listen-pid",
            "--ready",
            "delay:3s",
            "--",
            &script,
        ],
        |cmd| {
            if let Some(uid) = uid {
                cmd.uid(uid).gid(uid);
            }
        },
    );
    grace.wait_line(") is serving", T);
    assert!(grace.output().contains(tracking), "{}", grace.describe());
    let old = grace.serving_pids()[0];
    let addr = grace.addr();
    grace.signal("USR2");
    let worker: i32 = grace
        .wait_line("generation=2", T)
        .split("pid=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the worker's pid");
    grace.wait_line("restart failed", T);
    wait_for("the worker to be killed", T, || {
        (!alive(worker)).then_some(())
    });
    for _ in 0..20 {
        let (code, body) = http_get(addr, "/").unwrap();
        assert_eq!(code, 200);
        assert_eq!(served_by(&body), old, "served by the rolled-back release");
    }
}

#[test]
fn a_setsid_worker_of_a_rolled_back_release_is_killed_and_never_serves() {
    // As root here: each generation in a cgroup of its own where the machine has cgroup v2.
    let tracking = if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        || Path::new("/sys/fs/cgroup/cgroup.procs").exists()
    {
        "in a cgroup of its own"
    } else {
        "tracked by process group and GRACE_GENERATION"
    };
    rolled_back_worker_is_killed(None, tracking);
}

#[test]
fn without_cgroups_the_setsid_worker_is_found_by_its_generation() {
    // As nobody, grace cannot create cgroups: the re-parented worker is found by its
    // GRACE_GENERATION instead.
    rolled_back_worker_is_killed(
        Some(NOBODY),
        "tracked by process group and GRACE_GENERATION",
    );
}

/// The abstract name of the control socket and the notify socket of the grace with this pid.
fn names_of(grace: &Grace) -> (String, String) {
    let server = grace.serving_pids()[0];
    let env = std::fs::read(format!("/proc/{server}/environ")).unwrap();
    let notify = env
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET=@"))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap();
    (
        format!("grace/control/{}/{}", pid_namespace(), grace.pid()),
        notify,
    )
}

#[test]
fn a_flood_from_another_user_costs_a_few_lines_and_no_latency() {
    let dir = temp_dir("trust-flood");
    let control = dir.join("ctl");
    let grace = Grace::serve_with_control(&control);
    let (control_name, notify_name) = names_of(&grace);
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            Command::new("/usr/bin/python3")
                .args([&fixture("flood.py"), &control_name, &notify_name, "5"])
                .uid(NOBODY)
                .gid(NOBODY)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut worst = Vec::new();
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        let start = Instant::now();
        let mut s = UnixStream::connect(&control).unwrap();
        s.write_all(b"status\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"pid\":"), "{line}");
        worst.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut sent = 0;
    for f in flooders {
        let out = f.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        sent += text
            .trim()
            .strip_prefix("sent ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    worst.sort();
    assert!(
        worst[worst.len() / 2] < Duration::from_millis(100),
        "grace status during the flood: {worst:?}"
    );
    let lines =
        grace.count_lines("refused a client") + grace.count_lines("outside every generation");
    assert!(sent > 1_000, "the flood sent {sent}");
    assert!(lines < 300, "{lines} warning lines for {sent} attempts");
    assert!(grace.count_lines("suppressed") > 0, "{}", grace.describe());
    assert_eq!(grace.count_lines("re-executing"), 0, "nobody restarted it");
}

#[test]
fn pid_and_status_files_are_never_written_through_a_symlink() {
    let dir = temp_dir("trust-symlink");
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let (pid_file, status_file) = (dir.join("app.pid"), dir.join("app.json"));
    for link in [&pid_file, &status_file] {
        std::os::unix::fs::symlink(&victim, link).unwrap();
    }
    let grace = Grace::serve(&[
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--status-file",
        status_file.to_str().unwrap(),
    ]);
    wait_for("the status file", T, || {
        std::fs::read_to_string(&status_file)
            .ok()
            .filter(|s| s.contains("\"running\""))
    });
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    for file in [&pid_file, &status_file] {
        let meta = std::fs::symlink_metadata(file).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{} is still a symlink",
            file.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        grace.pid().to_string()
    );
    // No temporary file is left beside them.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    drop(grace);
}
