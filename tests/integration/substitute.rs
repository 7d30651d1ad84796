//! Bind substitution for binaries no preload library can reach: Debian's caddy (Go) with a
//! `bind` directive and a Go server built with `CGO_ENABLED=0`, each binding its own port, lose
//! nothing across restarts under load; binds keep being answered while grace re-executes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    Grace, fixture, free_port, grace_bin, install, install_copy, require, temp_dir,
};
use crate::steered::{four_restarts_under_load, stop};

const T: Duration = Duration::from_secs(60);

/// Builds a Go fixture with the standard library only, `CGO_ENABLED=0`: a static binary.
fn go_build(source: &str, dir: &Path) -> std::path::PathBuf {
    let go = require("/usr/bin/go", "golang-go");
    let out = dir.join("server");
    let built = Command::new(go)
        .args(["build", "-o"])
        .arg(&out)
        .arg(fixture(source))
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("gopath"))
        .env("HOME", dir)
        .env("GO111MODULE", "off")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    // No program interpreter: nothing a loader could preload into.
    let elf = std::fs::read(&out).unwrap();
    assert!(
        !elf.windows(b"ld-linux".len()).any(|w| w == b"ld-linux"),
        "{} is dynamically linked",
        out.display()
    );
    out
}

#[test]
fn a_static_go_server_that_binds_its_port_loses_nothing() {
    let dir = temp_dir("substitute-go");
    let server = go_build("go_bind_server.go", &dir);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let grace = Grace::start(&[
        "run",
        "--listen",
        &listen,
        "--ready",
        "http:/",
        "--",
        server.to_str().unwrap(),
        &listen,
    ]);
    grace.wait_line(") is serving", T);
    four_restarts_under_load(&grace, listen.parse().unwrap(), true);
    stop(grace);
}

#[test]
fn caddy_with_a_bind_directive_loses_nothing() {
    let caddy = require("/usr/bin/caddy", "caddy");
    let dir = temp_dir("substitute-caddy");
    let port = free_port();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{{\n\tadmin off\n\tauto_https off\n\tservers {{\n\t\tprotocols h1\n\t}}\n}}\n\
             http://127.0.0.1:{port} {{\n\tbind 127.0.0.1\n\trespond \"hello from caddy\" 200\n}}\n"
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let grace = Grace::start_with(
        &[
            "run",
            "--listen",
            &listen,
            "--ready",
            "http:/",
            "--",
            caddy,
            "run",
            "--config",
            config.to_str().unwrap(),
            "--adapter",
            "caddyfile",
        ],
        |cmd| {
            cmd.env("HOME", &dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config"));
        },
    );
    grace.wait_line(") is serving", T);
    // caddy's reply does not name its pid: new pids are checked from grace's log.
    four_restarts_under_load(&grace, listen.parse().unwrap(), false);
    stop(grace);
}

/// A generation that binds in a loop while grace re-executes: every call is answered (by the
/// image that is there when it comes), none fails, none waits long.
#[test]
fn binds_racing_a_restart_are_answered() {
    let python = require("/usr/bin/python3", "python3");
    let dir = temp_dir("substitute-race");
    let grace = Grace::start(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "delay:1s",
        "--",
        python,
        fixture("bind_loop.py").to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    grace.wait_line(") is serving", T);
    // Two restarts, each a re-exec while generation 1 (then 2) binds away.
    for n in 2..=3 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", n, T);
        grace.wait_line_count(") exited with status", n - 1, T);
    }
    crate::harness::wait_for("two generations' results", T, || {
        (std::fs::read_dir(&dir).unwrap().count() >= 2).then_some(())
    });
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        binds_were_answered(&entry.path());
    }
    stop(grace);
}

/// What a `bind_loop.py` generation wrote at its stop: it bound many times, every bind succeeded,
/// none waited as long as a second.
fn binds_were_answered(results: &Path) {
    let text = std::fs::read_to_string(results).unwrap();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .map(|x| x.parse().unwrap())
        .collect();
    let (count, errors, worst_ms) = (v[0], v[1], v[2]);
    assert!(count > 100.0, "{text}");
    assert_eq!(errors, 0.0, "{text}");
    assert!(worst_ms < 1000.0, "a bind waited {worst_ms} ms: {text}");
}

