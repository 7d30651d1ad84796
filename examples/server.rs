//! A small HTTP/1.1 server for trying grace out, and the fixture its tests run.
//!
//! ```text
//! server [--bind ADDR]... [--behavior WORDS]... [--behavior-file PATH]
//! ```
//!
//! Listening sockets come from systemd socket activation (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`), which is how grace hands them over. Without `LISTEN_FDS` the server binds
//! `--bind ADDR` itself (`127.0.0.1:8080`, `[::1]:0`, `unix:/path`), so benchmarks can compare
//! grace against the bare server.
//!
//! Routes (every reply has `Content-Length` and `X-Pid`):
//!
//! | route                        | reply                                                |
//! |------------------------------|------------------------------------------------------|
//! | `GET /`                      | `hello from pid=<pid> generation=<g>`                |
//! | `GET /sleep?duration=2s`     | sleeps, then `slept 2s pid=<pid> generation=<g>`     |
//! | `GET /health`                | `ok`                                                 |
//! | `GET /pid`                   | `<pid>`                                              |
//!
//! `<g>` is `GRACE_GENERATION` (`0` when unset). Once accepting, the server prints
//! `ready pid=<pid> generation=<g> listeners=<n>` and sends `READY=1` to `NOTIFY_SOCKET`.
//! SIGTERM or SIGINT drains: stop accepting, finish in-flight requests, close idle keep-alive
//! connections, exit 0.
//!
//! Behaviour words (from `--behavior` and from `--behavior-file`, read once at start-up so that
//! successive generations of one command line can behave differently): `exit-immediately`,
//! `never-ready`, `ignore-term`, `crash-after-ready`, `unhealthy` (`/health` answers 503),
//! `close-sockets` (closes every passed socket, then claims to be ready), `daemonize` (forks, the
//! parent exits 0, and the child serves from 300ms later), `flood-notify=N` (N junk notify messages
//! before READY=1), `slow-start=DUR`, `exit-code=N`.

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, SigSet, Signal};
use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname};
use nix::sys::socket::{getsockopt, sockopt};

/// Largest request head (request line and headers) we accept; beyond it the reply is 431.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body we read and discard; beyond it the reply is 413.
const MAX_BODY: usize = 1024 * 1024;
/// How long a keep-alive connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send one whole request once it has started.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reply may take to write (a client that stops reading must not pin a thread).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection stays open once the drain starts (see
/// `serve_connection`).
const DRAIN_IDLE_GRACE: Duration = Duration::from_millis(500);
/// How long we keep reading after our last reply before closing (see `close_gracefully`).
const LINGER: Duration = Duration::from_secs(2);
/// How long `crash-after-ready` serves before it exits with code 4.
const CRASH_DELAY: Duration = Duration::from_millis(200);

/// Prints one line to stdout and flushes it. A closed stdout must not kill the server (as
/// `println!` would, by panicking), so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

/// Prints one line to stderr, ignoring write errors for the same reason as `say!`.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr().lock(), "server: {}", format_args!($($arg)*));
    }};
}

/// A start-up failure: the message for stderr and the exit code.
struct Fatal {
    code: u8,
    message: String,
}

impl Fatal {
    fn usage(message: impl Into<String>) -> Self {
        Fatal {
            code: 2,
            message: message.into(),
        }
    }

