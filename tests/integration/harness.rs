//! A small harness around the real `grace` binary: start it, read its log lines, poll with
//! deadlines, and dump everything when an assertion fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A port that was free a moment ago (for a server that needs the number before it starts).
/// Picked below the kernel's ephemeral range: a port from that range (what binding port 0 gives)
/// can be taken meanwhile as the source port of any test's client connection.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    // Never the same port twice in this process: tests running at once each get their own.
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let free = |port: u16| {
        let in_use =
            |r: std::io::Result<()>| r.is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse);
        TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            // The dual-stack address of `--listen :PORT`, where the machine has IPv6.
            && !in_use(TcpListener::bind(("::", port)).map(drop))
    };
    loop {
        // A random start (the standard hasher's keys are random), so that test processes running
        // at once do not walk the same ports.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let port = from + (hasher.finish() % u64::from(to - from)) as u16;
        if !given.contains(&port) && free(port) {
            given.push(port);
            return port;
        }
    }
}

/// `path`, which Debian's `package` installs (`.ci/deps` does); a clear failure if it is missing.
pub fn require(path: &str, package: &str) -> &'static str {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's {package} package (.ci/deps does)"
    );
    path.to_string().leak()
}

/// The grace under test: the one cargo built, or `GRACE_TEST_BIN` (CI runs part of the suite on
/// the static musl build that way).
pub fn grace_bin() -> PathBuf {
    std::env::var_os("GRACE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_grace")))
}

