//! The handoff check: before re-executing, grace asks the binary on disk which record versions it
//! can adopt, with this process's own arguments.

use std::os::fd::AsFd;
use std::path::Path;

use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::{CHECK_ENV, ENV, VERSION};
use crate::supervisor::Millis;
use crate::sys::now;

/// Whether `exe` is the very file this process runs (same device and inode): a running binary
/// cannot be written to (`ETXTBSY`), so it is this version, which read these arguments at its own
/// start. A new release replaces the file (a new inode) and is checked. Saves a process per
/// restart (about 2 ms) when only the server changed.
fn is_this_binary(exe: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(exe), std::fs::metadata("/proc/self/exe")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How the check waits for its child: `poll` on the given descriptors up to the timeout,
/// returning how many of them are ready. The caller's loop passes one that also answers, in the
/// meantime, what must not wait for the check (a server's `bind`); it may return 0 before the
/// timeout.
pub type Wait<'a> = dyn FnMut(&mut [PollFd<'_>], PollTimeout) -> nix::Result<libc::c_int> + 'a;

/// Asks the binary on disk which handoff versions it reads, before betting the process on it.
/// It runs with this process's own arguments, so a new binary that would not accept them is
/// refused here too rather than after the `execve`, when the generations would be orphaned. A
/// binary that hangs is given [`CHECK_TIMEOUT`]; `wait` does the waiting.
pub fn check_new_binary(exe: &Path, wait: &mut Wait<'_>) -> Result<(), String> {
    if is_this_binary(exe) {
        return Ok(());
    }
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHECK_ENV, "1")
        .env_remove(ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    // Wait for its answer, bounded: the pipes close when it exits. (No sleep-and-poll of the
    // child: that added most of a millisecond to every restart.)
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("the handoff check has no pipes".into());
    };
    let mut out = Pipe::new(stdout);
    let mut err = Pipe::new(stderr);
    let deadline = now() + CHECK_TIMEOUT;
    while out.open || err.open {
        let left = deadline.saturating_sub(now());
        if left == 0 {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} did not answer the handoff check",
                exe.display()
            ));
        }
        let mut fds: Vec<PollFd> = [(out.open, out.fd()), (err.open, err.fd())]
            .into_iter()
            .filter(|(open, _)| *open)
            .map(|(_, fd)| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        // Whatever woke it (a pipe, the caller's descriptors, the timeout), the pipes are read
        // and the deadline looked at again.
        let _ = wait(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO),
        );
        drop(fds);
        // Non-blocking reads: whichever pipe is ready gives data or end-of-file.
        out.read_some();
        err.read_some();
    }
    // Its pipes are closed, but it may still run (it closed them itself): bounded too. A pidfd
    // becomes readable when it exits, so the wait costs no sleep-and-poll.
    let exited = crate::sys::pidfd_open(child.id() as i32).ok();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if now() < deadline => match &exited {
                Some(pidfd) => {
                    let left = PollTimeout::try_from(deadline.saturating_sub(now()))
                        .unwrap_or(PollTimeout::ZERO);
                    let _ = wait(&mut [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)], left);
                }
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            },
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer the handoff check",
                    exe.display()
                ));
            }
            Err(e) => return Err(format!("waiting for the handoff check: {e}")),
        }
    };
    let (out, err) = (out.text, err.text);
    let readable = out.split_whitespace().any(|v| v == VERSION.to_string());
    if status.success() && readable {
        return Ok(());
    }
    match err.lines().next() {
        Some(line) if !status.success() => Err(format!(
            "{} refuses this command line: {line}",
            exe.display()
        )),
        _ => Err(format!(
            "{} cannot adopt handoff version {} (it reads {:?})",
            exe.display(),
            VERSION,
            out.trim()
        )),
    }
}

/// One output pipe of the handoff check, read without blocking.
struct Pipe<R> {
    reader: R,
    text: String,
    open: bool,
}

impl<R: std::io::Read + AsFd> Pipe<R> {
    fn new(reader: R) -> Self {
        // A pipe that is not ready must not stall grace.
        let _ = nix::fcntl::fcntl(
            reader.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        Self {
            reader,
            text: String::new(),
            open: true,
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.reader.as_fd()
    }

    fn read_some(&mut self) {
        if !self.open {
            return;
        }
        let mut buf = [0u8; 4096];
        match self.reader.read(&mut buf) {
            Ok(0) => self.open = false,
            Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.open = false,
        }
    }
}

/// How long the new binary may take to answer the handoff check.
const CHECK_TIMEOUT: Millis = 5_000;