    fn runtime(message: impl Into<String>) -> Self {
        Fatal {
            code: 1,
            message: message.into(),
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(fatal) => {
            note!("{}", fatal.message);
            ExitCode::from(fatal.code)
        }
    }
}

fn run() -> Result<u8, Fatal> {
    let args = Args::parse(env::args_os().skip(1))?;
    let behavior = Behavior::load(&args)?;
    if behavior.exit_immediately {
        note!("exit-immediately: exiting with code 3");
        return Ok(3);
    }

    let pid = std::process::id();
    let generation = env::var("GRACE_GENERATION").unwrap_or_else(|_| "0".to_owned());

    // Adopt the activated fds before this process opens any fd of its own: if LISTEN_FDS names
    // a number that is not actually open, our own pipe could otherwise land on it and be
    // mistaken for (and closed as) a passed socket.
    let mut activated = activated_listeners(pid)?;
    if behavior.close_sockets {
        note!("close-sockets: closing every passed socket");
        activated = Some(Vec::new());
    }
    let pid = if behavior.daemonize {
        // SAFETY: no thread exists yet, so the child is a complete copy of this process.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                note!("daemonize: child {child} keeps serving, parent exits 0");
                return Ok(0);
            }
            Ok(nix::unistd::ForkResult::Child) => {
                // Like a classic daemon, the child initialises after its parent is gone (and so
                // the order grace sees is deterministic: the leader's exit, then anything else).
                thread::sleep(Duration::from_millis(300));
                std::process::id()
            }
            Err(e) => return Err(Fatal::runtime(format!("daemonize: fork: {e}"))),
        }
    } else {
        pid
    };

    // Block the stop signals before any thread exists, so that every thread inherits the mask
    // and a SIGTERM that arrives during start-up stays pending for the signal thread.
    let stop_signals = block_stop_signals()?;
    let shared = Arc::new(Shared::new(pid, generation, behavior.unhealthy)?);
    start_signal_thread(stop_signals, behavior.ignore_term, &shared)?;

    if let Some(delay) = behavior.slow_start {
        note!("slow-start: waiting {delay:?} before listening");
        if shared.wait_for_drain(Some(delay)) {
            // Stopped before we ever served: nothing to drain.
            say!("exited pid={pid}");
            return Ok(behavior.exit_code);
        }
    }

    let listeners = match activated {
        Some(listeners) => listeners,
        None => bind_listeners(&args.binds)?,
    };
    let count = listeners.len();
    let acceptors = start_accepting(listeners, &shared)?;

    if behavior.never_ready {
        note!("never-ready: serving without announcing readiness");
    } else {
        say!(
            "ready pid={pid} generation={} listeners={count}",
            shared.generation
        );
        for i in 0..behavior.flood_notify {
            notify(&format!("STATUS=flood {i}"));
        }
        notify_ready(pid);
    }
    if behavior.crash_after_ready {
        thread::spawn(move || {
            thread::sleep(CRASH_DELAY);
            say!("crashing pid={pid}");
            std::process::exit(4);
        });
    }

    shared.wait_for_drain(None);
    // Each accept thread closes its listener when it sees the wake-up pipe; after these joins no
    // new connection can appear, so the number of connections can only go down.
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    shared.wait_for_connections();
    say!("exited pid={pid}");
    Ok(behavior.exit_code)
}

fn start_signal_thread(set: SigSet, ignore_term: bool, shared: &Arc<Shared>) -> Result<(), Fatal> {
    let shared = Arc::clone(shared);
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || signal_loop(set, ignore_term, &shared))
        .map(drop)
        .map_err(|e| Fatal::runtime(format!("spawning the signal thread: {e}")))
}

/// Prints each listener and starts one accept thread per listener.
fn start_accepting(
    listeners: Vec<Listener>,
    shared: &Arc<Shared>,
) -> Result<Vec<thread::JoinHandle<()>>, Fatal> {
    let mut acceptors = Vec::with_capacity(listeners.len());
    for listener in listeners {
        say!(
            "listening fd={} name={} addr={}",
            listener.socket.as_fd().as_raw_fd(),
            listener.name,
            listener.socket.describe()
        );
        let shared = Arc::clone(shared);
        let acceptor = thread::Builder::new()
            .name(format!("accept-{}", listener.name))
            .spawn(move || accept_loop(listener, &shared))
            .map_err(|e| Fatal::runtime(format!("spawning an accept thread: {e}")))?;
        acceptors.push(acceptor);
    }
    Ok(acceptors)
}

// ---------------------------------------------------------------------------------------------
// Command line and behaviours

struct Args {
    binds: Vec<String>,
    behavior_words: Vec<String>,
    behavior_file: Option<PathBuf>,
}

const USAGE: &str = "\
usage: server [--bind ADDR]... [--behavior WORDS]... [--behavior-file PATH]

Serves HTTP/1.1 on the sockets passed by systemd socket activation (LISTEN_FDS),
or on --bind ADDR (host:port, [v6]:port, unix:/path) when there are none.

Behaviour words: exit-immediately never-ready ignore-term crash-after-ready unhealthy\n  close-sockets daemonize flood-notify=N
                 slow-start=DUR exit-code=N";

