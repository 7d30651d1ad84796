//! `--inject`: zero-downtime restarts for servers that bind their own port.
//!
//! Most servers never read `LISTEN_FDS`: they `bind` the port from their own flags. For those,
//! grace preloads a small library into the command (`LD_PRELOAD`, after any the user set) and
//! describes its sockets in `GRACE_INJECT`; when the server binds one of those addresses, the
//! library hands it grace's socket instead (see `preload/src/lib.rs`). Every generation then
//! accepts from the one kernel queue grace holds, exactly as a socket-activated server would.
//!
//! This module decides whether a command can load the library (by reading its ELF headers, and
//! following `#!` interpreters), writes the library (carried inside the grace binary) into a
//! sealed memfd the child loads through `/proc/<grace>/fd/N`, and adds the two variables to a
//! generation's environment.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use clap::ValueEnum;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{SockaddrStorage, getsockname};
use nix::sys::statvfs::{FsFlags, statvfs};
use tracing::{debug, info, warn};

use crate::cli::RunArgs;
use crate::exit::{self, ExitError};
use crate::listen::{Listener, SocketKind};
use crate::sys;

// Shared with the library: grace encodes the table; the parsing and matching are for its tests.
#[allow(dead_code)]
#[path = "../preload/src/table.rs"]
mod table;

#[cfg(test)]
#[path = "../preload/src/addr.rs"]
mod addr;

pub use table::ENV;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InjectMode {
    /// When the command is a dynamically linked program that does not itself read LISTEN_FDS.
    Auto,
    /// Whenever the command can load it; a statically linked command is refused.
    Always,
    /// Never: the server gets the sockets by socket activation only.
    Never,
}

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
pub fn check(args: &RunArgs, program: &Path) -> anyhow::Result<()> {
    if args.inject != InjectMode::Always {
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
            let proto = match l.kind {
                SocketKind::Stream => table::Proto::Tcp,
                SocketKind::Datagram => table::Proto::Udp,
            };
            let local: SockaddrStorage = getsockname(l.fd.as_raw_fd()).ok()?;
            let addr = inet_addr(&local)?;
            let entry = table::Entry {
                fd: 3 + i32::try_from(i).ok()?,
                proto,
                addr,
            };
            Some(entry.to_string())
        })
        .collect();
    entries.join(",")
}

fn inet_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// The library as children load it: a sealed memfd of grace, and its `/proc/<grace>/fd/N`.
#[derive(Debug)]
struct Library {
    fd: OwnedFd,
    path: String,
}

/// Created at the first spawn that needs it (and tried again at the next if that failed), or
/// adopted from the previous image.
static LIBRARY_FD: OnceLock<Library> = OnceLock::new();

/// The path a child loads the library from: a sealed memfd of this image, created once.
///
/// A memfd leaves nothing on disk to clean up or to tamper with (it is sealed before anyone can
/// see it). The child opens it through grace's `/proc/PID/fd/N`, which needs `/proc` and the
/// same user as grace (a server that drops privileges before its `exec` cannot load it).
fn library_path() -> Result<&'static str, String> {
    if let Some(library) = LIBRARY_FD.get() {
        return Ok(&library.path);
    }
    let fd = write_library()?;
    let path = proc_path(&fd)?;
    debug!("grace's socket library is at {path}");
    Ok(&LIBRARY_FD.get_or_init(|| Library { fd, path }).path)
}

/// The library's fd, if there is one: grace keeps it open across a re-exec (see
/// [`adopt_library`]).
pub fn library_fd() -> Option<BorrowedFd<'static>> {
    LIBRARY_FD.get().map(|library| library.fd.as_fd())
}

/// Takes over the library fd the previous image handed over, at the same number. The
/// generations it started have `LD_PRELOAD=/proc/<grace>/fd/N` in their environment, and so has
/// every program they `exec` later: N must go on holding grace's library for as long as grace
/// runs, never whatever the number would be reused for.
pub fn adopt_library(fd: OwnedFd) {
    let number = fd.as_raw_fd();
    match adopted(fd) {
        Ok(library) => {
            debug!("grace's socket library is still at {}", library.path);
            let _ = LIBRARY_FD.set(library);
        }
        Err(why) => warn!("adopting grace's socket library (fd {number}): {why}"),
    }
}

/// The adopted fd as this image's library: kept if it holds the library this binary carries,
/// otherwise (grace was upgraded) made to hold it, still at the same number.
fn adopted(mut fd: OwnedFd) -> Result<Library, String> {
    if !holds_library(&fd) {
        let fresh = write_library()?;
        nix::unistd::dup3(&fresh, &mut fd, OFlag::O_CLOEXEC)
            .map_err(|e| format!("replacing the previous grace's library: {e}"))?;
    }
    let path = proc_path(&fd)?;
    Ok(Library { fd, path })
}

/// Whether `fd` has exactly the bytes of the library this binary carries.
fn holds_library(fd: &OwnedFd) -> bool {
    let Ok(file) = fd.try_clone().map(File::from) else {
        return false;
    };
    let mut bytes = vec![0u8; LIBRARY.len()];
    file.metadata()
        .is_ok_and(|m| m.len() == LIBRARY.len() as u64)
        && file.read_exact_at(&mut bytes, 0).is_ok()
        && bytes == LIBRARY
}

fn write_library() -> Result<OwnedFd, String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        format!("writing grace's socket library to a memfd: {what}: {e}")
    };
    // MFD_NOEXEC_SEAL (Linux 6.3): nobody can execve it; mapping it executable, as the loader
    // does, is still allowed. Older kernels refuse the flag.
    let noexec = MFdFlags::from_bits_retain(0x0008);
    let base = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    let fd = match memfd_create(c"grace-preload", base | noexec) {
        Err(Errno::EINVAL) => memfd_create(c"grace-preload", base),
        other => other,
    }
    .map_err(|e| failed("memfd_create", &e))?;
    let mut file = File::from(fd);
    file.write_all(LIBRARY).map_err(|e| failed("write", &e))?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| failed("sealing", &e))?;
    Ok(OwnedFd::from(file))
}

