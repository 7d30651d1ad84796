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

mod server;

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::socket::{getsockopt, sockopt};

pub use server::{CarriedClient, CarriedSocket, ControlServer};

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
    pub fn parse(line: &str) -> Option<Self> {
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

/// The abstract address of the control socket of the grace with this pid in this PID namespace.
/// Abstract names belong to the network namespace, which containers (`--network host`, a
/// Kubernetes pod) may share while each has its own PID namespace and its own PID 1: the PID
/// namespace in the name keeps their graces apart.
pub fn abstract_name(pid: i32) -> String {
    format!("grace/control/{}/{pid}", crate::sys::pid_namespace())
}

/// Where the client finds the running grace.
#[derive(Debug, Clone)]
pub enum Target {
    Path(PathBuf),
    Pid(i32),
}

impl Target {
    /// Connects, then checks who answered (`SO_PEERCRED`): the pid meant, if one was, and this
    /// user or root. Abstract names have no permissions, and a stale pid file may name anyone.
    pub fn connect(&self, deadline: Instant) -> anyhow::Result<UnixStream> {
        let (stream, shown, expected) = match self {
            Target::Path(path) => {
                let addr = SocketAddr::from_pathname(path)?;
                let stream = connect_by(&addr, deadline).with_context(|| {
                    format!("connecting to the control socket {}", path.display())
                })?;
                (stream, path.display().to_string(), None)
            }
            Target::Pid(pid) => {
                let name = abstract_name(*pid);
                let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
                let stream = connect_by(&addr, deadline).with_context(|| {
                    format!("connecting to grace (pid {pid}) on @{name}; is it running, in this PID and network namespace?")
                })?;
                (stream, format!("@{name}"), Some(*pid))
            }
        };
        let cred = getsockopt(&stream, sockopt::PeerCredentials)
            .with_context(|| format!("reading the credentials of the peer on {shown}"))?;
        let me = nix::unistd::geteuid().as_raw();
        if let Some(pid) = expected
            && cred.pid() != pid
        {
            bail!(
                "refusing to talk to {shown}: it is held by pid {} of uid {}, not grace's pid {pid}",
                cred.pid(),
                cred.uid()
            );
        }
        // Root may talk to any user's grace it found by its pid or path; anyone else only to
        // their own or root's.
        if me != 0 && cred.uid() != me && cred.uid() != 0 {
            bail!(
                "refusing to talk to {shown}: it is held by pid {} of uid {}, neither this user nor root",
                cred.pid(),
                cred.uid()
            );
        }
        Ok(stream)
    }
}

/// Connects by `deadline`: a listener whose queue is full (grace busy, or a squatter that never
/// accepts) makes a blocking connect wait forever.
fn connect_by(addr: &SocketAddr, deadline: Instant) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let unix = match (addr.as_pathname(), addr.as_abstract_name()) {
        (Some(path), _) => nix::sys::socket::UnixAddr::new(path)?,
        (None, Some(name)) => nix::sys::socket::UnixAddr::new_abstract(name)?,
        _ => return Err(std::io::Error::other("an unnamed socket address")),
    };
    loop {
        match nix::sys::socket::connect(fd.as_raw_fd(), &unix) {
            Ok(()) => break,
            // A full queue (EAGAIN for unix sockets): try again until the deadline.
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "nobody accepted the connection in time",
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends `request` and returns the stream to read the reply from, with `timeout` for each read.
pub fn send(target: &Target, request: Request, timeout: Duration) -> anyhow::Result<Client> {
    let deadline = Instant::now() + timeout;
    let mut stream = target.connect(deadline)?;
    let sent = stream.write_all(format!("{}\n", request.as_str()).as_bytes());
    let mut client = Client {
        reader: BufReader::new(stream),
        deadline,
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
}
