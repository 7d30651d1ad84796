//! `--inject`: servers that bind their own port (Node, Python, a Rust program, `python3 -m
//! http.server`) get grace's socket through bind substitution, and restart with zero downtime
//! like socket-activated ones. Loopback only; ports are picked free by the kernel, then given to
//! both grace and the server (which needs the number on its command line).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{
    Grace, alive, example, fixture, free_port, grace_bin, http_get, require, served_by, temp_dir,
    wait_for,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(30);

/// What grace logs at start when it substitutes binds.
const INJECTING: &str = "a server's bind of a --listen address gets grace's socket";

/// Debian's python3, never a pyenv shim from PATH.
fn python() -> &'static str {
    require("/usr/bin/python3", "python3")
}

fn node() -> &'static str {
    require("/usr/bin/node", "nodejs")
}

/// `rustc` run from a test (builds the static server and the user's preload library).
fn rustc(args: &[&str]) {
    let output = Command::new("rustc")
        .args(["--edition", "2024", "-C", "opt-level=1"])
        .args(args)
        .output()
        .expect("running rustc");
    assert!(
        output.status.success(),
        "rustc {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts `grace run --listen 127.0.0.1:PORT … -- command` and waits until it serves.
fn start(port: u16, extra: &[&str], command: &[&str]) -> (Grace, SocketAddr) {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["run", "--listen", &listen, "--ready", "delay:500ms"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let grace = Grace::start(&args);
    grace.wait_line(INJECTING, T);
    grace.wait_line(") is serving", T);
    let addr: SocketAddr = listen.parse().unwrap();
    wait_for("a first answer", T, || http_get(addr, "/").ok());
    (grace, addr)
}

/// A process's environment variable, if it has it.
fn env_of(pid: i32, key: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let prefix = format!("{key}=");
    environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Nothing of the substitution in a server's environment.
fn no_trace(pid: i32) {
    for key in ["LD_PRELOAD", "GRACE_INJECT"] {
        assert_eq!(env_of(pid, key), None, "pid {pid} has {key}");
    }
}

/// Three restarts under load: no request fails, and after each one the new pid answers, its bind
/// substituted with nothing in its environment.
fn restarts_under_load(grace: &Grace, addr: SocketAddr) {
    no_trace(*grace.serving_pids().last().unwrap());
    let load = Load::start(addr, 4, "/");
    load.wait_more(50, T);
    for i in 1..=3 {
        grace.signal("USR2");
        grace.wait_line_count(") is serving", i + 1, T);
        let newest = *grace.serving_pids().last().unwrap();
        wait_for(&format!("generation {} to answer", i + 1), T, || {
            let (_, body) = http_get(addr, "/").ok()?;
            (served_by(&body) == newest).then_some(())
        });
        no_trace(newest);
        load.wait_more(50, T);
    }
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{:?}\n{}",
        &tally.errors[..tally.errors.len().min(10)],
        grace.describe()
    );
    let pids = grace.serving_pids();
    assert_eq!(pids.len(), 4, "{}", grace.describe());
    assert_eq!(
        pids.iter().collect::<BTreeSet<_>>().len(),
        4,
        "a new process each time"
    );
    for pid in &pids {
        assert!(
            tally.pids.contains(pid),
            "generation pid {pid} served under load: {:?}",
            tally.pids
        );
    }
}

fn stop(mut grace: Grace) {
    grace.signal("TERM");
    assert_eq!(grace.wait_exit(T).code(), Some(0), "{}", grace.describe());
}

#[test]
fn node_server_that_binds_its_port_restarts_under_load_losing_nothing() {
    let port = free_port();
    let script = fixture("inject_server.js");
    let (grace, addr) = start(
        port,
        &[],
        &[node(), script.to_str().unwrap(), &port.to_string()],
    );
    restarts_under_load(&grace, addr);
    stop(grace);
}

#[test]
fn python_threading_http_server_restarts_under_load_losing_nothing() {
    let port = free_port();
    let script = fixture("inject_server.py");
    let (grace, addr) = start(
        port,
        &[],
        &[python(), script.to_str().unwrap(), &port.to_string()],
    );
    restarts_under_load(&grace, addr);
    stop(grace);
}

/// A bind whose length is that of the `sockaddr_storage` holding the address, not of the
/// address: reported by the filter (longer than any unix address) and substituted all the same.
#[test]
fn a_bind_with_the_length_of_sockaddr_storage_restarts_under_load_losing_nothing() {
    let port = free_port();
    let script = fixture("inject_server.py");
    let (grace, addr) = start(
        port,
        &[],
        &[
            python(),
            script.to_str().unwrap(),
            &port.to_string(),
            "127.0.0.1",
            "storage",
        ],
    );
    restarts_under_load(&grace, addr);
    stop(grace);
}

#[test]
fn rust_server_that_binds_its_port_restarts_under_load_losing_nothing() {
    let port = free_port();
    let server = example("bind_server");
    let (grace, addr) = start(
        port,
        &[],
        &[server.to_str().unwrap(), &format!("127.0.0.1:{port}")],
    );
    restarts_under_load(&grace, addr);
    stop(grace);
}

/// A server that calls `shutdown(SHUT_RDWR)` on its listening socket when it stops (to wake its
/// accept threads, as many C and C++ servers do) stops only its own generation's socket (what its
/// bind got), never the one another generation accepts from.
#[test]
fn server_that_shuts_its_listener_down_restarts_under_load_losing_nothing() {
    let port = free_port();
    let script = fixture("inject_shutdown_server.py");
    let (grace, addr) = start(
        port,
        &[],
        &[python(), script.to_str().unwrap(), &port.to_string()],
    );
    restarts_under_load(&grace, addr);
    assert_eq!(
        listening_inode(port).map(|inode| socket_inodes(grace.pid()).contains(&inode)),
        Some(true),
        "grace's socket still listens"
    );
    stop(grace);
}

/// A server whose fd 3 (the socket grace passed) was stopped with a raw shutdown(2) before it
/// execs again: its listen() on that socket runs for real (grace answers listen itself only on a
/// socket that still listens) and brings it back, at its address.
#[test]
fn a_passed_socket_stopped_before_exec_listens_again() {
    let port = free_port();
    let script = fixture("inject_shutdown_server.py");
    let (grace, addr) = start(
        port,
        &[],
        &[python(), script.to_str().unwrap(), &port.to_string(), "raw"],
    );
    let pid = *grace.serving_pids().last().unwrap();
    let (_, body) = http_get(addr, "/").unwrap();
    assert_eq!(served_by(&body), pid);
    let inode = listening_inode(port).expect("a socket listens");
    assert!(socket_inodes(grace.pid()).contains(&inode), "grace's own");
    assert!(socket_inodes(pid).contains(&inode), "the server's copy");
    stop(grace);
}

/// A UDP server binding `0.0.0.0:P` does not get the dual-stack socket of `udp://:P` (its
/// recvfrom would give it IPv6 senders cut to an IPv4 buffer): its bind fails, and grace says
/// why.
#[test]
fn ipv4_udp_server_is_not_given_the_dual_stack_socket() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("udp://:{port}");
    let bind = "import socket, sys\n\
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                s.bind(('0.0.0.0', int(sys.argv[1])))\n\
                print('bound on its own', flush=True)\n";
    let mut grace = Grace::start(&[
        "run",
        "--listen",
        &listen,
        "--ready",
        "delay:200ms",
        "--inject",
        "always",
        "--",
        python(),
        "-c",
        bind,
        &port.to_string(),
    ]);
    let line = grace.wait_line("but the addresses differ", T);
    assert!(
        line.contains(&format!(
            "binds udp 0.0.0.0:{port}, which grace holds as udp [::]:{port}"
        )),
        "{line}"
    );
    assert!(line.contains(&format!("udp://0.0.0.0:{port}")), "{line}");
    assert_eq!(grace.wait_exit(T).code(), Some(1), "{}", grace.describe());
    assert!(
        !grace.output().contains("bound on its own"),
        "{}",
        grace.describe()
    );
}

/// Connects and sends a request, without reading the reply.
fn send_request(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /index.html HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    Ok(s)
}

fn read_reply(mut s: TcpStream) -> Result<String, String> {
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

/// `python3 -m http.server` dies at once on SIGTERM: what it had accepted and not answered would
/// be lost. With its own steered socket, what is queued for it at the switch stays its to answer:
/// grace waits for its queue to empty before the stop signal. To make "queued for it" certain, the
/// old generation is frozen (SIGSTOP) while the clients connect and through the switch; woken, it
/// answers them all, and only then is it stopped. Nothing is refused meanwhile.
#[test]
fn python_http_server_frozen_at_the_switch_answers_its_queue_before_it_is_stopped() {
    let dir = temp_dir("inject-http-server");
    std::fs::write(dir.join("index.html"), "queued and answered\n").unwrap();
    let port = free_port();
    let (grace, addr) = start(
        port,
        &["--drain-timeout", "20s"],
        &[
            python(),
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            dir.to_str().unwrap(),
        ],
    );
    let load = Load::start(addr, 2, "/index.html");
    load.wait_more(20, T);
    for i in 1..=3 {
        let old = *grace.serving_pids().last().unwrap();
        kill(old, "STOP");
        let waiting: Vec<TcpStream> = (0..8)
            .map(|n| send_request(addr).unwrap_or_else(|e| panic!("client {n}: {e}")))
            .collect();
        grace.signal("USR2");
        grace.wait_line_count(") is serving", i + 1, T);
        // The new generation serves new clients (the load's own may be waiting in the frozen
        // one's queue); the frozen one keeps its queue, and is not stopped.
        for _ in 0..5 {
            let reply = read_reply(send_request(addr).unwrap()).unwrap();
            assert!(reply.starts_with("HTTP/1.0 200"), "{reply:?}");
        }
        assert!(alive(old), "stopped with a queue\n{}", grace.describe());
        assert_eq!(
            grace.count_lines("queue empty after"),
            i - 1,
            "{}",
            grace.describe()
        );
        kill(old, "CONT");
        for (n, s) in waiting.into_iter().enumerate() {
            let reply = read_reply(s).unwrap_or_else(|e| panic!("queued client {n}: {e}"));
            assert!(
                reply.starts_with("HTTP/1.0 200") && reply.ends_with("queued and answered\n"),
                "queued client {n}: {reply:?}"
            );
        }
        wait_for("the old generation to exit", T, || {
            (!alive(old)).then_some(())
        });
        load.wait_more(20, T);
    }
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{:?}\n{}", tally.errors, grace.describe());
    stop(grace);
}

fn kill(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The inodes of the sockets `pid` has open.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The inode of the socket listening on 127.0.0.1:`port`, from /proc/net/tcp.
fn listening_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
            .then(|| fields.get(9)?.parse().ok())
            .flatten()
    })
}

#[test]
fn only_the_address_grace_owns_is_substituted() {
    let owned = free_port();
    let other = free_port();
    let server = example("bind_server");
    let (grace, addr) = start(
        owned,
        &[],
        &[
            server.to_str().unwrap(),
            &format!("127.0.0.1:{owned}"),
            &format!("127.0.0.1:{other}"),
        ],
    );
    let pid = *grace.serving_pids().last().unwrap();
    let other_addr: SocketAddr = format!("127.0.0.1:{other}").parse().unwrap();
    let (_, body) = http_get(addr, "/").unwrap();
    assert_eq!(served_by(&body), pid);
    assert!(body.contains(&format!("port={owned}")), "{body}");
    let (_, body) = http_get(other_addr, "/").unwrap();
    assert!(body.contains(&format!("port={other}")), "{body}");

    // One socket listens on each port; the owned one is grace's (the server holds a copy), the
    // other is the server's alone.
    let owned_inode = listening_inode(owned).expect("a socket listens on the owned port");
    let other_inode = listening_inode(other).expect("a socket listens on the other port");
    let grace_sockets = socket_inodes(grace.pid());
    let server_sockets = socket_inodes(pid);
    assert!(grace_sockets.contains(&owned_inode));
    assert!(server_sockets.contains(&owned_inode), "substituted");
    assert!(server_sockets.contains(&other_inode));
    assert!(
        !grace_sockets.contains(&other_inode),
        "grace does not hold it"
    );

    stop(grace);
    assert!(
        TcpStream::connect(other_addr).is_err(),
        "the server's own port went away with it"
    );
}

/// examples/bind_server.rs, statically linked (glibc's static libraries: libc6-dev), built once.
fn static_bind_server() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // Shared by the tests for the whole run: in cargo's directory for them, not a temporary one.
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("bind_server_static-{}", std::process::id()));
            let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/bind_server.rs");
            rustc(&[
                "-C",
                "target-feature=+crt-static",
                source.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ]);
            out
        })
        .clone()
}