/// `/proc/<grace>/fd/N` for one of grace's fds, checked to open.
fn proc_path(fd: &OwnedFd) -> Result<String, String> {
    // Our pid as the /proc the child sees numbers it (inside a PID namespace with the host's
    // /proc, getpid() would name another process).
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    let path = format!("/proc/{pid}/fd/{}", fd.as_raw_fd());
    File::open(&path).map_err(|e| {
        format!("opening grace's socket library at {path}: {e} (is /proc mounted?)")
    })?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Reading the command's file.

fn inspect(program: &Path) -> Inspection {
    let mut path = program.to_path_buf();
    let mut via = Vec::new();
    for _ in 0..=MAX_INTERPRETER_DEPTH {
        let class = match read_head(&path) {
            Err(e) => Class::Unknown(format!("reading {}: {e}", path.display())),
            Ok(head) if head.starts_with(b"#!") => {
                match scan(&path) {
                    Ok(marks) if marks.activation => {
                        return Inspection {
                            class: Class::Consumer,
                            runs: path,
                            via: via.join(", "),
                        };
                    }
                    _ => {}
                }
                match interpreter(&head) {
                    Ok(next) => {
                        via.push(format!("a script for {}", next.display()));
                        path = next;
                        continue;
                    }
                    Err(why) => Class::Unknown(format!("{}: {why}", path.display())),
                }
            }
            Ok(head) if head.starts_with(b"\x7fELF") => classify_elf(&path),
            Ok(_) => Class::Unknown(format!(
                "{} is neither an ELF program nor a #! script",
                path.display()
            )),
        };
        return Inspection {
            class,
            runs: path,
            via: via.join(", "),
        };
    }
    Inspection {
        class: Class::Unknown("too many nested #! interpreters".into()),
        runs: path,
        via: via.join(", "),
    }
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(SHEBANG_MAX);
    File::open(path)?
        .take(SHEBANG_MAX as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// The program a `#!` line runs, resolved as the kernel and env do: the kernel takes the first
/// word (up to a space or a tab) as the interpreter and the rest of the line, trimmed of spaces
/// and tabs, as one argument; `#!/usr/bin/env ARG` then runs the command ARG names (see
/// [`env_command`]), looked up in `PATH`. A carriage return is no blank for the kernel: a script
/// with CRLF line ends (`#!/bin/sh\r`) names an interpreter that does not exist.
fn interpreter(head: &[u8]) -> Result<PathBuf, String> {
    let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let line = trim(line, blank);
    let end = line.iter().position(blank).unwrap_or(line.len());
    let (word, rest) = line.split_at(end);
    if word.is_empty() {
        return Err("empty #! line".into());
    }
    if word.contains(&b'\r') {
        return Err(crlf(&String::from_utf8_lossy(word)));
    }
    let first = PathBuf::from(OsStr::from_bytes(word));
    if first.file_name().is_none_or(|name| name != "env") {
        return Ok(first);
    }
    let rest = trim(rest, blank);
    if rest.is_empty() {
        return Ok(first);
    }
    let Some(command) = env_command(&String::from_utf8_lossy(rest))? else {
        return Ok(first);
    };
    if command.name.contains('\r') {
        return Err(crlf(&command.name));
    }
    if command.name.contains('/') {
        let path = PathBuf::from(&command.name);
        return Ok(match command.dir {
            Some(dir) if path.is_relative() => Path::new(&dir).join(path),
            _ => path,
        });
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let found = match &command.search {
        Some(dirs) => which::which_in(&command.name, Some(dirs), cwd),
        None => which::which(&command.name),
    };
    found.map_err(|_| format!("{:?} (run by env) is not in PATH", command.name))
}

fn trim(bytes: &[u8], blank: impl Fn(&u8) -> bool) -> &[u8] {
    let start = bytes.iter().position(|b| !blank(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

fn crlf(name: &str) -> String {
    format!(
        "the #! line ends in a carriage return (the script has CRLF line ends), so it names \
         {name:?}, which does not exist"
    )
}

/// The command an `env` run from a `#!` line runs, and what changes its lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EnvCommand {
    name: String,
    /// `-P PATH`: the directories searched instead of `PATH`.
    search: Option<String>,
    /// `-C DIR` (`--chdir`): where a relative path is found.
    dir: Option<String>,
}

/// env's options that take a value, short and long; `S` (`split-string`) splits it into more
/// arguments.
const ENV_VALUE_OPTIONS: &[(char, &str)] = &[
    ('u', "unset"),
    ('C', "chdir"),
    ('S', "split-string"),
    ('a', "argv0"),
    ('P', ""),
];

/// env's long options that take no value (or only one given with `=`).
const ENV_FLAG_OPTIONS: &[&str] = &[
    "ignore-environment",
    "null",
    "debug",
    "block-signal",
    "default-signal",
    "ignore-signal",
    "list-signal-handling",
    "help",
    "version",
];

/// Parses env's arguments as GNU env does (options until the first other word, then
/// `NAME=VALUE` assignments, then the command); `first` is the one argument a `#!` line passes.
/// `None` when no command follows (env then runs the script itself, or prints its environment).
fn env_command(first: &str) -> Result<Option<EnvCommand>, String> {
    let mut args = VecDeque::from([first.to_string()]);
    let mut search = None;
    let mut dir = None;
    let mut options = true;
    while let Some(arg) = args.pop_front() {
        if options && arg.starts_with('-') && arg != "-" && arg != "--" {
            let Some((option, value)) = env_option(&arg) else {
                continue;
            };
            let Some(value) = value.or_else(|| args.pop_front()) else {
                return Err(format!("env's option {arg:?} has no value"));
            };
            match option {
                'S' => {
                    for word in split_string(&value).into_iter().rev() {
                        args.push_front(word);
                    }
                }
                'P' => search = Some(value),
                'C' => dir = Some(value),
                _ => {}
            }
        } else if (options && (arg == "-" || arg == "--")) || arg.contains('=') {
            // The end of the options (`-` also empties the environment), or an assignment.
            options = false;
        } else {
            return Ok(Some(EnvCommand {
                name: arg,
                search,
                dir,
            }));
        }
    }
    Ok(None)
}

/// The option in `arg` (`-uNAME`, `-i`, `-iu`, `--unset=NAME`, `--chdir`, …) that takes a value,
/// with the value if it is in `arg` itself; `None` for options that take none.
fn env_option(arg: &str) -> Option<(char, Option<String>)> {
    if let Some(long) = arg.strip_prefix("--") {
        let (name, inline) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (long, None),
        };
        // getopt_long takes any unambiguous prefix of a long option.
        if let Some((short, _)) = ENV_VALUE_OPTIONS.iter().find(|(_, long)| *long == name) {
            return Some((*short, inline));
        }
        let mut candidates = ENV_VALUE_OPTIONS
            .iter()
            .filter(|(_, long)| !long.is_empty() && long.starts_with(name));
        let flag = ENV_FLAG_OPTIONS.iter().any(|f| f.starts_with(name));
        return match (candidates.next(), candidates.next()) {
            (Some((short, _)), None) if !flag => Some((*short, inline)),
            _ => None,
        };
    }
    // A cluster of short options: the first that takes a value takes the rest of the word (or
    // the next argument).
    let (at, short) = arg[1..]
        .char_indices()
        .find(|(_, c)| ENV_VALUE_OPTIONS.iter().any(|(s, _)| s == c))?;
    let rest = &arg[1 + at + short.len_utf8()..];
    Some((short, (!rest.is_empty()).then(|| rest.to_string())))
}

/// env's `-S STRING`: words separated by whitespace, with `'…'` and `"…"` quoting and a `#` that
/// starts a word ending the string. (env's escapes and `${NAME}` are not expanded.)
fn split_string(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, c) if c.is_ascii_whitespace() => words.extend(word.take()),
            (None, '#') if word.is_none() => break,
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    words.extend(word);
    words
}

/// The marks found in a file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Marks {
    activation: bool,
    go: bool,
}

/// Looks through the whole file for the marks, in chunks (a server binary may be 100 MB).
fn scan(path: &Path) -> std::io::Result<Marks> {
    // On the stack and small: a heap buffer of a megabyte stayed resident in grace after the
    // first spawn (glibc raises its mmap threshold once such a block is freed).
    const CHUNK: usize = 64 << 10;
    let keep = ACTIVATION_MARK.len().max(GO_MARK.len()) - 1;
    let activation = memchr::memmem::Finder::new(ACTIVATION_MARK);
    let go = memchr::memmem::Finder::new(GO_MARK);
    let mut file = File::open(path)?;
    let mut buf = [0u8; CHUNK + 64];
    assert!(keep < 64, "the marks fit in the carried tail");
    let mut carried = 0;
    let mut marks = Marks::default();
    loop {
        let n = file.read(&mut buf[carried..])?;
        if n == 0 {
            return Ok(marks);
        }
        let filled = carried + n;
        let window = &buf[..filled];
        marks.activation |= activation.find(window).is_some();
        marks.go |= go.find(window).is_some();
        if marks.activation && marks.go {
            return Ok(marks);
        }
        // Keep the tail, so that a mark split across two reads is still seen.
        carried = keep.min(filled);
        buf.copy_within(filled - carried..filled, 0);
    }
}

/// The parts of an ELF header that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ElfInfo {
    class64: bool,
    little_endian: bool,
    machine: u16,
    /// Has a PT_INTERP program header: the kernel starts the dynamic loader.
    interpreter: bool,
}

const PT_INTERP: u32 = 3;

/// `sizeof(Elf64_Phdr)` and `sizeof(Elf32_Phdr)`.
const PHDR64_SIZE: u16 = 56;
const PHDR32_SIZE: u16 = 32;

/// The most program headers the kernel reads (`load_elf_phdrs`): a bigger table is a corrupt or
/// hostile file, not a program.
const MAX_PHDRS_BYTES: usize = 64 << 10;

fn read_elf(file: &mut File) -> Result<ElfInfo, String> {
    let mut ident = [0u8; 64];
    file.read_exact(&mut ident)
        .map_err(|e| format!("reading its ELF header: {e}"))?;
    let class64 = match ident[4] {
        1 => false,
        2 => true,
        other => return Err(format!("unknown ELF class {other}")),
    };
    let little_endian = match ident[5] {
        1 => true,
        2 => false,
        other => return Err(format!("unknown ELF data encoding {other}")),
    };
    let u16_at = |at: usize| {
        let b = [ident[at], ident[at + 1]];
        if little_endian {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u32_at = |at: usize| {
        let b = [ident[at], ident[at + 1], ident[at + 2], ident[at + 3]];
        if little_endian {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&ident[at..at + 8]);
        if little_endian {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let machine = u16_at(18);
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(32), u16_at(54), u16_at(56))
    } else {
        (u64::from(u32_at(28)), u16_at(42), u16_at(44))
    };
    let expected = if class64 { PHDR64_SIZE } else { PHDR32_SIZE };
    if phentsize != expected {
        return Err(format!(
            "bad program header size {phentsize} (expected {expected})"
        ));
    }
    let size = usize::from(phentsize) * usize::from(phnum);
    if size == 0 || size > MAX_PHDRS_BYTES {
        return Err(format!("bad number of program headers {phnum}"));
    }
    let mut headers = vec![0u8; size];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut headers))
        .map_err(|e| format!("reading its program headers: {e}"))?;
    let interpreter = headers.chunks_exact(usize::from(phentsize)).any(|h| {
        let b = [h[0], h[1], h[2], h[3]];
        let p_type = if little_endian {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        };
        p_type == PT_INTERP
    });
    Ok(ElfInfo {
        class64,
        little_endian,
        machine,
        interpreter,
    })
}

/// `e_machine` of the programs the library is built for (grace's own architecture).
const HOST_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else if cfg!(target_arch = "riscv64") {
    Some(243)
} else {
    None
};

/// What decides whether the loader runs a program in secure mode: who runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Runner {
    /// Real user and group ids (the kernel compares the new effective ids with these).
    uid: u32,
    gid: u32,
    /// `PR_SET_NO_NEW_PRIVS` (systemd's `NoNewPrivileges=`): set-user-ID bits are ignored.
    no_new_privs: bool,
}

impl Runner {
    /// grace itself, whose children inherit all three.
    fn current() -> Self {
        let no_new_privs = std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"]))
        });
        Runner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            no_new_privs,
        }
    }
}

