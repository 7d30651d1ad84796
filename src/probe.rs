//! Readiness probes (`http`, `tcp`, `exec`) as non-blocking state in the poll set.
//!
//! One attempt is a connect, a request and the status line (`http`), a connection the server
//! accepts (`tcp`), or a check command that exits (`exec`); a network attempt has
//! [`ATTEMPT_TIME`], a check command runs until it exits (bounded by `--ready-timeout`, when the
//! probe ends and the check is killed), and a failed attempt is tried again [`INTERVAL`] later,
//! until the supervisor ends the probe (the generation is ready, rolled back at
//! `--ready-timeout`, or stopped). The loop waits on the
//! probe's socket or its next deadline; it never waits *for* it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::signal::{Signal, killpg};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, getsockname, getsockopt,
    socket, sockopt,
};
use nix::unistd::Pid;

use crate::readiness::ReadyMode;
use crate::spawn;
use crate::supervisor::{Event, GenId, Millis};

/// Pause between two attempts.
pub const INTERVAL: Millis = 100;
/// One attempt (connect, request and reply) over loopback may take this long.
pub const ATTEMPT_TIME: Millis = 1_000;
/// How often a `tcp` attempt looks at the accept queue once connected.
const QUEUE_CHECK: Millis = 5;

enum Attempt {
    /// The next attempt starts at `next_at`.
    Idle {
        next_at: Millis,
    },
    Connecting {
        stream: TcpStream,
        deadline: Millis,
    },
    /// `http`: the request went out; reading the status line.
    Reading {
        stream: TcpStream,
        head: Vec<u8>,
        deadline: Millis,
    },
    /// `tcp`: connected; waiting for the server to take the connection from the queue.
    Accepting {
        _stream: TcpStream,
        check_at: Millis,
        deadline: Millis,
    },
    /// `exec`: the check runs; it ends when it is reaped.
    Running {
        pid: i32,
    },
}

struct Probe {
    generation: GenId,
    /// The generation's leader (for `exec`'s `GRACE_PID`).
    pid: i32,
    /// Where `http` and `tcp` connect.
    target: Option<Target>,
    attempt: Attempt,
}

/// What a network probe connects to.
struct Target {
    addr: SocketAddr,
    /// The generation's socket the connection lands in (grace's copy, held until the probe
    /// ends): its accept queue shows whether the server took the connection.
    queue: OwnedFd,
    /// The real address, where the steering sends connections from the probe's source port to
    /// the generation; else a private loopback socket of the generation's own.
    steered: bool,
}

pub struct Probes {
    mode: ReadyMode,
    items: Vec<Probe>,
}

impl Probes {
    pub fn new(mode: ReadyMode) -> Self {
        Self {
            mode,
            items: Vec::new(),
        }
    }

    /// Where a generation about to be spawned is probed, if the mode connects: `steered`, its own
    /// socket on a steered listener (the address, and the socket); else a private probe socket,
    /// returned to be passed to the generation (an extra fd and `GRACE_PROBE_ADDR`).
    pub fn prepare(
        &mut self,
        generation: GenId,
        steered: Option<(SocketAddr, BorrowedFd<'_>)>,
    ) -> Result<Option<(RawFd, SocketAddr)>, String> {
        if !self.mode.needs_probe_socket() {
            return Ok(None);
        }
        let (target, private) = match steered {
            Some((addr, socket)) => {
                let queue = socket
                    .try_clone_to_owned()
                    .map_err(|e| format!("holding its socket for the probe: {e}"))?;
                let target = Target {
                    addr,
                    queue,
                    steered: true,
                };
                (target, None)
            }
            None => {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .map_err(|e| format!("binding its probe socket: {e}"))?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| format!("binding its probe socket: {e}"))?;
                let fd = listener.as_raw_fd();
                let target = Target {
                    addr,
                    queue: listener.into(),
                    steered: false,
                };
                (target, Some((fd, addr)))
            }
        };
        self.items.push(Probe {
            generation,
            pid: 0,
            target: Some(target),
            attempt: Attempt::Idle {
                next_at: Millis::MAX,
            },
        });
        Ok(private)
    }

    /// Starts probing a spawned generation.
    pub fn start(&mut self, generation: GenId, pid: i32, now: Millis) {
        match self.items.iter_mut().find(|p| p.generation == generation) {
            Some(p) => {
                p.pid = pid;
                p.attempt = Attempt::Idle { next_at: now };
            }
            None => self.items.push(Probe {
                generation,
                pid,
                target: None,
                attempt: Attempt::Idle { next_at: now },
            }),
        }
    }

