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

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use clap::ValueEnum;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{SockaddrStorage, getsockname};
use tracing::{debug, info, warn};

use crate::cli::RunArgs;
use crate::exit::{self, ExitError};
use crate::listen::{Listener, SocketKind};

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
    let library = library_path()?;
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

/// The path a child loads the library from: a sealed memfd of this image, created once.
///
/// A memfd leaves nothing on disk to clean up or to tamper with (it is sealed before anyone can
/// see it). The child opens it through grace's `/proc/PID/fd/N`, which needs `/proc` and the
/// same user as grace (a server that drops privileges before its `exec` cannot load it).
fn library_path() -> Result<&'static str, String> {
    static LIBRARY_FD: OnceLock<Result<(OwnedFd, String), String>> = OnceLock::new();
    LIBRARY_FD
        .get_or_init(write_library)
        .as_ref()
        .map(|(_, path)| path.as_str())
        .map_err(Clone::clone)
}

fn write_library() -> Result<(OwnedFd, String), String> {
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
    // Our pid as the /proc the child sees numbers it (inside a PID namespace with the host's
    // /proc, getpid() would name another process).
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    let path = format!("/proc/{pid}/fd/{}", file.as_raw_fd());
    File::open(&path).map_err(|e| failed(&format!("opening {path}"), &e))?;
    debug!("grace's socket library is at {path}");
    Ok((OwnedFd::from(file), path))
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

/// The program a `#!` line runs, resolved: `#!/usr/bin/env [-S] [NAME=V…] NAME` looks NAME up in
/// `PATH`, as env will.
fn interpreter(head: &[u8]) -> Result<PathBuf, String> {
    let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let Some(first) = words.next() else {
        return Err("empty #! line".into());
    };
    let first = PathBuf::from(first);
    if first.file_name().is_none_or(|name| name != "env") {
        return Ok(first);
    }
    // What env runs: the first word that is neither an option nor an assignment. (`-S` splits
    // the rest into words, which split_whitespace already did.)
    let Some(name) = words.find(|w| !w.starts_with('-') && !w.contains('=')) else {
        return Ok(first);
    };
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    which::which(name).map_err(|_| format!("{name:?} (run by env) is not in PATH"))
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
    if usize::from(phentsize) < 4 {
        return Err(format!("bad program header size {phentsize}"));
    }
    let mut headers = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
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

fn classify_elf(path: &Path) -> Class {
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
        use table::{Match, matches};
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let rows = [
            // held, dual stack, wanted, result
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
                matches(&a(held), dual, &a(wanted)),
                expected,
                "{held} (dual stack: {dual}) vs {wanted}"
            );
        }
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
