//! Seccomp user notification for `bind`: the filter a child installs on itself before `execve`,
//! and grace's side of the conversation (receive a call, read its address, put a socket in place,
//! answer or let the call go on).
//!
//! The filter reports only `bind` calls whose address length can be an IPv4 or IPv6 address's
//! (that of `sockaddr_in` or `sockaddr_in6`, or that of a buffer larger than any unix address);
//! everything else, nearly every unix bind included, never leaves the kernel. A reported call
//! waits until grace answers: with success after it installed its own socket at the caller's
//! descriptor (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SECCOMP_ADDFD_FLAG_SETFD`,
//! like `dup3`), or with `SECCOMP_USER_NOTIF_FLAG_CONTINUE`, which runs the call as if no filter
//! were there.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets in `struct seccomp_data`: nr, arch, instruction pointer, then the six arguments.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// `bind`'s third argument (the address length), its low 32 bits (little-endian).
const DATA_ADDRLEN: u32 = 16 + 2 * 8;

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The filter's instructions, in a fixed array so that the child installs it without allocating.
pub type Program = [libc::sock_filter; 12];

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The longest `sockaddr_un` a `bind` accepts: a longer address is never a unix socket's.
const UNIX_ADDR_MAX: u32 = std::mem::size_of::<libc::sockaddr_un>() as u32;
/// The longest address any `bind` accepts (`sizeof(struct sockaddr_storage)`); the kernel refuses
/// a longer one (`EINVAL`) before looking at the socket.
const ADDR_MAX: u32 = std::mem::size_of::<libc::sockaddr_storage>() as u32;

/// To grace: `bind` with an address the size of `sockaddr_in` or `sockaddr_in6`, or longer than
/// any unix address and no longer than `sockaddr_storage` (a program passing the size of the
/// buffer it filled), and `listen` (so that a server's backlog does not shrink grace's socket).
/// The rest runs in the kernel, unix binds of every length but 16 and 28 included. (Jump offsets
/// count the instructions skipped.)
pub const fn bind_program() -> Program {
    const NOTIFY: u8 = 10;
    const ALLOW: u8 = 11;
    /// The offset from instruction `at` to instruction `to`.
    const fn to(at: u8, to: u8) -> u8 {
        to - at - 1
    }
    [
        /* 0 */ op(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        // Another architecture's call (a 32-bit program on a 64-bit kernel): let it run.
        /* 1 */
        op(BPF_JEQ_K, 0, to(1, ALLOW), AUDIT_ARCH),
        /* 2 */ op(BPF_LD_W_ABS, 0, 0, DATA_NR),
        /* 3 */ op(BPF_JEQ_K, to(3, NOTIFY), 0, libc::SYS_listen as u32),
        /* 4 */ op(BPF_JEQ_K, 0, to(4, ALLOW), libc::SYS_bind as u32),
        /* 5 */ op(BPF_LD_W_ABS, 0, 0, DATA_ADDRLEN),
        /* 6 */
        op(
            BPF_JEQ_K,
            to(6, NOTIFY),
            0,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ),
        /* 7 */
        op(
            BPF_JEQ_K,
            to(7, NOTIFY),
            0,
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ),
        // Unsigned comparisons: a negative length is larger than both, and the kernel's to refuse.
        /* 8 */
        op(BPF_JGT_K, 0, to(8, ALLOW), UNIX_ADDR_MAX),
        /* 9 */ op(BPF_JGT_K, to(9, ALLOW), 0, ADDR_MAX),
        /* 10 */ op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
        /* 11 */ op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// In the child, before `execve`: installs the filter (after `no_new_privs` when asked, which an
/// unprivileged process needs) and sends its notification descriptor to grace over `channel`
/// (`SCM_RIGHTS`), then closes its own copy. Returns 0 or the errno.
///
/// # Safety
/// For the child of a fork: makes only async-signal-safe system calls on the caller's memory.
pub unsafe fn install_in_child(
    program: &Program,
    no_new_privs: bool,
    channel: RawFd,
) -> libc::c_int {
    // SAFETY: plain system calls on valid pointers to memory that outlives them.
    unsafe {
        if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return *libc::__errno_location();
        }
        let prog = libc::sock_fprog {
            len: program.len() as libc::c_ushort,
            filter: program.as_ptr().cast_mut(),
        };
        let listener = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        );
        if listener < 0 {
            return *libc::__errno_location();
        }
        let listener = listener as RawFd;
        let rc = send_fd(channel, listener);
        libc::close(listener);
        rc
    }
}

/// Whether a child of this process could install the filter: a forked child tries, and exits
/// with the errno. Under a filter that already has a listener (grace under grace, or under a tool
/// that uses seccomp user notification) the kernel refuses a second one with `EBUSY`; without
/// `CAP_SYS_ADMIN` and without `no_new_privs` it refuses with `EACCES`.
pub fn try_install(no_new_privs: bool) -> Result<(), Errno> {
    let program = bind_program();
    // SAFETY: the child only makes system calls (prctl, seccomp, close, _exit) on memory that was
    // in place before the fork, which is async-signal-safe in a multi-threaded parent too.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Errno::last());
    }
    if pid == 0 {
        // SAFETY: as above; the child never returns from this block.
        unsafe {
            if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            let prog = libc::sock_fprog {
                len: program.len() as libc::c_ushort,
                filter: program.as_ptr().cast_mut(),
            };
            let listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &prog as *const libc::sock_fprog,
            );
            libc::_exit(if listener < 0 {
                *libc::__errno_location()
            } else {
                0
            });
        }
    }
    let status = loop {
        match nix::sys::wait::waitpid(Pid::from_raw(pid), None) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, errno) => Err(Errno::from_raw(errno)),
        _ => Err(Errno::ECHILD),
    }
}