    /// Stops probing a generation: its socket closes and a check still running is killed.
    pub fn end(&mut self, generation: GenId) {
        self.items.retain(|p| {
            if p.generation != generation {
                return true;
            }
            if let Attempt::Running { pid } = p.attempt {
                // With whatever it started: it leads its own process group, and is not reaped
                // yet (it is reaped like every other child), so the group id is still its own.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            false
        });
    }

    /// The pids of the `exec:` checks that run now.
    pub fn running_checks(&self) -> Vec<i32> {
        self.items
            .iter()
            .filter_map(|p| match p.attempt {
                Attempt::Running { pid } => Some(pid),
                _ => None,
            })
            .collect()
    }

    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        self.items
            .iter()
            .filter_map(|p| match &p.attempt {
                Attempt::Connecting { stream, .. } => Some((stream.as_fd(), PollFlags::POLLOUT)),
                Attempt::Reading { stream, .. } => Some((stream.as_fd(), PollFlags::POLLIN)),
                _ => None,
            })
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Millis> {
        self.items
            .iter()
            .filter_map(|p| match p.attempt {
                Attempt::Idle { next_at } => Some(next_at),
                Attempt::Connecting { deadline, .. } | Attempt::Reading { deadline, .. } => {
                    Some(deadline)
                }
                Attempt::Accepting {
                    check_at, deadline, ..
                } => Some(check_at.min(deadline)),
                Attempt::Running { .. } => None,
            })
            .min()
    }

    /// An `exec` check was reaped: its verdict, if `pid` was one.
    pub fn reaped(&mut self, pid: i32, code: i32, now: Millis) -> Option<Event> {
        let p = self
            .items
            .iter_mut()
            .find(|p| matches!(p.attempt, Attempt::Running { pid: running } if running == pid))?;
        p.attempt = Attempt::Idle {
            next_at: now + INTERVAL,
        };
        Some(if code == 0 {
            Event::ProbePassed {
                generation: p.generation,
            }
        } else {
            Event::ProbeFailed {
                generation: p.generation,
                error: format!("ready check exited with status {code}"),
            }
        })
    }

    /// Moves every probe on as far as it goes without blocking. `steer(generation, port)` is
    /// called before a connection to the real address is made from source port `port`.
    pub fn service(
        &mut self,
        now: Millis,
        events: &mut Vec<Event>,
        steer: &mut dyn FnMut(GenId, u16),
    ) {
        for p in &mut self.items {
            let attempt = std::mem::replace(&mut p.attempt, Attempt::Idle { next_at: 0 });
            let (next, verdict) = advance(&self.mode, p, attempt, now, steer);
            p.attempt = next;
            match verdict {
                Some(Ok(())) => {
                    // Passed: no further attempt until the supervisor ends the probe.
                    p.attempt = Attempt::Idle {
                        next_at: Millis::MAX,
                    };
                    events.push(Event::ProbePassed {
                        generation: p.generation,
                    });
                }
                Some(Err(error)) => {
                    p.attempt = Attempt::Idle {
                        next_at: now + INTERVAL,
                    };
                    events.push(Event::ProbeFailed {
                        generation: p.generation,
                        error,
                    });
                }
                None => {}
            }
        }
    }
}

type Verdict = Option<Result<(), String>>;

fn advance(
    mode: &ReadyMode,
    p: &Probe,
    attempt: Attempt,
    now: Millis,
    steer: &mut dyn FnMut(GenId, u16),
) -> (Attempt, Verdict) {
    let addr = p.target.as_ref().map(|t| t.addr);
    let steered = p.target.as_ref().is_some_and(|t| t.steered);
    match attempt {
        Attempt::Idle { next_at } if now < next_at => (Attempt::Idle { next_at }, None),
        Attempt::Idle { .. } => match (mode, addr) {
            (ReadyMode::Exec(argv), _) => match spawn::ready_check(argv, p.generation, p.pid) {
                Ok(pid) => (Attempt::Running { pid }, None),
                Err(e) => (idle(), Some(Err(e))),
            },
            (_, Some(addr)) => {
                match connect_nonblocking(addr, steered, &mut |port| steer(p.generation, port)) {
                    Ok(stream) => {
                        let connecting = Attempt::Connecting {
                            stream,
                            deadline: now + ATTEMPT_TIME,
                        };
                        // Loopback often connects at once: go on in the same wake-up.
                        advance(mode, p, connecting, now, steer)
                    }
                    Err(e) => (idle(), Some(Err(format!("connecting to {addr}: {e}")))),
                }
            }
            _ => (never(), None),
        },
        Attempt::Connecting { stream, deadline } => {
            let addr = addr.expect("a connecting probe has an address");
            match connect_result(&stream) {
                Err(Errno::EINPROGRESS | Errno::EALREADY) if now < deadline => {
                    (Attempt::Connecting { stream, deadline }, None)
                }
                Err(Errno::EINPROGRESS | Errno::EALREADY) => (
                    idle(),
                    Some(Err(format!("connecting to {addr}: timed out"))),
                ),
                Err(e) => (
                    idle(),
                    Some(Err(format!("connecting to {addr}: {}", e.desc()))),
                ),
                Ok(()) => match mode {
                    ReadyMode::Http(path) => {
                        let request = format!(
                            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: grace\r\nConnection: close\r\n\r\n"
                        );
                        // A fresh socket's buffer takes the whole request at once.
                        match (&stream).write(request.as_bytes()) {
                            Ok(n) if n == request.len() => advance(
                                mode,
                                p,
                                Attempt::Reading {
                                    stream,
                                    head: Vec::new(),
                                    deadline,
                                },
                                now,
                                steer,
                            ),
                            Ok(_) => (
                                idle(),
                                Some(Err(format!("sending GET {path}: short write"))),
                            ),
                            Err(e) => (idle(), Some(Err(format!("sending GET {path}: {e}")))),
                        }
                    }
                    _ => advance(
                        mode,
                        p,
                        Attempt::Accepting {
                            _stream: stream,
                            check_at: now,
                            deadline,
                        },
                        now,
                        steer,
                    ),
                },
            }
        }
        Attempt::Reading {
            stream,
            mut head,
            deadline,
        } => {
            let ReadyMode::Http(path) = mode else {
                return (never(), None);
            };
            let mut buf = [0u8; 64];
            loop {
                match (&stream).read(&mut buf) {
                    Ok(0) => return (idle(), Some(status_of(&head, path))),
                    Ok(n) => {
                        head.extend_from_slice(&buf[..n]);
                        if head.len() >= 12 {
                            return (idle(), Some(status_of(&head, path)));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        return (
                            idle(),
                            Some(Err(format!("reading the reply to GET {path}: {e}"))),
                        );
                    }
                }
            }
            if now >= deadline {
                let error = format!("GET {path}: no reply within {ATTEMPT_TIME}ms");
                return (idle(), Some(Err(error)));
            }
            (
                Attempt::Reading {
                    stream,
                    head,
                    deadline,
                },
                None,
            )
        }
        Attempt::Accepting {
            _stream,
            check_at,
            deadline,
        } => {
            let Some(Target {
                queue: listener,
                addr,
                ..
            }) = &p.target
            else {
                return (never(), None);
            };
            if now < check_at {
                return (
                    Attempt::Accepting {
                        _stream,
                        check_at,
                        deadline,
                    },
                    None,
                );
            }
            // Connecting alone proves nothing: grace's own copy of the socket is listening, so
            // the kernel completes the handshake whether or not the server ever accepts. What
            // counts is the connection leaving the accept queue (the generation's socket gets
            // no other connection before it is ready).
            match crate::sys::accept_queue_len(listener.as_fd()) {
                Ok(0) => (idle(), Some(Ok(()))),
                Ok(_) if now < deadline => (
                    Attempt::Accepting {
                        _stream,
                        check_at: now + QUEUE_CHECK,
                        deadline,
                    },
                    None,
                ),
                Ok(_) => (
                    idle(),
                    Some(Err(format!(
                        "connection to {addr} not accepted within {ATTEMPT_TIME}ms"
                    ))),
                ),
                Err(e) => (
                    idle(),
                    Some(Err(format!("reading the accept queue of {addr}: {e}"))),
                ),
            }
        }
        running @ Attempt::Running { .. } => (running, None),
    }
}

/// Placeholder; [`Probes::service`] sets the real next attempt from the verdict.
fn idle() -> Attempt {
    Attempt::Idle { next_at: 0 }
}

/// No attempt can be made (a probe with nothing to probe): none is scheduled, so the loop never
/// wakes for it.
fn never() -> Attempt {
    Attempt::Idle {
        next_at: Millis::MAX,
    }
}

/// `steered`: the connection is made from a source port of its own, which `steer` hears before
/// the handshake starts.
fn connect_nonblocking(
    addr: SocketAddr,
    steered: bool,
    steer: &mut dyn FnMut(u16),
) -> Result<TcpStream, Errno> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if steered {
        let from = SocketAddr::new(
            match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            0,
        );
        bind(fd.as_raw_fd(), &SockaddrStorage::from(from))?;
        let local: SockaddrStorage = getsockname(fd.as_raw_fd())?;
        let port = local
            .as_sockaddr_in()
            .map(|a| a.port())
            .or_else(|| local.as_sockaddr_in6().map(|a| a.port()))
            .ok_or(Errno::EAFNOSUPPORT)?;
        steer(port);
    }
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e),
    }
}

