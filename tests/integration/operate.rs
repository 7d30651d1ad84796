//! Operating grace: `grace restart/status/stop`, the control socket, the status file, systemd's
//! notify protocol, socket activation of grace itself, compatibility variables, deploy scripts.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    Grace, TempDir, example, grace_bin, http_get, served_by, served_by_other, temp_dir, wait_for,
};

const T: Duration = Duration::from_secs(20);

fn grace_cmd(args: &[&str]) -> Output {
    Command::new(grace_bin()).args(args).output().unwrap()
}

fn text(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// grace with a control socket, a pid file, a status file and a behaviour file for the server.
struct Running {
    grace: Grace,
    dir: TempDir,
    control: String,
    behavior: PathBuf,
}

fn start(extra: &[&str]) -> Running {
    let dir = temp_dir("operate");
    let control = dir.join("ctl").display().to_string();
    let behavior = dir.join("behavior");
    let server = example("fault_server");
    let pid_file = dir.join("pid").display().to_string();
    let status_file = dir.join("status.json").display().to_string();
    let behavior_arg = behavior.display().to_string();
    let mut args = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--control",
        &control,
        "--pid-file",
        &pid_file,
        "--status-file",
        &status_file,
    ];
    args.extend_from_slice(extra);
    args.extend([
        "--",
        server.to_str().unwrap(),
        "--behavior-file",
        &behavior_arg,
    ]);
    let grace = Grace::start(&args);
    grace.wait_line(") is serving", T);
    Running {
        grace,
        dir,
        control,
        behavior,
    }
}

#[test]
fn restart_waits_for_the_outcome_across_the_reexec() {
    let r = start(&[]);
    let old = served_by(&http_get(r.grace.addr(), "/").unwrap().1);
    let (code, out, err) = text(&grace_cmd(&["restart", "--control", &r.control]));
    assert_eq!(code, Some(0), "{out}{err}");
    // grace's log line may reach the test's reader thread after the client's answer.
    r.grace.wait_line_count(") is serving", 2, T);
    let new = r.grace.serving_pids()[1];
    assert_ne!(new, old);
    served_by_other(r.grace.addr(), old);
    assert_eq!(
        out.trim(),
        format!("restarted: generation 2 (pid {new}) is serving")
    );
    // The answer came from the re-executed image: the request was made before the re-exec.
    assert_eq!(r.grace.count_lines("re-executing"), 1);
}

#[test]
fn restart_reports_a_rollback_with_its_reason_and_a_non_zero_exit() {
    let r = start(&["--ready-timeout", "1s", "--ready", "notify"]);
    let pid_file = r.dir.join("pid").display().to_string();
    for (words, reason) in [
        ("exit-immediately", "exited with status 3"),
        ("never-ready", "not ready within 1s"),
    ] {
        std::fs::write(&r.behavior, words).unwrap();
        let (code, out, err) = text(&grace_cmd(&["restart", "--pid-file", &pid_file]));
        assert_eq!(code, Some(1), "{out}{err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("grace: restart failed: generation "),
            "{err}"
        );
        assert!(first.contains(reason), "{reason:?} in {first:?}");
    }
}

#[test]
fn concurrent_restarts_both_get_an_answer() {
    let r = start(&[]);
    std::fs::write(&r.behavior, "slow-start=1s").unwrap();
    let control = r.control.clone();
    let first = std::thread::spawn(move || text(&grace_cmd(&["restart", "--control", &control])));
    r.grace.wait_line("re-executing", T);
    let (code, out, err) = text(&grace_cmd(&["restart", "--control", &r.control]));
    let (code1, out1, err1) = first.join().unwrap();
    assert_eq!(code1, Some(0), "{out1}{err1}");
    assert_eq!(code, Some(0), "{out}{err}");
    // The second request came during the first restart: it is answered by the one after it.
    assert!(out1.contains("generation 2"), "{out1}");
    assert!(out.contains("generation 3"), "{out}");
}

