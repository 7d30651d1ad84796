//! Bind substitution by seccomp user notification: every generation runs under a filter that
//! reports its `bind` calls on IPv4 and IPv6 addresses to grace (installed by the child itself
//! before `execve`, see `sys::seccomp`). For an address grace holds, grace puts the generation's
//! own socket at the server's descriptor and answers success; any other call goes on untouched.
//! It reaches every binary (Go, static, musl: they all make the system call), needs nothing in the
//! environment, and a server that never binds a held address never notices it.
//!
//! Matching is exact: protocol, family, address and port. A server that binds `0.0.0.0:PORT`
//! where grace holds the dual-stack `[::]:PORT` is not substituted (it would get IPv6 peer
//! addresses on what it made as an IPv4 socket): its bind fails as it would without grace, and one
//! line names the `--listen` to give.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use tracing::{debug, warn};

use crate::listen::{Listener, Proto};
use crate::steer::Steering;
use crate::supervisor::GenId;
use crate::sys::{self, seccomp};

/// One generation's filter: the descriptor its calls arrive on.
#[derive(Debug)]
struct Filter {
    generation: GenId,
    fd: OwnedFd,
}

#[derive(Debug, Default)]
pub struct Substitution {
    filters: Vec<Filter>,
    /// What was said already, said once.
    explained: HashSet<Said>,
}

/// A line that is said once: a near miss of an address, or a generation whose calls grace cannot
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Said {
    NearMiss(Proto, SocketAddr),
    Unreadable(GenId),
}

/// What a reported call asks for, once read from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bind {
    proto: Proto,
    addr: SocketAddr,
    /// The caller's descriptor, its close-on-exec flag, and whether it is non-blocking.
    fd: RawFd,
    cloexec: bool,
    nonblocking: bool,
}

impl Substitution {
    /// Takes the filter descriptor of `generation` (received from its first process).
    pub fn add(&mut self, generation: GenId, fd: OwnedFd) {
        // Linux 6.6+: the caller and grace take turns on one CPU, not two (a call is a ping-pong).
        let _ = seccomp::sync_wake_up(fd.as_fd());
        self.filters.push(Filter { generation, fd });
    }

    pub fn poll_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.filters.iter().map(|f| f.fd.as_fd())
    }

    /// The filters to carry across `execve`.
    pub fn carried(&self) -> impl Iterator<Item = (BorrowedFd<'_>, GenId)> {
        self.filters.iter().map(|f| (f.fd.as_fd(), f.generation))
    }

    /// Answers the calls waiting, one per filter, without blocking; drops the filters no process
    /// uses any more. One pass: a server's next call comes only after this one is answered, and
    /// one still waiting wakes the loop's own poll at once (each poll of a filter takes the lock
    /// its callers take too: polling again straight away mostly waits on that lock).
    pub fn service(&mut self, listeners: &[Listener], steering: &Steering) {
        let mut fds: Vec<PollFd> = self
            .filters
            .iter()
            .map(|f| PollFd::new(f.fd.as_fd(), PollFlags::POLLIN))
            .collect();
        if fds.is_empty() || !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return;
        }
        let ready: Vec<(bool, bool)> = fds
            .iter()
            .map(|p| {
                let r = p.revents().unwrap_or(PollFlags::empty());
                (
                    r.contains(PollFlags::POLLIN),
                    r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR),
                )
            })
            .collect();
        drop(fds);
        let mut gone = Vec::new();
        for (i, (readable, hung_up)) in ready.into_iter().enumerate() {
            if readable {
                let (generation, fd) = (self.filters[i].generation, &self.filters[i].fd);
                match seccomp::receive(fd.as_fd()) {
                    Ok(call) => {
                        let lines = answer(fd.as_fd(), call, generation, listeners, steering);
                        for (key, line) in lines {
                            if key.is_none_or(|k| self.explained.insert(k)) {
                                warn!("{line}");
                            }
                        }
                    }
                    // The caller was interrupted or killed before the call could be read.
                    Err(Errno::ENOENT | Errno::EINTR) => {}
                    // Kept: without it the kernel fails this generation's binds with ENOSYS.
                    Err(e) => debug!("generation {generation}: reading a bind call: {}", e.desc()),
                }
            } else if hung_up {
                // Every process under this filter has exited.
                gone.push(i);
            }
        }
        // A filter is let go only once no process uses it: a gone generation's stray process (a
        // daemonized worker) would otherwise see its binds fail with ENOSYS.
        for i in gone.into_iter().rev() {
            let f = self.filters.remove(i);
            debug!(
                "generation {}: no process left under its filter",
                f.generation
            );
        }
    }
}

