//! `--inject`: whether a server that binds a `--listen` address itself gets grace's socket.
//!
//! Most servers never read `LISTEN_FDS`: they `bind` the port from their own flags. Bind
//! substitution (`substitute.rs`) hands such a server its generation's socket instead, through a
//! seccomp filter that reaches every binary. This module turns the flag and the kernel into the
//! mechanism for the run, refuses what cannot be done, and says once which was chosen and why.

use tracing::info;

use crate::cli::InjectMode;
use crate::exit::{self, ExitError};
use crate::substitute;

/// How a bind of a held address reaches grace's socket in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// No substitution: `--inject never`, or `auto` on a kernel that cannot do it.
    Off,
    /// A seccomp filter in every generation; `no_new_privs` when grace is not root (the kernel
    /// requires it of an unprivileged process installing a filter).
    Seccomp { no_new_privs: bool },
}

/// What `mode` comes to, given whether the kernel can substitute binds and whether grace is root.
/// `--inject always` on a kernel that cannot is an error, with the line to show.
fn choose(
    mode: InjectMode,
    kernel: Result<(), String>,
    root: bool,
) -> Result<(Mechanism, String), String> {
    let seccomp = |no_new_privs| Mechanism::Seccomp { no_new_privs };
    match (mode, kernel) {
        (InjectMode::Never, _) => Ok((
            Mechanism::Off,
            "--inject never: a server that binds a --listen address itself finds it in use".into(),
        )),
        (_, Ok(())) if root => Ok((
            seccomp(false),
            "a server's bind of a --listen address gets grace's socket (seccomp user \
             notification; grace is root, so no no_new_privs)"
                .into(),
        )),
        (_, Ok(())) => Ok((
            seccomp(true),
            "a server's bind of a --listen address gets grace's socket (seccomp user \
             notification): the server runs with no_new_privs, which an unprivileged filter \
             requires, so set-user-ID programs it starts gain no privileges (--inject never to \
             run it without)"
                .into(),
        )),
        (InjectMode::Always, Err(why)) => Err(format!(
            "--inject always: {why}, so grace cannot hand a server that binds a --listen address \
             its socket: have the server take its sockets by socket activation (LISTEN_FDS), or \
             use --inject auto"
        )),
        (InjectMode::Auto, Err(why)) => Ok((
            Mechanism::Off,
            format!(
                "{why}: a server that binds a --listen address itself finds it in use; have it \
                 take its sockets by socket activation (LISTEN_FDS)"
            ),
        )),
    }
}

fn decide(mode: InjectMode) -> Result<(Mechanism, String), String> {
    choose(
        mode,
        substitute::supported(),
        nix::unistd::geteuid().is_root(),
    )
}

/// The mechanism for this run (checked at start: an image that runs has a usable one).
pub fn mechanism(mode: InjectMode) -> Mechanism {
    decide(mode).map_or(Mechanism::Off, |(mechanism, _)| mechanism)
}

/// The start-up check: `--inject always` that cannot be honoured is refused before anything is
/// bound or started.
pub fn check(mode: InjectMode) -> anyhow::Result<()> {
    decide(mode).map(drop).map_err(|message| {
        ExitError {
            code: exit::FAILURE,
            message,
        }
        .into()
    })
}

/// Says at start how a server's bind of a --listen address is handled, and why.
pub fn announce(mode: InjectMode) {
    if let Ok((_, reason)) = decide(mode) {
        info!("{reason}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_on_each_kernel() {
        let old = || Err("Linux 5.4.0 has no seccomp user notification".to_string());
        let mechanism = |mode, kernel, root| choose(mode, kernel, root).map(|(m, _)| m);
        for root in [true, false] {
            assert_eq!(
                mechanism(InjectMode::Never, Ok(()), root),
                Ok(Mechanism::Off)
            );
            assert_eq!(
                mechanism(InjectMode::Never, old(), root),
                Ok(Mechanism::Off)
            );
            assert_eq!(mechanism(InjectMode::Auto, old(), root), Ok(Mechanism::Off));
            for mode in [InjectMode::Auto, InjectMode::Always] {
                assert_eq!(
                    mechanism(mode, Ok(()), root),
                    Ok(Mechanism::Seccomp {
                        no_new_privs: !root
                    })
                );
            }
        }
        let refused = choose(InjectMode::Always, old(), true).unwrap_err();
        assert!(
            refused.starts_with("--inject always: Linux 5.4.0"),
            "{refused}"
        );
        assert!(refused.contains("LISTEN_FDS"), "{refused}");
        let (_, said) = choose(InjectMode::Auto, old(), false).unwrap();
        assert!(said.contains("finds it in use"), "{said}");
    }
}
