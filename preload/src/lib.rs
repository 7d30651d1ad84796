//! grace's preload library: lets a server that binds its own port accept from the socket grace
//! holds, so that every generation shares one kernel queue (as socket activation would).
//!
//! grace loads it into a generation with `LD_PRELOAD` and describes its sockets in `GRACE_INJECT`
//! (see `table.rs`). When the server `bind`s an address that one of them has, the library puts
//! grace's socket in place of the server's own (`dup3` onto the server's fd number, keeping the
//! server's `O_CLOEXEC` and `O_NONBLOCK`), and the server's `listen` on it succeeds without
//! touching the shared queue. A `shutdown` of grace's socket does nothing: on a listening socket
//! it would stop the queue every generation shares (closing the fd is how a server stops
//! accepting). Everything else goes to the real call, found with `dlsym(RTLD_NEXT)`, untouched.
//!
//! Rules it keeps:
//! - It acts only in the process grace started: the one whose pid is `LISTEN_PID` (the same pid
//!   across the `exec`s of a wrapper or a version-manager shim), and the children it forks
//!   without `exec` (they share its memory and its fds); programs its children `exec` pass
//!   through. Without `LISTEN_PID` (`--no-listen-pid`) any process may take a socket.
//! - A socket is taken only if its fd is still the one grace passed: checked at start-up (type,
//!   address, listening) and again at each `bind` by identity (device and inode), so a number the
//!   server closed and reused is never mistaken for grace's socket.
//! - No allocation, no locks, only async-signal-safe calls in the hooks; the table is a
//!   fixed-size static filled once, before `main` (or by the first hook, if another library's
//!   constructor binds first), and published with an atomic.
//! - Only the same address family matches, with one exception: a TCP server binding `0.0.0.0:P`
//!   gets the dual-stack `[::]:P` that `--listen :P` gives, and then sees IPv4 addresses from its
//!   `getsockname` and `accept` on that socket, as an IPv4 socket would show them. (Not UDP: its
//!   `recvfrom` would give IPv6 sender addresses; see `table::matches`.)
//! - Filling the table from a hook (before the constructor ran) leaves `errno` as it was.

#![no_std]

mod addr;
// Shared with grace, which also uses the parts the library does not.
#[allow(dead_code)]
mod table;

use core::cell::UnsafeCell;
use core::ffi::{CStr, c_char, c_int, c_void};
use core::fmt::{self, Write as _};
use core::net::SocketAddr;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};

use table::{Entry, MAX_ENTRIES, Match, Proto};

type Socklen = u32;

// Linux values, the same on every architecture grace's build.rs builds this library for.
const SOL_SOCKET: c_int = 1;
const SO_TYPE: c_int = 3;
const SO_ACCEPTCONN: c_int = 30;
const IPPROTO_IPV6: c_int = 41;
const IPV6_V6ONLY: c_int = 26;
const SOCK_STREAM: c_int = 1;
const SOCK_DGRAM: c_int = 2;
const SHUT_RD: c_int = 0;
const SHUT_RDWR: c_int = 2;
const F_GETFD: c_int = 1;
const F_GETFL: c_int = 3;
const F_SETFL: c_int = 4;
const FD_CLOEXEC: c_int = 1;
const O_NONBLOCK: c_int = 0o4000;
const O_CLOEXEC: c_int = 0o2000000;
const EINVAL: c_int = 22;
const EADDRINUSE: c_int = 98;
const ENOSYS: c_int = 38;
/// glibc's and musl's `RTLD_NEXT`.
const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;

#[link(name = "c")]
unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn getenv(name: *const c_char) -> *const c_char;
    fn getpid() -> c_int;
    fn fstat(fd: c_int, buf: *mut c_void) -> c_int;
    fn getpeername(fd: c_int, addr: *mut c_void, len: *mut Socklen) -> c_int;
    fn getsockopt(
        fd: c_int,
        level: c_int,
        name: c_int,
        value: *mut c_void,
        len: *mut Socklen,
    ) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int;
    fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
    fn __errno_location() -> *mut c_int;
    fn abort() -> !;
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: abort takes no arguments and never returns.
    unsafe { abort() }
}

