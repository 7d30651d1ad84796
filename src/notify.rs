//! The `NOTIFY_SOCKET` grace gives its generations, and the sender check on what arrives there.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use anyhow::Context;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

/// Messages read per wake-up at most, so a generation flooding the socket cannot starve signals.
const MAX_PER_WAKE: usize = 64;

pub struct NotifySocket {
    sock: UnixDatagram,
    /// The address as the server sees it in `NOTIFY_SOCKET` (`@…`, abstract).
    pub name: String,
}

/// One datagram with the pid the kernel vouches for (`SCM_CREDENTIALS`).
#[derive(Debug)]
pub struct Message {
    pub pid: i32,
    pub text: String,
}

impl Message {
    /// Whether the message holds the `key=value` assignment (one per line, as sd_notify sends).
    pub fn has(&self, assignment: &str) -> bool {
        self.text.lines().any(|line| line == assignment)
    }
}

impl NotifySocket {
    pub fn create() -> anyhow::Result<Self> {
        // Abstract: nothing to clean up on disk, and unique per grace process and start time.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("grace/{}/{nanos:08x}/notify", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).context("notify socket name")?;
        let sock = UnixDatagram::bind_addr(&addr)
            .with_context(|| format!("binding the notify socket @{name}"))?;
        Self::configure(sock, format!("@{name}"))
    }

    /// Adopts the socket a previous image created.
    pub fn from_fd(fd: OwnedFd, name: String) -> anyhow::Result<Self> {
        Self::configure(UnixDatagram::from(fd), name)
    }

    fn configure(sock: UnixDatagram, name: String) -> anyhow::Result<Self> {
        sock.set_nonblocking(true).context("notify socket")?;
        setsockopt(&sock, sockopt::PassCred, &true).context("enabling SO_PASSCRED")?;
        Ok(Self { sock, name })
    }

    /// Every datagram that is waiting, up to a bound. Datagrams without credentials are dropped.
    pub fn receive(&self) -> Vec<Message> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..MAX_PER_WAKE {
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                break;
            };
            let len = msg.bytes;
            let pid = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                    _ => None,
                })
            });
            if let Some(pid) = pid {
                out.push(Message {
                    pid,
                    text: String::from_utf8_lossy(&buf[..len]).into_owned(),
                });
            }
        }
        out
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// The process group of `pid` and, failing that, its ancestors up to `limit` levels: a worker that
/// moved to a group of its own still belongs to the generation that forked it.
pub fn lineage(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(pgid) = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) {
        out.push(pgid.as_raw());
    }
    let mut current = pid;
    for _ in 0..16 {
        out.push(current);
        match crate::sys::parent_of(current) {
            Some(parent) if parent > 1 => current = parent,
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_with_the_sender_pid() {
        let notify = NotifySocket::create().unwrap();
        let client = UnixDatagram::unbound().unwrap();
        let name = notify.name.strip_prefix('@').unwrap();
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        client.send_to_addr(b"READY=1\nSTATUS=up", &addr).unwrap();
        let got = notify.receive();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].pid, std::process::id() as i32);
        assert!(got[0].has("READY=1"));
        assert!(!got[0].has("READY=0"));
        assert!(notify.receive().is_empty());
    }

    #[test]
    fn lineage_includes_own_group_and_parent() {
        let me = std::process::id() as i32;
        let line = lineage(me);
        assert_eq!(line[0], nix::unistd::getpgrp().as_raw());
        assert!(line.contains(&me));
        assert!(
            line.contains(&(nix::unistd::getppid().as_raw()))
                || nix::unistd::getppid().as_raw() == 1
        );
    }
}
