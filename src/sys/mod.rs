//! The only place with `unsafe`: the child between `fork` and `execve`, fd flags, and the
//! process-wide switches grace flips at start-up.

use std::ffi::{CStr, CString, c_char};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::libc;
use nix::unistd::Pid;

pub mod seccomp;

/// The `bind` filter, built at compile time: the child installs it without allocating.
static BIND_PROGRAM: seccomp::Program = seccomp::bind_program();

/// Everything the child needs, allocated before `fork` so that the child allocates nothing.
pub struct ExecPlan {
    program: CString,
    argv: Vec<CString>,
    env: Vec<Vec<u8>>,
    /// Index in `env` of a `LISTEN_PID=` entry whose digits the child writes after `fork`; its
    /// buffer is long enough for any pid.
    listen_pid_slot: Option<usize>,
    /// Sockets to place at fds 3, 4, … in this order.
    fds: Vec<RawFd>,
    /// What else the child does before `execve`.
    setup: ChildSetup,
    /// The generation's cgroup directory, to start the child in.
    cgroup_dir: Option<RawFd>,
}

/// What a child does for itself between `fork` and `execve`, besides its fds and signals.
#[derive(Clone, Copy)]
struct ChildSetup {
    /// The signal it gets when grace dies (`PR_SET_PDEATHSIG`), or 0.
    death_signal: libc::c_int,
    /// grace's pid: a child whose parent is already gone by the time it set the death signal
    /// exits at once.
    parent: libc::pid_t,
    /// `cgroup.procs` of its generation's cgroup, to move itself there, or -1.
    cgroup_procs: RawFd,
    /// The pipe on which a failed `execve` reports its errno (set by `spawn`).
    report: RawFd,
    /// Where to send the notification descriptor of the `bind` filter it installs, or -1 for
    /// none (see `seccomp`); and whether it sets `no_new_privs` first.
    bind_filter: RawFd,
    no_new_privs: bool,
}

/// Room for `LISTEN_PID=` plus the digits of any pid and the terminating NUL.
const LISTEN_PID_BYTES: usize = "LISTEN_PID=".len() + 20 + 1;

impl ExecPlan {
    pub fn new(
        program: CString,
        argv: Vec<CString>,
        env: Vec<CString>,
        listen_pid: bool,
        fds: Vec<RawFd>,
    ) -> Self {
        let mut env: Vec<Vec<u8>> = env.into_iter().map(CString::into_bytes_with_nul).collect();
        let listen_pid_slot = listen_pid.then(|| {
            let mut slot = b"LISTEN_PID=".to_vec();
            slot.resize(LISTEN_PID_BYTES, 0);
            env.push(slot);
            env.len() - 1
        });
        Self {
            program,
            argv,
            env,
            listen_pid_slot,
            fds,
            cgroup_dir: None,
            setup: ChildSetup {
                death_signal: 0,
                parent: 0,
                cgroup_procs: -1,
                report: -1,
                bind_filter: -1,
                no_new_privs: false,
            },
        }
    }

    /// The child gets `signal` if grace dies (even by SIGKILL), so it does not outlive it holding
    /// the sockets.
    pub fn die_with_grace(&mut self, signal: nix::sys::signal::Signal) {
        self.setup.death_signal = signal as libc::c_int;
        self.setup.parent = std::process::id() as libc::pid_t;
    }

    /// The child installs the `bind` filter (`seccomp`) just before `execve` and sends its
    /// notification descriptor over `channel`, which must stay open until `spawn` returns.
    pub fn filter_binds(&mut self, channel: BorrowedFd<'_>, no_new_privs: bool) {
        self.setup.bind_filter = channel.as_raw_fd();
        self.setup.no_new_privs = no_new_privs;
    }

    /// The child moves itself into the cgroup whose `cgroup.procs` this is, before it execs (so
    /// that everything it ever forks is in there too). The fd must stay open until `spawn`
    /// returns.
    pub fn join_cgroup(&mut self, dir: BorrowedFd<'_>, procs: BorrowedFd<'_>) {
        self.cgroup_dir = Some(dir.as_raw_fd());
        self.setup.cgroup_procs = procs.as_raw_fd();
    }
}

