//! Test fixture: reports what the process received from whoever started it (grace), so tests can
//! check the contract of DESIGN.md section 2: fds, environment, signal mask and dispositions,
//! process group.
//!
//! ```text
//! contract REPORT_PATH
//! ```
//!
//! Writes the report to `REPORT_PATH.tmp` and renames it to `REPORT_PATH` (a reader never sees
//! half a report), then sends `READY=1` to `NOTIFY_SOCKET` if set, then waits for SIGTERM (or
//! SIGINT) and exits 0. One `key=value` per line:
//!
//! ```text
//! pid=<getpid>
//! sigblk=<hex>               SigBlk of /proc/self/status, as received
//! sigign=<hex>               SigIgn of /proc/self/status, as received
//! pgid=<getpgid(0)>
//! ppid=<getppid>
//! fd=<n> <readlink /proc/self/fd/n>      every open fd, 0-2 included
//! fdtype=<n> stream|dgram|other          each socket fd >= 3
//! fdaddr=<n> <local address>             each socket fd >= 3: ip:port, [ip6]:port, /path, @abstract
//! env=<KEY>=<VALUE>                      every variable, sorted by key (a newline in a
//!                                        value is written as `\n`)
//! ```

use std::env;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{BorrowedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt};
use nix::unistd::{getpgid, getpid, getppid};

fn main() -> ExitCode {
    // First thing, before this process changes its own mask: the mask and ignored set exactly
    // as they came through exec.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();

    let Some(path) = env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: contract REPORT_PATH");
        return ExitCode::from(2);
    };

    // Block the stop signals before anyone could learn we are ready, so that a SIGTERM sent
    // right after READY=1 waits for sigwait instead of killing us with the default action.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    if let Err(e) = stop.thread_block() {
        eprintln!("contract: blocking SIGTERM: {e}");
        return ExitCode::from(1);
    }

    // Gathered before this process opens anything of its own (the report file, the notify
    // socket), so that the fd list shows only what we were given.
    let report = build_report(&status);

    let tmp = {
        let mut name = path.clone().into_os_string();
        name.push(".tmp");
        PathBuf::from(name)
    };
    if let Err(e) = fs::write(&tmp, report).and_then(|()| fs::rename(&tmp, &path)) {
        eprintln!("contract: writing {}: {e}", path.display());
        return ExitCode::from(1);
    }
    // READY=1 only once the report is in place: whoever sees us ready can read it.
    notify_ready();

    loop {
        match stop.wait() {
            Ok(_) => return ExitCode::SUCCESS,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("contract: sigwait: {e}");
                return ExitCode::from(1);
            }
        }
    }
}

fn build_report(status: &str) -> String {
    let mut out = Vec::new();
    let _ = write_report(&mut out, status);
    String::from_utf8_lossy(&out).into_owned()
}

fn write_report(out: &mut impl Write, status: &str) -> io::Result<()> {
    writeln!(out, "pid={}", getpid())?;
    for key in ["SigBlk", "SigIgn"] {
        let value = status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .map_or("unknown", str::trim);
        writeln!(out, "{}={value}", key.to_ascii_lowercase())?;
    }
    let pgid = getpgid(None).map_or_else(|e| format!("error:{e}"), |p| p.to_string());
    writeln!(out, "pgid={pgid}")?;
    writeln!(out, "ppid={}", getppid())?;

    let fds = open_fds();
    for &fd in &fds {
        let target = fs::read_link(format!("/proc/self/fd/{fd}"));
        let target = target.map_or_else(|e| format!("?({e})"), |t| t.display().to_string());
        writeln!(out, "fd={fd} {target}")?;
    }
    for fd in fds.into_iter().filter(|&fd| fd >= 3) {
        // SAFETY: `fd` was open when listed just now, and nothing in this single-threaded
        // process closes fds while the report is built, so it stays valid for these calls.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let kind = match getsockopt(&borrowed, sockopt::SockType) {
            Err(Errno::ENOTSOCK) => continue,
            Ok(SockType::Stream) => "stream",
            Ok(SockType::Datagram) => "dgram",
            // SEQPACKET, RAW, ... (and types nix does not know, which come back as EINVAL).
            Ok(_) | Err(_) => "other",
        };
        writeln!(out, "fdtype={fd} {kind}")?;
        let addr = getsockname::<SockaddrStorage>(fd)
            .map_or_else(|e| format!("?({e})"), |a| describe_addr(&a));
        writeln!(out, "fdaddr={fd} {addr}")?;
    }

    let mut vars: Vec<_> = env::vars_os().collect();
    vars.sort();
    for (key, value) in vars {
        // A newline inside a value would break the one-line-per-entry format.
        let value = value.to_string_lossy().replace('\n', "\\n");
        writeln!(out, "env={}={value}", key.to_string_lossy())?;
    }
    Ok(())
}

/// The fds open in this process, in order. Listing /proc/self/fd opens an fd of its own, which
/// shows up in the listing; it is closed once the listing is done, so it is the one entry whose
/// link no longer resolves, and is dropped.
fn open_fds() -> Vec<RawFd> {
    let listed: Vec<RawFd> = match fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => {
            eprintln!("contract: listing /proc/self/fd: {e}");
            return Vec::new();
        }
    };
    let mut fds: Vec<RawFd> = listed
        .into_iter()
        .filter(|fd| fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok())
        .collect();
    fds.sort_unstable();
    fds
}

fn describe_addr(addr: &SockaddrStorage) -> String {
    if let Some(unix) = addr.as_unix_addr() {
        if let Some(path) = unix.path() {
            return path.display().to_string();
        }
        if let Some(name) = unix.as_abstract() {
            return format!("@{}", String::from_utf8_lossy(name));
        }
        return "unnamed".to_owned();
    }
    if let Some(v4) = addr.as_sockaddr_in() {
        return v4.to_string();
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return v6.to_string();
    }
    match addr.family() {
        Some(family) => format!("{family:?}"),
        None => "unknown".to_owned(),
    }
}

/// Sends `READY=1` to `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), if set.
fn notify_ready() {
    let Some(target) = env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
        return;
    };
    let message = format!("READY=1\nMAINPID={}", std::process::id());
    let sent =
        UnixDatagram::unbound().and_then(|socket| match target.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                let addr = UnixSocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)
            }
            None => socket.send_to(message.as_bytes(), Path::new(&target)),
        });
    if let Err(e) = sent {
        eprintln!(
            "contract: warning: sending READY=1 to NOTIFY_SOCKET={}: {e}",
            target.to_string_lossy()
        );
    }
}