// The precompiled `core` refers to the unwinding personality even though this library is built
// with `panic=abort` and never unwinds; without a definition the loader would refuse the library
// (it is linked with immediate binding). The definition is hidden, so that it can never stand in
// for the personality of a program this library is loaded into; it traps if ever called.
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".globl rust_eh_personality",
    ".hidden rust_eh_personality",
    "rust_eh_personality:",
    "ud2"
);
#[cfg(target_arch = "aarch64")]
core::arch::global_asm!(
    ".globl rust_eh_personality",
    ".hidden rust_eh_personality",
    "rust_eh_personality:",
    "udf #0"
);
#[cfg(target_arch = "riscv64")]
core::arch::global_asm!(
    ".globl rust_eh_personality",
    ".hidden rust_eh_personality",
    "rust_eh_personality:",
    "unimp"
);

// ---------------------------------------------------------------------------------------------
// The real functions, behind ours.

type BindFn = unsafe extern "C" fn(c_int, *const c_void, Socklen) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type AcceptFn = unsafe extern "C" fn(c_int, *mut c_void, *mut Socklen) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut c_void, *mut Socklen, c_int) -> c_int;
type GetsocknameFn = unsafe extern "C" fn(c_int, *mut c_void, *mut Socklen) -> c_int;
type ShutdownFn = unsafe extern "C" fn(c_int, c_int) -> c_int;

/// The next definition of each hooked symbol, resolved once (0 until then).
struct Real {
    bind: AtomicUsize,
    listen: AtomicUsize,
    accept: AtomicUsize,
    accept4: AtomicUsize,
    getsockname: AtomicUsize,
    shutdown: AtomicUsize,
}

static REAL: Real = Real {
    bind: AtomicUsize::new(0),
    listen: AtomicUsize::new(0),
    accept: AtomicUsize::new(0),
    accept4: AtomicUsize::new(0),
    getsockname: AtomicUsize::new(0),
    shutdown: AtomicUsize::new(0),
};

/// Looks `name` up behind this library (done once, in the constructor, where `dlsym` may lock).
fn resolve(cell: &AtomicUsize, name: &CStr) -> usize {
    let cached = cell.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only reads them.
    let found = unsafe { dlsym(RTLD_NEXT, name.as_ptr()) } as usize;
    cell.store(found, Ordering::Release);
    found
}

fn resolve_all() {
    resolve(&REAL.bind, c"bind");
    resolve(&REAL.listen, c"listen");
    resolve(&REAL.accept, c"accept");
    resolve(&REAL.accept4, c"accept4");
    resolve(&REAL.getsockname, c"getsockname");
    resolve(&REAL.shutdown, c"shutdown");
}

/// Makes a call fail with ENOSYS when the real function cannot be found (never expected).
fn missing() -> c_int {
    set_errno(ENOSYS);
    -1
}

unsafe fn real_bind(fd: c_int, addr: *const c_void, len: Socklen) -> c_int {
    match resolve(&REAL.bind, c"bind") {
        0 => missing(),
        // SAFETY: the address is libc's `bind`, whose type BindFn is; the caller's arguments are
        // passed on as they came.
        f => unsafe { core::mem::transmute::<usize, BindFn>(f)(fd, addr, len) },
    }
}

unsafe fn real_listen(fd: c_int, backlog: c_int) -> c_int {
    match resolve(&REAL.listen, c"listen") {
        0 => missing(),
        // SAFETY: as in real_bind, for `listen`.
        f => unsafe { core::mem::transmute::<usize, ListenFn>(f)(fd, backlog) },
    }
}

unsafe fn real_accept(fd: c_int, addr: *mut c_void, len: *mut Socklen) -> c_int {
    match resolve(&REAL.accept, c"accept") {
        0 => missing(),
        // SAFETY: as in real_bind, for `accept`.
        f => unsafe { core::mem::transmute::<usize, AcceptFn>(f)(fd, addr, len) },
    }
}