#[test]
fn status_json_matches_reality_and_the_status_file() {
    let r = start(&[]);
    grace_cmd(&["restart", "--control", &r.control]);
    let (code, out, err) = text(&grace_cmd(&["status", "--json", "--control", &r.control]));
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pid"], r.grace.pid());
    assert_eq!(v["current"]["generation"], 2);
    let pid = v["current"]["pid"].as_i64().unwrap() as i32;
    assert_eq!(served_by(&http_get(r.grace.addr(), "/").unwrap().1), pid);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(v["listen"][0]["address"], format!("tcp {}", r.grace.addr()));
    assert_eq!(v["last_restart"]["result"], "ok");
    assert_eq!(v["restarts"], 1);
    let gens = v["generations"].as_array().unwrap();
    assert!(
        gens.iter()
            .any(|g| g["generation"] == 2 && g["state"] == "ready")
    );

    let file = r.dir.join("status.json");
    let on_disk: Value = wait_for("the status file to show generation 2", T, || {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok()?;
        (v["current"]["generation"] == 2 && v["generations"].as_array()?.len() == 1).then_some(v)
    });
    assert_eq!(on_disk["current"]["pid"], pid);

    let (code, out, _) = text(&grace_cmd(&["status", "--control", &r.control]));
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&format!("pid {pid}")) && out.contains("(current)"),
        "{out}"
    );
}

#[test]
fn stop_waits_until_grace_has_exited_and_cleans_up() {
    let mut r = start(&[]);
    let (code, out, err) = text(&grace_cmd(&["stop", "--control", &r.control]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "stopped");
    let status = r.grace.wait_exit(Duration::from_secs(2));
    assert_eq!(status.code(), Some(0));
    for file in ["ctl", "pid", "status.json"] {
        assert!(!r.dir.join(file).exists(), "{file} left behind");
    }
}

#[test]
fn the_control_socket_is_private() {
    let r = start(&[]);
    let mode = std::fs::metadata(&r.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // `nobody` through the abstract socket (no file permission in the way): refused by
    // SO_PEERCRED. The pid file must be readable for that.
    let pid_file = r.dir.join("pid");
    std::fs::set_permissions(&r.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&pid_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec!["restart", "--pid-file", pid_file.to_str().unwrap()],
        vec!["restart", "--control", &r.control],
    ] {
        let out = Command::new(grace_bin())
            .args(&args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let (code, _, err) = text(&out);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("permission denied") || err.contains("Permission denied"),
            "{err}"
        );
    }
    assert_eq!(
        r.grace.count_lines("re-executing"),
        0,
        "nothing was restarted"
    );
    assert!(
        r.grace.output().contains("refused a client of uid 65534"),
        "{}",
        r.grace.describe()
    );
}

#[test]
fn no_running_grace_is_one_clear_line() {
    let dir = temp_dir("no-grace");
    let missing = dir.join("ctl").display().to_string();
    let (code, _, err) = text(&grace_cmd(&["restart", "--control", &missing]));
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("grace: connecting to the control socket"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Receives sd_notify datagrams with the sender's pid, as systemd does.
struct FakeSystemd {
    sock: UnixDatagram,
    path: PathBuf,
    extended: std::cell::Cell<u64>,
    _dir: TempDir,
}

impl FakeSystemd {
    fn new() -> Self {
        let dir = temp_dir("systemd");
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true).unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        FakeSystemd {
            sock,
            path,
            extended: std::cell::Cell::new(0),
            _dir: dir,
        }
    }

    fn next(&self) -> (i32, String) {
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let msg = nix::sys::socket::recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("a notify message in time");
        let pid = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmCredentials(c) => Some(c.pid()),
                _ => None,
            })
            .unwrap();
        let len = msg.bytes;
        (pid, String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    /// The next message that carries a state change; STATUS= and EXTEND_TIMEOUT_USEC= alone are
    /// skipped (the largest extension seen meanwhile is kept).
    fn next_state(&self, grace_pid: i32) -> String {
        loop {
            let (pid, text) = self.next();
            assert_eq!(
                pid, grace_pid,
                "every message comes from grace's own (stable) pid: {text}"
            );
            if let Some(usec) = text
                .lines()
                .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
            {
                let usec: u64 = usec.parse().unwrap();
                self.extended.set(self.extended.get().max(usec));
            }
            let state =
                |l: &str| !l.starts_with("STATUS=") && !l.starts_with("EXTEND_TIMEOUT_USEC=");
            if text.lines().any(state) {
                return text;
            }
        }
    }
}

#[test]
fn systemd_sees_ready_reloading_ready_stopping_from_one_pid() {
    let systemd = FakeSystemd::new();
    let server = example("fault_server");
    let mut grace = Grace::start_with(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "2m",
            "--",
            server.to_str().unwrap(),
        ],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &systemd.path);
        },
    );
    let pid = grace.pid();
    let first = systemd.next_state(pid);
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    assert!(
        systemd.extended.get() >= 120_000_000,
        "the start timeout is extended to --ready-timeout"
    );
    assert!(first.contains("STATUS=serving: generation 1"), "{first}");

    grace.signal("USR2");
    let reloading = systemd.next_state(pid);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = systemd.next_state(pid);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving: generation 2"), "{ready}");

    grace.signal("TERM");
    let stopping = systemd.next_state(pid);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert_eq!(grace.wait_exit(T).code(), Some(0));
}