/// Why running the file would put the dynamic loader in secure mode (`AT_SECURE`), where it
/// ignores an `LD_PRELOAD` entry with a `/` in it (grace's is `/proc/…`): what the file is, and
/// who grace would have to run as. Linux's rule (`cap_bprm_creds_from_file`): a set-user-ID
/// (set-group-ID) file whose owner (group) is not the runner's, or file capabilities for a runner
/// that is not root; neither counts on a `nosuid` mount, nor the bits under `no_new_privs`.
fn secure_exec(
    meta: &Metadata,
    capabilities: bool,
    nosuid: bool,
    runner: Runner,
) -> Option<(String, String)> {
    const S_ISUID: u32 = 0o4000;
    const S_ISGID: u32 = 0o2000;
    const S_IXGRP: u32 = 0o0010;
    if nosuid {
        return None;
    }
    let mode = meta.mode();
    if !runner.no_new_privs {
        if mode & S_ISUID != 0 && meta.uid() != runner.uid {
            return Some((
                format!("is set-user-ID (owner uid {})", meta.uid()),
                "as that user".into(),
            ));
        }
        if mode & (S_ISGID | S_IXGRP) == S_ISGID | S_IXGRP && meta.gid() != runner.gid {
            return Some((
                format!("is set-group-ID (group gid {})", meta.gid()),
                "in that group".into(),
            ));
        }
    }
    if capabilities && runner.uid != 0 {
        return Some((
            "has file capabilities (security.capability)".into(),
            "as root".into(),
        ));
    }
    None
}