unsafe fn real_accept4(fd: c_int, addr: *mut c_void, len: *mut Socklen, flags: c_int) -> c_int {
    match resolve(&REAL.accept4, c"accept4") {
        0 => missing(),
        // SAFETY: as in real_bind, for `accept4`.
        f => unsafe { core::mem::transmute::<usize, Accept4Fn>(f)(fd, addr, len, flags) },
    }
}

unsafe fn real_getsockname(fd: c_int, addr: *mut c_void, len: *mut Socklen) -> c_int {
    match resolve(&REAL.getsockname, c"getsockname") {
        0 => missing(),
        // SAFETY: as in real_bind, for `getsockname`.
        f => unsafe { core::mem::transmute::<usize, GetsocknameFn>(f)(fd, addr, len) },
    }
}

unsafe fn real_shutdown(fd: c_int, how: c_int) -> c_int {
    match resolve(&REAL.shutdown, c"shutdown") {
        0 => missing(),
        // SAFETY: as in real_bind, for `shutdown`.
        f => unsafe { core::mem::transmute::<usize, ShutdownFn>(f)(fd, how) },
    }
}

// ---------------------------------------------------------------------------------------------
// The table, filled once.

/// One socket grace passed, as checked in this process.
#[derive(Clone, Copy)]
struct Slot {
    entry: Entry,
    /// The socket's identity (`st_dev`, `st_ino`) when it was checked.
    id: (u64, u64),
    /// An IPv6 socket that also takes IPv4.
    dual_stack: bool,
    /// This process may take it: it is the process grace started, and the fd held the socket
    /// grace described.
    usable: bool,
}

const EMPTY_SLOT: Slot = Slot {
    entry: Entry {
        fd: -1,
        proto: Proto::Tcp,
        addr: SocketAddr::V4(core::net::SocketAddrV4::new(
            core::net::Ipv4Addr::UNSPECIFIED,
            0,
        )),
    },
    id: (0, 0),
    dual_stack: false,
    usable: false,
};

struct Table {
    /// This is the process grace started (or grace did not say which).
    active: bool,
    /// `LISTEN_PID`, 0 when unset.
    listen_pid: i32,
    len: usize,
    slots: [Slot; MAX_ENTRIES],
}

struct Shared(UnsafeCell<Table>);

// SAFETY: the table is written only by the one thread that wins STATE's NEW -> FILLING exchange,
// and read only after STATE is READY (Release store, Acquire load); it never changes after that.
unsafe impl Sync for Shared {}

static TABLE: Shared = Shared(UnsafeCell::new(Table {
    active: false,
    listen_pid: 0,
    len: 0,
    slots: [EMPTY_SLOT; MAX_ENTRIES],
}));

const NEW: u8 = 0;
const FILLING: u8 = 1;
const READY: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(NEW);

/// Fills the table before `main`.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    table();
}

fn table() -> &'static Table {
    if STATE.load(Ordering::Acquire) != READY {
        if STATE
            .compare_exchange(NEW, FILLING, Ordering::Acquire, Ordering::Acquire)
            .is_ok()
        {
            // Filling makes system calls that may fail (a closed fd, an unset variable): a hook
            // whose own call then succeeds must not leave their errno behind.
            let saved = errno();
            // SAFETY: we won the exchange: no one else writes, and no one reads before READY.
            fill(unsafe { &mut *TABLE.0.get() });
            set_errno(saved);
            STATE.store(READY, Ordering::Release);
        } else {
            // Another thread is filling it (only possible if threads run before our
            // constructor); it takes a few system calls.
            while STATE.load(Ordering::Acquire) != READY {
                core::hint::spin_loop();
            }
        }
    }
    // SAFETY: READY was observed with Acquire: the table is complete and never written again.
    unsafe { &*TABLE.0.get() }
}

fn fill(t: &mut Table) {
    resolve_all();
    let Some(text) = env(c"GRACE_INJECT") else {
        return;
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() };
    t.listen_pid = env(c"LISTEN_PID").and_then(|p| p.parse().ok()).unwrap_or(0);
    t.active = t.listen_pid == 0 || t.listen_pid == pid;
    for entry in table::entries(text).flatten() {
        if t.len == MAX_ENTRIES {
            break;
        }
        let mut slot = Slot {
            entry,
            ..EMPTY_SLOT
        };
        if t.active {
            check(&mut slot);
        }
        t.slots[t.len] = slot;
        t.len += 1;
    }
}