/// Answers one call; returns the lines to log, each with a key to say it once (or none).
fn answer(
    filter: BorrowedFd<'_>,
    call: seccomp::Call,
    generation: GenId,
    listeners: &[Listener],
    steering: &Steering,
) -> Vec<(Option<Said>, String)> {
    let go_on = |lines| {
        // The call runs as it would without grace (it may have ended meanwhile: nothing to do).
        let _ = seccomp::let_run(filter, call.id);
        lines
    };
    if call.nr == libc::SYS_listen as i32 {
        go_on_listen(filter, call, generation, listeners, steering);
        return Vec::new();
    }
    let held_ports: Vec<u16> = listeners
        .iter()
        .filter_map(|l| l.local.inet().map(|(_, a)| a.port()))
        .collect();
    let bind = match read_bind(filter, &call, &held_ports) {
        Ok(Some(bind)) => bind,
        Ok(None) => return go_on(Vec::new()),
        // Gone meanwhile: its call is over.
        Err(None) => return Vec::new(),
        // Every bind of this server will fail the same way (and one of a held address with
        // EADDRINUSE): said once, with what to do.
        Err(Some(why)) => {
            return go_on(vec![(
                Some(Said::Unreadable(generation)),
                format!(
                    "generation {generation}: pid {}'s binds cannot be substituted ({why}): they run as without grace; grace needs ptrace access to its server (CAP_SYS_PTRACE, or the same user with no change of credentials; kernel.yama.ptrace_scope 0 or 1), or have the server take its sockets by socket activation (LISTEN_FDS)",
                    call.pid
                ),
            )]);
        }
    };
    let exact = listeners
        .iter()
        .position(|l| l.local.inet() == Some((bind.proto, bind.addr)));
    let Some(i) = exact else {
        // Same port and protocol, another address: tell the user which --listen would do.
        let near = listeners.iter().find_map(|l| {
            let (proto, addr) = l.local.inet()?;
            (proto == bind.proto && addr.port() == bind.addr.port()).then_some(addr)
        });
        let lines = near.map(|held| {
            let proto = match bind.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let flag = match bind.proto {
                Proto::Tcp => bind.addr.to_string(),
                Proto::Udp => format!("udp://{}", bind.addr),
            };
            (
                Some(Said::NearMiss(bind.proto, bind.addr)),
                format!(
                    "pid {} binds {proto} {}, which grace holds as {proto} {held}, but the addresses differ: not substituted (its bind fails as without grace); give --listen {flag}",
                    call.pid, bind.addr
                ),
            )
        });
        return go_on(lines.into_iter().collect());
    };
    let socket = steering.socket_of(listeners, generation, i);
    let own = steering.owns(generation, i);
    let placed = seccomp::place(filter, call.id, socket, bind.fd, bind.cloexec)
        .and_then(|()| seccomp::answer(filter, call.id, 0));
    match placed {
        Ok(()) => {
            // O_NONBLOCK is the open file's: set it as the server made its own (an event loop
            // needs it, a blocking accept must not get it), but only on a socket this generation
            // has to itself; a shared one is every generation's, and left as it is.
            if own {
                let _ = set_nonblocking(socket, bind.nonblocking);
            }
            debug!(
                "pid {} binds {}: generation {generation}'s socket put at its fd {}",
                call.pid, listeners[i].local, bind.fd
            );
            Vec::new()
        }
        Err(Errno::ENOENT) => Vec::new(),
        Err(e) => {
            let _ = seccomp::answer(filter, call.id, Errno::EADDRINUSE as i32);
            vec![(
                None,
                format!(
                    "pid {} binds {}: grace's socket could not be put in place ({}): its bind fails",
                    call.pid,
                    listeners[i].local,
                    e.desc()
                ),
            )]
        }
    }
}

/// A `listen` on a socket grace gave the generation, that listens already: answered without it,
/// so the server's backlog (Python's is 5) does not shrink the queue grace set up (`--backlog`).
/// One that stopped listening (a server's `shutdown`) gets the real call, which brings it back.
fn go_on_listen(
    filter: BorrowedFd<'_>,
    call: seccomp::Call,
    generation: GenId,
    listeners: &[Listener],
    steering: &Steering,
) {
    // Ours if it is the same socket as one of the generation's (same inode), which listens:
    // asked of grace's own descriptor of it.
    let skip = sys::socket_inode(call.pid, call.args[0] as RawFd).is_ok_and(|theirs| {
        (0..listeners.len()).any(|i| {
            let ours = steering.socket_of(listeners, generation, i);
            crate::steer::inode(ours).ok() == Some(theirs)
                && getsockopt(&ours, sockopt::AcceptConn).unwrap_or(false)
        })
    });
    if !seccomp::still_waiting(filter, call.id) {
        return;
    }
    let _ = if skip {
        seccomp::answer(filter, call.id, 0)
    } else {
        seccomp::let_run(filter, call.id)
    };
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> Result<(), Errno> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    let want = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    if want != flags {
        fcntl(fd, FcntlArg::F_SETFL(want))?;
    }
    Ok(())
}

