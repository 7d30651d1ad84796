//! Fault injection: broken new generations, misbehaving old ones, trouble for grace itself and
//! scarce resources. Each case ends with grace in a known state, and the clients of the generation
//! that survives lose nothing. (Other faults are covered beside the feature they break:
//! rollback.rs — exits at once, never ready, failing check, ignores the stop signal, restart storm;
//! upgrade.rs — grace's binary deleted, replaced by a non-executable or by a stranger.)

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{
    Grace, TempDir, alive, descendants, example, grace_bin, http_get, proc_state, served_by,
    temp_dir, wait_for,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(20);

struct Setup {
    grace: Grace,
    behavior: PathBuf,
    dir: TempDir,
}

/// grace running the example server, whose later generations read their behaviour from a file.
fn start(extra: &[&str]) -> Setup {
    start_command(extra, &[example("fault_server").to_str().unwrap()])
}

fn start_command(extra: &[&str], command: &[&str]) -> Setup {
    let dir = temp_dir("faults");
    let behavior = dir.join("behavior");
    let behavior_arg = behavior.display().to_string();
    let control = dir.join("ctl").display().to_string();
    let mut args = vec!["run", "--listen", "127.0.0.1:0", "--control", &control];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    args.extend(["--behavior-file", &behavior_arg]);
    let grace = Grace::start(&args);
    grace.wait_line(") is serving", T);
    Setup {
        grace,
        behavior,
        dir,
    }
}

fn restart(s: &Setup) -> (Option<i32>, String) {
    let control = s.dir.join("ctl");
    let out = Command::new(grace_bin())
        .args(["restart", "--control", control.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn assert_no_failures(load: Load, s: &Setup) {
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}\n{}",
        &tally.errors[..tally.errors.len().min(5)],
        s.grace.describe()
    );
    assert!(tally.ok > 0);
}

/// Exactly one generation left and nothing else under grace, no zombie.
fn settled(s: &Setup) -> i32 {
    wait_for("one generation and nothing else", T, || {
        let tree = descendants(s.grace.pid());
        (tree.len() == 1 && tree.iter().all(|&p| proc_state(p) != Some('Z'))).then(|| tree[0])
    })
}

#[test]
fn new_generation_crashes_after_ready_and_on_crash_restart_recovers() {
    let s = start(&["--on-crash", "restart"]);
    let addr = s.grace.addr();
    std::fs::write(&s.behavior, "crash-after-ready").unwrap();
    let (code, out) = restart(&s);
    assert_eq!(code, Some(0), "{out}");
    // Generation 2 took over, then crashed; the next one must not crash again.
    std::fs::write(&s.behavior, "").unwrap();
    s.grace.wait_line("exited with status 4", T);
    s.grace.wait_line_count(") is serving", 3, T);
    // The sockets stayed open: requests sent meanwhile waited in the queue.
    let load = Load::start(addr, 2, "/");
    load.wait_more(50, T);
    assert_no_failures(load, &s);
    settled(&s);
}

#[test]
fn new_generation_that_closes_its_sockets_fails_the_probe_and_is_rolled_back() {
    let s = start(&["--ready", "http:/health", "--ready-timeout", "2s"]);
    let addr = s.grace.addr();
    let old = served_by(&http_get(addr, "/").unwrap().1);
    let load = Load::start(addr, 2, "/");
    std::fs::write(&s.behavior, "close-sockets").unwrap();
    let (code, out) = restart(&s);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not ready within 2s"), "{out}");
    load.wait_more(30, T);
    assert_no_failures(load, &s);
    assert_eq!(settled(&s), old);
}

#[test]
fn new_generation_that_forks_a_daemon_and_exits_is_rolled_back_with_its_daemon() {
    let s = start(&[]);
    let addr = s.grace.addr();
    let old = served_by(&http_get(addr, "/").unwrap().1);
    let load = Load::start(addr, 2, "/");
    std::fs::write(&s.behavior, "daemonize").unwrap();
    let (code, out) = restart(&s);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("exited with status 0"), "{out}");
    // The daemon was in the generation's process group: killed with it, reaped by grace.
    assert_eq!(settled(&s), old);
    load.wait_more(30, T);
    let tally = load.finish();
    // Requests the daemon had accepted before it was killed are lost: that is what killing a
    // daemon that escaped its parent means. Everything the old generation took was answered.
    let lost: Vec<&String> = tally
        .errors
        .iter()
        .filter(|e| !e.contains("reset") && !e.contains("read"))
        .collect();
    assert!(lost.is_empty(), "{lost:?}");
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), old);
}