/// `Ok` once the connection is established, `EINPROGRESS` while it is not, else its error.
fn connect_result(stream: &TcpStream) -> Result<(), Errno> {
    match getsockopt(stream, sockopt::SocketError) {
        Ok(0) => {}
        Ok(e) => return Err(Errno::from_raw(e)),
        Err(e) => return Err(e),
    }
    match stream.peer_addr() {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(Errno::ENOTCONN as i32) => Err(Errno::EINPROGRESS),
        Err(e) => Err(Errno::from_raw(e.raw_os_error().unwrap_or(0))),
    }
}

/// The verdict of an HTTP reply's first bytes: 2xx passes.
fn status_of(head: &[u8], path: &str) -> Result<(), String> {
    let line = String::from_utf8_lossy(head);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None if head.is_empty() => Err(format!("GET {path}: connection closed without a reply")),
        None => Err(format!("GET {path}: not an HTTP reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs the probe of generation 1 until it gives a verdict or `ms` pass.
    fn verdict(probes: &mut Probes, ms: u64) -> Option<Event> {
        let end = crate::sys::now() + ms;
        while crate::sys::now() < end {
            let mut events = Vec::new();
            probes.service(crate::sys::now(), &mut events, &mut |_, _| {});
            if let Some(e) = events.pop() {
                return Some(e);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// The generation's copy of its probe socket.
    fn server_copy(probes: &Probes) -> TcpListener {
        let target = probes.items[0].target.as_ref().unwrap();
        TcpListener::from(target.queue.try_clone().unwrap())
    }

    /// An `http` probe whose server, in a thread, answers `reply` (or, if empty, never does).
    fn http(reply: &'static str) -> Probes {
        let mut probes = Probes::new(ReadyMode::Http("/health".into()));
        probes.prepare(1, None).unwrap().unwrap();
        // The "server": a duplicate of the private socket, as the generation would have.
        let listener = server_copy(&probes);
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            if !reply.is_empty() {
                conn.write_all(reply.as_bytes()).unwrap();
            } else {
                // Accepts and never answers.
                std::thread::sleep(Duration::from_secs(3));
            }
        });
        probes.start(1, 1234, crate::sys::now());
        probes
    }

    #[test]
    fn http_reads_the_status() {
        let mut p = http("HTTP/1.1 204 No Content\r\n\r\n");
        assert!(matches!(
            verdict(&mut p, 2_000),
            Some(Event::ProbePassed { generation: 1 })
        ));
        let mut p = http("HTTP/1.1 503 Busy\r\n\r\n");
        let Some(Event::ProbeFailed { error, .. }) = verdict(&mut p, 2_000) else {
            panic!()
        };
        assert_eq!(error, "GET /health answered 503");
        let mut p = http("SSH-2.0-x\r\n");
        let Some(Event::ProbeFailed { error, .. }) = verdict(&mut p, 2_000) else {
            panic!()
        };
        assert!(error.contains("not an HTTP reply"), "{error}");
    }

    #[test]
    fn a_server_that_never_answers_costs_no_wait() {
        let mut p = http("");
        let start = std::time::Instant::now();
        let mut events = Vec::new();
        for _ in 0..50 {
            p.service(crate::sys::now(), &mut events, &mut |_, _| {});
        }
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "{:?}",
            start.elapsed()
        );
        assert!(events.is_empty());
        let Some(Event::ProbeFailed { error, .. }) = verdict(&mut p, 3_000) else {
            panic!()
        };
        assert!(error.contains("no reply within"), "{error}");
    }

    #[test]
    fn tcp_needs_the_connection_accepted() {
        let mut p = Probes::new(ReadyMode::Tcp);
        p.prepare(1, None).unwrap().unwrap();
        p.start(1, 1234, crate::sys::now());
        // Listening but nobody accepts: the handshake completes, the probe must still fail.
        let Some(Event::ProbeFailed { error, .. }) = verdict(&mut p, 3_000) else {
            panic!()
        };
        assert!(error.contains("not accepted"), "{error}");
        let accepter = server_copy(&p);
        std::thread::spawn(move || {
            for _ in 0..3 {
                let _ = accepter.accept();
            }
        });
        assert!(matches!(
            verdict(&mut p, 3_000),
            Some(Event::ProbePassed { .. })
        ));
    }

    #[test]
    fn ending_a_probe_closes_its_socket() {
        let mut p = Probes::new(ReadyMode::Tcp);
        let (fd, addr) = p.prepare(1, None).unwrap().unwrap();
        assert!(crate::sys::fd_is_open(fd));
        p.end(1);
        assert!(TcpStream::connect(addr).is_err());
        assert!(p.next_deadline().is_none());
    }
}