/// A new grace binary that hangs on the handoff check holds the restart up for seconds: the
/// server's binds are answered all the while, not after it.
#[test]
fn binds_are_answered_while_a_new_binary_hangs_on_the_handoff_check() {
    let python = require("/usr/bin/python3", "python3");
    let dir = temp_dir("substitute-check");
    let bin = temp_dir("substitute-check-bin");
    let copy = bin.join("grace");
    install_copy(&grace_bin(), &copy);
    let mut grace = Grace::start_raw(
        copy.to_str().unwrap(),
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--ready",
            "delay:200ms",
            "--",
            python,
            fixture("bind_loop.py").to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    )
    .owning(bin);
    grace.wait_line(") is serving", T);
    // Replaced, not overwritten (the running grace executes the old file): a binary that never
    // answers, which grace waits for up to its check timeout (5 s).
    std::fs::remove_file(&copy).unwrap();
    install(&copy, b"#!/bin/sh\nexec sleep 100\n");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    grace.signal("USR2");
    let line = grace.wait_line("restart failed", T);
    assert!(line.contains("did not answer the handoff check"), "{line}");
    grace.signal("TERM");
    assert_eq!(grace.wait_exit(T).code(), Some(0), "{}", grace.describe());
    let results: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(results.len(), 1, "one generation's results");
    // A bind that waited for the check would have waited its 5 s.
    binds_were_answered(&results[0].path());
}

/// A grace that may not read its server's memory (root without CAP_SYS_PTRACE, the server
/// another user: Docker-like capabilities and a server that drops privileges before binding)
/// says so in one line with what to do, and the bind runs as without grace.
#[test]
fn a_server_grace_cannot_read_is_named_in_one_line() {
    let python = require("/usr/bin/python3", "python3");
    let setpriv = require("/usr/bin/setpriv", "util-linux");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let grace_path = grace_bin();
    let mut grace = Grace::start_raw(
        setpriv,
        &[
            "--bounding-set=-sys_ptrace",
            "--inh-caps=-sys_ptrace",
            grace_path.to_str().unwrap(),
            "run",
            "--listen",
            &listen,
            "--",
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            fixture("inject_server.py").to_str().unwrap(),
            &port.to_string(),
        ],
    );
    let line = grace.wait_line("binds cannot be substituted", T);
    assert!(
        line.contains("reading its address") && line.contains("CAP_SYS_PTRACE"),
        "{line}"
    );
    // Its bind ran in the kernel, on the port grace holds: the server exits, and with it grace.
    assert_ne!(grace.wait_exit(T).code(), Some(0), "{}", grace.describe());
    assert_eq!(
        grace.count_lines("binds cannot be substituted"),
        1,
        "said once: {}",
        grace.describe()
    );
}

/// grace run by another user than root: the filter needs `no_new_privs`, which grace sets in the
/// server and says so; the bind is substituted all the same.
#[test]
fn as_another_user_the_server_runs_with_no_new_privs_and_is_substituted() {
    use std::os::unix::process::CommandExt;
    let python = require("/usr/bin/python3", "python3");
    let dir = temp_dir("substitute-nobody");
    // Its control socket goes there.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let grace = Grace::start_with(
        &[
            "run",
            "--listen",
            &listen,
            "--control",
            dir.join("ctl").to_str().unwrap(),
            "--ready",
            "http:/",
            "--",
            python,
            fixture("inject_server.py").to_str().unwrap(),
            &port.to_string(),
        ],
        |cmd| {
            cmd.uid(65534).gid(65534).current_dir("/");
        },
    );
    grace.wait_line("the server runs with no_new_privs", T);
    grace.wait_line(") is serving", T);
    let pid = *grace.serving_pids().last().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let (_, body) = crate::harness::http_get(listen.parse().unwrap(), "/").unwrap();
    assert_eq!(crate::harness::served_by(&body), pid);
    stop(grace);
}

/// `--listen :PORT` is the dual-stack `[::]:PORT`; a server binding `0.0.0.0:PORT` would get IPv6
/// peers on an IPv4 socket: not substituted, its bind fails as without grace, and one line says
/// which `--listen` to give.
#[test]
fn an_ipv4_wildcard_bind_on_the_dual_stack_port_is_refused_with_the_listen_to_give() {
    let python = require("/usr/bin/python3", "python3");
    let port = free_port();
    let listen = format!(":{port}");
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        &listen,
        "--",
        python,
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "0.0.0.0",
    ]);
    let line = grace.wait_line("but the addresses differ", T);
    assert!(
        line.contains(&format!(
            "binds tcp 0.0.0.0:{port}, which grace holds as tcp [::]:{port}"
        )),
        "{line}"
    );
    assert!(
        line.contains(&format!("give --listen 0.0.0.0:{port}")),
        "{line}"
    );
    assert_eq!(grace.wait_exit(T).code(), Some(1), "{}", grace.describe());
    assert!(
        grace.output().contains("Address already in use"),
        "{}",
        grace.describe()
    );
}