#[test]
fn a_notify_flood_does_not_starve_grace() {
    let s = start(&[]);
    std::fs::write(&s.behavior, "flood-notify=20000").unwrap();
    let started = Instant::now();
    let (code, out) = restart(&s);
    assert_eq!(code, Some(0), "{out}");
    // Meanwhile grace kept answering.
    let control = s.dir.join("ctl");
    let status = Command::new(grace_bin())
        .args(["status", "--control", control.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(started.elapsed() < T);
    settled(&s);
}

#[test]
fn ready_from_a_process_outside_the_generation_is_ignored() {
    let s = start(&["--ready", "notify", "--ready-timeout", "2s"]);
    let addr = s.grace.addr();
    let old = served_by(&http_get(addr, "/").unwrap().1);
    std::fs::write(&s.behavior, "never-ready").unwrap();
    s.grace.signal("USR2");
    s.grace.wait_line("started generation 2", T);
    // The notify socket's address, as the server sees it.
    let new = wait_for("generation 2's pid", T, || {
        descendants(s.grace.pid())
            .into_iter()
            .find(|&p| p != old && alive(p))
    });
    let environ = std::fs::read(format!("/proc/{new}/environ")).unwrap();
    let socket = environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET=@"))
        .map(|n| n.to_vec())
        .unwrap();
    use std::os::linux::net::SocketAddrExt;
    let forger = UnixDatagram::unbound().unwrap();
    let to = std::os::unix::net::SocketAddr::from_abstract_name(&socket).unwrap();
    for _ in 0..5 {
        forger
            .send_to_addr(format!("READY=1\nMAINPID={new}").as_bytes(), &to)
            .unwrap();
    }
    s.grace.wait_line("outside every generation: ignored", T);
    s.grace.wait_line("restart failed", T);
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), old);
    let _ = forger.as_raw_fd();
}

#[test]
fn old_generation_that_fails_while_draining_is_just_reaped() {
    let s = start(&[]);
    let addr = s.grace.addr();
    std::fs::write(&s.behavior, "exit-code=9").unwrap();
    // Generation 2 exits 9 when it is drained by generation 3.
    assert_eq!(restart(&s).0, Some(0));
    std::fs::write(&s.behavior, "").unwrap();
    let load = Load::start(addr, 2, "/");
    assert_eq!(restart(&s).0, Some(0));
    s.grace.wait_line("exited with status 9", T);
    load.wait_more(30, T);
    assert_no_failures(load, &s);
    settled(&s);
}

