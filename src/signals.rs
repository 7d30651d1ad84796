//! Signals in, domain events out.
//!
//! grace never runs code in a signal handler. Every signal it cares about is blocked for the whole
//! life of the process and read synchronously from a signalfd in the main loop. The mask (and any
//! pending signal) survives `execve`, so a signal that lands while grace re-executes itself waits
//! for the new image instead of killing the process with a default action.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::Context;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::sys;

/// Signals forwarded to the current generation as they are.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGWINCH,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// What a signal means to the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    Restart,
    Stop,
    Forward(Signal),
    ChildExited,
}

pub fn classify(signal: Signal) -> Option<SignalEvent> {
    match signal {
        Signal::SIGUSR2 => Some(SignalEvent::Restart),
        Signal::SIGTERM | Signal::SIGINT => Some(SignalEvent::Stop),
        Signal::SIGCHLD => Some(SignalEvent::ChildExited),
        s if FORWARDED.contains(&s) => Some(SignalEvent::Forward(s)),
        _ => None,
    }
}

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGCHLD,
    ]
    .into_iter()
    .chain(FORWARDED)
    {
        set.add(signal);
    }
    set
}

/// The blocked signals, readable as events.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the handled signals and opens a signalfd for them. Safe to call again in a re-executed
    /// image: the signals are already blocked and whatever is pending is read first.
    pub fn install() -> anyhow::Result<Self> {
        let set = handled();
        // A disposition of SIG_IGN discards a signal even while it is blocked, and a process
        // started in the background by a non-interactive shell inherits SIGINT and SIGQUIT ignored.
        // SIG_DFL for those makes them queue for the signalfd instead. Only ignored ones are
        // touched: setting SIG_DFL on a signal whose default is to ignore it (SIGCHLD, SIGWINCH)
        // would discard one pending across a re-exec.
        for signal in set.iter() {
            sys::unignore(signal)
                .with_context(|| format!("resetting the disposition of {signal}"))?;
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("blocking signals")?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .context("creating the signalfd")?;
        Ok(Self { fd })
    }

    /// Every signal queued so far, oldest first.
    pub fn drain(&self) -> Vec<Signal> {
        let mut out = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                out.push(signal);
            }
        }
        out
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Parses `TERM`, `SIGTERM`, `sigterm` or `15`.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let invalid = || {
        format!("invalid signal {text:?}: expected a name like TERM, SIGQUIT or a number like 15")
    };
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| invalid());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        for (text, signal) in [
            ("TERM", Signal::SIGTERM),
            ("SIGTERM", Signal::SIGTERM),
            ("sigquit", Signal::SIGQUIT),
            ("int", Signal::SIGINT),
            ("15", Signal::SIGTERM),
            ("3", Signal::SIGQUIT),
            ("USR1", Signal::SIGUSR1),
        ] {
            assert_eq!(parse_signal(text), Ok(signal), "{text}");
        }
    }

    #[test]
    fn bad_signal_names() {
        for text in ["", "TERMINATE", "SIG", "0", "99", "-15", "SIGTERM "] {
            let err = parse_signal(text).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid signal {text:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn classification_follows_the_design_table() {
        assert_eq!(classify(Signal::SIGUSR2), Some(SignalEvent::Restart));
        assert_eq!(classify(Signal::SIGTERM), Some(SignalEvent::Stop));
        assert_eq!(classify(Signal::SIGINT), Some(SignalEvent::Stop));
        assert_eq!(classify(Signal::SIGCHLD), Some(SignalEvent::ChildExited));
        for s in FORWARDED {
            assert_eq!(classify(s), Some(SignalEvent::Forward(s)));
        }
        assert_eq!(classify(Signal::SIGALRM), None);
    }
}