/// Forks and executes `plan` in a new process group. Returns the child's pid once `execve`
/// succeeded, or the errno of the failed `execve` (after reaping the child).
pub fn spawn(plan: &mut ExecPlan) -> Result<Pid, Errno> {
    let argv: Vec<*const c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let env: Vec<*mut c_char> = plan
        .env
        .iter_mut()
        .map(|e| e.as_mut_ptr().cast::<c_char>())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    let listen_pid_digits: *mut u8 = match plan.listen_pid_slot {
        // SAFETY: the slot is LISTEN_PID_BYTES long, so the offset stays inside the buffer.
        Some(i) => unsafe { plan.env[i].as_mut_ptr().add("LISTEN_PID=".len()) },
        None => std::ptr::null_mut(),
    };
    // Scratch space for the child's fd shuffle, allocated here because the child must not allocate.
    let mut scratch: Vec<RawFd> = vec![-1; plan.fds.len()];
    let (report_read, report_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;

    // Straight into its generation's cgroup where the kernel can (clone3 with CLONE_INTO_CGROUP,
    // Linux 5.7+): moving a running process there afterwards costs the kernel a few milliseconds
    // of synchronisation at every spawn. Else a fork, and the child moves itself.
    let mut setup = plan.setup;
    let cloned = match plan.cgroup_dir {
        Some(dir) => clone_into_cgroup(dir),
        None => Err(Errno::ENOSYS),
    };
    let pid = match cloned {
        Ok(pid) => {
            setup.cgroup_procs = -1;
            pid
        }
        // SAFETY: grace is single-threaded, and the child only calls async-signal-safe functions
        // on memory prepared above before it execs or exits.
        Err(_) => unsafe { libc::fork() },
    };
    if pid < 0 {
        return Err(Errno::last());
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork; `child_exec` never returns.
        unsafe {
            child_exec(
                &plan.program,
                &argv,
                &env,
                listen_pid_digits,
                &plan.fds,
                &mut scratch,
                ChildSetup {
                    report: report_write.as_raw_fd(),
                    ..setup
                },
            )
        }
    }
    drop(report_write);
    let pid = Pid::from_raw(pid);
    // Also set the group from the parent, so it is in place before we could signal it, whichever
    // of the two runs first. EACCES means the child already exec'd: it did it itself then.
    let _ = nix::unistd::setpgid(pid, pid);

    // The pipe is close-on-exec: EOF means `execve` succeeded, four bytes are its errno.
    let mut buf = [0u8; 4];
    let mut got = 0;
    loop {
        match nix::unistd::read(&report_read, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == buf.len() {
                    break;
                }
            }
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if got == buf.len() {
        let errno = Errno::from_raw(i32::from_ne_bytes(buf));
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(errno);
    }
    Ok(pid)
}

/// The kernel's `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `fork`, but the child starts in the cgroup whose directory `dir` is. Returns the child's pid
/// (0 in the child), or the reason the kernel refused (then nothing was created).
fn clone_into_cgroup(dir: RawFd) -> Result<libc::pid_t, Errno> {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: dir as u64,
        ..CloneArgs::default()
    };
    // SAFETY: without CLONE_VM the child gets a copy of this single-threaded process, as with
    // fork; `args` is valid for the call, and the child only runs `child_exec` (see `spawn`).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    Errno::result(rc).map(|pid| pid as libc::pid_t)
}

/// Runs in the child between `fork` and `execve`: it must not allocate, lock or touch anything
/// but the prepared buffers (the parent's other threads, if any, could hold a lock forever).
///
/// # Safety
/// Must only be called in a freshly forked child; never returns.
unsafe fn child_exec(
    program: &CStr,
    argv: &[*const c_char],
    env: &[*mut c_char],
    listen_pid_digits: *mut u8,
    fds: &[RawFd],
    scratch: &mut [RawFd],
    setup: ChildSetup,
) -> ! {
    let report = setup.report;
    // SAFETY: the whole body makes only async-signal-safe system calls, on memory the parent
    // prepared before the fork (nothing here allocates or takes a lock).
    unsafe {
        // Own process group, so that grace can signal or kill the whole generation.
        libc::setpgid(0, 0);
        // Its cgroup next, before it can fork anything. A failure leaves it where grace is; grace
        // still has the process group.
        if setup.cgroup_procs >= 0 {
            libc::write(setup.cgroup_procs, b"0".as_ptr().cast(), 1);
        }
        if setup.death_signal != 0 {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                setup.death_signal as libc::c_ulong,
                0,
                0,
                0,
            );
            // grace died between the fork and the prctl: nobody would send the signal.
            if libc::getppid() != setup.parent {
                libc::_exit(crate::exit::FAILURE);
            }
        }

        // Dispositions back to default (a handler does not survive exec, but SIG_IGN would), then
        // an empty mask: grace blocks signals for itself, the server must not inherit that.
        // The raw system call, because libc refuses the real-time signals it reserves for itself
        // (32 and 33), and an ignored one of those would still be inherited.
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Move every source fd above the targets first, so that placing one never overwrites
        // another that is still to be placed; then dup2 each onto 3+i (dup2 clears FD_CLOEXEC on
        // exactly those).
        let target_end = 3 + fds.len() as RawFd;
        let mut floor = target_end.max(report + 1).max(setup.bind_filter + 1);
        for &fd in fds {
            floor = floor.max(fd + 1);
        }
        let report = libc::fcntl(report, libc::F_DUPFD_CLOEXEC, floor);
        if report < 0 {
            // Without the pipe the parent cannot learn why; it sees this status instead.
            libc::_exit(crate::exit::FAILURE);
        }
        // The filter's channel too, out of the way of the sockets placed at 3, 4, …
        let bind_filter = if setup.bind_filter >= 0 {
            let fd = libc::fcntl(setup.bind_filter, libc::F_DUPFD_CLOEXEC, floor);
            if fd < 0 {
                fail(report);
            }
            fd
        } else {
            -1
        };
        for (i, &fd) in fds.iter().enumerate() {
            scratch[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
            if scratch[i] < 0 {
                fail(report);
            }
        }
        for (i, &fd) in scratch.iter().enumerate() {
            if libc::dup2(fd, 3 + i as RawFd) < 0 {
                fail(report);
            }
        }
        // Everything else above the sockets closes at exec, whatever grace inherited. (The
        // fallback, for kernels without CLOSE_RANGE_CLOEXEC, closes the low range only: every fd
        // grace itself holds is close-on-exec already.)
        if libc::syscall(
            libc::SYS_close_range,
            target_end as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            let mut fd = target_end;
            while fd < 4096 {
                if fd != report && fd != bind_filter {
                    libc::close(fd);
                }
                fd += 1;
            }
        }

        if !listen_pid_digits.is_null() {
            write_decimal(listen_pid_digits, libc::getpid() as u64);
        }

        // Last, so that nothing above is reported to grace.
        if bind_filter >= 0 {
            let rc = seccomp::install_in_child(&BIND_PROGRAM, setup.no_new_privs, bind_filter);
            if rc != 0 {
                *libc::__errno_location() = rc;
                fail(report);
            }
        }
        libc::execve(program.as_ptr(), argv.as_ptr(), env.as_ptr().cast());
        fail(report)
    }
}

/// The kernel's `struct sigaction` (x86_64, aarch64 and the other SA_RESTORER architectures), not
/// libc's, whose layout differs.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Writes `n` in decimal followed by a NUL. The buffer has room for 20 digits and the NUL.
///
/// # Safety
/// `out` must point to at least 21 writable bytes.
unsafe fn write_decimal(out: *mut u8, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= 20 and the caller guarantees 21 bytes.
        unsafe { *out.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= 20.
    unsafe { *out.add(len) = 0 };
}

/// Reports errno to the parent and exits the child.
///
/// # Safety
/// Child of a fork only.
unsafe fn fail(report: RawFd) -> ! {
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(report, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(crate::exit::NOT_FOUND)
    }
}

/// How many connections wait in a listening TCP socket's accept queue (for a listener, the kernel
/// reports that in `tcpi_unacked`).
pub fn accept_queue_len(listener: BorrowedFd<'_>) -> Result<u32, Errno> {
    listen_queue(listener).map(|(len, _)| len)
}

/// A listening TCP socket's accept queue: its length and its backlog (`tcpi_unacked` and
/// `tcpi_sacked`, for a listener).
pub fn listen_queue(listener: BorrowedFd<'_>) -> Result<(u32, u32), Errno> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    Errno::result(rc).map(|_| (info.tcpi_unacked, info.tcpi_sacked))
}

/// Holds completed handshakes in `SYN_RECV` until the client sends data (`TCP_DEFER_ACCEPT`): how
/// tests make a handshake that stays in progress.
#[cfg(test)]
pub fn defer_accept(listener: BorrowedFd<'_>, seconds: libc::c_int) -> Result<(), Errno> {
    // SAFETY: the kernel reads one c_int from the pointer.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// The bytes waiting in a datagram socket's receive queue (the size of the next datagram).
pub fn datagram_queued(socket: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    Errno::result(rc).map(|_| n.max(0) as u32)
}

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5+; the libc crate defines it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches a classic BPF program to the `SO_REUSEPORT` group of `socket`: from then on it picks
/// the group member for each new connection (or datagram) by index. Attaching again replaces the
/// program atomically. No privilege is needed.
pub fn attach_reuseport_cbpf(
    socket: BorrowedFd<'_>,
    program: &[libc::sock_filter],
) -> Result<(), Errno> {
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies `len` instructions from `filter` during the call; both outlive it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// Sets `signal` back to its default action if it is ignored; any other disposition stays.
pub fn unignore(signal: nix::sys::signal::Signal) -> Result<(), Errno> {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null `act` only reads.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reading the disposition writes `current` and nothing else.
    Errno::result(unsafe { libc::sigaction(signal as i32, std::ptr::null(), &mut current) })?;
    if current.sa_sigaction == libc::SIG_IGN {
        // SAFETY: SIG_DFL installs no handler, so no code of ours can run asynchronously.
        Errno::result(unsafe { libc::signal(signal as i32, libc::SIG_DFL) })?;
    }
    Ok(())
}

/// Milliseconds on CLOCK_MONOTONIC, which keeps counting across `execve` (unlike `Instant`, whose
/// origin is private to one image).
pub fn now() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic clock");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// Makes grace the reaper of its descendants' orphans (PID 1 is one already).
pub fn become_subreaper() -> Result<(), Errno> {
    // SAFETY: prctl with an integer argument touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    Errno::result(rc).map(drop)
}

pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> Result<(), Errno> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(drop)
}

/// Marks every fd from 3 up close-on-exec, so nothing grace inherited leaks into a server.
pub fn cloexec_inherited_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0
        && let Ok(dir) = std::fs::read_dir("/proc/self/fd")
    {
        let fds: Vec<RawFd> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd >= 3)
            .collect();
        for fd in fds {
            // SAFETY: F_SETFD on a number only changes that fd's flags (or fails with EBADF).
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Takes ownership of an fd number handed over by the previous image (or by systemd).
///
/// # Safety-relevant contract
/// The caller guarantees `fd` is open and owned by nobody else in this process; it is checked to be
/// open here.
pub fn adopt_fd(fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: F_GETFD reads the flags of a number, touching no memory.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: the fd is open (checked above) and the caller hands us its only ownership.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This process's PID namespace, by its inode number (`/proc/self/ns/pid` is `pid:[N]`).
pub fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| {
            let text = link.to_string_lossy().into_owned();
            Some(text.strip_prefix("pid:[")?.strip_suffix(']')?.to_string())
        })
        .unwrap_or_else(|| "0".to_string())
}

/// Whether `fd` is an open descriptor of this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on a number reads its flags (or fails with EBADF), touching no memory.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

/// Whether `pid` is a child of this process (running, or exited and not yet reaped). Asks the
/// kernel (`waitid` without reaping), so it needs no `/proc`.
pub fn is_child(pid: i32) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    pid > 0 && waitid(Id::Pid(Pid::from_raw(pid)), flags).is_ok()
}

/// Whether process group `pgid` holds a child of this process.
pub fn group_has_child(pgid: i32) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    pgid > 1 && waitid(Id::PGid(Pid::from_raw(pgid)), flags).is_ok()
}

/// What an inherited fd is, as far as the handoff record cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A socket: its family (`AF_*`), type (`SOCK_*`) and whether it listens.
    Socket {
        family: i32,
        stream: bool,
        listening: bool,
    },
    /// A pidfd (a signal 0 through it is understood).
    Pidfd,
    /// A seccomp filter's notification descriptor.
    SeccompNotify,
    RegularFile,
    Other,
}