/// Reads what a `bind` call asks for. `Ok(None)`: not one for grace (not an IPv4/IPv6 address on
/// a TCP or UDP socket); `Err(None)`: the call is gone; `Err(Some(why))`: it cannot be read.
fn read_bind(
    filter: BorrowedFd<'_>,
    call: &seccomp::Call,
    held_ports: &[u16],
) -> Result<Option<Bind>, Option<String>> {
    if call.nr != libc::SYS_bind as i32 {
        return Ok(None);
    }
    let fd = call.args[0] as RawFd;
    let len = (call.args[2] as usize).min(std::mem::size_of::<libc::sockaddr_in6>());
    let raw = seccomp::read_memory(call.pid, call.args[1], len)
        .map_err(|e| Some(format!("reading its address: {}", e.desc())))?;
    // Most binds are of ports grace does not hold (clients, a server's other ports): let them go
    // at once, without looking any further (letting a call run needs no check that it is the
    // one that was read: it runs as it is).
    let Some(addr) = parse_sockaddr(&raw) else {
        return Ok(None);
    };
    if !held_ports.contains(&addr.port()) {
        return Ok(None);
    }
    // Its socket, as /proc shows it: which protocol, which flags.
    let theirs =
        sys::socket_at(call.pid, fd).map_err(|e| Some(format!("its fd {fd}: {}", e.desc())))?;
    // Everything read so far is only the call's own if it still waits.
    if !seccomp::still_waiting(filter, call.id) {
        return Err(None);
    }
    let Some(proto) = proto_of(&theirs.protocol) else {
        return Ok(None);
    };
    let cloexec = theirs.flags & libc::O_CLOEXEC as u32 != 0;
    let nonblocking = theirs.flags & libc::O_NONBLOCK as u32 != 0;
    Ok(Some(Bind {
        proto,
        addr,
        fd,
        cloexec,
        nonblocking,
    }))
}

/// TCP or UDP, from a socket's protocol name (MPTCP is a stream grace's TCP socket serves as
/// its fallback does; UDP-Lite, SCTP and the rest are not grace's).
fn proto_of(name: &str) -> Option<Proto> {
    match name {
        "TCP" | "TCPv6" | "MPTCP" | "MPTCPv6" => Some(Proto::Tcp),
        "UDP" | "UDPv6" => Some(Proto::Udp),
        _ => None,
    }
}

/// A `sockaddr_in` or `sockaddr_in6` as the caller wrote it.
fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET if b.len() >= 8 => {
            let ip: [u8; 4] = b[4..8].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        libc::AF_INET6 if b.len() >= 28 => {
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            let flow = u32::from_be_bytes(b[4..8].try_into().ok()?);
            let scope = u32::from_ne_bytes(b[24..28].try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Whether this kernel can do it: user notification (5.0) with `SECCOMP_IOCTL_NOTIF_ADDFD` (5.9).
pub fn supported() -> Result<(), String> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    release_supports(&release)
}

fn release_supports(release: &str) -> Result<(), String> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < (5, 9) {
        return Err(format!(
            "Linux {release} has no seccomp user notification with SECCOMP_IOCTL_NOTIF_ADDFD (5.9)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_from_5_9() {
        for old in [
            "4.18.0-553.el8_10.x86_64",
            "5.4.0-150-generic",
            "5.8.18",
            "",
        ] {
            let why = release_supports(old).unwrap_err();
            assert!(why.starts_with(&format!("Linux {old} has no")), "{why}");
        }
        for new in ["5.9.0", "5.10.0-33-amd64", "6.1.0-27-amd64", "10.0"] {
            assert_eq!(release_supports(new), Ok(()), "{new}");
        }
    }

    #[test]
    fn parses_what_a_caller_writes() {
        // A sockaddr_in as C lays it out: family (host order), port (network order), address.
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let bytes = &v4[..];
        assert_eq!(
            parse_sockaddr(bytes),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(parse_sockaddr(&bytes[..6]), None);
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(parse_sockaddr(&v6), Some("[::1]:443".parse().unwrap()));
        let mut unix = [0u8; 16];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix), None);
    }
}
