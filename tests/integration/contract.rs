//! The contract of DESIGN.md section 2, as the server sees it (examples/contract.rs reports it).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use nix::libc;

use crate::harness::{Grace, example, temp_dir, wait_for};

const T: Duration = Duration::from_secs(20);

struct Report {
    fields: BTreeMap<String, String>,
    fds: BTreeSet<i32>,
    fdtype: BTreeMap<i32, String>,
    fdaddr: BTreeMap<i32, String>,
    env: BTreeMap<String, String>,
}

fn parse(text: &str) -> Report {
    let mut r = Report {
        fields: BTreeMap::new(),
        fds: BTreeSet::new(),
        fdtype: BTreeMap::new(),
        fdaddr: BTreeMap::new(),
        env: BTreeMap::new(),
    };
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap();
        let fd_and = |v: &str| {
            let (fd, rest) = v.split_once(' ').unwrap();
            (fd.parse::<i32>().unwrap(), rest.to_string())
        };
        match key {
            "fd" => {
                r.fds.insert(fd_and(value).0);
            }
            "fdtype" => {
                let (fd, t) = fd_and(value);
                r.fdtype.insert(fd, t);
            }
            "fdaddr" => {
                let (fd, a) = fd_and(value);
                r.fdaddr.insert(fd, a);
            }
            "env" => {
                let (k, v) = value.split_once('=').unwrap();
                r.env.insert(k.to_string(), v.to_string());
            }
            _ => {
                r.fields.insert(key.to_string(), value.to_string());
            }
        }
    }
    r
}

/// The fixture is a Rust program, and Rust's runtime ignores SIGPIPE before `main` runs, so the
/// signal state is read by grep (C) in the same process environment, and the shell then `exec`s the
/// fixture (same pid, so LISTEN_PID still matches).
const SIGNAL_STATE: &str = r#"grep -E '^Sig(Blk|Ign)' /proc/self/status > "$1.sig.tmp" && mv "$1.sig.tmp" "$1.sig"; exec "$0" "$1""#;

fn signal_state(report: &Path) -> String {
    std::fs::read_to_string(report.with_extension("sig")).unwrap()
}

/// Waits for a report written by the generation whose GRACE_GENERATION is `generation`.
fn report_of(path: &Path, generation: &str) -> Report {
    wait_for(&format!("report of generation {generation}"), T, || {
        let r = parse(&std::fs::read_to_string(path).ok()?);
        (r.env.get("GRACE_GENERATION").map(String::as_str) == Some(generation)).then_some(r)
    })
}

#[test]
fn the_server_gets_exactly_its_sockets_env_and_a_clean_signal_state() {
    let dir = temp_dir("contract");
    let report = dir.join("report");
    let sock = dir.join("app.sock");
    let contract = example("contract");
    let unix = format!("unix:{}", sock.display());
    let grace = Grace::start_with(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "admin=127.0.0.1:0",
            "--listen",
            &unix,
            "--listen",
            "dns=udp://127.0.0.1:0",
            // The plain socket-activation contract, without the bind filter (the test of a
            // Python server below checks that the filter leaves no trace).
            "--inject",
            "never",
            "--",
            "/bin/sh",
            "-c",
            SIGNAL_STATE,
            contract.to_str().unwrap(),
            report.to_str().unwrap(),
        ],
        |cmd| {
            cmd.env("CONTRACT_MARKER", "kept")
                .env("LISTEN_PIDFDID", "12345")
                .env("LISTEN_FDS", "9")
                .env("GRACE_PROBE_ADDR", "stale");
            // SAFETY: between fork and exec of grace: only async-signal-safe calls. grace must undo
            // all of this for its server: ignored SIGINT/SIGQUIT (as a background job of a
            // non-interactive shell gets them), a blocked SIGUSR1, and a stray inheritable fd.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                    libc::signal(libc::SIGQUIT, libc::SIG_IGN);
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGUSR1);
                    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    libc::dup2(2, 57);
                    Ok(())
                });
            }
        },
    );
    let tcp = grace.tcp_addrs(2);
    let first = report_of(&report, "1");
    let check = |r: &Report| {
        let pid = &r.fields["pid"];
        assert_eq!(
            r.fds,
            BTreeSet::from([0, 1, 2, 3, 4, 5, 6]),
            "only the sockets beyond 0-2"
        );
        assert_eq!(r.fdtype[&3], "stream");
        assert_eq!(r.fdtype[&4], "stream");
        assert_eq!(r.fdtype[&5], "stream");
        assert_eq!(r.fdtype[&6], "dgram");
        assert_eq!(r.fdaddr[&3], tcp[0].to_string(), "in --listen order");
        assert_eq!(r.fdaddr[&4], tcp[1].to_string());
        assert_eq!(r.fdaddr[&5], sock.display().to_string());
        assert_eq!(r.env["LISTEN_FDS"], "4");
        assert_eq!(
            &r.env["LISTEN_PID"], pid,
            "LISTEN_PID is the server's own pid"
        );
        assert_eq!(r.env["LISTEN_FDNAMES"], "unknown:admin:unknown:dns");
        assert!(
            r.env["NOTIFY_SOCKET"].starts_with('@'),
            "{}",
            r.env["NOTIFY_SOCKET"]
        );
        assert_eq!(
            r.env["CONTRACT_MARKER"], "kept",
            "the rest of the environment passes through"
        );
        assert!(!r.env.contains_key("LISTEN_PIDFDID"));
        assert!(
            !r.env.contains_key("GRACE_PROBE_ADDR"),
            "no probe socket unless a probe mode asks"
        );
        let internal: Vec<&String> = r
            .env
            .keys()
            .filter(|k| k.starts_with("GRACE_") && *k != "GRACE_GENERATION" && *k != "GRACE_LOG")
            .collect();
        assert!(
            internal.is_empty(),
            "grace-internal variables leaked: {internal:?}"
        );
        let signals = signal_state(&report);
        assert!(
            signals.contains("SigBlk:\t0000000000000000"),
            "signal mask reset: {signals}"
        );
        assert!(
            signals.contains("SigIgn:\t0000000000000000"),
            "dispositions reset: {signals}"
        );
        assert_eq!(&r.fields["pgid"], pid, "own process group");
        assert_eq!(r.fields["ppid"], grace.pid().to_string());
    };
    check(&first);

    // The same after a restart (a re-executed grace must not leak its own fds either).
    grace.signal("USR2");
    let second = report_of(&report, "2");
    check(&second);
    assert_ne!(first.fields["pid"], second.fields["pid"]);
    assert_eq!(first.env["NOTIFY_SOCKET"], second.env["NOTIFY_SOCKET"]);
}

