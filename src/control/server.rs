//! grace's side of the control socket: every client is non-blocking state in the poll set.
//!
//! A client has [`REQUEST_TIME`] for its whole request line, then it is dropped with a log line;
//! at most [`MAX_CLIENTS`] are connected at once (beyond that a newcomer is told so and closed),
//! and one wake-up accepts at most [`MAX_ACCEPTS`] per socket. Nothing here waits for a client:
//! a slow one costs grace a read when it sends something, never a pause.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use tracing::{debug, info, warn};

use super::{Request, abstract_name};
use crate::listen::{Addr, BindOptions, ListenSpec, bind_all};
use crate::supervisor::{ClientId, Event, Millis};
use crate::throttle::Throttle;

/// The time a client has for its whole request line (our own CLI sends it at once).
pub const REQUEST_TIME: Millis = 2_000;
/// Connected clients at most, whatever they are doing.
pub const MAX_CLIENTS: usize = 64;
/// Accepts per socket per wake-up at most, so a flood cannot starve signals and reaping.
pub const MAX_ACCEPTS: usize = 32;
/// The longest request line.
const MAX_REQUEST: usize = 256;
/// How long the sockets rest after an accept error (e.g. out of fds).
const PAUSE: Millis = 100;

/// A control socket handed over by the previous image.
pub struct CarriedSocket {
    pub fd: OwnedFd,
    pub display: String,
    pub path: Option<PathBuf>,
}

/// A connected client handed over by the previous image (see [`ControlServer::clients`]).
pub struct CarriedClient {
    pub fd: OwnedFd,
    pub id: ClientId,
    pub partial: String,
    pub deadline: Option<Millis>,
}

struct ControlSocket {
    listener: UnixListener,
    /// `@grace/control/N` or the path.
    display: String,
    /// A socket file grace created, removed at final exit.
    path: Option<PathBuf>,
}

enum Stage {
    /// Reading the request line, until `deadline`.
    Reading { partial: Vec<u8>, deadline: Millis },
    /// The request went to the supervisor; the answer comes as an action.
    Answering,
    /// `grace stop`: connected until grace exits.
    Holding,
}

struct Conn {
    id: ClientId,
    stream: UnixStream,
    stage: Stage,
}

pub struct ControlServer {
    sockets: Vec<ControlSocket>,
    clients: Vec<Conn>,
    next_id: ClientId,
    paused_until: Millis,
    /// One throttle per kind of warning: other users, a full house, clients out of time.
    refused: Throttle,
    full: Throttle,
    dropped: Throttle,
}