impl Args {
    fn parse(raw: impl Iterator<Item = OsString>) -> Result<Args, Fatal> {
        let mut args = Args {
            binds: Vec::new(),
            behavior_words: Vec::new(),
            behavior_file: None,
        };
        let mut raw = raw.map(|a| a.to_string_lossy().into_owned());
        while let Some(arg) = raw.next() {
            // Accept both `--flag value` and `--flag=value`.
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| raw.next())
                    .ok_or_else(|| Fatal::usage(format!("{flag} needs a value\n{USAGE}")))
            };
            match flag.as_str() {
                "--bind" => args.binds.push(value()?),
                "--behavior" => args
                    .behavior_words
                    .extend(value()?.split_whitespace().map(str::to_owned)),
                "--behavior-file" => args.behavior_file = Some(PathBuf::from(value()?)),
                "-h" | "--help" => {
                    say!("{USAGE}");
                    std::process::exit(0);
                }
                _ => {
                    return Err(Fatal::usage(format!(
                        "unexpected argument {arg:?}\n{USAGE}"
                    )));
                }
            }
        }
        Ok(args)
    }
}

/// Fixture behaviours, fixed at start-up.
struct Behavior {
    exit_immediately: bool,
    never_ready: bool,
    ignore_term: bool,
    crash_after_ready: bool,
    unhealthy: bool,
    close_sockets: bool,
    daemonize: bool,
    flood_notify: u32,
    slow_start: Option<Duration>,
    exit_code: u8,
}

