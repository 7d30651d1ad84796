//! Bad input: one clear line naming the input and the problem, a non-zero exit, and nothing left
//! running or bound.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::harness::{grace_bin, temp_dir};

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn grace(args: &[&str]) -> Outcome {
    let out = Command::new(grace_bin())
        .args(args)
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The message (stderr up to the first blank line: one line, or clap's line plus the list of
/// missing arguments) must name `needles`.
fn refused(args: &[&str], code: i32, needles: &[&str]) {
    let out = grace(args);
    let first = out.stderr.split("\n\n").next().unwrap_or_default();
    assert_eq!(out.code, Some(code), "{args:?}: {}", out.stderr);
    for needle in needles {
        assert!(
            first.contains(needle),
            "{args:?}: expected {needle:?} in the message {first:?}"
        );
    }
    assert!(
        first.starts_with("error: ") || first.starts_with("grace: "),
        "{args:?}: a message, not a log line or a panic: {first:?}"
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    // Nothing started: the would-be server writes a marker file if it ever runs.
}

#[test]
fn malformed_invocations_are_refused_with_a_clear_line() {
    let t = "/bin/true";
    let usage: &[(&[&str], &[&str])] = &[
        (&["run", "--", t], &["--listen"]),
        (&["run", "--listen", "127.0.0.1:0"], &["COMMAND"]),
        (
            &["run", "--listen", "127.0.0.1:99999", "--", t],
            &["127.0.0.1:99999", "out of range"],
        ),
        (
            &["run", "--listen", "http://:80", "--", t],
            &["http://:80", "unknown scheme"],
        ),
        (&["run", "--listen", "=:80", "--", t], &["=:80", "name"]),
        (&["run", "--listen", "[::1:80", "--", t], &["[::1:80"]),
        (&["run", "--listen", "unix:", "--", t], &["unix:"]),
        (&["run", "--listen", "fd:1", "--", t], &["fd:1"]),
        (
            &["run", "--listen", ":0", "--ready-timeout", "30", "--", t],
            &["\"30\"", "missing unit"],
        ),
        (
            &["run", "--listen", ":0", "--drain-timeout", "5d", "--", t],
            &["\"5d\"", "unknown unit"],
        ),
        (
            &[
                "run",
                "--listen",
                ":0",
                "--stop-signal",
                "TERMINATE",
                "--",
                t,
            ],
            &["TERMINATE", "invalid signal"],
        ),
        (
            &["run", "--listen", ":0", "--ready", "banana", "--", t],
            &["banana", "invalid ready mode"],
        ),
        (
            &["run", "--listen", ":0", "--ready", "http:health", "--", t],
            &["http:health"],
        ),
        (
            &["run", "--listen", ":0", "--on-crash", "sometimes", "--", t],
            &["sometimes"],
        ),
        (
            &["run", "--listen", ":0", "--socket-mode", "999", "--", t],
            &["999"],
        ),
        (
            &["run", "--listen", ":0", "--backlog", "0", "--", t],
            &["0"],
        ),
        (
            &["run", "--listen", ":0", "--max-draining", "0", "--", t],
            &["0"],
        ),
        (&["frobnicate"], &["frobnicate"]),
    ];
    for (args, needles) in usage {
        refused(args, 2, needles);
    }
}

#[test]
fn runtime_refusals_leave_nothing_bound_or_running() {
    let dir = temp_dir("bad-input");
    let marker = dir.join("ran");
    let script = format!("touch {}", marker.display());
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    // A free port first, then the busy one: the first must be released again.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let free_addr = free.to_string();
    refused(
        &[
            "run", "--listen", &free_addr, "--listen", &busy_addr, "--", "/bin/sh", "-c", &script,
        ],
        1,
        &[&busy_addr, "in use"],
    );
    TcpListener::bind(free).expect("the first socket was released");

    let file = dir.join("not-a-socket");
    std::fs::write(&file, "x").unwrap();
    let spec = format!("unix:{}", file.display());
    refused(
        &["run", "--listen", &spec, "--", "/bin/sh", "-c", &script],
        1,
        &["not-a-socket", "not a socket"],
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "x",
        "the file is untouched"
    );

    let spec = format!("unix:{}/missing/app.sock", dir.display());
    refused(
        &["run", "--listen", &spec, "--", "/bin/sh", "-c", &script],
        1,
        &["missing/app.sock"],
    );

    refused(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            "no-such-command-xyz",
        ],
        127,
        &["no-such-command-xyz", "not found"],
    );
    let plain = dir.join("plain");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            plain.to_str().unwrap(),
        ],
        126,
        &["plain", "not executable"],
    );
    refused(
        &["run", "--listen", "systemd", "--", t_true()],
        1,
        &["LISTEN_FDS"],
    );

    assert!(!marker.exists(), "the server must never have started");
}

fn t_true() -> &'static str {
    "/bin/true"
}
