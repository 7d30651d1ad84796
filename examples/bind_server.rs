//! A server that binds its own ports, as most servers do (it never reads `LISTEN_FDS`): the
//! fixture for `--inject` (tests/integration/inject.rs).
//!
//! ```text
//! bind_server ADDR...        e.g. bind_server 127.0.0.1:8080 127.0.0.1:9090
//! ```
//!
//! Binds every ADDR with `std::net::TcpListener::bind`, prints `ready pid=<pid>`, and answers
//! every HTTP request with `hello from pid=<pid> port=<local port>` on a thread of its own.
//! SIGTERM or SIGINT drains: stop accepting (close our copy of each listener; never `shutdown`,
//! which would stop the shared socket for every process), finish the requests in flight, exit 0.
//! A bind that fails prints one line and exits 1.
//!
//! Only the standard library (and three libc functions), so the tests can also build it with
//! plain `rustc` as a statically linked program.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const POLLIN: i16 = 1;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn poll(fds: *mut PollFd, nfds: u64, timeout_ms: i32) -> i32;
}

extern "C" fn on_stop(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    if addrs.is_empty() {
        eprintln!("usage: bind_server ADDR...");
        return ExitCode::from(2);
    }
    for sig in [SIGTERM, SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal(sig, on_stop) };
    }
    let mut listeners = Vec::new();
    for addr in &addrs {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                // One write, so that the line arrives whole beside grace's own on a shared pipe.
                let line = format!("bind_server: binding {addr}: {e}\n");
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                return ExitCode::from(1);
            }
        }
    }
    for l in &listeners {
        // Another generation may take a connection we were woken for: never block in accept.
        if let Err(e) = l.set_nonblocking(true) {
            eprintln!("bind_server: {e}");
            return ExitCode::from(1);
        }
    }
    println!("ready pid={}", std::process::id());
    let _ = std::io::stdout().flush();

    let mut workers = Vec::new();
    while !STOP.load(Ordering::SeqCst) {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd {
                fd: l.as_raw_fd(),
                events: POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of fds.len() pollfd structures. A signal interrupts the
        // wait (poll is never restarted); the timeout covers one that lands just before it.
        let ready = unsafe { poll(fds.as_mut_ptr(), fds.len() as u64, 200) };
        if ready <= 0 {
            continue;
        }
        for (l, p) in listeners.iter().zip(&fds) {
            if p.revents == 0 {
                continue;
            }
            let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
            loop {
                match l.accept() {
                    Ok((conn, _)) => workers.push(thread::spawn(move || serve(conn, port))),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        }
        workers.retain(|w| !w.is_finished());
    }
    // Closing our copies leaves the shared sockets (and what waits in their queues) to the next
    // generation.
    drop(listeners);
    for w in workers {
        let _ = w.join();
    }
    ExitCode::SUCCESS
}

fn serve(mut conn: TcpStream, port: u16) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("hello from pid={} port={port}\n", std::process::id());
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if conn.write_all(reply.as_bytes()).is_ok() {
        let _ = conn.shutdown(Shutdown::Write);
    }
}