impl Behavior {
    /// Combines the `--behavior` words with those in `--behavior-file`, if that file exists now.
    fn load(args: &Args) -> Result<Behavior, Fatal> {
        let mut behavior = Behavior {
            exit_immediately: false,
            never_ready: false,
            ignore_term: false,
            crash_after_ready: false,
            unhealthy: false,
            close_sockets: false,
            daemonize: false,
            flood_notify: 0,
            slow_start: None,
            exit_code: 0,
        };
        for word in &args.behavior_words {
            behavior
                .apply(word)
                .map_err(|e| Fatal::usage(format!("--behavior: {e}")))?;
        }
        if let Some(path) = &args.behavior_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for word in text.split_whitespace() {
                        behavior.apply(word).map_err(|e| {
                            Fatal::usage(format!("behavior file {}: {e}", path.display()))
                        })?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Fatal::usage(format!(
                        "reading behavior file {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(behavior)
    }

    fn apply(&mut self, word: &str) -> Result<(), String> {
        match word.split_once('=') {
            None => match word {
                "exit-immediately" => self.exit_immediately = true,
                "never-ready" => self.never_ready = true,
                "ignore-term" => self.ignore_term = true,
                "crash-after-ready" => self.crash_after_ready = true,
                "unhealthy" => self.unhealthy = true,
                "close-sockets" => self.close_sockets = true,
                "daemonize" => self.daemonize = true,
                _ => return Err(format!("unknown behavior {word:?}")),
            },
            Some(("slow-start", value)) => {
                let delay = parse_duration(value)
                    .ok_or_else(|| format!("bad duration in {word:?} (use e.g. 500ms, 2s, 1m)"))?;
                self.slow_start = Some(delay);
            }
            Some(("flood-notify", value)) => {
                self.flood_notify = value
                    .parse()
                    .map_err(|_| format!("bad count in {word:?}"))?;
            }
            Some(("exit-code", value)) => {
                self.exit_code = value
                    .parse()
                    .map_err(|_| format!("bad exit code in {word:?} (0-255)"))?;
            }
            Some(_) => return Err(format!("unknown behavior {word:?}")),
        }
        Ok(())
    }
}

/// Parses `500ms`, `2s`, `1.5s`, `1m`, `1h`. A unit is required.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    if !number.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

// ---------------------------------------------------------------------------------------------
// Signals and the drain

/// State shared by every thread.
struct Shared {
    pid: u32,
    generation: String,
    /// `/health` answers 503 (the `unhealthy` behaviour).
    unhealthy: bool,
    draining: AtomicBool,
    /// Wake-up pipe. Written once when the drain starts and never read, so from then on its read
    /// end is readable for every poller, whenever it polls: one write wakes all accept loops and
    /// idle connections, and a thread that polls later cannot miss it.
    wake_r: OwnedFd,
    wake_w: OwnedFd,
    /// Connections being served, and a condvar signalled when that reaches zero.
    active: Mutex<usize>,
    all_done: Condvar,
}

impl Shared {
    fn new(pid: u32, generation: String, unhealthy: bool) -> Result<Shared, Fatal> {
        let (wake_r, wake_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Fatal::runtime(format!("creating the wake-up pipe: {e}")))?;
        Ok(Shared {
            pid,
            generation,
            unhealthy,
            draining: AtomicBool::new(false),
            wake_r,
            wake_w,
            active: Mutex::new(0),
            all_done: Condvar::new(),
        })
    }

    /// Waits until the drain starts (true) or `timeout` passes (false).
    fn wait_for_drain(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match wait_readable(self.wake_r.as_fd(), None, left) {
                Ok(Wait::Readable) => return true,
                Ok(_) if left.is_some_and(|l| l.is_zero()) => return false,
                Ok(_) => {}
                Err(e) => {
                    note!("poll on the wake-up pipe: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Waits until every connection thread has finished.
    fn wait_for_connections(&self) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while *active > 0 {
            active = self
                .all_done
                .wait(active)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain; false if it had already started.
    fn start_drain(&self) -> bool {
        if self.draining.swap(true, Ordering::SeqCst) {
            return false;
        }
        say!("draining pid={}", self.pid);
        // One byte, never read: the pipe stays readable for every poller from now on.
        while let Err(e) = nix::unistd::write(&self.wake_w, b"x") {
            if e != Errno::EINTR {
                note!("writing the wake-up pipe: {e}");
                break;
            }
        }
        true
    }
}

/// Resets SIGTERM and SIGINT to their default action and blocks them in this thread (and so in
/// every thread spawned after). They are taken synchronously by `signal_loop`: no handler runs.
fn block_stop_signals() -> Result<SigSet, Fatal> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // A process started in the background by a non-interactive shell inherits SIGINT
        // ignored, and an ignored signal may be discarded instead of left pending for sigwait.
        // SAFETY: installing SIG_DFL registers no handler code, so nothing can run in signal
        // context; no other thread exists yet to race with the change.
        unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) }
            .map_err(|e| Fatal::runtime(format!("resetting {signal}: {e}")))?;
        set.add(signal);
    }
    set.thread_block()
        .map_err(|e| Fatal::runtime(format!("blocking SIGTERM and SIGINT: {e}")))?;
    Ok(set)
}

fn signal_loop(set: SigSet, ignore_term: bool, shared: &Shared) {
    loop {
        match set.wait() {
            // `ignore-term` ignores both stop signals, so SIGKILL is the only way out whichever
            // stop signal grace is configured with.
            Ok(signal) if ignore_term => note!("ignore-term: ignoring {signal}"),
            Ok(signal) => {
                if !shared.start_drain() {
                    note!("already draining; ignoring {signal}");
                }
            }
            Err(e) => {
                note!("sigwait: {e}");
                return;
            }
        }
    }
}

/// Sends `READY=1` to `NOTIFY_SOCKET` if it is set. Failure is reported, not fatal.
fn notify_ready(pid: u32) {
    notify(&format!("READY=1\nMAINPID={pid}"));
}

/// Sends one datagram to `NOTIFY_SOCKET`, if set.
fn notify(message: &str) {
    let Some(target) = env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
        return;
    };
    let sent =
        UnixDatagram::unbound().and_then(|socket| match target.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                let addr = UnixSocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)
            }
            None => socket.send_to(message.as_bytes(), Path::new(&target)),
        });
    if let Err(e) = sent {
        note!(
            "warning: sending {message:?} to NOTIFY_SOCKET={}: {e}",
            target.to_string_lossy()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

struct Listener {
    name: String,
    socket: Socket,
}

impl Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Socket::Tcp(l) => Conn::Tcp(l.accept()?.0),
            Socket::Unix(l) => Conn::Unix(l.accept()?.0),
        })
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(l) => l.set_nonblocking(true),
            Socket::Unix(l) => l.set_nonblocking(true),
        }
    }

    fn describe(&self) -> String {
        match self {
            Socket::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
            Socket::Unix(l) => match l.local_addr() {
                Ok(addr) => describe_unix(&addr),
                Err(e) => format!("?({e})"),
            },
        }
    }
}

fn describe_unix(addr: &UnixSocketAddr) -> String {
    if let Some(path) = addr.as_pathname() {
        format!("unix:{}", path.display())
    } else if let Some(name) = addr.as_abstract_name() {
        format!("unix:@{}", String::from_utf8_lossy(name))
    } else {
        "unix:(unnamed)".to_owned()
    }
}

/// The activated sockets, if `LISTEN_FDS` is set and meant for us.
fn activated_listeners(pid: u32) -> Result<Option<Vec<Listener>>, Fatal> {
    let Some(fds) = activated_fds(pid)? else {
        return Ok(None);
    };
    let listeners: Vec<Listener> = fds
        .into_iter()
        .filter_map(|(fd, name)| adopt_fd(fd, name))
        .collect();
    if listeners.is_empty() {
        return Err(Fatal::runtime(
            "LISTEN_FDS holds no usable listening stream socket",
        ));
    }
    Ok(Some(listeners))
}

