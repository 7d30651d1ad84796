//! Restart, status and stop requests to a running grace, and their replies.
//!
//! A running grace listens on a Unix stream socket: always on the abstract address
//! `@grace/control/<pid>` (so `--pid-file`, or plain PID 1 in a container, is enough to find it), and
//! on `--control PATH` (mode 0600) when asked. Only the same user or root may talk to it
//! (`SO_PEERCRED`). The protocol is one request line (`restart`, `status`, `stop`) and reply lines:
//!
//! | request | reply |
//! |---|---|
//! | `restart` | after the restart that includes this request: `ok generation=N pid=P` or `failed REASON` |
//! | `status` | the status JSON on one line |
//! | `status text` | the status for people, then end-of-file |
//! | `stop` | `stopping`, then end-of-file once grace has exited |

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::socket::{getsockopt, sockopt};
use tracing::{debug, warn};

use crate::listen::{Addr, BindOptions, ListenSpec, bind_all};

/// How long grace waits for a client's request line: our own CLI sends it at once.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Restart,
    /// The status JSON on one line.
    Status,
    /// The status for people, several lines.
    StatusText,
    Stop,
}

impl Request {
    fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "restart" => Some(Request::Restart),
            "status" => Some(Request::Status),
            "status text" => Some(Request::StatusText),
            "stop" => Some(Request::Stop),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Request::Restart => "restart",
            Request::Status => "status",
            Request::StatusText => "status text",
            Request::Stop => "stop",
        }
    }
}

/// The abstract address of the control socket of the grace with this pid.
pub fn abstract_name(pid: i32) -> String {
    format!("grace/control/{pid}")
}

pub struct ControlSocket {
    pub listener: UnixListener,
    /// `@grace/control/N` or the path.
    pub display: String,
    /// A socket file grace created, removed at final exit.
    pub path: Option<PathBuf>,
}

impl AsFd for ControlSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// Opens the control sockets of a fresh grace. The abstract one is best effort (another process in
/// this network namespace may hold the name, e.g. a second PID 1); `--control PATH` must work.
pub fn open(path: Option<&Path>) -> anyhow::Result<Vec<ControlSocket>> {
    let mut out = Vec::new();
    if let Some(path) = path {
        // The same stale-file rules as `--listen unix:…`, with mode 0600 set before listen().
        let spec = ListenSpec {
            name: None,
            addr: Addr::Unix(path.to_path_buf()),
        };
        let opts = BindOptions {
            backlog: Some(64),
            socket_mode: Some(0o600),
        };
        let mut bound = bind_all(&[spec], &opts).context("creating the control socket")?;
        let l = bound.remove(0);
        out.push(ControlSocket {
            listener: UnixListener::from(l.fd),
            display: path.display().to_string(),
            path: l.unix_path,
        });
    }
    let name = abstract_name(std::process::id() as i32);
    match SocketAddr::from_abstract_name(name.as_bytes()).and_then(|a| UnixListener::bind_addr(&a))
    {
        Ok(listener) => out.push(ControlSocket {
            listener,
            display: format!("@{name}"),
            path: None,
        }),
        Err(e) => warn!("control socket @{name} unavailable: {e}"),
    }
    for c in &out {
        c.listener.set_nonblocking(true)?;
    }
    Ok(out)
}

/// Rebuilds a control socket handed over across re-exec.
pub fn adopt(fd: OwnedFd, display: String, path: Option<PathBuf>) -> anyhow::Result<ControlSocket> {
    let listener = UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(ControlSocket {
        listener,
        display,
        path,
    })
}

