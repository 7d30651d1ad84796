//! `--inject`: zero-downtime restarts for servers that bind their own port.
//!
//! Most servers never read `LISTEN_FDS`: they `bind` the port from their own flags. For those,
//! grace preloads a small library into the command (`LD_PRELOAD`, after any the user set) and
//! describes its sockets in `GRACE_INJECT`; when the server binds one of those addresses, the
//! library hands it grace's socket instead (see `preload/src/lib.rs`). Every generation then
//! accepts from the one kernel queue grace holds, exactly as a socket-activated server would.
//!
//! This module decides, per generation, whether to inject, and adds the two variables to the
//! environment. What the command is comes from `inspect.rs` (ELF headers, marks in the file) and
//! `shebang.rs` (`#!` interpreters, `env`); the library's memfd is `library.rs`; the socket table
//! is shared with the library itself (`preload/src/table.rs`).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::statvfs::{FsFlags, statvfs};
use tracing::{debug, info, warn};

use crate::cli::{InjectMode, RunArgs};
use crate::exit::{self, ExitError};
use crate::listen::{Listener, Proto};
use crate::sys;

// Shared with the library: grace encodes the table; the parsing and matching are for its tests.
#[allow(dead_code)]
#[path = "../../preload/src/table.rs"]
mod table;

#[cfg(test)]
#[path = "../../preload/src/addr.rs"]
mod addr;

pub use table::ENV;

mod inspect;
mod library;
mod shebang;
#[cfg(test)]
mod tests;

use inspect::*;
use library::*;
pub use library::{adopt_library, library_fd};
use shebang::*;

/// The preload library, built by build.rs (empty where it is not supported).
static LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libgrace_preload.so"));

/// Linux lets a `#!` interpreter be a script itself, this many levels deep.
const MAX_INTERPRETER_DEPTH: usize = 4;

/// The bytes of the first line of a script the kernel reads for `#!` (`BINPRM_BUF_SIZE`).
const SHEBANG_MAX: usize = 256;

/// What a program that reads socket activation has in it.
const ACTIVATION_MARK: &[u8] = b"LISTEN_FDS";

/// The start of a Go binary's build information (`.go.buildinfo`), dynamically linked or not.
const GO_MARK: &[u8] = b"\xff Go buildinf:";

/// What running a command would make of the library.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    /// A dynamically linked program: the loader honours `LD_PRELOAD`.
    Dynamic,
    /// A dynamically linked program that mentions `LISTEN_FDS`: it takes its sockets by socket
    /// activation and needs no help.
    Consumer,
    /// It will not load the library, or the library would not see its calls; the text says why.
    Unloadable(String),
    /// Neither an ELF program nor a `#!` script we can follow; the text says what went wrong.
    Unknown(String),
}

/// The command as inspected: what it is, and how we got there (`x is a script for y; `).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inspection {
    class: Class,
    /// The ELF file that will run.
    runs: PathBuf,
    via: String,
}

impl Inspection {
    /// `/usr/bin/python3.11` or `/root/.pyenv/shims/python3 (a script for /usr/bin/bash)`.
    fn describe(&self, program: &Path) -> String {
        if self.via.is_empty() {
            program.display().to_string()
        } else {
            format!("{} ({})", program.display(), self.via)
        }
    }
}

/// The decision for one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Inject(String),
    Skip(String),
    /// `--inject always` with a command that cannot load the library.
    Refuse(String),
}

fn decide(mode: InjectMode, program: &Path) -> Verdict {
    if mode == InjectMode::Never {
        return Verdict::Skip("not preloading grace's socket library (--inject never)".into());
    }
    if LIBRARY.is_empty() {
        let why = "grace's socket library is not available on this platform";
        return match mode {
            InjectMode::Always => Verdict::Refuse(format!("--inject always: {why}")),
            _ => Verdict::Skip(format!("not preloading: {why}")),
        };
    }
    let found = inspect(program);
    let name = found.describe(program);
    match (&found.class, mode) {
        (Class::Unloadable(why), InjectMode::Always) => Verdict::Refuse(format!(
            "--inject always: {name} {why}, so grace cannot hand it its sockets that way: have \
             the server take them by socket activation (LISTEN_FDS) instead"
        )),
        (Class::Unloadable(why), _) => Verdict::Skip(format!(
            "not preloading grace's socket library: {name} {why}; the server gets the sockets by \
             socket activation only (LISTEN_FDS), and cannot bind a --listen address itself"
        )),
        (Class::Dynamic, _) => Verdict::Inject(format!(
            "preloading grace's socket library into {name}: it is dynamically linked, and a bind \
             of a --listen address gets grace's socket"
        )),
        (Class::Consumer, InjectMode::Always) | (Class::Unknown(_), InjectMode::Always) => {
            Verdict::Inject(format!(
                "preloading grace's socket library into {name} (--inject always)"
            ))
        }
        (Class::Consumer, _) => Verdict::Skip(format!(
            "not preloading grace's socket library: {} reads LISTEN_FDS (socket activation)",
            found.runs.display()
        )),
        (Class::Unknown(why), _) => Verdict::Skip(format!(
            "not preloading grace's socket library: cannot tell whether {name} can load it ({why})"
        )),
    }
}

/// Logs a decision at info the first time it is made (by this image), at debug after that;
/// returns whether this was the first time.
fn note(reason: &str) -> bool {
    static LAST: Mutex<Option<String>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_deref() == Some(reason) {
        debug!("{reason}");
        false
    } else {
        info!("{reason}");
        *last = Some(reason.to_string());
        true
    }
}