/// Binds the `--bind` addresses (used when there is no socket activation).
fn bind_listeners(binds: &[String]) -> Result<Vec<Listener>, Fatal> {
    if binds.is_empty() {
        return Err(Fatal::usage(format!(
            "no listening sockets: LISTEN_FDS is not set (run under grace or systemd) and no \
             --bind ADDR was given\n{USAGE}"
        )));
    }
    let mut listeners = Vec::new();
    for addr in binds {
        let socket = match addr.strip_prefix("unix:") {
            Some(path) => UnixListener::bind(path).map(Socket::Unix),
            None if addr.starts_with('/') => UnixListener::bind(addr).map(Socket::Unix),
            None => TcpListener::bind(addr.as_str()).map(Socket::Tcp),
        }
        .map_err(|e| Fatal::runtime(format!("binding {addr}: {e}")))?;
        socket
            .set_nonblocking()
            .map_err(|e| Fatal::runtime(format!("setting {addr} non-blocking: {e}")))?;
        listeners.push(Listener {
            name: "bind".to_owned(),
            socket,
        });
    }
    Ok(listeners)
}

/// Reads the socket-activation variables: `Some((fd, name)...)` when fds were passed to us.
/// The variables are left in the environment.
fn activated_fds(pid: u32) -> Result<Option<Vec<(RawFd, String)>>, Fatal> {
    const FIRST_FD: RawFd = 3;
    let Ok(count) = env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| Fatal::usage(format!("LISTEN_FDS={count:?} is not a number of fds")))?;
    if count == 0 {
        return Ok(None);
    }
    if let Ok(listen_pid) = env::var("LISTEN_PID")
        && listen_pid.trim().parse::<u32>().ok() != Some(pid)
    {
        note!("LISTEN_PID={listen_pid} is not our pid {pid}: ignoring LISTEN_FDS={count}");
        return Ok(None);
    }
    let names = env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':').filter(|_| !names.is_empty());
    Ok(Some(
        (FIRST_FD..FIRST_FD + count)
            .map(|fd| {
                let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
                (fd, name.to_owned())
            })
            .collect(),
    ))
}

/// Takes ownership of an activated fd if it is a listening stream socket (TCP or Unix);
/// otherwise says why it is skipped.
fn adopt_fd(fd: RawFd, name: String) -> Option<Listener> {
    // SAFETY: F_GETFD only reads the fd's flags; on a number that is not open it fails with
    // EBADF and touches nothing.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        note!("fd {fd} ({name}) from LISTEN_FDS is not open: skipped");
        return None;
    }
    // SAFETY: the socket-activation protocol hands fds 3..3+LISTEN_FDS to this process; we just
    // checked this one is open, and each number is adopted exactly once, so this OwnedFd is its
    // sole owner in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // We start nothing, but keep the usual hygiene: not inherited by anything we might exec.
    // FD_CLOEXEC belongs to this fd only, not to the socket shared with other processes.
    if let Err(e) = fcntl(owned.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        note!("fd {fd} ({name}): setting FD_CLOEXEC: {e}");
    }
    match getsockopt(&owned, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(SockType::Datagram) => {
            note!("fd {fd} ({name}) is a datagram socket: skipped");
            return None;
        }
        Ok(other) => {
            note!("fd {fd} ({name}) is a {other:?} socket, not a stream: skipped");
            return None;
        }
        Err(Errno::ENOTSOCK) => {
            note!("fd {fd} ({name}) is not a socket: skipped");
            return None;
        }
        Err(e) => {
            note!("fd {fd} ({name}): reading SO_TYPE: {e}: skipped");
            return None;
        }
    }
    if getsockopt(&owned, sockopt::AcceptConn) != Ok(true) {
        note!("fd {fd} ({name}) is a stream socket that is not listening: skipped");
        return None;
    }
    let family = getsockname::<SockaddrStorage>(owned.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    let socket = match family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Socket::Tcp(TcpListener::from(owned)),
        Some(AddressFamily::Unix) => Socket::Unix(UnixListener::from(owned)),
        other => {
            note!("fd {fd} ({name}) has address family {other:?}, not TCP or Unix: skipped");
            return None;
        }
    };
    // Non-blocking, because after poll() says "readable" another process sharing the socket
    // (grace's other generation) may take the connection first; a blocking accept() would then
    // hang and could not see the wake-up pipe. O_NONBLOCK lives on the socket's open file
    // description, so this also applies to the other holders; servers built for socket
    // activation (Go, tokio, ...) all set it, and grace itself never accepts on these sockets.
    if let Err(e) = socket.set_nonblocking() {
        note!("fd {fd} ({name}): setting O_NONBLOCK: {e}: skipped");
        return None;
    }
    Some(Listener { name, socket })
}