#[test]
fn systemd_gets_the_reason_of_a_failed_restart() {
    let systemd = FakeSystemd::new();
    let dir = temp_dir("systemd-fail");
    let behavior = dir.join("b");
    let server = example("fault_server");
    let grace = Grace::start_with(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            server.to_str().unwrap(),
            "--behavior-file",
            behavior.to_str().unwrap(),
        ],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &systemd.path);
        },
    );
    systemd.next_state(grace.pid());
    std::fs::write(&behavior, "exit-immediately").unwrap();
    grace.signal("USR2");
    assert!(systemd.next_state(grace.pid()).contains("RELOADING=1"));
    let end = systemd.next_state(grace.pid());
    assert!(
        end.lines().any(|l| l == "READY=1"),
        "systemd's reload ends either way: {end}"
    );
    assert!(
        end.contains("STATUS=restart failed: generation 2 exited with status 3"),
        "{end}"
    );
}

#[test]
fn grace_takes_sockets_passed_by_socket_activation() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let server = example("fault_server");
    // LISTEN_PID must be grace's own pid: the shell exports its pid and execs grace.
    let script = r#"LISTEN_PID=$$ exec "$@""#;
    let grace = {
        let mut cmd_args: Vec<String> = vec!["-c".into(), script.into(), "sh".into()];
        cmd_args.extend([
            grace_bin().display().to_string(),
            "run".into(),
            "--listen".into(),
            "systemd".into(),
        ]);
        cmd_args.extend(["--".into(), server.display().to_string()]);
        let refs: Vec<&str> = cmd_args.iter().map(String::as_str).collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(&refs[..])
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "web");
        // SAFETY: between fork and exec: dup2 is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would leave close-on-exec set.
                let rc = if fd == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(fd, 3)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        crate::harness::Grace::from_command(cmd)
    };
    drop(listener);
    grace.wait_line(") is serving", T);
    assert!(
        grace.output().contains("(name web)"),
        "{}",
        grace.describe()
    );
    let (status, body) = http_get(addr, "/").unwrap();
    assert_eq!(status, 200, "{body}");
    let environ = |grace: &crate::harness::Grace| {
        std::fs::read(format!("/proc/{}/environ", grace.pid())).unwrap()
    };
    assert!(
        contains(&environ(&grace), b"LISTEN_FDS=1"),
        "the first image got it"
    );
    grace.signal("USR2");
    grace.wait_line_count(") is serving", 2, T);
    assert_eq!(http_get(addr, "/").unwrap().0, 200);
    // The re-executed grace no longer carries what systemd passed to the first image.
    let env = environ(&grace);
    for var in ["LISTEN_FDS=", "LISTEN_PID=", "LISTEN_FDNAMES="] {
        assert!(
            !contains(&env, var.as_bytes()),
            "{var} still in grace's environment"
        );
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn compat_variables_follow_start_server_and_einhorn() {
    let dir = temp_dir("compat");
    let report = dir.join("report");
    let sock = dir.join("app.sock");
    let contract = example("contract");
    let unix = format!("unix:{}", sock.display());
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        ":0",
        "--listen",
        &unix,
        "--compat",
        "server-starter",
        "--compat",
        "einhorn",
        "--",
        contract.to_str().unwrap(),
        report.to_str().unwrap(),
    ]);
    let tcp = grace.tcp_addrs(2);
    let text = wait_for("the report", T, || std::fs::read_to_string(&report).ok());
    let env = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("env={k}=")))
            .unwrap_or_else(|| panic!("{k} missing:\n{text}"))
            .to_string()
    };
    // start_server: `--port 127.0.0.1:5000 --port 8080 --path /tmp/a.sock` gives
    // SERVER_STARTER_PORT=127.0.0.1:5000=3;8080=4;/tmp/a.sock=5
    assert_eq!(
        env("SERVER_STARTER_PORT"),
        format!("{}=3;{}=4;{}=5", tcp[0], tcp[1].port(), sock.display())
    );
    assert_eq!(env("SERVER_STARTER_GENERATION"), "1");
    assert_eq!(env("EINHORN_FD_COUNT"), "3");
    assert_eq!(
        (
            env("EINHORN_FD_0"),
            env("EINHORN_FD_1"),
            env("EINHORN_FD_2")
        ),
        ("3".into(), "4".into(), "5".into())
    );
}