/// Whether the slot's fd still holds the socket grace described.
fn check(slot: &mut Slot) {
    let fd = slot.entry.fd;
    let Some(id) = identity(fd) else { return };
    let want_type = match slot.entry.proto {
        Proto::Tcp => SOCK_STREAM,
        Proto::Udp => SOCK_DGRAM,
    };
    if int_option(fd, SOL_SOCKET, SO_TYPE) != Some(want_type)
        || local_addr(fd) != Some(slot.entry.addr)
    {
        return;
    }
    // A listening socket, or one whose queue was shut down (a `shutdown(2)` that bypassed this
    // library): still bound, not connected. The server's `listen` then brings it back.
    if slot.entry.proto == Proto::Tcp
        && int_option(fd, SOL_SOCKET, SO_ACCEPTCONN) != Some(1)
        && connected(fd)
    {
        return;
    }
    slot.dual_stack =
        slot.entry.addr.is_ipv6() && int_option(fd, IPPROTO_IPV6, IPV6_V6ONLY) == Some(0);
    slot.id = id;
    slot.usable = true;
}

impl Table {
    fn slots(&self) -> &[Slot] {
        &self.slots[..self.len]
    }
}

// ---------------------------------------------------------------------------------------------
// Small wrappers over libc.

fn env(name: &CStr) -> Option<&'static str> {
    // SAFETY: getenv reads the environment; the string it returns stays valid while nobody
    // changes that variable, and we copy what we need out of it right away.
    let value = unsafe { getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: getenv returned a NUL-terminated string.
    unsafe { CStr::from_ptr(value) }.to_str().ok()
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *__errno_location() }
}

fn set_errno(value: c_int) {
    // SAFETY: as in errno.
    unsafe { *__errno_location() = value }
}

/// The socket's identity: (`st_dev`, `st_ino`), shared by every fd that refers to it.
fn identity(fd: c_int) -> Option<(u64, u64)> {
    // Room for any architecture's `struct stat`; on 64-bit Linux `st_dev` and `st_ino` are the
    // first two 64-bit fields.
    let mut buf = [0u64; 32];
    // SAFETY: buf is larger than struct stat.
    if unsafe { fstat(fd, buf.as_mut_ptr().cast()) } != 0 {
        return None;
    }
    Some((buf[0], buf[1]))
}

fn int_option(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = core::mem::size_of::<c_int>() as Socklen;
    // SAFETY: value and len are valid for the sizes given.
    let rc = unsafe { getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    (rc == 0).then_some(value)
}

/// Whether `fd` has a peer (a connection, not a listening or a dead socket).
fn connected(fd: c_int) -> bool {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as Socklen;
    // SAFETY: buf and len describe a valid buffer.
    unsafe { getpeername(fd, buf.as_mut_ptr().cast(), &mut len) == 0 }
}

fn local_addr(fd: c_int) -> Option<SocketAddr> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as Socklen;
    // SAFETY: buf and len describe a valid buffer.
    if unsafe { real_getsockname(fd, buf.as_mut_ptr().cast(), &mut len) } != 0 {
        return None;
    }
    addr::decode(&buf[..(len as usize).min(buf.len())])
}

/// The caller's socket address, if it is an IPv4 or IPv6 one.
///
/// # Safety
/// `addr` must be null or point to `len` readable bytes.
unsafe fn read_addr(addr: *const c_void, len: Socklen) -> Option<SocketAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller of bind promises `len` readable bytes at `addr`.
    addr::decode(unsafe { core::slice::from_raw_parts(addr.cast::<u8>(), len as usize) })
}