/// Accepts connections until the drain starts, then closes this process's copy of the listener.
fn accept_loop(listener: Listener, shared: &Arc<Shared>) {
    loop {
        let mut fds = [
            PollFd::new(listener.socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(shared.wake_r.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                note!("poll on listener {}: {e}", listener.name);
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if fds[1].any().unwrap_or(false) {
            break;
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        match listener.socket.accept() {
            Ok(conn) => spawn_connection(conn, shared),
            // Another process sharing the socket took this connection first.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Someone called shutdown() on the shared socket: it accepts nothing any more.
                note!(
                    "listener {} was shut down by another process; no longer accepting",
                    listener.name
                );
                break;
            }
            Err(e) => {
                // Out of fds or memory: back off rather than spin; the connection stays queued.
                note!("accept on listener {}: {e}", listener.name);
                let _ = wait_readable(
                    shared.wake_r.as_fd(),
                    None,
                    Some(Duration::from_millis(100)),
                );
            }
        }
    }
    // Stop accepting by CLOSING our copy of the listening socket, never by shutdown(): the socket
    // is shared with grace and the next generation, and shutdown() acts on the socket itself, so
    // it would stop accepting in every process. Closing only drops our reference; connections
    // still queued on the socket stay there for the next generation to accept.
    drop(listener);
}

fn spawn_connection(conn: Conn, shared: &Arc<Shared>) {
    // Counted before the thread starts, so that once the accept loops have ended the count can
    // only go down. The guard decrements it when the thread ends, even by a panic, or right here
    // if the thread cannot be spawned (the closure, and the guard in it, are then dropped).
    *shared.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let guard = ActiveGuard(Arc::clone(shared));
    let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
        let guard = guard;
        serve_connection(conn, &guard.0);
    });
    if let Err(e) = spawned {
        note!("spawning a connection thread: {e}; dropping the connection");
    }
}

struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut active = self.0.active.lock().unwrap_or_else(|e| e.into_inner());
        *active -= 1;
        if *active == 0 {
            self.0.all_done.notify_all();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }

    fn configure(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }

    fn shutdown_write(&self) {
        // shutdown() on a *connection* is ours alone (unlike on the shared listener).
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, PartialEq)]
enum Wait {
    /// The fd is readable (data, end of file or an error to collect with read).
    Readable,
    /// The wake-up pipe fired: the drain has started.
    Woken,
    TimedOut,
}

/// Waits until `fd` is readable, the optional wake-up fd is readable, or `timeout` passes.
fn wait_readable(
    fd: BorrowedFd<'_>,
    wake: Option<BorrowedFd<'_>>,
    timeout: Option<Duration>,
) -> Result<Wait, Errno> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut fds = vec![PollFd::new(fd, PollFlags::POLLIN)];
        if let Some(wake) = wake {
            fds.push(PollFd::new(wake, PollFlags::POLLIN));
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let poll_timeout = match left {
            None => PollTimeout::NONE,
            Some(left) => {
                // Round up so that we never wake a hair early and spin.
                let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut fds, poll_timeout) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if fds.get(1).is_some_and(|w| w.any().unwrap_or(false)) {
            return Ok(Wait::Woken);
        }
        if fds[0].any().unwrap_or(false) {
            return Ok(Wait::Readable);
        }
        if left.is_some_and(|l| l.is_zero()) {
            return Ok(Wait::TimedOut);
        }
    }
}