/// The start-up check: `--inject always` with a command that cannot load the library is
/// refused before anything is bound or started. (Other decisions are logged at the spawn, so
/// that a refusal for another reason stays one line.)
/// How a bind of a held address reaches grace's socket in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `--inject never`.
    Off,
    /// A seccomp filter in every generation (see `substitute`); `no_new_privs` when grace is not
    /// root (the kernel requires it of an unprivileged process installing a filter).
    Seccomp { no_new_privs: bool },
    /// The preload library, where the kernel cannot do the former (before Linux 5.9).
    Preload,
}

/// Chooses the mechanism for this run, and says which and why, once.
pub fn mechanism(mode: InjectMode) -> Mechanism {
    if mode == InjectMode::Never {
        return Mechanism::Off;
    }
    match crate::substitute::supported() {
        Ok(()) => Mechanism::Seccomp {
            no_new_privs: !nix::unistd::geteuid().is_root(),
        },
        Err(why) => {
            debug!(
                "{why}: binds are substituted by the preload library, for dynamically linked servers only"
            );
            Mechanism::Preload
        }
    }
}

/// Says at start how a server's bind of a --listen address is handled.
pub fn announce(mechanism: Mechanism) {
    match mechanism {
        Mechanism::Off => {
            info!("--inject never: a server that binds a --listen address itself finds it in use")
        }
        Mechanism::Seccomp {
            no_new_privs: false,
        } => info!(
            "a server's bind of a --listen address gets grace's socket (seccomp user notification; grace is root, so no no_new_privs)"
        ),
        Mechanism::Seccomp { no_new_privs: true } => info!(
            "a server's bind of a --listen address gets grace's socket (seccomp user notification): the server runs with no_new_privs, which an unprivileged filter requires, so set-user-ID programs it starts gain no privileges (--inject never to run it without)"
        ),
        Mechanism::Preload => {}
    }
}

pub fn check(args: &RunArgs, program: &Path) -> anyhow::Result<()> {
    if args.inject != InjectMode::Always || mechanism(args.inject) != Mechanism::Preload {
        return Ok(());
    }
    match decide(args.inject, program) {
        Verdict::Refuse(message) => Err(ExitError {
            code: exit::FAILURE,
            message,
        }
        .into()),
        Verdict::Inject(_) | Verdict::Skip(_) => Ok(()),
    }
}

/// Adds `LD_PRELOAD` (after the user's own) and the socket table to a generation's environment,
/// when the decision for `program` says so. `env` holds `KEY=VALUE` entries.
pub fn apply(
    args: &RunArgs,
    program: &Path,
    listeners: &[Listener],
    env: &mut Vec<CString>,
) -> Result<(), String> {
    let verdict = if args.inject == InjectMode::Auto && !args.compat.is_empty() {
        Verdict::Skip(
            "not preloading grace's socket library: with --compat the server takes its sockets \
             from the fds grace names"
                .into(),
        )
    } else {
        decide(args.inject, program)
    };
    match verdict {
        Verdict::Refuse(message) => return Err(message),
        Verdict::Skip(reason) => {
            note(&reason);
            return Ok(());
        }
        Verdict::Inject(reason) => {
            if note(&reason) && args.ready.needs_probe_socket() {
                // The probe socket is one grace passes by socket activation; a server that binds
                // its own port never answers on it.
                warn!(
                    "--ready http/tcp probe a private socket that a server binding its own port \
                     never answers: use --ready delay:DURATION, notify or exec:COMMAND"
                );
            }
        }
    }
    let table = table_for(listeners);
    if table.is_empty() {
        debug!("no TCP or UDP socket to hand over: the socket library is not needed");
        return Ok(());
    }
    let library = match library_path() {
        Ok(path) => path,
        Err(why) => return without_library(args.inject, program, why),
    };
    let mut preload = take_var(env, "LD_PRELOAD").unwrap_or_default();
    if !preload.is_empty() {
        preload.push(b':');
    }
    preload.extend_from_slice(library.as_bytes());
    for (key, value) in [("LD_PRELOAD", preload), (ENV, table.into_bytes())] {
        let mut entry = format!("{key}=").into_bytes();
        entry.extend_from_slice(&value);
        env.extend(CString::new(entry).ok());
    }
    Ok(())
}

/// When the library cannot be prepared (no `/proc`, out of fds, …): `--inject always` fails the
/// spawn with the reason; `auto` runs the server without it, saying so once.
fn without_library(mode: InjectMode, program: &Path, why: String) -> Result<(), String> {
    if mode == InjectMode::Always {
        return Err(format!("--inject always: {why}"));
    }
    static WARNED: AtomicBool = AtomicBool::new(false);
    let message = format!(
        "{why}: running {} without grace's socket library, so a server that binds a --listen \
         address itself finds it in use",
        program.display()
    );
    if WARNED.swap(true, Ordering::Relaxed) {
        debug!("{message}");
    } else {
        warn!("{message}");
    }
    Ok(())
}

/// Removes `KEY=…` from `env`, returning its value.
fn take_var(env: &mut Vec<CString>, key: &str) -> Option<Vec<u8>> {
    let prefix = format!("{key}=");
    let at = env
        .iter()
        .position(|e| e.as_bytes().starts_with(prefix.as_bytes()))?;
    Some(env.remove(at).as_bytes()[prefix.len()..].to_vec())
}

/// `GRACE_INJECT` for these listeners, which the child finds at fds 3, 4, …: its TCP and UDP
/// sockets (unix sockets are not substituted).
fn table_for(listeners: &[Listener]) -> String {
    let entries: Vec<String> = listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let (proto, addr) = l.local.inet()?;
            let entry = table::Entry {
                fd: 3 + i32::try_from(i).ok()?,
                proto: match proto {
                    Proto::Tcp => table::Proto::Tcp,
                    Proto::Udp => table::Proto::Udp,
                },
                addr,
            };
            Some(entry.to_string())
        })
        .collect();
    entries.join(",")
}