#[test]
fn old_generation_that_leaves_workers_behind_has_them_killed_at_the_drain_timeout() {
    // The shell leaves a `sleep` in the generation's process group and execs the server.
    let server = example("fault_server");
    let script = format!(r#"sleep 300 & exec {} "$@""#, server.display());
    let s = start_command(
        &["--drain-timeout", "1s"],
        &["/bin/sh", "-c", &script, "sh"],
    );
    let first_tree = descendants(s.grace.pid());
    assert_eq!(first_tree.len(), 2, "server and its sleep");
    assert_eq!(restart(&s).0, Some(0));
    // After the drain timeout, the leftover sleep of generation 1 is killed and reaped.
    wait_for("generation 1's leftovers to go", T, || {
        first_tree
            .iter()
            .all(|&p| proc_state(p).is_none())
            .then_some(())
    });
    s.grace
        .wait_line("still running after the drain timeout", T);
}

#[test]
fn sigusr2_during_a_drain_starts_another_generation() {
    let s = start(&["--drain-timeout", "3s"]);
    let addr = s.grace.addr();
    std::fs::write(&s.behavior, "ignore-term").unwrap();
    assert_eq!(restart(&s).0, Some(0)); // generation 2 ignores SIGTERM
    std::fs::write(&s.behavior, "").unwrap();
    let load = Load::start(addr, 2, "/");
    assert_eq!(restart(&s).0, Some(0)); // generation 2 drains (stubbornly)
    assert_eq!(restart(&s).0, Some(0)); // during that drain
    load.wait_more(30, T);
    assert_no_failures(load, &s);
    settled(&s);
}

#[test]
fn sigterm_during_a_restart_stops_everything() {
    let mut s = start(&[]);
    std::fs::write(&s.behavior, "slow-start=3s").unwrap();
    s.grace.signal("USR2");
    s.grace.wait_line("started generation 2", T);
    let tree = descendants(s.grace.pid());
    s.grace.signal("TERM");
    assert_eq!(
        s.grace.wait_exit(T).code(),
        Some(0),
        "{}",
        s.grace.describe()
    );
    for pid in tree {
        assert!(
            proc_state(pid).is_none() || proc_state(pid) == Some('Z'),
            "{pid} survived"
        );
    }
}

fn proc_field(pid: i32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn status(s: &Setup) -> serde_json::Value {
    let control = s.dir.join("ctl");
    let out = Command::new(grace_bin())
        .args(["status", "--json", "--control", control.to_str().unwrap()])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// How many sockets the first listener's reuseport group holds (grace's, per generation).
fn group_size(s: &Setup) -> u64 {
    let status = status(s);
    status["listen"][0]["sockets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no steered group: {status}"))
}

#[test]
fn a_hundred_restarts_in_a_row_leak_nothing() {
    let s = start(&[]);
    let addr = s.grace.addr();
    // Measured after a first restart: the first image may hold inherited fds (close-on-exec).
    assert_eq!(restart(&s).0, Some(0));
    settled(&s);
    let pid = s.grace.pid();
    // One generation's worth: a group of one, and an fd count that holds still (what a gone
    // generation leaves, its pidfd and bind filter, goes within a wake-up or two).
    let flat = || {
        wait_for("grace's fds and group back to one generation's", T, || {
            let n = s.grace.fd_count();
            std::thread::sleep(std::time::Duration::from_millis(100));
            (group_size(&s) == 1 && s.grace.fd_count() == n).then_some(n)
        })
    };
    let fds = flat();
    let rss = proc_field(pid, "VmRSS:");
    let load = Load::start(addr, 2, "/");
    for i in 0..100 {
        let (code, out) = restart(&s);
        assert_eq!(code, Some(0), "restart {i}: {out}");
    }
    load.wait_more(20, T);
    assert_no_failures(load, &s);
    settled(&s);
    // Generations that overlapped may leave members that can close only at the next handover
    // (the target is the group's last socket): each is one of grace's fds, and no more.
    wait_for(
        "every extra fd to be a member left for the next handover",
        T,
        || {
            let extra = group_size(&s) - 1;
            (s.grace.fd_count() == fds + extra as usize).then_some(())
        },
    );
    assert!(group_size(&s) <= 4, "{}", status(&s));
    assert_eq!(restart(&s).0, Some(0));
    settled(&s);
    wait_for("grace's fds back to what they were", T, || {
        (flat() == fds).then_some(())
    });
    assert_eq!(proc_field(pid, "Threads:"), 1, "grace is single-threaded");
    let rss_after = proc_field(pid, "VmRSS:");
    assert!(
        rss_after < rss + 1024,
        "RSS grew from {rss} kB to {rss_after} kB"
    );
}

#[test]
fn command_missing_at_restart_time_is_rolled_back() {
    let dir = temp_dir("path");
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(example("fault_server"), bin.join("myserver")).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let mut grace = Grace::start_with(&["run", "--listen", "127.0.0.1:0", "--", "myserver"], |c| {
        c.env("PATH", &path);
    });
    grace.wait_line(") is serving", T);
    let addr = grace.addr();
    let old = served_by(&http_get(addr, "/").unwrap().1);
    std::fs::remove_file(bin.join("myserver")).unwrap();
    grace.signal("USR2");
    let line = grace.wait_line("restart failed", T);
    assert!(line.contains("\"myserver\" not found in PATH"), "{line}");
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), old);
    grace.signal("TERM");
    assert_eq!(grace.wait_exit(T).code(), Some(0));
}

#[test]
fn low_rlimit_nofile_still_restarts() {
    let server = example("fault_server");
    let grace = Grace::start_raw(
        "/usr/bin/prlimit",
        &[
            "--nofile=32",
            grace_bin().to_str().unwrap(),
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            server.to_str().unwrap(),
        ],
    );
    grace.wait_line(") is serving", T);
    let addr = grace.addr();
    let load = Load::start(addr, 2, "/");
    for i in 1..=3 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", i + 1, T);
    }
    load.wait_more(30, T);
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
}

#[test]
fn unix_socket_directory_removed_underneath() {
    let dir = temp_dir("vanish");
    let sockdir = dir.join("run");
    std::fs::create_dir(&sockdir).unwrap();
    let spec = format!("unix:{}", sockdir.join("app.sock").display());
    let server = example("fault_server");
    let mut grace = Grace::start(&["run", "--listen", &spec, "--", server.to_str().unwrap()]);
    grace.wait_line(") is serving", T);
    std::fs::remove_dir_all(&sockdir).unwrap();
    // The socket itself lives on in grace: restarts still work, and stopping does not trip over
    // the missing file.
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    grace.signal("TERM");
    assert_eq!(grace.wait_exit(T).code(), Some(0), "{}", grace.describe());
}