impl ControlServer {
    /// Opens the control sockets of a fresh grace: always the abstract `@grace/control/<pid>`
    /// (best effort: another process in this network namespace may hold the name, e.g. a second
    /// PID 1), and `--control PATH` (mode 0600), which must work.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let mut sockets = Vec::new();
        if let Some(path) = path {
            // The same stale-file rules as `--listen unix:…`, with mode 0600 set before listen().
            let spec = ListenSpec {
                name: None,
                addr: Addr::Unix(path.to_path_buf()),
            };
            let opts = BindOptions {
                backlog: Some(128),
                socket_mode: Some(0o600),
            };
            let mut bound = bind_all(&[spec], &opts).context("creating the control socket")?;
            let l = bound.remove(0);
            sockets.push(ControlSocket {
                listener: UnixListener::from(l.fd),
                display: path.display().to_string(),
                path: l.unix_path,
            });
        }
        let name = abstract_name(std::process::id() as i32);
        match SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| UnixListener::bind_addr(&a))
        {
            Ok(listener) => sockets.push(ControlSocket {
                listener,
                display: format!("@{name}"),
                path: None,
            }),
            Err(e) => warn!("control socket @{name} unavailable: {e}"),
        }
        for c in &sockets {
            c.listener.set_nonblocking(true)?;
        }
        Ok(Self::with(sockets, Vec::new()))
    }

    fn with(sockets: Vec<ControlSocket>, clients: Vec<Conn>) -> Self {
        let next_id = clients.iter().map(|c| c.id + 1).max().unwrap_or(1);
        Self {
            sockets,
            clients,
            next_id,
            paused_until: 0,
            refused: Throttle::new(1_000),
            full: Throttle::new(1_000),
            dropped: Throttle::new(1_000),
        }
    }

    /// Rebuilds the server from what the previous image handed over.
    pub fn adopt(sockets: Vec<CarriedSocket>, clients: Vec<CarriedClient>) -> anyhow::Result<Self> {
        let mut listeners = Vec::new();
        for CarriedSocket { fd, display, path } in sockets {
            let listener = UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            listeners.push(ControlSocket {
                listener,
                display,
                path,
            });
        }
        let mut conns = Vec::new();
        for CarriedClient {
            fd,
            id,
            partial,
            deadline,
        } in clients
        {
            let stream = UnixStream::from(fd);
            stream.set_nonblocking(true)?;
            let stage = match deadline {
                Some(deadline) => Stage::Reading {
                    partial: partial.into_bytes(),
                    deadline,
                },
                None => Stage::Answering,
            };
            conns.push(Conn { id, stream, stage });
        }
        Ok(Self::with(listeners, conns))
    }

    /// The sockets, to carry across the re-exec.
    pub fn sockets(&self) -> impl Iterator<Item = (BorrowedFd<'_>, &str, Option<&Path>)> {
        self.sockets
            .iter()
            .map(|c| (c.listener.as_fd(), c.display.as_str(), c.path.as_deref()))
    }

    /// Every connected client, to carry across the re-exec: its id, its request so far and the
    /// deadline for the rest (none: its request went to the supervisor).
    pub fn clients(
        &self,
    ) -> impl Iterator<Item = (BorrowedFd<'_>, ClientId, String, Option<Millis>)> {
        self.clients.iter().map(|c| {
            let (partial, deadline) = match &c.stage {
                Stage::Reading { partial, deadline } => (
                    String::from_utf8_lossy(partial).into_owned(),
                    Some(*deadline),
                ),
                Stage::Answering | Stage::Holding => (String::new(), None),
            };
            (c.stream.as_fd(), c.id, partial, deadline)
        })
    }

    /// The fds to wait on: the sockets (unless resting after an error) and the clients still
    /// sending their request.
    pub fn poll_fds(&self, now: Millis) -> Vec<BorrowedFd<'_>> {
        let sockets = self
            .sockets
            .iter()
            .filter(|_| now >= self.paused_until)
            .map(|c| c.listener.as_fd());
        let reading = self
            .clients
            .iter()
            .filter(|c| matches!(c.stage, Stage::Reading { .. }))
            .map(|c| c.stream.as_fd());
        sockets.chain(reading).collect()
    }

    pub fn next_deadline(&self, now: Millis) -> Option<Millis> {
        let reading = self.clients.iter().filter_map(|c| match c.stage {
            Stage::Reading { deadline, .. } => Some(deadline),
            _ => None,
        });
        reading
            .chain((self.paused_until > now).then_some(self.paused_until))
            .min()
    }

    #[cfg(test)]
    pub fn connected(&self) -> usize {
        self.clients.len()
    }

    /// Accepts new clients, reads what the others sent and drops those out of time; a complete
    /// request becomes an [`Event::Control`]. Never blocks.
    pub fn service(&mut self, now: Millis, events: &mut Vec<Event>) {
        if now >= self.paused_until {
            for i in 0..self.sockets.len() {
                self.accept(i, now);
            }
        }
        let mut gone = Vec::new();
        for c in &mut self.clients {
            let Stage::Reading { partial, deadline } = &mut c.stage else {
                continue;
            };
            match read_request(&c.stream, partial) {
                Got::Complete(Some(request)) => {
                    debug!("control: {} request", request.as_str());
                    c.stage = Stage::Answering;
                    events.push(Event::Control {
                        client: c.id,
                        request,
                    });
                }
                Got::Complete(None) => {
                    send(
                        &c.stream,
                        "failed unknown request (expected restart, status or stop)",
                    );
                    gone.push(c.id);
                }
                Got::TooLong => {
                    send(&c.stream, "failed request too long");
                    gone.push(c.id);
                }
                Got::Closed => gone.push(c.id),
                Got::More if now >= *deadline => {
                    let shown = String::from_utf8_lossy(partial).into_owned();
                    self.dropped.warn(
                        now,
                        format!(
                            "control: dropped a client that sent no request within {}ms ({shown:?} so far)",
                            REQUEST_TIME
                        ),
                    );
                    send(&c.stream, "failed no request in time");
                    gone.push(c.id);
                }
                Got::More => {}
            }
        }
        self.clients.retain(|c| !gone.contains(&c.id));
    }

    fn accept(&mut self, i: usize, now: Millis) {
        for _ in 0..MAX_ACCEPTS {
            let stream = match self.sockets[i].listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: the socket stays readable, so polling it again at
                    // once would spin. Leave the clients in the queue for a moment.
                    warn!("control: accept: {e}");
                    self.paused_until = now + PAUSE;
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            // Credentials first: a stranger must not even get to make grace read its request.
            let me = nix::unistd::getuid().as_raw();
            match getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
                Ok(cred) => {
                    self.refused.warn(
                        now,
                        format!(
                            "control: refused a client of uid {} (pid {})",
                            cred.uid(),
                            cred.pid()
                        ),
                    );
                    send(&stream, "failed permission denied");
                    continue;
                }
                Err(e) => {
                    self.refused.warn(
                        now,
                        format!("control: cannot check a client's credentials: {e}"),
                    );
                    continue;
                }
            }
            if self.clients.len() >= MAX_CLIENTS {
                self.full.warn(
                    now,
                    format!("control: refused a client: {MAX_CLIENTS} are connected already"),
                );
                send(
                    &stream,
                    &format!("failed too many clients ({MAX_CLIENTS} connected)"),
                );
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.clients.push(Conn {
                id,
                stream,
                stage: Stage::Reading {
                    partial: Vec::new(),
                    deadline: now + REQUEST_TIME,
                },
            });
        }
    }

    /// Answers a client; `hold` keeps it connected until [`ControlServer::farewell`].
    pub fn reply(&mut self, client: ClientId, line: &str, hold: bool) {
        let Some(i) = self.clients.iter().position(|c| c.id == client) else {
            debug!("control: client {client} went away before its answer");
            return;
        };
        send(&self.clients[i].stream, line);
        if hold {
            self.clients[i].stage = Stage::Holding;
        } else {
            self.clients.swap_remove(i);
        }
    }

    /// Tells `grace stop` clients that grace is done, and gives them up to a second to hang up
    /// first: as PID 1, grace's exit kills every process left in the namespace, the client
    /// included.
    pub fn farewell(&mut self) {
        // A request still waiting for its answer (it came in the wake-up grace exited in) hears
        // why none comes.
        for c in &self.clients {
            if matches!(c.stage, Stage::Answering) {
                send(&c.stream, "failed grace exited");
            }
        }
        let mut holding: Vec<UnixStream> = self
            .clients
            .drain(..)
            .filter(|c| matches!(c.stage, Stage::Holding))
            .map(|c| c.stream)
            .collect();
        for stream in &holding {
            send(stream, "stopped");
        }
        let deadline = crate::sys::now() + 1000;
        while !holding.is_empty() && crate::sys::now() < deadline {
            let mut fds: Vec<PollFd> = holding
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            let left = PollTimeout::try_from(deadline.saturating_sub(crate::sys::now()))
                .unwrap_or(PollTimeout::ZERO);
            if poll(&mut fds, left).unwrap_or(0) == 0 {
                break;
            }
            let hung_up: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(true)).collect();
            drop(fds);
            let mut i = 0;
            holding.retain(|_| {
                i += 1;
                !hung_up[i - 1]
            });
        }
    }

    /// Removes the socket files grace created (final exit only, never on re-exec).
    pub fn remove_files(&self) {
        for c in &self.sockets {
            if let Some(path) = &c.path {
                let _ = std::fs::remove_file(path);
            }
        }
        if !self.clients.is_empty() {
            info!(
                "control: {} client(s) still connected at exit",
                self.clients.len()
            );
        }
    }
}