/// `sendmsg` of one descriptor with a one-byte payload, from a stack buffer.
///
/// # Safety
/// Async-signal-safe; `channel` and `fd` are open descriptors.
unsafe fn send_fd(channel: RawFd, fd: RawFd) -> libc::c_int {
    // Room for one cmsghdr carrying one int, aligned as the kernel wants it.
    #[repr(C, align(8))]
    struct Control([u8; 32]);
    let mut control = Control([0; 32]);
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: the header and buffers live on this stack frame for the call; the CMSG macros
    // stay inside `control`, whose size is at least CMSG_SPACE(sizeof(int)).
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(channel, &msg, libc::MSG_NOSIGNAL) < 0 {
            return *libc::__errno_location();
        }
    }
    0
}

/// One reported call: its id, the calling thread, and the call's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub id: u64,
    pub pid: u32,
    pub nr: i32,
    pub args: [u64; 6],
}

/// The next reported call (the descriptor is readable), or `ENOENT` when the caller is gone (its
/// call was interrupted) before it could be read.
pub fn receive(listener: BorrowedFd<'_>) -> Result<Call, Errno> {
    // SAFETY: all zeroes is a valid seccomp_notif (plain integers); the kernel requires it zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one seccomp_notif into `n`.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut n as *mut libc::seccomp_notif,
        )
    };
    Errno::result(rc)?;
    Ok(Call {
        id: n.id,
        pid: n.pid,
        nr: n.data.nr,
        args: n.data.args,
    })
}

/// Whether call `id` still waits (its thread was not interrupted or killed meanwhile): what was
/// read from its memory before this answered true is the call's own.
pub fn still_waiting(listener: BorrowedFd<'_>, id: u64) -> bool {
    // SAFETY: the ioctl reads one u64.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &id as *const u64,
        )
    };
    rc == 0
}

fn respond(listener: BorrowedFd<'_>, id: u64, error: i32, flags: u32) -> Result<(), Errno> {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: the ioctl reads one seccomp_notif_resp.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    };
    Errno::result(rc).map(drop)
}

/// Lets call `id` run as if no filter were there.
pub fn let_run(listener: BorrowedFd<'_>, id: u64) -> Result<(), Errno> {
    respond(
        listener,
        id,
        0,
        libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    )
}

/// Answers call `id`: success (`errno` 0) or that error.
pub fn answer(listener: BorrowedFd<'_>, id: u64, errno: i32) -> Result<(), Errno> {
    respond(listener, id, -errno, 0)
}