pub fn fd_kind(fd: RawFd) -> Result<FdKind, Errno> {
    // SAFETY: stat is plain data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct into `st`, which is valid for the call.
    Errno::result(unsafe { libc::fstat(fd, &mut st) })?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => {
            let int_opt = |level, name| -> Result<libc::c_int, Errno> {
                let mut v: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: the kernel writes at most `len` bytes into `v`.
                let rc = unsafe {
                    libc::getsockopt(
                        fd,
                        level,
                        name,
                        (&mut v as *mut libc::c_int).cast(),
                        &mut len,
                    )
                };
                Errno::result(rc).map(|_| v)
            };
            Ok(FdKind::Socket {
                family: int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?,
                stream: int_opt(libc::SOL_SOCKET, libc::SO_TYPE)? == libc::SOCK_STREAM,
                listening: int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 0,
            })
        }
        libc::S_IFREG => Ok(FdKind::RegularFile),
        _ => {
            // SAFETY: signal 0 through a pidfd only checks that the process can be signalled;
            // on any other fd the kernel refuses with EBADF or EINVAL.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    0,
                    std::ptr::null::<libc::siginfo_t>(),
                    0 as libc::c_uint,
                )
            };
            match Errno::result(rc) {
                Ok(_) | Err(Errno::ESRCH) | Err(Errno::EPERM) => Ok(FdKind::Pidfd),
                Err(_) => {
                    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
                    Ok(match link {
                        Ok(l) if l.as_os_str() == "anon_inode:seccomp notify" => {
                            FdKind::SeccompNotify
                        }
                        _ => FdKind::Other,
                    })
                }
            }
        }
    }
}