/// Processes running `path`, from /proc.
fn running(path: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read_link(e.path().join("exe")).ok()? == path).then_some(pid)
        })
        .collect()
}

/// A statically linked server makes the system call itself: the filter sees it all the same,
/// under `auto` and `always`.
#[test]
fn a_static_server_that_binds_its_port_restarts_under_load_losing_nothing() {
    let server = static_bind_server();
    for mode in ["auto", "always"] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let (grace, addr) = start(
            port,
            &["--inject", mode],
            &[server.to_str().unwrap(), listen.as_str()],
        );
        restarts_under_load(&grace, addr);
        stop(grace);
        assert!(running(&server).is_empty(), "nothing left running");
    }
}

#[test]
fn the_users_own_preload_library_still_loads() {
    let dir = temp_dir("inject-user-preload");
    let library = dir.join("libinject_marker.so");
    let marks = dir.join("marks");
    rustc(&[
        "--crate-type",
        "cdylib",
        fixture("inject_marker.rs").to_str().unwrap(),
        "-o",
        library.to_str().unwrap(),
    ]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = example("bind_server");
    let grace = Grace::start_with(
        &[
            "run",
            "--listen",
            &listen,
            "--ready",
            "delay:300ms",
            "--",
            server.to_str().unwrap(),
            &listen,
        ],
        |cmd| {
            cmd.env("LD_PRELOAD", &library).env("INJECT_MARKER", &marks);
        },
    );
    grace.wait_line(") is serving", T);
    let pid = *grace.serving_pids().last().unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    let (_, body) = wait_for("an answer", T, || http_get(addr, "/").ok());
    assert_eq!(served_by(&body), pid, "grace's socket reached the server");

    let loaded: Vec<String> = std::fs::read_to_string(&marks)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert!(
        loaded.contains(&pid.to_string()),
        "the user's library ran in the server: {loaded:?}"
    );
    assert_eq!(
        env_of(pid, "LD_PRELOAD").as_deref(),
        library.to_str(),
        "the user's LD_PRELOAD, untouched"
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains(library.to_str().unwrap()),
        "user's library mapped"
    );
    assert!(!maps.contains("grace-preload"), "no library of grace's");
    stop(grace);
}

/// Where generations cannot have the filter, `auto` says why in one line and serves by socket
/// activation, and `always` refuses before anything is bound: a kernel before 5.9 (`setarch
/// --uname-2.6` makes this one report 2.6), and grace under grace (the kernel allows one
/// listener in a filter chain).
#[test]
fn where_the_filter_cannot_be_had_auto_says_why_and_always_refuses() {
    let grace = grace_bin();
    let grace = grace.to_str().unwrap();
    let server = example("server");
    let server = server.to_str().unwrap();
    let old_kernel: &[&str] = &["setarch", "x86_64", "--uname-2.6", grace];
    let nested = |outer_port: String| -> Vec<String> {
        [grace, "run", "--listen", &outer_port, "--", grace]
            .map(String::from)
            .to_vec()
    };
    let cases: [(Vec<String>, &str); 2] = [
        (
            old_kernel.iter().map(|s| s.to_string()).collect(),
            "Linux 2.6",
        ),
        (
            nested(format!("127.0.0.1:{}", free_port())),
            "has a listener already",
        ),
    ];
    for (prefix, why) in &cases {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args: Vec<&str> = prefix[1..].iter().map(String::as_str).collect();
        args.extend([
            "run", "--listen", &listen, "--inject", "always", "--", server,
        ]);
        // The nested case's outer grace would start the inner one again and again: read the
        // refusal from the output, then stop it.
        let mut refusing = Grace::start_raw(&prefix[0], &args);
        let line = refusing.wait_line("--inject always", T);
        assert!(line.contains(why), "{line}");
        if prefix[0] == "setarch" {
            assert!(!refusing.wait_exit(T).success());
        }
        let output = refusing.output();
        assert!(
            !output.contains(&format!("started generation 1: {server}")),
            "nothing started: {output}"
        );
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing bound"
        );
        drop(refusing);

        args.retain(|a| *a != "always" && *a != "--inject");
        let running = Grace::start_raw(&prefix[0], &args);
        let line = running.wait_line("finds it in use", T);
        assert!(line.contains(why), "{line}");
        let addr: SocketAddr = listen.parse().unwrap();
        wait_for("the socket-activated server to answer", T, || {
            http_get(addr, "/").ok()
        });
    }
}