/// Puts `socket` at descriptor `at` of the process making call `id` (replacing what is there,
/// as `dup3` would), close-on-exec if `cloexec`.
pub fn place(
    listener: BorrowedFd<'_>,
    id: u64,
    socket: BorrowedFd<'_>,
    at: RawFd,
    cloexec: bool,
) -> Result<(), Errno> {
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: socket.as_raw_fd() as u32,
        newfd: at as u32,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: the ioctl reads one seccomp_notif_addfd.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ADDFD,
            &addfd as *const libc::seccomp_notif_addfd,
        )
    };
    Errno::result(rc).map(drop)
}

/// Asks the kernel to wake a caller on grace's own CPU when it answers
/// (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux 6.6): a call is a synchronous round trip.
pub fn sync_wake_up(listener: BorrowedFd<'_>) -> Result<(), Errno> {
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: the ioctl takes its flags as the argument's value, no pointer.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    Errno::result(rc).map(drop)
}

/// Receives the notification descriptor a child sent over `channel` (see [`install_in_child`]).
pub fn receive_listener(channel: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(Errno::EBADMSG)
}

/// Reads `len` bytes at `addr` in process `pid` (a caller's argument; the answer is only to be
/// trusted once [`still_waiting`] says the call still waits).
pub fn read_memory(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
    use nix::sys::uio::{RemoteIoVec, process_vm_readv};
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let got = match process_vm_readv(
        Pid::from_raw(pid as libc::pid_t),
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &[RemoteIoVec {
            base: addr as usize,
            len,
        }],
    ) {
        Ok(got) => got,
        // The same access check, through a file: Docker's default seccomp profile refuses
        // process_vm_readv without CAP_SYS_PTRACE (EPERM), but not open and pread.
        Err(Errno::EPERM | Errno::ENOSYS) => std::fs::File::open(format!("/proc/{pid}/mem"))
            .and_then(|mem| mem.read_at(&mut buf, addr))
            .map_err(super::io_errno)?,
        Err(e) => return Err(e),
    };
    buf.truncate(got);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    fn readable(fd: BorrowedFd<'_>) {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(5_000u16)).unwrap(), 1);
    }

    fn sockaddr(addr: std::net::SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }

    /// A process under a filter with a listener cannot give its children another one (EBUSY):
    /// what `try_install` must find out before grace, run by a grace, starts any server.
    #[test]
    fn a_second_listener_is_refused_under_the_first() {
        assert_eq!(try_install(true), Ok(()));
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let program = bind_program();
        // SAFETY: the child makes system calls only, then exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let mut code = install_in_child(&program, true, theirs.as_raw_fd());
                if code == 0 {
                    code = match try_install(true) {
                        Err(Errno::EBUSY) => 0,
                        Ok(()) => 100,
                        Err(e) => 101 + (e as i32).min(100),
                    };
                }
                libc::_exit(code);
            }
        }
        drop(theirs);
        // The listener must be drained for the child's own binds; it makes none.
        let _listener = receive_listener(ours.as_fd());
        let status = nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(Pid::from_raw(pid), 0)
        );
    }

    /// What the kernel does with the filter: a child binds the address a socket of ours holds
    /// and gets that very socket at its descriptor (close-on-exec as it asked), while a bind to
    /// another address, with the length of a `sockaddr_storage`, is reported and runs untouched;
    /// unix binds (unnamed, and of the longest address) and a bind whose length the kernel refuses
    /// never reach us.
    #[test]
    fn a_bind_to_a_held_address_gets_our_socket_and_others_run() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(at) = held.local_addr().unwrap() else {
            unreachable!()
        };
        let held_sa = sockaddr(at);
        // The way many C servers call it: the address in a sockaddr_storage, and its size.
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        let mut free_sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: a sockaddr_in fits in a sockaddr_storage, which is aligned for it.
        unsafe {
            *(&mut free_sa as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() =
                sockaddr("127.0.0.1:0".parse().unwrap());
        }
        // An abstract name filling the whole sun_path: the longest unix address there is.
        // SAFETY: as above.
        let mut long_unix_sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        long_unix_sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let name = format!(
            "grace-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        for (i, b) in name.bytes().enumerate() {
            long_unix_sa.sun_path[1 + i] = b as libc::c_char;
        }
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut unix_sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        unix_sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (results_r, results_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let program = bind_program();
        // SAFETY: the child makes only async-signal-safe calls on memory prepared above.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: system calls on the buffers above; the child exits without returning.
            unsafe {
                if install_in_child(&program, true, theirs.as_raw_fd()) != 0 {
                    libc::_exit(10);
                }
                let mut out = [0i64; 8];
                let s1 = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                out[0] = libc::bind(s1, (&held_sa as *const libc::sockaddr_in).cast(), 16) as i64;
                let mut st: libc::stat = std::mem::zeroed();
                libc::fstat(s1, &mut st);
                out[1] = st.st_ino as i64;
                out[2] = libc::fcntl(s1, libc::F_GETFD) as i64;
                let s2 = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                out[3] = libc::bind(
                    s2,
                    (&free_sa as *const libc::sockaddr_storage).cast(),
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
                ) as i64;
                let mut got: libc::sockaddr_in = std::mem::zeroed();
                let mut len = 16 as libc::socklen_t;
                libc::getsockname(s2, (&mut got as *mut libc::sockaddr_in).cast(), &mut len);
                out[4] = u16::from_be(got.sin_port) as i64;
                // An unnamed unix bind (autobind): the filter lets it run in the kernel.
                let s3 = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                out[5] = libc::bind(
                    s3,
                    (&unix_sa as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
                ) as i64;
                let s4 = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                out[6] = libc::bind(
                    s4,
                    (&long_unix_sa as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) as i64;
                // Longer than any address: the kernel's EINVAL, not grace's business.
                let s5 = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                out[7] =
                    libc::bind(s5, (&free_sa as *const libc::sockaddr_storage).cast(), 129) as i64;
                if out[7] < 0 {
                    out[7] = -(*libc::__errno_location() as i64);
                }
                libc::write(
                    results_w.as_raw_fd(),
                    out.as_ptr().cast(),
                    std::mem::size_of_val(&out),
                );
                libc::_exit(0);
            }
        }
        drop(results_w);
        readable(ours.as_fd());
        let listener = receive_listener(ours.as_fd()).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            readable(listener.as_fd());
            let call = receive(listener.as_fd()).unwrap();
            assert_eq!(call.nr, libc::SYS_bind as i32);
            assert_eq!(call.pid, pid as u32);
            let sa = read_memory(call.pid, call.args[1], call.args[2] as usize).unwrap();
            assert!(still_waiting(listener.as_fd(), call.id));
            let port = u16::from_be_bytes([sa[2], sa[3]]);
            seen.push(port);
            if port == at.port() {
                place(
                    listener.as_fd(),
                    call.id,
                    held.as_fd(),
                    call.args[0] as RawFd,
                    true,
                )
                .unwrap();
                answer(listener.as_fd(), call.id, 0).unwrap();
            } else {
                let_run(listener.as_fd(), call.id).unwrap();
            }
        }
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < buf.len() {
            let n = nix::unistd::read(&results_r, &mut buf[got..]).unwrap();
            assert!(n > 0, "the child wrote {got} bytes");
            got += n;
        }
        let out: Vec<i64> = buf
            .chunks(8)
            .map(|c| i64::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        let status = nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(Pid::from_raw(pid), 0)
        );
        assert_eq!(
            seen,
            [at.port(), 0],
            "only the two inet binds were reported"
        );
        assert_eq!(out[0], 0, "the held bind succeeded");
        let ours_ino = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/self/fd/{}", held.as_raw_fd()))
                .unwrap()
                .ino()
        };
        assert_eq!(out[1] as u64, ours_ino, "the child got our socket");
        assert_eq!(out[2] & libc::FD_CLOEXEC as i64, libc::FD_CLOEXEC as i64);
        assert_eq!(out[3], 0, "the other bind ran");
        assert!(out[4] != 0 && out[4] != at.port() as i64, "{}", out[4]);
        assert_eq!(out[5], 0, "the unix bind ran in the kernel");
        assert_eq!(out[6], 0, "the long unix bind ran in the kernel");
        assert_eq!(out[7], -(libc::EINVAL as i64), "too long an address");
    }
}