fn signal_pid(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

#[test]
fn sigterm_right_behind_sigusr2_is_not_lost_in_the_reexec() {
    use nix::sys::signal::Signal::*;
    let mut s = start(&[]);
    // Both land in one wake-up of grace: the stop must win over the restart it follows.
    signal_pid(s.grace.pid(), SIGSTOP);
    signal_pid(s.grace.pid(), SIGUSR2);
    signal_pid(s.grace.pid(), SIGTERM);
    signal_pid(s.grace.pid(), SIGCONT);
    assert_eq!(
        s.grace.wait_exit(T).code(),
        Some(0),
        "{}",
        s.grace.describe()
    );
}

/// Kills the server while grace is stopped, then sends SIGUSR2: grace wakes to both at once.
/// Returns the dead server's pid.
fn crash_during_usr2(s: &Setup) -> i32 {
    use nix::sys::signal::Signal::*;
    let server = s.grace.serving_pids()[0];
    signal_pid(s.grace.pid(), SIGSTOP);
    signal_pid(server, SIGKILL);
    // A zombie whose other threads are gone too: only then can grace reap it.
    wait_for("the server to die", T, || {
        let threads = std::fs::read_dir(format!("/proc/{server}/task")).map_or(0, |d| d.count());
        (proc_state(server) == Some('Z') && threads <= 1).then_some(())
    });
    signal_pid(s.grace.pid(), SIGUSR2);
    signal_pid(s.grace.pid(), SIGCONT);
    server
}

#[test]
fn a_crash_seen_in_the_same_wakeup_as_a_restart_is_not_lost() {
    // Exits are handled before the signals of the same wake-up: the crash comes first, and
    // under `--on-crash restart` the restart then replaces the crashed generation.
    let s = start(&["--on-crash", "restart"]);
    let server = crash_during_usr2(&s);
    // The exit is handled before the re-exec (not forgotten by it), and the restart's
    // generation takes over.
    s.grace
        .wait_line(&format!("(pid {server}) exited with status 137"), T);
    s.grace.wait_line_count(") is serving", 2, T);
    let new = settled(&s);
    assert_ne!(new, server);
    let status = status(&s);
    assert_eq!(status["current"]["pid"], new);
    assert_eq!(
        status["generations"].as_array().unwrap().len(),
        1,
        "{status}"
    );
}

#[test]
fn a_crash_seen_in_the_same_wakeup_as_a_restart_exits_under_on_crash_exit() {
    let mut s = start(&[]);
    crash_during_usr2(&s);
    // The crash was first: grace exits with its status and never re-executes around it.
    let status = s.grace.wait_exit(T);
    assert_eq!(status.code(), Some(137), "{}", s.grace.describe());
    assert_eq!(
        s.grace.count_lines("re-executing"),
        0,
        "{}",
        s.grace.describe()
    );
}

#[test]
fn stopping_a_server_whose_workers_outlive_it_still_exits() {
    // The shell ignores SIGTERM and waits on a child: at the drain timeout the whole group is
    // killed, and the leader and its reparented worker are reaped in one go.
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "delay:100ms",
        "--drain-timeout",
        "1s",
        "--",
        "/bin/sh",
        "-c",
        "trap '' TERM; sleep 1000; :",
    ]);
    grace.wait_line(") is serving", T);
    grace.signal("TERM");
    assert_eq!(grace.wait_exit(T).code(), Some(137), "{}", grace.describe());
}

#[test]
fn tcp_readiness_needs_a_server_that_accepts() {
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "tcp",
        "--ready-timeout",
        "1s",
        "--",
        "/bin/sleep",
        "1000",
    ]);
    assert_eq!(grace.wait_exit(T).code(), Some(1), "{}", grace.describe());
    assert!(
        grace.output().contains("was not ready within 1s"),
        "{}",
        grace.describe()
    );
}

#[test]
fn a_pid_file_that_cannot_be_rewritten_does_not_abort_a_restart() {
    let dir = temp_dir("pidfile");
    let piddir = dir.join("run");
    std::fs::create_dir(&piddir).unwrap();
    let pid_file = piddir.join("grace.pid");
    let grace = Grace::serve(&["--pid-file", pid_file.to_str().unwrap()]);
    std::fs::remove_dir_all(&piddir).unwrap();
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    assert!(
        grace.output().contains("writing pid file"),
        "{}",
        grace.describe()
    );
    assert!(alive(grace.pid()));
}