/// Accepts one pending client and reads its request: `Ok(None)` for a client that was refused
/// (another user, or a request that makes no sense), an error when nothing could be accepted
/// (`WouldBlock` once the queue is empty).
pub fn accept(socket: &ControlSocket) -> std::io::Result<Option<(UnixStream, Request)>> {
    let (stream, _) = socket.listener.accept()?;
    // Credentials first: a stranger must not even get to make grace wait for its request line.
    let me = nix::unistd::getuid().as_raw();
    match getsockopt(&stream, sockopt::PeerCredentials) {
        Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
        Ok(cred) => {
            warn!(
                "control: refused a client of uid {} (pid {})",
                cred.uid(),
                cred.pid()
            );
            // Let its request arrive first (without waiting for it), so that the refusal
            // reaches it instead of a failed write.
            let _ = stream.set_nonblocking(true);
            let _ = (&stream).read(&mut [0u8; 256]);
            reply(&stream, "failed permission denied");
            return Ok(None);
        }
        Err(e) => {
            warn!("control: cannot check the client's credentials: {e}");
            return Ok(None);
        }
    }
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    let _ = BufReader::new((&stream).take(256)).read_line(&mut line);
    match Request::parse(&line) {
        Some(request) => {
            debug!("control: {} request", request.as_str());
            Ok(Some((stream, request)))
        }
        None => {
            reply(
                &stream,
                "failed unknown request (expected restart, status or stop)",
            );
            Ok(None)
        }
    }
}

/// Sends one reply line; a client that went away is not an error worth more than a debug line.
pub fn reply(mut stream: &UnixStream, line: &str) {
    if let Err(e) = stream.write_all(format!("{line}\n").as_bytes()) {
        debug!("control: client went away before its reply: {e}");
    }
}

/// Where the client finds the running grace.
#[derive(Debug, Clone)]
pub enum Target {
    Path(PathBuf),
    Pid(i32),
}

impl Target {
    pub fn connect(&self) -> anyhow::Result<UnixStream> {
        match self {
            Target::Path(path) => UnixStream::connect(path)
                .with_context(|| format!("connecting to the control socket {}", path.display())),
            Target::Pid(pid) => {
                let name = abstract_name(*pid);
                let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
                UnixStream::connect_addr(&addr).with_context(|| {
                    format!("connecting to grace (pid {pid}) on @{name}; is it running, and in this network namespace?")
                })
            }
        }
    }
}

/// Sends `request` and returns the stream to read the reply from, with `timeout` for each read.
pub fn send(target: &Target, request: Request, timeout: Duration) -> anyhow::Result<Client> {
    let mut stream = target.connect()?;
    let sent = stream.write_all(format!("{}\n", request.as_str()).as_bytes());
    let mut client = Client {
        reader: BufReader::new(stream),
        deadline: Instant::now() + timeout,
        early: None,
    };
    if let Err(e) = sent {
        // grace may have answered (a refusal) and hung up before the request went out: that
        // answer says more than the failed write.
        return match client.line() {
            Ok(Some(line)) => Ok(Client::with_reply(client, line)),
            _ => Err(e).context("sending the request"),
        };
    }
    Ok(client)
}

pub struct Client {
    reader: BufReader<UnixStream>,
    deadline: Instant,
    /// A reply already read.
    early: Option<String>,
}

impl Client {
    fn with_reply(mut client: Client, line: String) -> Client {
        client.early = Some(line);
        client
    }

    /// The next reply line, or `None` at end-of-file.
    pub fn line(&mut self) -> anyhow::Result<Option<String>> {
        if let Some(line) = self.early.take() {
            return Ok(Some(line));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer in time");
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line.trim_end().to_string())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no answer in time")
            }
            Err(e) => Err(e).context("reading the reply"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(Request::parse("restart\n"), Some(Request::Restart));
        assert_eq!(Request::parse("status"), Some(Request::Status));
        assert_eq!(Request::parse(" stop \n"), Some(Request::Stop));
        assert_eq!(Request::parse("reboot"), None);
        for r in [
            Request::Restart,
            Request::Status,
            Request::StatusText,
            Request::Stop,
        ] {
            assert_eq!(Request::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn a_path_socket_is_private_and_answers() {
        let dir = std::env::temp_dir().join(format!("grace-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let sockets = open(Some(&path)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut c =
                    send(&Target::Path(path), Request::Status, Duration::from_secs(5)).unwrap();
                c.line().unwrap()
            }
        });
        let accepted = (0..500).find_map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            accept(&sockets[0]).ok().flatten()
        });
        let (stream, request) = accepted.expect("a client");
        assert_eq!(request, Request::Status);
        reply(&stream, "{}");
        assert_eq!(client.join().unwrap().as_deref(), Some("{}"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