/// `--ready tcp` on a TCP listener: the probe goes through the real address to the generation's
/// own socket, so the server gets exactly its N sockets and no probe address.
#[test]
fn no_listen_pid_and_a_probe_through_the_real_address() {
    let dir = temp_dir("contract-probe");
    let report = dir.join("report");
    let contract = example("contract");
    let _grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--no-listen-pid",
        "--ready",
        "tcp",
        "--",
        contract.to_str().unwrap(),
        report.to_str().unwrap(),
    ]);
    let r = report_of(&report, "1");
    assert!(!r.env.contains_key("LISTEN_PID"));
    assert_eq!(r.env["LISTEN_FDS"], "1", "no extra probe socket");
    assert_eq!(r.env["LISTEN_FDNAMES"], "unknown");
    assert!(!r.env.contains_key("GRACE_PROBE_ADDR"));
}

/// Where nothing is steered (a unix socket only), a TCP probe needs a private socket of the
/// generation's own: it comes last, with its address in `GRACE_PROBE_ADDR`.
#[test]
fn a_probe_with_only_shared_sockets_gets_a_private_socket() {
    let dir = temp_dir("contract-probe-unix");
    let report = dir.join("report");
    let sock = dir.join("s.sock");
    let contract = example("contract");
    let _grace = Grace::start(&[
        "run",
        "--listen",
        &format!("unix:{}", sock.display()),
        "--ready",
        "tcp",
        "--",
        contract.to_str().unwrap(),
        report.to_str().unwrap(),
    ]);
    let r = report_of(&report, "1");
    assert_eq!(r.env["LISTEN_FDS"], "2", "the probe socket comes last");
    assert_eq!(r.env["LISTEN_FDNAMES"], "unknown:grace-probe");
    assert_eq!(r.fdaddr[&4], r.env["GRACE_PROBE_ADDR"]);
    assert!(r.env["GRACE_PROBE_ADDR"].starts_with("127.0.0.1:"));
}

/// With default flags, a Python server (which `--inject auto` once preloaded a library into)
/// sees no trace of bind substitution: no grace-internal variable, no `LD_PRELOAD`; and a helper
/// it runs as another user says nothing on its stderr (a preload the loader cannot open made it
/// print an error).
#[test]
fn a_python_server_and_its_helpers_see_no_trace_of_substitution() {
    let python = crate::harness::require("/usr/bin/python3", "python3");
    let dir = temp_dir("contract-python");
    let out = dir.join("out");
    let script = r#"
import os, subprocess, sys
seen = sorted(k for k in os.environ if k.startswith("GRACE_INJECT") or k == "LD_PRELOAD")
helper = subprocess.run([sys.executable, "-c", "print('helper ran')"], user="nobody",
                        capture_output=True, text=True, cwd="/")
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("vars=" + ",".join(seen) + "\n")
    f.write("helper_out=" + helper.stdout.strip() + "\n")
    f.write("helper_err=" + helper.stderr.replace("\n", " ") + "\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
import time
time.sleep(60)
"#;
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--",
        python,
        "-c",
        script,
        out.to_str().unwrap(),
    ]);
    let text = wait_for("the server's report", T, || {
        std::fs::read_to_string(&out).ok()
    });
    assert!(text.contains("vars=\n"), "{text}");
    assert!(text.contains("helper_out=helper ran\n"), "{text}");
    assert!(text.contains("helper_err=\n"), "{text}");
    drop(grace);
}
