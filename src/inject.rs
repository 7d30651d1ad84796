//! `--inject`: whether a server that binds a `--listen` address itself gets grace's socket.
//!
//! Most servers never read `LISTEN_FDS`: they `bind` the port from their own flags. Bind
//! substitution (`substitute.rs`) hands such a server its generation's socket instead, through a
//! seccomp filter that reaches every binary. This module turns the flag and the kernel into the
//! mechanism for the run, refuses what cannot be done, and says once which was chosen and why.

use std::sync::OnceLock;

use nix::errno::Errno;
use tracing::info;

use crate::cli::InjectMode;
use crate::exit::{self, ExitError};
use crate::substitute;
use crate::sys::seccomp;

/// How a bind of a held address reaches grace's socket in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// No substitution: `--inject never`, or `auto` on a kernel that cannot do it.
    Off,
    /// A seccomp filter in every generation; `no_new_privs` when grace lacks `CAP_SYS_ADMIN` (the
    /// kernel requires one or the other of a process installing a filter).
    Seccomp { no_new_privs: bool },
}

/// What `mode` comes to, given whether the kernel can substitute binds and whether grace has
/// `CAP_SYS_ADMIN`. `--inject always` on a kernel that cannot is an error, with the line to show.
fn choose(
    mode: InjectMode,
    kernel: Result<(), String>,
    privileged: bool,
) -> Result<(Mechanism, String), String> {
    let seccomp = |no_new_privs| Mechanism::Seccomp { no_new_privs };
    match (mode, kernel) {
        (InjectMode::Never, _) => Ok((
            Mechanism::Off,
            "--inject never: a server that binds a --listen address itself finds it in use".into(),
        )),
        (_, Ok(())) if privileged => Ok((
            seccomp(false),
            "a server's bind of a --listen address gets grace's socket (seccomp user \
             notification; grace has CAP_SYS_ADMIN, so no no_new_privs)"
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
    let privileged = has_cap_sys_admin();
    if mode == InjectMode::Never {
        return choose(mode, Ok(()), privileged);
    }
    choose(mode, usable(!privileged), privileged)
}

/// Whether generations can be given the filter here: a recent enough kernel, and, where this
/// process already runs under seccomp (a container's profile, or a grace or sandbox with its own
/// listener), a trial install in a child. Found out once per image: neither changes across
/// grace's re-execs.
fn usable(no_new_privs: bool) -> Result<(), String> {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            substitute::supported()?;
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            if status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "0"]))
            {
                return Ok(());
            }
            seccomp::try_install(no_new_privs).map_err(|e| match e {
                Errno::EBUSY => concat!(
                    "the bind filter cannot be installed: grace runs under a seccomp filter that ",
                    "has a listener already (grace under grace, or under a sandbox that uses ",
                    "seccomp user notification)"
                )
                .to_string(),
                e => format!("the bind filter cannot be installed here: {}", e.desc()),
            })
        })
        .clone()
}

/// Whether grace may install a filter without `no_new_privs`: the kernel asks for `CAP_SYS_ADMIN`,
/// not for uid 0. A container's root lacks it (Docker's default capabilities leave it out), and
/// there a filter without `no_new_privs` fails with EACCES. Unknown counts as no: `no_new_privs`
/// always works.
fn has_cap_sys_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_caps(&status))
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// `CAP_SYS_ADMIN` in `linux/capability.h`.
const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability set from the text of `/proc/PID/status`.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
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
        let mechanism = |mode, kernel, privileged| choose(mode, kernel, privileged).map(|(m, _)| m);
        for privileged in [true, false] {
            assert_eq!(
                mechanism(InjectMode::Never, Ok(()), privileged),
                Ok(Mechanism::Off)
            );
            assert_eq!(
                mechanism(InjectMode::Never, old(), privileged),
                Ok(Mechanism::Off)
            );
            assert_eq!(
                mechanism(InjectMode::Auto, old(), privileged),
                Ok(Mechanism::Off)
            );
            for mode in [InjectMode::Auto, InjectMode::Always] {
                assert_eq!(
                    mechanism(mode, Ok(()), privileged),
                    Ok(Mechanism::Seccomp {
                        no_new_privs: !privileged
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

    #[test]
    fn cap_sys_admin_is_read_from_the_effective_set() {
        // A host's root (every capability), and a container's root under Docker's defaults.
        let host = "Name:\tgrace\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let docker =
            "CapPrm:\t00000000a80425fb\nCapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\n";
        let caps = |status| effective_caps(status).map(|c| c & (1 << CAP_SYS_ADMIN) != 0);
        assert_eq!(caps(host), Some(true));
        assert_eq!(caps(docker), Some(false));
        assert_eq!(caps("Name:\tgrace\n"), None);
    }
}
