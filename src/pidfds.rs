//! Signals that reach only the process meant: each generation's leader is signalled through a
//! pidfd (Linux 5.3+), which stops working when the process is reaped, so a recycled pid is never
//! hit. Where the kernel has no pidfds, `kill` on a leader that has not been reaped yet is just as
//! safe: an unreaped pid is not reused.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::debug;

use crate::sys;

#[derive(Default)]
pub struct Pidfds {
    /// (leader pid, its pidfd)
    fds: Vec<(i32, OwnedFd)>,
    /// Leaders reaped since the supervisor last heard of them: never signalled by pid.
    reaped: Vec<i32>,
}

impl Pidfds {
    pub fn adopt(carried: Vec<(i32, OwnedFd)>) -> Self {
        Self {
            fds: carried,
            reaped: Vec::new(),
        }
    }

    /// Opens a pidfd for a new leader (it is our unreaped child, so the pid is still its own).
    pub fn open(&mut self, pid: i32) {
        self.reaped.retain(|&p| p != pid);
        match sys::pidfd_open(pid) {
            Ok(fd) => self.fds.push((pid, fd)),
            Err(e) => debug!("pidfd_open({pid}): {e}; signals go by pid"),
        }
    }

    /// A leader was reaped: from now on its pid may belong to someone else. Its pidfd stays (it
    /// names the dead process, so a signal through it fails) until [`Pidfds::retain`].
    pub fn reaped(&mut self, pid: i32) {
        self.reaped.push(pid);
    }

    /// Forgets the leaders that are no longer any generation's.
    pub fn retain(&mut self, mut live: impl FnMut(i32) -> bool) {
        self.fds.retain(|(p, _)| live(*p));
        self.reaped.retain(|&p| live(p));
    }

    pub fn signal(&self, pid: i32, signal: Signal) {
        let result = match self.fds.iter().find(|(p, _)| *p == pid) {
            Some((_, fd)) => sys::pidfd_send_signal(fd.as_fd(), signal),
            None if self.reaped.contains(&pid) => Err(Errno::ESRCH),
            None => kill(Pid::from_raw(pid), signal),
        };
        if let Err(e) = result {
            debug!("signalling pid {pid} with {signal}: {e}");
        }
    }

    pub fn carried(&self) -> impl Iterator<Item = (i32, BorrowedFd<'_>)> {
        self.fds.iter().map(|(pid, fd)| (*pid, fd.as_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaped_leader_is_never_signalled_again() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Reaped below by pid, as the loop does, rather than through `Child`.
        std::mem::forget(child);
        let mut pidfds = Pidfds::default();
        pidfds.open(pid);
        let fd = pidfds.fds[0].1.try_clone().unwrap();
        // Reaped (as the loop does before it acts on the signals of the same wake-up).
        nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
        // The pidfd still names the dead process, not whatever gets its pid next.
        assert_eq!(
            sys::pidfd_send_signal(fd.as_fd(), Signal::SIGTERM),
            Err(Errno::ESRCH)
        );
        pidfds.reaped(pid);
        // Without the pidfd, the reaped pid is refused rather than signalled by number.
        pidfds.fds.clear();
        pidfds.signal(pid, Signal::SIGTERM);
        pidfds.retain(|_| false);
        assert!(pidfds.carried().next().is_none() && pidfds.reaped.is_empty());
    }

    #[test]
    fn a_live_leader_gets_the_signal_through_its_pidfd() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut pidfds = Pidfds::default();
        pidfds.open(pid);
        pidfds.signal(pid, Signal::SIGTERM);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
    }
}