/// The parent of `pid`, from `/proc` (a zombie keeps its parent until it is reaped).
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// What `/proc` shows of a socket at descriptor `fd` of thread `tid`, read without taking a copy
/// of it (`pidfd_getfd` is refused by Docker's default seccomp profile): its inode, its
/// protocol's name and its file status flags. `/proc/<tid>` is the thread's own descriptor table,
/// also if it unshared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TheirSocket {
    pub inode: u64,
    /// The socket's `system.sockprotoname` attribute: `TCP`, `TCPv6`, `UDP`, `UDPv6`, `MPTCP`,
    /// `UNIX-STREAM`, …
    pub protocol: String,
    /// `O_NONBLOCK`, `O_CLOEXEC` and the rest, as `fdinfo` shows them.
    pub flags: u32,
}

/// [`TheirSocket`] at descriptor `fd` of thread `tid`.
pub fn socket_at(tid: u32, fd: RawFd) -> Result<TheirSocket, Errno> {
    let inode = socket_inode(tid, fd)?;
    let c_path = CString::new(format!("/proc/{tid}/fd/{fd}")).map_err(|_| Errno::EINVAL)?;
    let mut name = [0u8; 64];
    // SAFETY: NUL-terminated strings and a buffer of the length given, all alive for the call.
    let len = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c"system.sockprotoname".as_ptr(),
            name.as_mut_ptr().cast(),
            name.len(),
        )
    };
    let len = Errno::result(len)? as usize;
    let protocol = String::from_utf8_lossy(&name[..len])
        .trim_end_matches('\0')
        .to_string();
    let info = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).map_err(io_errno)?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .ok_or(Errno::EIO)?;
    Ok(TheirSocket {
        inode,
        protocol,
        flags,
    })
}