/// Copies an address out the way the kernel does: truncated to the caller's buffer, with the
/// full length stored in `*len`.
///
/// # Safety
/// `out` must point to `*len` writable bytes; `len` must be valid.
unsafe fn give_addr(bytes: &[u8], out: *mut c_void, len: *mut Socklen) {
    // SAFETY: the caller's contract.
    unsafe {
        let room = *len as usize;
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len().min(room));
        *len = bytes.len() as Socklen;
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets handed out as IPv4 over grace's dual-stack socket.

/// fd numbers where the server has grace's dual-stack socket but asked for IPv4 (-1: free).
static CONVERTED: [AtomicI32; MAX_ENTRIES] = [const { AtomicI32::new(-1) }; MAX_ENTRIES];
static ANY_CONVERTED: AtomicBool = AtomicBool::new(false);

fn remember_converted(fd: c_int) {
    if CONVERTED.iter().any(|c| c.load(Ordering::Acquire) == fd) {
        return;
    }
    for c in &CONVERTED {
        if c.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            ANY_CONVERTED.store(true, Ordering::Release);
            return;
        }
    }
    // Full: the server then sees the IPv6 form of addresses on this fd.
}

fn forget_converted(fd: c_int) {
    for c in &CONVERTED {
        let _ = c.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Whether `fd` is grace's dual-stack socket handed out as an IPv4 one. fd numbers are reused
/// after `close`, so a remembered number counts only while it still refers to that socket.
fn converted(fd: c_int) -> bool {
    if !ANY_CONVERTED.load(Ordering::Acquire)
        || !CONVERTED.iter().any(|c| c.load(Ordering::Acquire) == fd)
    {
        return false;
    }
    let id = identity(fd);
    let shared = table()
        .slots()
        .iter()
        .any(|s| s.usable && s.dual_stack && Some(s.id) == id);
    if !shared {
        forget_converted(fd);
    }
    shared
}

// ---------------------------------------------------------------------------------------------
// The hooks.

/// `bind(2)`: an address grace holds gets grace's socket; anything else goes to the real call.
///
/// # Safety
/// As `bind(2)`: `addr` points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const c_void, len: Socklen) -> c_int {
    let t = table();
    if t.len == 0 {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real_bind(fd, addr, len) };
    }
    // SAFETY: the caller's contract.
    let Some(wanted) = (unsafe { read_addr(addr, len) }) else {
        // SAFETY: as above.
        return unsafe { real_bind(fd, addr, len) };
    };
    if t.active
        && let Some(rc) = substitute(t, fd, &wanted)
    {
        return rc;
    }
    // SAFETY: as above.
    let rc = unsafe { real_bind(fd, addr, len) };
    if rc != 0 && errno() == EADDRINUSE {
        explain_in_use(t, fd, &wanted);
        set_errno(EADDRINUSE);
    }
    rc
}

/// Puts grace's socket for `wanted` at `fd`; `None` when grace holds no such socket here.
fn substitute(t: &Table, fd: c_int, wanted: &SocketAddr) -> Option<c_int> {
    let ty = int_option(fd, SOL_SOCKET, SO_TYPE)?;
    let (slot, how) = t.slots().iter().find_map(|s| {
        let proto_ok = match s.entry.proto {
            Proto::Tcp => ty == SOCK_STREAM,
            Proto::Udp => ty == SOCK_DGRAM,
        };
        let how = table::matches(s.entry.proto, &s.entry.addr, s.dual_stack, wanted);
        (s.usable && proto_ok && how != Match::No).then_some((s, how))
    })?;
    // Still the socket grace passed? (The server may have closed the fd and reused the number.)
    if identity(slot.entry.fd) != Some(slot.id) {
        return None;
    }
    if identity(fd) == Some(slot.id) {
        // Binding grace's socket a second time: the kernel's answer for a bound socket.
        set_errno(EINVAL);
        return Some(-1);
    }
    // SAFETY: fcntl with F_GETFD/F_GETFL takes no third argument.
    let (fd_flags, status_flags) = unsafe { (fcntl(fd, F_GETFD), fcntl(fd, F_GETFL)) };
    if fd_flags < 0 || status_flags < 0 {
        return Some(-1);
    }
    let cloexec = if fd_flags & FD_CLOEXEC != 0 {
        O_CLOEXEC
    } else {
        0
    };
    // Atomically closes the server's own socket and puts grace's at its number.
    // SAFETY: dup3 on two fd numbers touches no memory.
    if unsafe { dup3(slot.entry.fd, fd, cloexec) } < 0 {
        return Some(-1);
    }
    // O_NONBLOCK belongs to the shared socket, not to the fd: set it when the server asked for
    // it (its event loop must never block in accept), and never clear it (an older generation
    // may rely on it).
    if status_flags & O_NONBLOCK != 0 {
        // SAFETY: F_GETFL/F_SETFL with an int argument.
        unsafe {
            let now = fcntl(fd, F_GETFL);
            if now >= 0 && now & O_NONBLOCK == 0 {
                fcntl(fd, F_SETFL, now | O_NONBLOCK);
            }
        }
    }
    if how == Match::V4WildcardOnDualStack {
        remember_converted(fd);
    } else {
        forget_converted(fd);
    }
    Some(0)
}