enum Got {
    /// A whole line: the request, or `None` for one that makes no sense.
    Complete(Option<Request>),
    More,
    TooLong,
    Closed,
}

/// Reads what the client sent so far, without blocking.
fn read_request(mut stream: &UnixStream, partial: &mut Vec<u8>) -> Got {
    let mut buf = [0u8; MAX_REQUEST];
    loop {
        match stream.read(&mut buf) {
            Ok(0) if partial.is_empty() => return Got::Closed,
            // A request without its newline, then end-of-file: take it as the line.
            Ok(0) => return Got::Complete(parse(partial)),
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                if let Some(end) = partial.iter().position(|&b| b == b'\n') {
                    partial.truncate(end);
                    return Got::Complete(parse(partial));
                }
                if partial.len() > MAX_REQUEST {
                    return Got::TooLong;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Got::More,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Got::Closed,
        }
    }
}

fn parse(line: &[u8]) -> Option<Request> {
    std::str::from_utf8(line).ok().and_then(Request::parse)
}

/// Sends one line without waiting: a client whose buffer is full, or that went away, loses it.
/// Whatever the client sent and nobody read is drained first, or closing would reset the
/// connection and the client would see an error instead of the line.
fn send(mut stream: &UnixStream, line: &str) {
    let mut sink = [0u8; MAX_REQUEST];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    if let Err(e) = stream.write_all(format!("{line}\n").as_bytes()) {
        debug!("control: client went away before its reply: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Target, send as client_send};
    use std::time::Duration;

    fn temp_socket(tag: &str) -> (PathBuf, ControlServer) {
        let dir =
            std::env::temp_dir().join(format!("grace-control-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let server = ControlServer::open(Some(&path)).unwrap();
        (path, server)
    }

    /// Services the server until it produced an event or `ms` passed.
    fn serve_until_event(server: &mut ControlServer, ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..ms / 5 {
            server.service(crate::sys::now(), &mut events);
            if !events.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        events
    }

    #[test]
    fn a_path_socket_is_private_and_answers() {
        let (path, mut server) = temp_socket("answers");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut c =
                    client_send(&Target::Path(path), Request::Status, Duration::from_secs(5))
                        .unwrap();
                c.line().unwrap()
            }
        });
        let events = serve_until_event(&mut server, 5_000);
        let [
            Event::Control {
                client: id,
                request,
            },
        ] = events[..]
        else {
            panic!("{events:?}")
        };
        assert_eq!(request, Request::Status);
        server.reply(id, "{}", false);
        assert_eq!(client.join().unwrap().as_deref(), Some("{}"));
        assert_eq!(server.connected(), 0);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn slow_and_silent_clients_never_hold_up_the_others_and_time_out() {
        let (path, mut server) = temp_socket("slow");
        let mut slow = UnixStream::connect(&path).unwrap();
        let _silent = UnixStream::connect(&path).unwrap();
        let mut events = Vec::new();
        let t0 = crate::sys::now();
        server.service(t0, &mut events);
        assert_eq!(server.connected(), 2);
        slow.write_all(b"sta").unwrap();
        let mut fast = UnixStream::connect(&path).unwrap();
        fast.write_all(b"status\n").unwrap();
        let start = std::time::Instant::now();
        let events = serve_until_event(&mut server, 1_000);
        assert!(start.elapsed() < Duration::from_millis(100));
        assert!(matches!(
            events[..],
            [Event::Control {
                request: Request::Status,
                ..
            }]
        ));
        // Past the deadline both are dropped, with a line each way.
        let mut none = Vec::new();
        server.service(t0 + REQUEST_TIME, &mut none);
        assert!(none.is_empty());
        assert_eq!(server.connected(), 1, "only the answered one is left");
        let mut reply = String::new();
        slow.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "failed no request in time\n");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn clients_beyond_the_cap_are_refused_with_a_line() {
        let (path, mut server) = temp_socket("cap");
        let mut held = Vec::new();
        let mut events = Vec::new();
        for _ in 0..MAX_CLIENTS + 5 {
            held.push(UnixStream::connect(&path).unwrap());
            server.service(crate::sys::now(), &mut events);
        }
        assert_eq!(server.connected(), MAX_CLIENTS);
        let mut reply = String::new();
        held.last_mut().unwrap().read_to_string(&mut reply).unwrap();
        assert_eq!(
            reply,
            format!("failed too many clients ({MAX_CLIENTS} connected)\n")
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn garbage_and_long_lines_get_an_answer_and_are_closed() {
        let (path, mut server) = temp_socket("garbage");
        let mut a = UnixStream::connect(&path).unwrap();
        a.write_all(b"reboot\n").unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        b.write_all(&[b'x'; 300]).unwrap();
        let mut events = Vec::new();
        for _ in 0..20 {
            server.service(crate::sys::now(), &mut events);
        }
        assert!(events.is_empty());
        assert_eq!(server.connected(), 0);
        let mut reply = String::new();
        a.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("failed unknown request"), "{reply}");
        reply.clear();
        b.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "failed request too long\n");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