fn classify_elf(path: &Path) -> Class {
    classify_elf_as(path, Runner::current())
}

fn classify_elf_as(path: &Path, runner: Runner) -> Class {
    let info = match File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|mut f| read_elf(&mut f))
    {
        Ok(info) => info,
        Err(e) => return Class::Unknown(format!("{}: {e}", path.display())),
    };
    if !info.interpreter {
        return Class::Unloadable("is statically linked (it does not load LD_PRELOAD)".into());
    }
    if !info.class64 || !info.little_endian || Some(info.machine) != HOST_MACHINE {
        return Class::Unloadable(
            "is built for another architecture than grace's socket library".into(),
        );
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let capabilities = sys::has_xattr(path, c"security.capability").unwrap_or(false);
        let nosuid = statvfs(path).is_ok_and(|s| s.flags().contains(FsFlags::ST_NOSUID));
        if let Some((what, who)) = secure_exec(&meta, capabilities, nosuid, runner) {
            return Class::Unloadable(format!(
                "{what}: the loader runs it in secure mode, which ignores a library preloaded by \
                 path, unless grace runs {who}"
            ));
        }
    }
    match scan(path) {
        Ok(marks) if marks.go => Class::Unloadable(
            "is a Go program, which makes its socket system calls itself (the library never \
             sees them)"
                .into(),
        ),
        Ok(marks) if marks.activation => Class::Consumer,
        Ok(_) => Class::Dynamic,
        Err(e) => Class::Unknown(format!("reading {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("grace-inject-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn table_round_trips() {
        let entries = [
            table::Entry {
                fd: 3,
                proto: table::Proto::Tcp,
                addr: "127.0.0.1:8080".parse().unwrap(),
            },
            table::Entry {
                fd: 4,
                proto: table::Proto::Udp,
                addr: "[::1]:5353".parse().unwrap(),
            },
            table::Entry {
                fd: 5,
                proto: table::Proto::Tcp,
                addr: "[::]:80".parse().unwrap(),
            },
            table::Entry {
                fd: 6,
                proto: table::Proto::Tcp,
                addr: "[fe80::1%2]:443".parse().unwrap(),
            },
        ];
        let text: Vec<String> = entries.iter().map(ToString::to_string).collect();
        let text = text.join(",");
        assert_eq!(
            text,
            "3:tcp:127.0.0.1:8080,4:udp:[::1]:5353,5:tcp:[::]:80,6:tcp:[fe80::1%2]:443"
        );
        let parsed: Vec<table::Entry> = table::entries(&text).map(Option::unwrap).collect();
        assert_eq!(parsed, entries);
    }

    #[test]
    fn table_entries_that_do_not_parse_are_skipped_not_guessed() {
        let parsed: Vec<Option<table::Entry>> =
            table::entries("3:tcp:127.0.0.1:80,,2:tcp:127.0.0.1:81,x:tcp:1.2.3.4:5,4:sctp:127.0.0.1:82,5:udp:nonsense,6:udp:[::1]:53").collect();
        assert_eq!(parsed.len(), 6, "empty entries are ignored");
        assert!(parsed[0].is_some());
        assert!(parsed[1].is_none(), "fds below 3 are not grace's");
        assert!(parsed[2].is_none());
        assert!(parsed[3].is_none());
        assert!(parsed[4].is_none());
        assert_eq!(parsed[5].unwrap().fd, 6);
        assert_eq!(table::entries("").count(), 0);
    }

    #[test]
    fn matching_rules() {
        use table::{Match, Proto, matches};
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let rows = [
            // held, dual stack, wanted, result (the same for TCP and UDP but where noted)
            ("127.0.0.1:80", false, "127.0.0.1:80", Match::Same),
            ("127.0.0.1:80", false, "127.0.0.1:81", Match::No),
            ("127.0.0.1:80", false, "127.0.0.2:80", Match::No),
            ("127.0.0.1:80", false, "0.0.0.0:80", Match::No),
            ("0.0.0.0:80", false, "0.0.0.0:80", Match::Same),
            ("0.0.0.0:80", false, "127.0.0.1:80", Match::No),
            ("[::]:80", true, "[::]:80", Match::Same),
            ("[::]:80", false, "[::]:80", Match::Same),
            ("[::]:80", true, "0.0.0.0:80", Match::V4WildcardOnDualStack),
            ("[::]:80", false, "0.0.0.0:80", Match::No),
            ("[::]:80", true, "127.0.0.1:80", Match::No),
            ("0.0.0.0:80", false, "[::]:80", Match::No),
            ("[::1]:80", false, "[::1]:80", Match::Same),
            ("[::1]:80", false, "127.0.0.1:80", Match::No),
            ("[fe80::1%2]:80", false, "[fe80::1%3]:80", Match::No),
            ("127.0.0.1:0", false, "127.0.0.1:0", Match::No),
        ];
        for (held, dual, wanted, expected) in rows {
            assert_eq!(
                matches(Proto::Tcp, &a(held), dual, &a(wanted)),
                expected,
                "tcp {held} (dual stack: {dual}) vs {wanted}"
            );
            // UDP never gets the dual-stack socket for an IPv4 bind: recvfrom would give the
            // server IPv6 senders in its IPv4 buffer.
            let udp = match expected {
                Match::V4WildcardOnDualStack => Match::No,
                other => other,
            };
            assert_eq!(
                matches(Proto::Udp, &a(held), dual, &a(wanted)),
                udp,
                "udp {held} (dual stack: {dual}) vs {wanted}"
            );
        }
        assert_eq!(
            matches(Proto::Udp, &a("[::]:53"), true, &a("0.0.0.0:53")),
            Match::No
        );
    }

    #[test]
    fn sockaddr_bytes_and_ipv4_view() {
        let mut buf = [0u8; addr::SOCKADDR_IN6_LEN];
        for text in ["127.0.0.1:8080", "[::1]:443", "[fe80::1%7]:22", "0.0.0.0:0"] {
            let a: SocketAddr = text.parse().unwrap();
            let n = addr::encode(&a, &mut buf);
            assert_eq!(n, if a.is_ipv4() { 16 } else { 28 });
            assert_eq!(addr::decode(&buf[..n]), Some(a), "{text}");
            // Read back the way grace reads its own sockets' addresses.
            assert_eq!(inet_addr(&SockaddrStorage::from(a)), Some(a));
        }
        assert_eq!(addr::decode(&buf[..10]), None, "short");
        // RFC 2133's sockaddr_in6 has no scope id: 24 bytes, accepted by the kernel as scope 0.
        let a: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
        assert_eq!(addr::encode(&a, &mut buf), 28);
        assert_eq!(addr::decode(&buf[..24]), Some(a));
        let scoped: SocketAddr = "[fe80::1%7]:22".parse().unwrap();
        addr::encode(&scoped, &mut buf);
        assert_eq!(
            addr::decode(&buf[..24]),
            Some("[fe80::1]:22".parse().unwrap()),
            "no room for the scope: 0"
        );
        assert_eq!(addr::decode(&buf[..23]), None, "shorter than RFC 2133's");
        assert_eq!(addr::decode(&[1, 0, 0, 0]), None, "AF_UNIX");
        let v4 = |s: &str| addr::as_v4(s.parse().unwrap()).to_string();
        assert_eq!(v4("[::]:80"), "0.0.0.0:80");
        assert_eq!(v4("[::ffff:127.0.0.1]:5000"), "127.0.0.1:5000");
        assert_eq!(
            v4("[::1]:5000"),
            "[::1]:5000",
            "a real IPv6 peer has no IPv4 form"
        );
        assert_eq!(v4("10.0.0.1:1"), "10.0.0.1:1");
    }

    #[test]
    fn elf_programs() {
        // /bin/sh is dash or bash on every Debian system: dynamically linked.
        assert_eq!(classify_elf(Path::new("/bin/sh")), Class::Dynamic);
        let info = read_elf(&mut File::open("/bin/sh").unwrap()).unwrap();
        assert!(info.interpreter && info.class64 && info.little_endian);
        assert_eq!(Some(info.machine), HOST_MACHINE);
        // ldconfig is statically linked (static-pie) in Debian's libc-bin, which is essential.
        let ldconfig = Path::new("/sbin/ldconfig");
        if ldconfig.exists() {
            assert!(
                matches!(classify_elf(ldconfig), Class::Unloadable(ref why) if why.contains("statically linked")),
                "{:?}",
                classify_elf(ldconfig)
            );
        }
        let dir = temp_dir("elf");
        let junk = script(&dir, "junk", "\x7fELF\x02\x01");
        assert!(matches!(classify_elf(&junk), Class::Unknown(_)));
    }

    /// A 64-bit little-endian ELF header with these program header fields, then zeroes.
    fn elf_header(phentsize: u16, phnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[18..20].copy_from_slice(&HOST_MACHINE.unwrap_or(62).to_le_bytes());
        h[32..40].copy_from_slice(&64u64.to_le_bytes());
        h[54..56].copy_from_slice(&phentsize.to_le_bytes());
        h[56..58].copy_from_slice(&phnum.to_le_bytes());
        h
    }

    #[test]
    fn corrupt_program_header_tables_are_refused_without_allocating_them() {
        let dir = temp_dir("corrupt-elf");
        let path = dir.join("corrupt");
        let read = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read_elf(&mut File::open(&path).unwrap())
        };
        // Up to 4 GiB before: 65535 headers of 65535 bytes.
        let err = read(&elf_header(u16::MAX, u16::MAX)).unwrap_err();
        assert!(err.contains("bad program header size 65535"), "{err}");
        let err = read(&elf_header(4, 10)).unwrap_err();
        assert!(err.contains("(expected 56)"), "{err}");
        // The right size, but more than the kernel's 64 KiB of headers.
        let err = read(&elf_header(56, 1171)).unwrap_err();
        assert!(err.contains("bad number of program headers 1171"), "{err}");
        let err = read(&elf_header(56, 0)).unwrap_err();
        assert!(err.contains("bad number of program headers 0"), "{err}");
        assert!(matches!(
            classify_elf(&path),
            Class::Unknown(ref why) if why.contains("program headers")
        ));
        // 1170 headers (65520 bytes) is allowed; the file is too short for them.
        let err = read(&elf_header(56, 1170)).unwrap_err();
        assert!(err.contains("reading its program headers"), "{err}");
        // A plausible table of all-zero (PT_NULL) headers: no interpreter.
        let info = read(&elf_header(56, 3)).unwrap();
        assert!(!info.interpreter);
        // 32-bit programs have 32-byte headers.
        let mut h32 = elf_header(0, 0);
        h32[4] = 1;
        h32[28..32].copy_from_slice(&52u32.to_le_bytes());
        h32[42..44].copy_from_slice(&32u16.to_le_bytes());
        h32[44..46].copy_from_slice(&2u16.to_le_bytes());
        assert!(!read(&h32).unwrap().class64);
        h32[42..44].copy_from_slice(&56u16.to_le_bytes());
        assert!(read(&h32).unwrap_err().contains("(expected 32)"));
    }

    const USER: Runner = Runner {
        uid: 1000,
        gid: 1000,
        no_new_privs: false,
    };
    const ROOT: Runner = Runner {
        uid: 0,
        gid: 0,
        no_new_privs: false,
    };

    #[test]
    fn set_id_programs_and_file_capabilities_cannot_load_the_library() {
        let dir = temp_dir("setuid");
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let copy = dir.join("sh");
        std::fs::copy(&sh, &copy).unwrap();
        let mode = |m: u32| {
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(m)).unwrap();
            std::fs::metadata(&copy).unwrap()
        };
        let owner = mode(0o755).uid();
        let group = std::fs::metadata(&copy).unwrap().gid();
        let other = Runner {
            uid: owner.wrapping_add(1),
            gid: group.wrapping_add(1),
            no_new_privs: false,
        };
        let its_owner = Runner {
            uid: owner,
            gid: group,
            no_new_privs: false,
        };
        assert_eq!(secure_exec(&mode(0o755), false, false, other), None);

        let setuid = mode(0o4755);
        let (what, who) = secure_exec(&setuid, false, false, other).unwrap();
        assert_eq!(what, format!("is set-user-ID (owner uid {owner})"));
        assert_eq!(who, "as that user");
        // Run by its owner (root for a root-owned copy), the ids do not change: no secure mode.
        assert_eq!(secure_exec(&setuid, false, false, its_owner), None);
        assert_eq!(secure_exec(&setuid, false, true, other), None, "nosuid");
        let nnp = Runner {
            no_new_privs: true,
            ..other
        };
        assert_eq!(
            secure_exec(&setuid, false, false, nnp),
            None,
            "no_new_privs"
        );

        let setgid = mode(0o2755);
        let (what, _) = secure_exec(&setgid, false, false, other).unwrap();
        assert!(what.starts_with("is set-group-ID"), "{what}");
        assert_eq!(secure_exec(&setgid, false, false, its_owner), None);
        // Set-group-ID without group execute is mandatory locking, not a set-group-ID program.
        assert_eq!(secure_exec(&mode(0o2745), false, false, other), None);

        let plain = mode(0o755);
        let (what, who) = secure_exec(&plain, true, false, USER).unwrap();
        assert!(what.contains("file capabilities"), "{what}");
        assert_eq!(who, "as root");
        assert_eq!(secure_exec(&plain, true, false, ROOT), None);
        assert_eq!(secure_exec(&plain, true, true, USER), None, "nosuid");

        // Through classify, on the file itself (the bits count whoever made the copy).
        mode(0o4755);
        if !statvfs(&copy).unwrap().flags().contains(FsFlags::ST_NOSUID) {
            let class = classify_elf_as(&copy, other);
            assert!(
                matches!(class, Class::Unloadable(ref why) if why.contains("set-user-ID") && why.contains("secure mode")),
                "{class:?}"
            );
            assert_eq!(classify_elf_as(&copy, its_owner), Class::Dynamic);
        }
        mode(0o755);
        assert_eq!(classify_elf_as(&copy, other), Class::Dynamic);
        assert_eq!(sys::has_xattr(&copy, c"security.capability"), Ok(false));
        // With a capability set by setcap (libcap2-bin), where the test runs as root.
        let setcap = Path::new("/usr/sbin/setcap");
        if setcap.exists() && nix::unistd::geteuid().is_root() {
            let status = std::process::Command::new(setcap)
                .arg("cap_net_bind_service=ep")
                .arg(&copy)
                .status()
                .unwrap();
            if status.success() {
                assert_eq!(sys::has_xattr(&copy, c"security.capability"), Ok(true));
                assert!(matches!(
                    classify_elf_as(&copy, USER),
                    Class::Unloadable(ref why) if why.contains("file capabilities")
                ));
                assert_eq!(classify_elf_as(&copy, ROOT), Class::Dynamic);
            }
        }
    }

    #[test]
    fn static_program_refused_by_always_skipped_by_auto() {
        let ldconfig = Path::new("/sbin/ldconfig");
        if !ldconfig.exists() {
            return;
        }
        match decide(InjectMode::Always, ldconfig) {
            Verdict::Refuse(message) => {
                assert!(message.contains("statically linked"), "{message}");
                assert!(message.contains("socket activation"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(InjectMode::Auto, ldconfig),
            Verdict::Skip(ref why) if why.contains("statically linked")
        ));
        assert!(matches!(
            decide(InjectMode::Never, Path::new("/bin/sh")),
            Verdict::Skip(_)
        ));
        assert!(matches!(
            decide(InjectMode::Auto, Path::new("/bin/sh")),
            Verdict::Inject(_)
        ));
    }

    #[test]
    fn scripts_are_followed_to_their_interpreter() {
        let dir = temp_dir("scripts");
        let direct = script(&dir, "direct", "#!/bin/sh -e\necho hi\n");
        let found = inspect(&direct);
        assert_eq!(found.class, Class::Dynamic);
        assert_eq!(found.runs, PathBuf::from("/bin/sh"));
        assert_eq!(found.via, "a script for /bin/sh");

        // A version-manager shim: `#!/usr/bin/env bash`, resolved in PATH like env does.
        let shim = script(
            &dir,
            "python3",
            "#!/usr/bin/env bash\nexec python3 \"$@\"\n",
        );
        let found = inspect(&shim);
        assert_eq!(found.class, Class::Dynamic);
        assert_eq!(found.runs, which::which("bash").unwrap());
        assert_eq!(
            found.via,
            format!("a script for {}", which::which("bash").unwrap().display())
        );
        let split = script(&dir, "split", "#!/usr/bin/env -S LC_ALL=C sh -e\n");
        assert_eq!(inspect(&split).runs, which::which("sh").unwrap());

        // A script of a script.
        let outer = script(&dir, "outer", &format!("#!{}\n", direct.display()));
        let found = inspect(&outer);
        assert_eq!(found.class, Class::Dynamic);
        assert_eq!(
            found.via,
            format!("a script for {}, a script for /bin/sh", direct.display())
        );

        let consumer = script(&dir, "consumer", "#!/bin/sh\necho $LISTEN_FDS\n");
        assert_eq!(inspect(&consumer).class, Class::Consumer);

        let missing = script(&dir, "missing", "#!/usr/bin/env no-such-interpreter-here\n");
        assert!(
            matches!(inspect(&missing).class, Class::Unknown(ref why) if why.contains("not in PATH"))
        );
        let text = script(&dir, "text", "just text\n");
        assert!(matches!(inspect(&text).class, Class::Unknown(_)));
        let looping = script(&dir, "loop", "#!/proc/self/exe\n");
        std::fs::write(&looping, format!("#!{}\n", looping.display())).unwrap();
        assert!(
            matches!(inspect(&looping).class, Class::Unknown(ref why) if why.contains("too many"))
        );
    }

    #[test]
    fn env_options_that_take_a_value_are_skipped_with_it() {
        let sh = which::which("sh").unwrap();
        let runs = |line: &str| interpreter(line.as_bytes());
        for line in [
            "#!/usr/bin/env sh",
            "#!/usr/bin/env  sh  \n",
            "#!/usr/bin/env\tsh\t",
            "#! /usr/bin/env sh\n",
            "#!/usr/bin/env -S -u NAME sh -e",
            "#!/usr/bin/env -S -uNAME sh",
            "#!/usr/bin/env -S -i -u NAME -C /tmp A=1 sh -e",
            "#!/usr/bin/env -S --unset=NAME sh",
            "#!/usr/bin/env -S --unset NAME sh",
            "#!/usr/bin/env -S --uns NAME --chdir /tmp sh",
            "#!/usr/bin/env -S -iu NAME sh",
            "#!/usr/bin/env -S -a ARGV0 sh",
            "#!/usr/bin/env -S --argv0=ARGV0 --debug -v sh",
            "#!/usr/bin/env -S --block-signal=PIPE sh",
            "#!/usr/bin/env -S -- sh",
            "#!/usr/bin/env -S - sh",
            "#!/usr/bin/env -S -S sh",
            "#!/usr/bin/env -S 'sh' -e # a comment",
            "#!/usr/bin/env -S sh\r\n",
            "#!/usr/bin/env -Ssh",
            "#!/usr/bin/env --split-string=sh",
        ] {
            assert_eq!(runs(line), Ok(sh.clone()), "{line:?}");
        }
        // -P searches its directories instead of PATH; -C moves a relative path.
        assert_eq!(
            runs("#!/usr/bin/env -S -P /usr/bin:/bin sh"),
            which::which_in("sh", Some("/usr/bin:/bin"), "/").map_err(|e| e.to_string())
        );
        assert_eq!(
            runs("#!/usr/bin/env -S -P /nonexistent sh"),
            Err("\"sh\" (run by env) is not in PATH".into())
        );
        assert_eq!(
            runs("#!/usr/bin/env -S -C /usr ./bin/sh"),
            Ok(PathBuf::from("/usr/./bin/sh"))
        );
        assert_eq!(
            runs("#!/usr/bin/env -S /bin/sh -e"),
            Ok(PathBuf::from("/bin/sh"))
        );
        // Without -S the kernel passes the rest of the line as one argument: env then looks
        // for a program named "sh -e" (and fails), or takes it all as an option's value.
        assert_eq!(
            runs("#!/usr/bin/env sh -e"),
            Err("\"sh -e\" (run by env) is not in PATH".into())
        );
        assert_eq!(
            runs("#!/usr/bin/env -u NAME sh"),
            Ok(PathBuf::from("/usr/bin/env")),
            "-u takes \" NAME sh\": no command"
        );
        assert_eq!(runs("#!/usr/bin/env"), Ok(PathBuf::from("/usr/bin/env")));
        assert_eq!(
            runs("#!/usr/bin/env -S -u"),
            Err("env's option \"-u\" has no value".into())
        );
        // A name that is only an assignment or a path after `--` is still the command.
        assert_eq!(runs("#!/usr/bin/env -S A=1 B=2 sh"), Ok(sh.clone()));
        assert_eq!(
            runs("#!/usr/bin/env -S A=1 -i"),
            Err("\"-i\" (run by env) is not in PATH".into()),
            "options end at the first assignment"
        );
    }

    #[test]
    fn a_crlf_shebang_names_no_interpreter() {
        for line in ["#!/bin/sh\r\n", "#!/bin/sh\r", "#!/usr/bin/env sh\r\n"] {
            let err = interpreter(line.as_bytes()).unwrap_err();
            assert!(err.contains("carriage return"), "{line:?}: {err}");
            assert!(err.contains("sh\\r"), "{line:?}: {err}");
        }
        // A blank before the CR: the kernel's interpreter is /bin/sh, its argument "\r".
        assert_eq!(interpreter(b"#!/bin/sh \r\n"), Ok(PathBuf::from("/bin/sh")));
        let dir = temp_dir("crlf");
        let crlf = script(&dir, "crlf", "#!/bin/sh\r\necho hi\r\n");
        assert!(
            matches!(inspect(&crlf).class, Class::Unknown(ref why) if why.contains("carriage return")),
            "{:?}",
            inspect(&crlf)
        );
        assert!(matches!(
            decide(InjectMode::Auto, &crlf),
            Verdict::Skip(ref why) if why.contains("carriage return")
        ));
    }

    #[test]
    fn a_library_that_cannot_be_prepared_fails_always_but_not_auto() {
        let why = "writing grace's socket library to a memfd: memfd_create: EMFILE".to_string();
        let err = without_library(InjectMode::Always, Path::new("/bin/sh"), why.clone());
        assert_eq!(err, Err(format!("--inject always: {why}")));
        for _ in 0..2 {
            assert_eq!(
                without_library(InjectMode::Auto, Path::new("/bin/sh"), why.clone()),
                Ok(())
            );
        }
    }

    #[test]
    fn the_library_fd_is_adopted_at_the_same_number() {
        // The previous image's memfd, with the same library: kept as it is.
        let same = write_library().unwrap();
        let number = same.as_raw_fd();
        let library = adopted(same).unwrap();
        assert_eq!(library.fd.as_raw_fd(), number);
        assert!(
            library.path.ends_with(&format!("/fd/{number}")),
            "{}",
            library.path
        );
        assert_eq!(std::fs::read(&library.path).unwrap(), LIBRARY);

        // A previous grace's different library (an upgrade): this one's, at the same number.
        let old = memfd_create(c"old-preload", MFdFlags::MFD_CLOEXEC).unwrap();
        File::from(old.try_clone().unwrap())
            .write_all(b"an older library")
            .unwrap();
        let number = old.as_raw_fd();
        assert!(!holds_library(&old));
        let library = adopted(old).unwrap();
        assert_eq!(library.fd.as_raw_fd(), number);
        assert!(holds_library(&library.fd));
        assert_eq!(std::fs::read(&library.path).unwrap(), LIBRARY);
        let flags = fcntl(&library.fd, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "still close-on-exec");
    }

    #[test]
    fn marks_split_across_chunks_are_found() {
        let dir = temp_dir("marks");
        let path = dir.join("big");
        let mut data = vec![b'x'; (1 << 20) - 4];
        data.extend_from_slice(b"LISTEN_FDS");
        data.extend(vec![b'y'; 100]);
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            scan(&path).unwrap(),
            Marks {
                activation: true,
                go: false
            }
        );
        std::fs::write(&path, b"nothing here").unwrap();
        assert_eq!(scan(&path).unwrap(), Marks::default());
    }

    #[test]
    fn preload_is_appended_to_the_users() {
        let mut env = vec![
            CString::new("A=1").unwrap(),
            CString::new("LD_PRELOAD=/usr/lib/libuser.so").unwrap(),
        ];
        assert_eq!(
            take_var(&mut env, "LD_PRELOAD").unwrap(),
            b"/usr/lib/libuser.so"
        );
        assert_eq!(env.len(), 1);
        assert_eq!(take_var(&mut env, "LD_PRELOAD"), None);
    }

    #[test]
    fn the_library_is_carried_and_loads_from_a_memfd() {
        assert!(
            LIBRARY.starts_with(b"\x7fELF"),
            "build.rs built the library"
        );
        let path = library_path().unwrap();
        assert!(path.starts_with("/proc/"), "{path}");
        assert_eq!(std::fs::read(path).unwrap(), LIBRARY);
        // Sealed: nobody can change what children load.
        let write = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"x"));
        assert!(write.is_err());
        // The loader accepts it (a process with no table passes everything through).
        let status = std::process::Command::new("/bin/true")
            .env("LD_PRELOAD", path)
            .env_remove(ENV)
            .status()
            .unwrap();
        assert!(status.success());
    }
}