/// One line on stderr when the real bind failed because grace holds that port, saying why the
/// socket was not handed over.
fn explain_in_use(t: &Table, fd: c_int, wanted: &SocketAddr) {
    let ty = int_option(fd, SOL_SOCKET, SO_TYPE);
    let Some(slot) = t.slots().iter().find(|s| {
        let proto_ok = match s.entry.proto {
            Proto::Tcp => ty == Some(SOCK_STREAM),
            Proto::Udp => ty == Some(SOCK_DGRAM),
        };
        proto_ok && s.entry.addr.port() == wanted.port()
    }) else {
        return;
    };
    let mut line = Line::new();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() };
    let proto = slot.entry.proto.as_str();
    let _ = write!(
        line,
        "grace: pid {pid} binds {proto} {wanted}, which grace holds as {proto} {}, but ",
        slot.entry.addr
    );
    let _ = if !t.active {
        write!(
            line,
            "only the process grace started (pid {}) gets it: a wrapper must `exec` the server \
             (or run grace with --no-listen-pid)",
            t.listen_pid
        )
    } else if !slot.usable || identity(slot.entry.fd) != Some(slot.id) {
        write!(
            line,
            "fd {} no longer holds it (did the server close it?)",
            slot.entry.fd
        )
    } else if slot.entry.proto == Proto::Udp
        && slot.dual_stack
        && table::matches(Proto::Tcp, &slot.entry.addr, true, wanted)
            == Match::V4WildcardOnDualStack
    {
        write!(
            line,
            "the addresses differ: give --listen the address the server binds (udp://0.0.0.0:{} \
             for this one: an IPv4 UDP server cannot share the dual-stack socket of :PORT, whose \
             senders have IPv6 addresses)",
            wanted.port()
        )
    } else {
        write!(
            line,
            "the addresses differ: give --listen the address the server binds"
        )
    };
    line.finish();
    // SAFETY: write from a valid buffer.
    unsafe { write(2, line.buf.as_ptr().cast(), line.len) };
}

/// A line of text in a fixed buffer (no allocation); what does not fit is cut.
struct Line {
    buf: [u8; 400],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 400],
            len: 0,
        }
    }

    fn finish(&mut self) {
        let end = self.len.min(self.buf.len() - 1);
        self.buf[end] = b'\n';
        self.len = end + 1;
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep one byte for the newline.
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The slot of grace's socket, if `fd` holds it (by identity) in the process grace started.
fn grace_socket(fd: c_int) -> Option<&'static Slot> {
    let t = table();
    if !t.active || t.len == 0 {
        return None;
    }
    let id = identity(fd)?;
    t.slots().iter().find(|s| s.usable && s.id == id)
}