/// Reads what is available into `buf`, waiting at most until `deadline`. Ok(0) is end of file.
fn read_some(conn: &mut Conn, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    match wait_readable(conn.as_fd(), None, Some(left))? {
        Wait::Readable => {}
        _ => return Err(io::ErrorKind::TimedOut.into()),
    }
    let mut chunk = [0u8; 8192];
    loop {
        match conn.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Serves requests on one connection until the client closes it, an error, or the drain.
fn serve_connection(mut conn: Conn, shared: &Shared) {
    if let Err(e) = conn.configure() {
        note!("configuring a connection: {e}");
        return;
    }
    // Bytes received but not yet consumed: a request arriving in pieces, or pipelined requests.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Idle between requests: wait for the next one, the idle timeout, or the drain.
        if buf.is_empty() {
            let wake = Some(shared.wake_r.as_fd());
            match wait_readable(conn.as_fd(), wake, Some(IDLE_TIMEOUT)) {
                Ok(Wait::Readable) => {}
                Ok(Wait::Woken) => {
                    // Draining, and this connection is idle. HTTP/1.1 has no way to tell a
                    // client "don't send another request" except a reply with `Connection:
                    // close`, so closing right now races with a request already on its way
                    // (a busy keep-alive client sends the next one the moment it reads a reply)
                    // and that request would fail. So wait a moment: a request that arrives
                    // is served with `Connection: close`; a connection that stays quiet is
                    // closed. The race is not gone, but it only hits a client that sends
                    // exactly as the grace period ends.
                    let grace = Some(DRAIN_IDLE_GRACE);
                    if wait_readable(conn.as_fd(), None, grace) != Ok(Wait::Readable) {
                        return;
                    }
                }
                Ok(Wait::TimedOut) | Err(_) => return,
            }
        }

        // From the first byte on, the request is in progress: it is finished even if the drain
        // starts meanwhile, so only the client or the request timeout can stop it now.
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let head_len = loop {
            // Tolerate blank lines before a request (RFC 9112 section 2.2).
            let blank = buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            buf.drain(..blank);
            if let Some(end) = head_end(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD {
                let reply = Reply::error(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large",
                );
                send_and_close(conn, &reply, None, shared);
                return;
            }
            match read_some(&mut conn, &mut buf, deadline) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        if head_len > MAX_HEAD {
            let reply = Reply::error(
                431,
                "Request Header Fields Too Large",
                "request head too large",
            );
            send_and_close(conn, &reply, None, shared);
            return;
        }
        let request = match Request::parse(&buf[..head_len]) {
            Ok(request) => request,
            Err(why) => {
                send_and_close(conn, &Reply::error(400, "Bad Request", &why), None, shared);
                return;
            }
        };
        buf.drain(..head_len);

        // Bodies mean nothing to our routes; read and discard them to reach the next request.
        if request.chunked {
            let reply = Reply::error(
                501,
                "Not Implemented",
                "chunked request bodies are not supported",
            );
            send_and_close(conn, &reply, Some(&request), shared);
            return;
        }
        if request.content_length > MAX_BODY {
            let reply = Reply::error(413, "Content Too Large", "request body too large");
            send_and_close(conn, &reply, Some(&request), shared);
            return;
        }
        while buf.len() < request.content_length {
            match read_some(&mut conn, &mut buf, deadline) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        buf.drain(..request.content_length);

        let reply = route(&request, shared);
        // Decided after the handler ran, so a request that was in progress when the drain
        // started (a long /sleep, say) tells its client that this connection is closing.
        let keep_alive = request.keep_alive && !shared.is_draining();
        if !keep_alive {
            send_and_close(conn, &reply, Some(&request), shared);
            return;
        }
        if conn
            .write_all(&reply.encode(Some(&request), true, shared.pid))
            .is_err()
        {
            return;
        }
    }
}

/// Writes a final reply (with `Connection: close`) and closes the connection gracefully.
fn send_and_close(mut conn: Conn, reply: &Reply, request: Option<&Request>, shared: &Shared) {
    if conn
        .write_all(&reply.encode(request, false, shared.pid))
        .is_ok()
    {
        close_gracefully(conn);
    }
}

/// Closes after a final reply without losing it: closing a socket that still has unread input
/// makes the kernel send RST, which can destroy the reply before the client reads it. So send
/// FIN (shutdown of *this connection's* write side), then read and discard until the client
/// closes too, for a bounded time.
fn close_gracefully(mut conn: Conn) {
    conn.shutdown_write();
    let deadline = Instant::now() + LINGER;
    let mut discarded = Vec::new();
    while discarded.len() < MAX_BODY {
        match read_some(&mut conn, &mut discarded, deadline) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Index just past the blank line that ends a request head, if it has arrived.
/// Lines end in CRLF; a bare LF is accepted too.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &byte) in buf.iter().enumerate() {
        if byte == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Request {
    method: String,
    target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    keep_alive: bool,
    content_length: usize,
    chunked: bool,
}

impl Request {
    fn parse(head: &[u8]) -> Result<Request, String> {
        let head = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_owned())?;
        let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("malformed request line {request_line:?}"));
        };
        if method.is_empty() || !method.bytes().all(is_token_byte) {
            return Err(format!("bad method {method:?}"));
        }
        if target.is_empty() || target.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!("bad request target {target:?}"));
        }
        let minor = match version {
            "HTTP/1.1" => 1,
            "HTTP/1.0" => 0,
            _ => return Err(format!("unsupported version {version:?}")),
        };

        let mut close = false;
        let mut keep_alive_token = false;
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        for line in lines.take_while(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(':') else {
                return Err(format!("malformed header line {line:?}"));
            };
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(format!("bad header name {name:?}"));
            }
            let value = value.trim_matches([' ', '\t']);
            if name.eq_ignore_ascii_case("connection") {
                for option in value.split(',').map(str::trim) {
                    close |= option.eq_ignore_ascii_case("close");
                    keep_alive_token |= option.eq_ignore_ascii_case("keep-alive");
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let length = value
                    .parse::<usize>()
                    .ok()
                    .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("bad Content-Length {value:?}"))?;
                if content_length.is_some_and(|l| l != length) {
                    return Err("conflicting Content-Length headers".to_owned());
                }
                content_length = Some(length);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        Ok(Request {
            method: method.to_owned(),
            target: target.to_owned(),
            minor,
            // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes unless asked
            // to keep it (as `ab -k` does).
            keep_alive: !close && (minor == 1 || keep_alive_token),
            content_length: content_length.unwrap_or(0),
            chunked,
        })
    }
}

/// RFC 9110 token characters (methods, header names).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

struct Reply {
    status: u16,
    reason: &'static str,
    body: String,
    extra: Vec<(&'static str, &'static str)>,
}

impl Reply {
    fn ok(body: String) -> Reply {
        Reply {
            status: 200,
            reason: "OK",
            body,
            extra: Vec::new(),
        }
    }

    fn error(status: u16, reason: &'static str, detail: &str) -> Reply {
        Reply {
            status,
            reason,
            body: format!("{detail}\n"),
            extra: Vec::new(),
        }
    }

    fn encode(&self, request: Option<&Request>, keep_alive: bool, pid: u32) -> Vec<u8> {
        let mut head = String::new();
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nX-Pid: {pid}\r\n",
            self.status,
            self.reason,
            self.body.len()
        );
        for (name, value) in &self.extra {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        } else if request.is_some_and(|r| r.minor == 0) {
            head.push_str("Connection: keep-alive\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if request.is_none_or(|r| r.method != "HEAD") {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

fn route(request: &Request, shared: &Shared) -> Reply {
    // A request may name the full URL (absolute form, as sent to proxies); keep only its path.
    let target = ["http://", "https://"]
        .iter()
        .find_map(|scheme| request.target.strip_prefix(scheme))
        .map_or(request.target.as_str(), |rest| {
            rest.find('/').map_or("/", |slash| &rest[slash..])
        });
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let known = matches!(path, "/" | "/sleep" | "/health" | "/pid");
    if !known {
        return Reply::error(404, "Not Found", "not found");
    }
    if request.method != "GET" && request.method != "HEAD" {
        let mut reply = Reply::error(405, "Method Not Allowed", "method not allowed");
        reply.extra.push(("Allow", "GET, HEAD"));
        return reply;
    }
    let (pid, generation) = (shared.pid, &shared.generation);
    match path {
        "/" => Reply::ok(format!("hello from pid={pid} generation={generation}\n")),
        "/health" if shared.unhealthy => Reply::error(503, "Service Unavailable", "unhealthy"),
        "/health" => Reply::ok("ok\n".to_owned()),
        "/pid" => Reply::ok(format!("{pid}\n")),
        _ => {
            let Some(text) = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("duration="))
            else {
                return Reply::error(
                    400,
                    "Bad Request",
                    "missing ?duration= (e.g. 500ms, 2s, 1m)",
                );
            };
            let Some(duration) = parse_duration(text) else {
                return Reply::error(
                    400,
                    "Bad Request",
                    &format!("bad duration {text:?} (e.g. 500ms, 2s, 1m)"),
                );
            };
            thread::sleep(duration);
            Reply::ok(format!("slept {text} pid={pid} generation={generation}\n"))
        }
    }
}