/// A binary built from `examples/` (cargo test builds them next to the test binaries).
pub fn example(name: &str) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_grace"));
    let path = built.parent().unwrap().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples`",
        path.display()
    );
    path
}

/// A fresh directory for one test, removed with everything in it when dropped (also when the
/// test fails).
pub fn temp_dir(tag: &str) -> TempDir {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("grace-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

#[derive(Debug)]
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A process killed a moment ago may still have been writing here: a file that appears
        // while the tree is removed fails the removal, so try again for a little while.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir_all(&self.0).is_err() && self.0.exists() {
            if Instant::now() > deadline {
                eprintln!("could not remove {}", self.0.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a thread of `pid` sleeps: the example server's `/sleep` request, on a thread of its
/// own (nothing else in it sleeps while it serves), so a request is known to be in flight.
pub fn sleeping(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("wchan")).is_ok_and(|w| w.contains("nanosleep"))
    })
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Grace {
    pub child: Child,
    pub args: Vec<String>,
    lines: Arc<Mutex<Vec<String>>>,
    status: Option<ExitStatus>,
    /// Directories it uses, removed after it was stopped.
    dirs: Vec<TempDir>,
}

impl Grace {
    /// Starts `grace <args>` with stdout and stderr collected line by line.
    pub fn start(args: &[&str]) -> Grace {
        Self::start_with(args, |_| {})
    }

    pub fn start_with(args: &[&str], tweak: impl FnOnce(&mut Command)) -> Grace {
        Self::spawn(Command::new(grace_bin()), args, tweak)
    }

    /// grace running the example server on a loopback port with `extra` options, once the first
    /// generation serves.
    pub fn serve(extra: &[&str]) -> Grace {
        let server = example("server");
        let mut args = vec!["run", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        args.extend(["--", server.to_str().unwrap()]);
        let grace = Grace::start(&args);
        grace.wait_line(") is serving", Duration::from_secs(20));
        grace
    }

    /// grace running the fault server on a loopback port with `--control PATH`, once it serves.
    pub fn serve_with_control(control: &std::path::Path) -> Grace {
        let server = example("fault_server");
        let grace = Grace::start(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
            "--",
            server.to_str().unwrap(),
        ]);
        grace.wait_line(") is serving", Duration::from_secs(20));
        grace
    }

    /// grace as PID 1 of a new PID namespace (`unshare --pid --fork --mount-proc`, and `--net`
    /// when `own_net`) on unix socket `sock`, once it serves; with grace's pid as seen from here.
    pub fn as_pid1(sock: &str, own_net: bool) -> (Grace, i32) {
        let server = example("fault_server");
        let grace = grace_bin();
        let mut args = vec!["--pid", "--fork", "--mount-proc"];
        if own_net {
            args.push("--net");
        }
        args.extend([grace.to_str().unwrap(), "run", "--listen", sock, "--"]);
        args.push(server.to_str().unwrap());
        let run = Grace::start_raw("/usr/bin/unshare", &args);
        run.wait_line(") is serving", Duration::from_secs(20));
        let init = wait_for(
            "grace inside the namespace",
            Duration::from_secs(20),
            || run.children().first().copied(),
        );
        (run, init)
    }

    /// grace on `listen` with the example server, once it serves; its output if it exits first
    /// (the address is taken, say).
    pub fn serve_on(listen: &str) -> Result<Grace, String> {
        let server = example("server");
        let mut grace = Grace::start(&["run", "--listen", listen, "--", server.to_str().unwrap()]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if grace.count_lines(") is serving") > 0 {
                return Ok(grace);
            }
            if let Some(status) = grace.child.try_wait().unwrap() {
                grace.status = Some(status);
                return Err(grace.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("grace neither served nor exited\n{}", grace.describe());
    }

    /// Runs another program (e.g. `unshare … grace run …`) with the same collection of output.
    pub fn start_raw(program: &str, args: &[&str]) -> Grace {
        Self::spawn(Command::new(program), args, |_| {})
    }

    /// Runs a prepared command (its arguments already set) with the same collection of output.
    pub fn from_command(cmd: Command) -> Grace {
        Self::spawn(cmd, &[], |_| {})
    }

    fn spawn(mut cmd: Command, args: &[&str], tweak: impl FnOnce(&mut Command)) -> Grace {
        cmd.args(args)
            .env("GRACE_LOG", "debug")
            // The tests' own switches, not something a server should see.
            .env_remove("GRACE_TEST_BIN")
            .env_remove("GRACE_REQUIRE_DOCKER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tweak(&mut cmd);
        // A binary a test has just written can be "busy" for a moment: another test thread may
        // fork while the write fd is open, and its child holds that fd until it execs.
        let mut child = (0..100)
            .find_map(|_| match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(Duration::from_millis(10));
                    None
                }
                other => Some(other),
            })
            .expect("the binary stayed busy")
            .expect("starting grace");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Grace {
            child,
            args: args.iter().map(|s| s.to_string()).collect(),
            lines,
            status: None,
            dirs: Vec::new(),
        }
    }

    /// Keeps `dir` until this grace is dropped (stopped first, then the directory removed).
    pub fn owning(mut self, dir: TempDir) -> Grace {
        self.dirs.push(dir);
        self
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line containing `needle` after `skip` lines, waiting up to `timeout`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_line_count(needle, 1, timeout)
    }

    /// Waits until `count` lines contain `needle`; returns the last of them.
    pub fn wait_line_count(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                let hits: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
                if hits.len() >= count {
                    return hits[count - 1].clone();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {count}x {needle:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pids of the generations grace reported as serving, in order.
    pub fn serving_pids(&self) -> Vec<i32> {
        self.output()
            .lines()
            .filter(|l| l.contains(") is serving"))
            .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
            .collect()
    }

    pub fn count_lines(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The TCP addresses grace logged as bound, in order.
    pub fn tcp_addrs(&self, n: usize) -> Vec<SocketAddr> {
        self.wait_line_count("listening on ", n, Duration::from_secs(10));
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| l.split("listening on tcp ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    }

    pub fn addr(&self) -> SocketAddr {
        let addr = self.tcp_addrs(1)[0];
        if addr.ip().is_unspecified() {
            SocketAddr::new("127.0.0.1".parse().unwrap(), addr.port())
        } else {
            addr
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for grace to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                // Let the reader threads catch the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return s;
            }
            if Instant::now() > deadline {
                panic!("grace did not exit within {timeout:?}\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "--- grace {:?} (pid {}) output:\n{}\n---",
            self.args,
            self.pid(),
            self.output()
        )
    }

    /// Children of grace (direct), from /proc.
    pub fn children(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Grace {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Kill the whole tree: grace first so it cannot restart anything, then its children.
            let kids = descendants(self.pid());
            let _ = self.child.kill();
            let _ = self.child.wait();
            for k in kids {
                let _ = Command::new("kill").arg("-9").arg(k.to_string()).status();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let path = format!("/proc/{pid}/task/{pid}/children");
    if let Ok(text) = std::fs::read_to_string(path) {
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    out
}

pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for c in children_of(p) {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

/// `Z` for zombies etc.: the state letter in /proc/PID/stat.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

pub fn alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// One HTTP/1.1 request on a new connection; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad reply {buf:?}"))?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

/// Polls until a request is answered by a process other than `old`, and returns its pid. Right
/// after a handover the old generation may still accept a few connections before it has closed
/// its copy of the socket, so one request is not enough to tell.
pub fn served_by_other(addr: SocketAddr, old: i32) -> i32 {
    wait_for(
        &format!("a process other than {old} to answer"),
        Duration::from_secs(10),
        || {
            let pid = served_by(&http_get(addr, "/").ok()?.1);
            (pid != old && pid != 0).then_some(pid)
        },
    )
}

/// The pid from the example server's reply `hello from pid=N generation=G`.
pub fn served_by(body: &str) -> i32 {
    body.split("pid=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Puts `contents` at `path` for something to execute later. The write happens in a `cp` process:
/// a file this (multi-threaded) test process had open for writing could be inherited by a child
/// another test forks meanwhile, and executing it would then fail with "Text file busy".
pub fn install(path: &std::path::Path, contents: &[u8]) {
    let source = path.with_extension("source");
    std::fs::write(&source, contents).unwrap();
    let status = Command::new("cp").arg(&source).arg(path).status().unwrap();
    assert!(status.success(), "cp to {}", path.display());
    std::fs::remove_file(&source).unwrap();
}

/// Copies an executable the same way as [`install`].
pub fn install_copy(from: &std::path::Path, to: &std::path::Path) {
    let status = Command::new("cp").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}