/// The inode of the socket at descriptor `fd` of thread `tid`, from its `/proc` link
/// (`socket:[INODE]`); `ENOTSOCK` for anything else.
pub fn socket_inode(tid: u32, fd: RawFd) -> Result<u64, Errno> {
    let link = std::fs::read_link(format!("/proc/{tid}/fd/{fd}")).map_err(io_errno)?;
    socket_link_inode(&link).ok_or(Errno::ENOTSOCK)
}

/// The inode a `/proc/PID/fd` link names, if it is a socket's (`socket:[INODE]`).
pub fn socket_link_inode(link: &std::path::Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The errno of an I/O error (EIO for one without).
fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A pidfd for `pid` (Linux 5.3+), close-on-exec. Signals sent through it reach that process or
/// nobody: once it is reaped, a recycled pid is a different process.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes two integers and returns a new fd (or -1) that we now own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    Errno::result(fd).map(|fd| {
        // SAFETY: the kernel returned a fresh descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    })
}

/// Sends `signal` through a pidfd; `ESRCH` once the process has exited.
pub fn pidfd_send_signal(
    pidfd: BorrowedFd<'_>,
    signal: nix::sys::signal::Signal,
) -> Result<(), Errno> {
    // SAFETY: a null siginfo asks the kernel to fill it in as kill(2) would; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        for n in [0u64, 7, 42, 4_194_304, u64::MAX] {
            let mut buf = [0xffu8; 21];
            // SAFETY: buf has 21 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), n.to_string());
        }
    }

    /// What the substitution reads of a server's socket instead of taking a copy: the inode
    /// fstat gives, the protocol by name, the flags fcntl sees.
    #[test]
    fn a_socket_is_read_from_proc() {
        use std::os::fd::AsFd;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = std::net::UdpSocket::bind("[::1]:0").unwrap();
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::gettid() } as u32;
        let got = socket_at(tid, tcp.as_raw_fd()).unwrap();
        assert_eq!(got.protocol, "TCP");
        assert_eq!(
            got.inode,
            nix::sys::stat::fstat(tcp.as_fd()).unwrap().st_ino
        );
        assert_ne!(got.flags & libc::O_NONBLOCK as u32, 0);
        assert_ne!(
            got.flags & libc::O_CLOEXEC as u32,
            0,
            "std opens close-on-exec"
        );
        let got = socket_at(tid, udp.as_raw_fd()).unwrap();
        assert_eq!(got.protocol, "UDPv6");
        assert_eq!(got.flags & libc::O_NONBLOCK as u32, 0);
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(socket_at(tid, file.as_raw_fd()), Err(Errno::ENOTSOCK));
    }
}
