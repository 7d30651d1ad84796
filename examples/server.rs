//! The README's demo: a small HTTP server that takes its sockets from grace.
//!
//! ```text
//! grace run --listen :8080 -- ./target/release/examples/server
//! ```
//!
//! It does the three things a server needs for zero-downtime restarts under grace:
//!
//! 1. **Take the sockets** grace passes by systemd socket activation: fds 3, 4, … (`LISTEN_FDS`,
//!    checked against `LISTEN_PID`). Run without grace, it binds `127.0.0.1:8080` itself.
//! 2. **Say when it is ready**: `READY=1` on `NOTIFY_SOCKET`, once it accepts.
//! 3. **Drain on SIGTERM**: stop accepting, finish the requests it has, exit 0.
//!
//! Routes: `GET /` answers `hello from pid=<pid> generation=<g>`, `GET /sleep?duration=2s` sleeps
//! first (a slow request to watch a restart wait for), `GET /health` answers `ok`, `GET /pid` the
//! pid. Every reply closes its connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};

fn main() {
    // Block SIGTERM and SIGINT before any thread starts, so every thread inherits the mask and
    // the drain below sees the signal however early it comes.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().expect("blocking SIGTERM");

    let listeners = sockets();
    let pid = std::process::id();
    let generation = std::env::var("GRACE_GENERATION").unwrap_or_else(|_| "0".into());
    println!(
        "ready pid={pid} generation={generation} listeners={}",
        listeners.len()
    );
    notify("READY=1");

    // Accept on every socket until a stop signal arrives: a signalfd would do as well; a thread
    // waiting for the signal and a pipe keep this in the standard library's terms.
    let (wake_read, wake_write) = nix::unistd::pipe().expect("pipe");
    thread::spawn(move || {
        let signal = stop.wait().expect("sigwait");
        println!("draining pid={pid} on {signal}");
        let _ = nix::unistd::write(&wake_write, b"x");
    });
    let in_flight = Arc::new(AtomicUsize::new(0));
    'serve: loop {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .chain([PollFd::new(wake_read.as_fd(), PollFlags::POLLIN)])
            .collect();
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(false)).collect();
        drop(fds);
        if ready[listeners.len()] {
            break 'serve;
        }
        for (listener, _) in listeners.iter().zip(&ready).filter(|(_, r)| **r) {
            let Ok((conn, _)) = listener.accept() else {
                continue;
            };
            let (in_flight, generation) = (Arc::clone(&in_flight), generation.clone());
            in_flight.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let _ = serve(conn, pid, &generation);
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
    // The sockets stay open (grace's next generation accepts from the same queue); the requests
    // already accepted are finished before we go.
    while in_flight.load(Ordering::SeqCst) > 0 {
        thread::sleep(Duration::from_millis(10));
    }
    println!("exited pid={pid}");
}

/// The sockets from socket activation, or a socket of our own without grace.
fn sockets() -> Vec<TcpListener> {
    let ours = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    let count: i32 = match std::env::var("LISTEN_FDS") {
        Ok(n) if ours => n.parse().expect("LISTEN_FDS is a number"),
        _ => return vec![TcpListener::bind("127.0.0.1:8080").expect("binding 127.0.0.1:8080")],
    };
    (3..3 + count)
        .map(|fd| {
            // SAFETY: socket activation hands us fds 3.. to own; nothing else in this process
            // has opened anything yet.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            let listener = TcpListener::from(socket);
            listener
                .set_nonblocking(true)
                .expect("non-blocking listener");
            listener
        })
        .collect()
}

/// One request, one reply, then the connection closes.
fn serve(conn: TcpStream, pid: u32, generation: &str) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(&conn);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Read the rest of the head: closing with unread bytes would reset the connection.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match target.split_once('?').unwrap_or((target, "")) {
        ("/", _) => (
            "200 OK",
            format!("hello from pid={pid} generation={generation}\n"),
        ),
        ("/sleep", query) => {
            let text = query.strip_prefix("duration=").unwrap_or("1s");
            let seconds: f64 = text.trim_end_matches('s').parse().unwrap_or(1.0);
            thread::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 600.0)));
            (
                "200 OK",
                format!("slept {text} pid={pid} generation={generation}\n"),
            )
        }
        ("/health", _) => ("200 OK", "ok\n".to_string()),
        ("/pid", _) => ("200 OK", format!("{pid}\n")),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let mut out = &conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Pid: {pid}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.shutdown(Shutdown::Write)
}

/// Sends `state` to `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), if it is set.
fn notify(state: &str) {
    let Ok(target) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    if let (Ok(addr), Ok(socket)) = (addr, UnixDatagram::unbound()) {
        let _ = socket.send_to_addr(state.as_bytes(), &addr);
    }
}