#[test]
fn deploy_script_fails_the_deploy_when_grace_rolls_back() {
    let dir = temp_dir("deploy");
    let installed = dir.join("server");
    crate::harness::install_copy(&example("fault_server"), &installed);
    let control = dir.join("ctl").display().to_string();
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--control",
        &control,
        "--",
        installed.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    let addr = grace.addr();
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/deploy.sh");
    let run = |new: &Path| {
        let out = Command::new(&deploy)
            .arg(new)
            .arg(&installed)
            .args(["--control", &control])
            .env("GRACE", grace_bin())
            .output()
            .unwrap();
        text(&out)
    };
    let broken = dir.join("broken");
    std::fs::write(&broken, "#!/bin/sh\nexit 1\n").unwrap();
    let before = served_by(&http_get(addr, "/").unwrap().1);
    let (code, out, err) = run(&broken);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("restart failed") && err.contains("rolled back"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(example("fault_server")).unwrap(),
        "restored"
    );
    assert_eq!(served_by(&http_get(addr, "/").unwrap().1), before);

    let (code, out, err) = run(&example("fault_server"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("is serving"), "{out}");
    served_by_other(addr, before);
}

#[test]
fn as_pid_1_grace_restart_needs_no_arguments() {
    let dir = temp_dir("pid1-control");
    let sock = format!("unix:{}", dir.join("app.sock").display());
    // A network namespace of its own too, so the abstract control name is ours alone.
    let (mut run, init) = Grace::as_pid1(&sock, true);
    let nsenter = |args: &[&str]| {
        let out = Command::new("/usr/bin/nsenter")
            .args([
                "--target",
                &init.to_string(),
                "--pid",
                "--net",
                grace_bin().to_str().unwrap(),
            ])
            .args(args)
            .output()
            .unwrap();
        text(&out)
    };
    let (code, out, err) = nsenter(&["restart"]);
    assert_eq!(code, Some(0), "{out}{err}\n{}", run.describe());
    assert!(out.contains("generation 2"), "{out}");
    let (code, out, _) = nsenter(&["status", "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pid"], 1);
    let (code, out, err) = nsenter(&["stop"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(run.wait_exit(T).code(), Some(0));
}