/// `listen(2)`: on grace's socket it succeeds without touching the shared queue's backlog. If the
/// socket no longer listens (a `shutdown(2)` that bypassed this library stopped its queue), it
/// is brought back at its address.
///
/// # Safety
/// As `listen(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let Some(slot) = grace_socket(fd) else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real_listen(fd, backlog) };
    };
    if slot.entry.proto != Proto::Tcp || int_option(fd, SOL_SOCKET, SO_ACCEPTCONN) != Some(0) {
        return 0;
    }
    // A stopped socket usually keeps its port (it was bound to an explicit one); if it lost it,
    // bind it again first. The bind fails with EINVAL when the address is still its own.
    let saved = errno();
    let mut buf = [0u8; addr::SOCKADDR_IN6_LEN];
    let n = addr::encode(&slot.entry.addr, &mut buf);
    // SAFETY: our own buffer of n bytes.
    unsafe { real_bind(fd, buf.as_ptr().cast(), n as Socklen) };
    set_errno(saved);
    // SAFETY: the caller's arguments, passed on.
    unsafe { real_listen(fd, backlog) }
}

/// `shutdown(2)`: does nothing on grace's socket. On a listening socket it would stop the one
/// queue every generation and grace share (and on a UDP socket, stop its reads for all of them);
/// closing the fd is how a server stops accepting. The call succeeds, as it does on a listening
/// socket; threads blocked in `accept` are not woken by it.
///
/// # Safety
/// As `shutdown(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if (SHUT_RD..=SHUT_RDWR).contains(&how) && grace_socket(fd).is_some() {
        return 0;
    }
    // SAFETY: the caller's arguments, passed on.
    unsafe { real_shutdown(fd, how) }
}

/// `accept(2)`.
///
/// # Safety
/// As `accept(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut c_void, len: *mut Socklen) -> c_int {
    if addr.is_null() || len.is_null() || !converted(fd) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real_accept(fd, addr, len) };
    }
    // SAFETY: as above; accept4 with no flags is accept.
    unsafe { accept_as_v4(fd, addr, len, 0) }
}

/// `accept4(2)`.
///
/// # Safety
/// As `accept4(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut c_void,
    len: *mut Socklen,
    flags: c_int,
) -> c_int {
    if addr.is_null() || len.is_null() || !converted(fd) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real_accept4(fd, addr, len, flags) };
    }
    // SAFETY: as above.
    unsafe { accept_as_v4(fd, addr, len, flags) }
}

/// Accepts on grace's dual-stack socket and gives the peer's address in IPv4 form.
///
/// # Safety
/// `addr` points to `*len` writable bytes.
unsafe fn accept_as_v4(fd: c_int, addr: *mut c_void, len: *mut Socklen, flags: c_int) -> c_int {
    let mut buf = [0u8; 128];
    let mut got = buf.len() as Socklen;
    // SAFETY: our own buffer.
    let conn = unsafe { real_accept4(fd, buf.as_mut_ptr().cast(), &mut got, flags) };
    if conn < 0 {
        return conn;
    }
    let got = &buf[..(got as usize).min(buf.len())];
    // SAFETY: the caller's buffer, as promised to accept.
    unsafe { give_addr_as_v4(got, addr, len) };
    conn
}

/// # Safety
/// `out` points to `*len` writable bytes.
unsafe fn give_addr_as_v4(raw: &[u8], out: *mut c_void, len: *mut Socklen) {
    let mut bytes = [0u8; addr::SOCKADDR_IN6_LEN];
    // SAFETY (both): the caller's contract.
    match addr::decode(raw) {
        Some(a) => {
            let n = addr::encode(&addr::as_v4(a), &mut bytes);
            unsafe { give_addr(&bytes[..n], out, len) }
        }
        None => unsafe { give_addr(raw, out, len) },
    }
}

/// `getsockname(2)`: grace's dual-stack socket handed out as IPv4 shows `0.0.0.0:P`.
///
/// # Safety
/// As `getsockname(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut c_void, len: *mut Socklen) -> c_int {
    if addr.is_null() || len.is_null() || !converted(fd) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real_getsockname(fd, addr, len) };
    }
    let mut buf = [0u8; 128];
    let mut got = buf.len() as Socklen;
    // SAFETY: our own buffer.
    let rc = unsafe { real_getsockname(fd, buf.as_mut_ptr().cast(), &mut got) };
    if rc == 0 {
        let got = &buf[..(got as usize).min(buf.len())];
        // SAFETY: the caller's buffer, as promised to getsockname.
        unsafe { give_addr_as_v4(got, addr, len) };
    }
    rc
}
