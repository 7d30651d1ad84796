//! grace as PID 1 of a real Docker container. Each test starts a `dockerd` of its own (a private
//! socket, data root, exec root, mount namespace and cgroup parent; no iptables rules, bridge or
//! forwarding), builds a `FROM scratch` image of the static (musl) grace and example server from
//! the final stage of `examples/docker/Dockerfile`, and runs the README's sequence under load with
//! every failed request counted. The engine is stopped by its pid, even on a panic.
//!
//! Where no engine can run (`dockerd` missing, or not starting) a test says so in one line and
//! passes; with `GRACE_REQUIRE_DOCKER=1` (CI, where `.ci/deps` installs docker.io) it fails.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{
    TempDir, children_of, http_get, require, served_by, sleeping, temp_dir, wait_for,
};
use crate::load::Load;

const T: Duration = Duration::from_secs(20);

/// Debian's engine (docker.io), named in full: `/usr/local/bin/docker` may come first in PATH,
/// and on this project's machines it is another client (Docker's static 28.x CLI) with no daemon.
const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
/// What dockerd finds its containerd, runc and shims in: Debian's, whatever else PATH has.
const ENGINE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

const MUSL: &str = "x86_64-unknown-linux-musl";

/// The engine of test `test` (its directory named after `tag`), or `None` (after one line on
/// stderr) where none can run here.
fn engine_or_skip(test: &str, tag: &str) -> Option<Engine> {
    let required = std::env::var("GRACE_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let why = match [DOCKERD, DOCKER].iter().find(|p| !Path::new(p).exists()) {
        Some(missing) => {
            format!("{missing} is missing (Debian's docker.io; .ci/deps installs it)")
        }
        None => match Engine::start(tag) {
            Ok(engine) => return Some(engine),
            Err(why) => why,
        },
    };
    assert!(!required, "GRACE_REQUIRE_DOCKER=1, but {why}");
    // One line: the reason, and the last of dockerd's log lines that says what went wrong, when
    // they follow it. Straight to stderr, past the test harness's capture (of eprintln!).
    let mut lines = why.lines();
    let reason = lines.next().unwrap_or_default();
    let log: Vec<&str> = lines.collect();
    let last = log
        .iter()
        .rev()
        .find(|l| {
            ["error", "fatal", "fail", "unknown"]
                .iter()
                .any(|w| l.contains(w))
        })
        .or(log.last())
        .map(|l| format!(" {l}"))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "skipping docker::{test}: no Docker engine can run here: {reason}{last}"
    );
    None
}

/// A private `dockerd`. Its mount namespace is its own (`unshare --mount`), with an empty `/run`
/// and `/etc/docker`, so its mounts (the data root, every container's overlay), containerd's
/// shim sockets, its plugin directory and its key file leave no trace outside and vanish with
/// it. Containers go under a cgroup parent of its own, removed at the end.
struct Engine {
    /// Removed when the engine is dropped, after dockerd (`shut_down` removes it first, to say
    /// what could not be).
    dir: TempDir,
    daemon: Child,
    socket: PathBuf,
    cgroup_parent: String,
    /// dockerd's mount namespace, to find whatever is left in it once dockerd is gone.
    mount_ns: String,
    stopped: bool,
}

impl Engine {
    fn start(tag: &str) -> Result<Engine, String> {
        let unshare = require("/usr/bin/unshare", "util-linux");
        let dir = temp_dir(&format!("docker-{tag}"));
        let socket = dir.join("docker.sock");
        let cgroup_parent = dir.file_name().unwrap().to_str().unwrap().to_string();
        // Nothing of the host's daemon.json applies.
        std::fs::write(dir.join("daemon.json"), "{}").unwrap();
        let log = File::create(dir.join("dockerd.log")).unwrap();
        let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
        let mut cmd = Command::new(unshare);
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(concat!(
                "mount -t tmpfs -o mode=0755 grace-test /run && ",
                "{ [ ! -d /etc/docker ] || mount -t tmpfs -o mode=0755 grace-test /etc/docker; } && ",
                r#"exec "$0" "$@""#
            ))
            .arg(DOCKERD)
            .args(["--config-file", &path("daemon.json")])
            .args(["--data-root", &path("data")])
            .args(["--exec-root", &path("exec")])
            .args(["--pidfile", &path("dockerd.pid")])
            .args(["--host", &format!("unix://{}", socket.display())])
            // No network of its own: containers run with `--network none` here, and nothing of
            // the host's (iptables, docker0, ip_forward) changes.
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--ip-forward=false", "--ip-masq=false"])
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args(["--cgroup-parent", &format!("/{cgroup_parent}")])
            .env("PATH", ENGINE_PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: between fork and exec, one async-signal-safe system call. If the thread of the
        // test dies without its Drop (the process killed), dockerd gets SIGTERM and cleans up.
        unsafe {
            cmd.pre_exec(|| {
                nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM);
                Ok(())
            });
        }
        let daemon = cmd
            .spawn()
            .map_err(|e| format!("starting {DOCKERD}: {e}"))?;
        let mut engine = Engine {
            dir,
            daemon,
            socket,
            cgroup_parent,
            mount_ns: String::new(),
            stopped: false,
        };
        // unshare and sh exec in turn: the pid spawned is dockerd's, and the engine answers
        // once it has set everything up (its containerd, its mounts).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine.answers() {
            if let Ok(Some(status)) = engine.daemon.try_wait() {
                let why = format!("dockerd exited ({status}):\n{}", engine.log_tail());
                engine.stopped = true;
                let _ = std::fs::remove_dir_all(&engine.dir);
                return Err(why);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd did not answer within 60s:\n{}",
                    engine.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = engine.daemon.id();
        let written = std::fs::read_to_string(engine.dir.join("dockerd.pid")).unwrap_or_default();
        assert_eq!(
            written.trim(),
            pid.to_string(),
            "the pid spawned is dockerd's"
        );
        engine.mount_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .unwrap()
            .display()
            .to_string();
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        assert_ne!(
            engine.mount_ns,
            ours.display().to_string(),
            "dockerd has its own mounts"
        );
        Ok(engine)
    }

    /// `GET /_ping` on the engine's socket answers `OK`.
    fn answers(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reply = String::new();
        s.write_all(b"GET /_ping HTTP/1.0\r\n\r\n").is_ok()
            && s.read_to_string(&mut reply).is_ok()
            && reply.starts_with("HTTP/1.")
            && reply.ends_with("OK")
    }

    /// `docker ARGS` on this engine, with a client configuration of its own.
    fn docker(&self, args: &[&str]) -> Output {
        self.docker_with_input(args, &[])
    }

    fn docker_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new(DOCKER)
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    /// `docker ARGS`, which must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?}: {}", shown(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops dockerd by its pid and removes everything it made; what was left behind, if anything.
    fn shut_down(&mut self) -> Vec<String> {
        self.stopped = true;
        let mut left = Vec::new();
        let pid = nix::unistd::Pid::from_raw(self.daemon.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        // dockerd stops any container still running (15s each at most), then containerd.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.daemon.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                left.push(format!(
                    "dockerd (pid {pid}) ignored SIGTERM for 30s: killed"
                ));
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever still runs in its mount namespace is its own (a shim, a container).
        let strays = wait_until_none(|| in_mount_ns(&self.mount_ns), Duration::from_secs(10));
        if !strays.is_empty() {
            left.push(format!(
                "processes left in dockerd's mount namespace: {strays:?}"
            ));
            for p in &strays {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            wait_until_none(|| in_mount_ns(&self.mount_ns), Duration::from_secs(10));
        }
        // The cgroup parent, in every hierarchy (its containers' cgroups went with them).
        let groups = wait_until_none(
            || {
                cgroup_mounts()
                    .into_iter()
                    .map(|m| m.join(&self.cgroup_parent))
                    .filter(|g| g.exists() && std::fs::remove_dir(g).is_err())
                    .collect()
            },
            Duration::from_secs(10),
        );
        left.extend(
            groups
                .iter()
                .map(|g| format!("cgroup {} not removable", g.display())),
        );
        let mounts = mounts_under(&self.dir);
        if mounts.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                left.push(format!("removing {}: {e}", self.dir.display()));
            }
        } else {
            left.push(format!(
                "mounts left under {}: {mounts:?}",
                self.dir.display()
            ));
        }
        left
    }

    /// The normal end: nothing may be left behind.
    fn finish(mut self) {
        let left = self.shut_down();
        assert!(left.is_empty(), "{left:#?}");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.stopped {
            if std::thread::panicking() {
                eprintln!("--- dockerd's last lines:\n{}\n---", self.log_tail());
            }
            for what in self.shut_down() {
                eprintln!("docker engine clean-up: {what}");
            }
        }
    }
}

/// Polls `f` until it returns nothing, for up to `timeout`; what it returned last.
fn wait_until_none<T>(mut f: impl FnMut() -> Vec<T>, timeout: Duration) -> Vec<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = f();
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes in mount namespace `ns` (as `readlink /proc/PID/ns/mnt` shows it).
fn in_mount_ns(ns: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                .is_ok_and(|link| link.display().to_string() == ns)
        })
        .collect()
}

/// (field 5 of /proc/self/mountinfo is the mount point; field 9, after `-`, the type.)
fn mountinfo() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some((fields[4].to_string(), fields.get(dash + 1)?.to_string()))
        })
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    mountinfo()
        .into_iter()
        .map(|(point, _)| point)
        .filter(|point| Path::new(point).starts_with(dir))
        .collect()
}

fn cgroup_mounts() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|(_, kind)| kind == "cgroup" || kind == "cgroup2")
        .map(|(point, _)| PathBuf::from(point))
        .collect()
}

fn shown(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The static grace, example server and server that binds its own port (musl), built here into
/// the suite's own target directory.
/// `.ci/run` builds them before `cargo test`, so that there this is a no-op: a first build (LTO)
/// takes a minute of both cores, which the tests running beside this one would feel. With
/// `.ci/deps && cargo test` alone it happens here, once. (`GRACE_TEST_BIN` may be a dynamically
/// linked grace, of no use in an image with nothing else: it does not apply.)
fn static_binaries() -> StaticBinaries {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_grace"));
    let target_dir = built
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .expect("the target directory (with CACHEDIR.TAG) above the grace under test");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            MUSL,
            "--bin",
            "grace",
            "--example",
            "server",
            "--example",
            "bind_server",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the static binaries (`rustup target add {MUSL}` if the target is missing; \
         .ci/deps does): {}",
        shown(&out)
    );
    let release = target_dir.join(MUSL).join("release");
    let binaries = StaticBinaries {
        grace: release.join("grace"),
        server: release.join("examples/server"),
        bind_server: release.join("examples/bind_server"),
    };
    for binary in [&binaries.grace, &binaries.server, &binaries.bind_server] {
        assert!(
            !has_interpreter(binary),
            "{} needs a dynamic loader, which a FROM scratch image lacks",
            binary.display()
        );
    }
    binaries
}

struct StaticBinaries {
    grace: PathBuf,
    server: PathBuf,
    bind_server: PathBuf,
}

/// Whether an ELF executable names a program interpreter (`PT_INTERP`, the dynamic loader).
/// A static (or static-pie) one has none, and the kernel runs it as it is.
fn has_interpreter(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).unwrap();
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entry_size, entries) = (u16_at(0x36), u16_at(0x38));
    (0..entries).any(|i| {
        let at = phoff + i * entry_size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

fn user_dockerfile() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/docker/Dockerfile");
    std::fs::read_to_string(path).unwrap()
}

/// The stages of a Dockerfile, each from its `FROM` line (comments before the first dropped).
fn stages(dockerfile: &str) -> Vec<String> {
    let mut stages: Vec<String> = Vec::new();
    for line in dockerfile.lines() {
        if line.to_ascii_uppercase().starts_with("FROM ") {
            stages.push(String::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push_str(line);
            stage.push('\n');
        }
    }
    stages
}

/// The `COPY --from=build SOURCE DEST` lines of a stage, as (source, dest).
fn copies_from_build(stage: &str) -> Vec<(String, String)> {
    stage
        .lines()
        .filter_map(|l| l.strip_prefix("COPY --from=build "))
        .map(|rest| {
            let (source, dest) = rest.split_once(' ').expect("COPY --from=build SOURCE DEST");
            (source.to_string(), dest.trim().to_string())
        })
        .collect()
}

/// The Dockerfile this test builds: `examples/docker/Dockerfile` with its build stage (a Rust
/// image, which cannot be pulled here) replaced by one holding the binaries built outside at the
/// same paths; its final stage verbatim, so that what is tested is what users build.
fn stand_in_dockerfile() -> String {
    let user = user_dockerfile();
    let stages = stages(&user);
    let last = stages.last().expect("a FROM line");
    let mut text = String::from("FROM scratch AS build\n");
    for (source, _) in copies_from_build(last) {
        let built = match source.rsplit('/').next() {
            Some("grace") => "grace",
            Some("server") => "server",
            _ => panic!("the final stage copies {source}, which this test does not build"),
        };
        text.push_str(&format!("COPY {built} {source}\n"));
    }
    text.push('\n');
    text.push_str(last);
    text
}

/// The user-facing Dockerfile keeps two stages: a build of the static binaries, where the final
/// stage finds them, and an image of nothing else with grace as its entry point.
#[test]
fn the_dockerfile_builds_static_binaries_for_a_scratch_image() {
    let user = user_dockerfile();
    let stages = stages(&user);
    assert_eq!(stages.len(), 2, "a build stage and a final one:\n{user}");
    let (build, last) = (&stages[0], &stages[1]);
    assert!(
        build.lines().next().unwrap().ends_with(" AS build"),
        "{build}"
    );
    assert!(
        build.contains(&format!("rustup target add {MUSL}")),
        "{build}"
    );
    assert!(
        build.contains(&format!("cargo build --release --target {MUSL}")),
        "{build}"
    );
    assert_eq!(last.lines().next(), Some("FROM scratch"), "{last}");
    let copies = copies_from_build(last);
    let release = format!("/src/target/{MUSL}/release/");
    let mut sources: Vec<&str> = copies.iter().map(|(s, _)| s.as_str()).collect();
    sources.sort_unstable();
    assert_eq!(
        sources,
        [
            format!("{release}examples/server"),
            format!("{release}grace")
        ],
        "the build stage's outputs, and no others"
    );
    for line in [
        r#"ENTRYPOINT ["grace", "run", "--listen", ":8080", "--drain-timeout", "20s", "--"]"#,
        r#"CMD ["grace-demo-server"]"#,
        "STOPSIGNAL SIGTERM",
    ] {
        assert!(last.lines().any(|l| l == line), "{line} in\n{last}");
    }
    // Under `docker stop -t 25` (the README's), the drain has time to finish.
    assert!(user.contains("docker stop -t 25 demo"), "{user}");
    let stand_in = stand_in_dockerfile();
    assert!(stand_in.ends_with(last.as_str()), "{stand_in}");
}

/// A container's network namespace (`--network none`: a loopback of its own), entered by the
/// threads that talk to its server. setns applies to one thread, and the threads it starts
/// inherit it: the load's clients reach the container's own 127.0.0.1, and no traffic leaves
/// loopback, while the test itself stays outside.
struct Netns(File);

impl Netns {
    fn of(pid: i32) -> Netns {
        Netns(File::open(format!("/proc/{pid}/ns/net")).unwrap())
    }

    fn spawn<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> JoinHandle<R> {
        let ns = self.0.try_clone().unwrap();
        std::thread::spawn(move || {
            // SAFETY: a plain system call on a descriptor we own; it moves this thread only.
            let rc = unsafe { nix::libc::setns(ns.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.spawn(f).join().unwrap()
    }
}

/// `grace status --json` inside the container.
fn status(engine: &Engine) -> serde_json::Value {
    let out = engine.ok(&["exec", "demo", "grace", "status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The current generation and its pid (inside the container).
fn current(engine: &Engine) -> (u64, i32) {
    let status = status(engine);
    let current = &status["current"];
    let pid = current["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{status}"));
    (current["generation"].as_u64().unwrap(), pid as i32)
}

/// The host's pid of the container process whose pid inside is `inner`, a child of grace.
fn host_pid(grace: i32, inner: i32) -> Option<i32> {
    children_of(grace).into_iter().find(|child| {
        std::fs::read_to_string(format!("/proc/{child}/status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|ids| ids.split_whitespace().last()?.parse::<i32>().ok())
                == Some(inner)
        })
    })
}

/// Prints the container's output if the test fails while it exists.
struct Logs<'a>(&'a Engine);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = self.0.docker(&["logs", "demo"]);
            eprintln!("--- docker logs demo:\n{}\n---", shown(&out));
        }
    }
}

/// A container named `demo` of `image`, serving on its own 127.0.0.1:8080.
struct Demo<'a> {
    logs: Logs<'a>,
    /// The host's pid of grace, the container's PID 1.
    grace: i32,
    netns: Netns,
    addr: SocketAddr,
    /// The pid (inside) that answered first.
    first: i32,
}

impl<'a> Demo<'a> {
    /// `docker run -d --name demo --network none IMAGE`, until its first answer. The README
    /// publishes the port (`-p 8080:8080`); this engine has no bridge to do that through, and
    /// the clients join the container's network namespace instead.
    fn run(engine: &'a Engine, image: &str) -> Demo<'a> {
        engine.ok(&["run", "-d", "--name", "demo", "--network", "none", image]);
        let logs = Logs(engine);
        // 0 once the container has exited.
        let grace: i32 = engine
            .ok(&["inspect", "-f", "{{.State.Pid}}", "demo"])
            .trim()
            .parse()
            .unwrap();
        assert!(grace > 0, "the container exited at once");
        let netns = Netns::of(grace);
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let first = netns.run(move || {
            wait_for("the first generation to answer", T, || {
                let (status, body) = http_get(addr, "/").ok()?;
                (status == 200).then(|| served_by(&body))
            })
        });
        Demo {
            logs,
            grace,
            netns,
            addr,
            first,
        }
    }
}

/// The README's sequence against a container of the image users build, with grace as its PID 1:
/// `docker run`, `docker kill -s USR2`, `docker exec … grace restart` (exit 0, a new pid), a
/// broken release it rolls back (exit 1, the old pid serving), `grace status`, then
/// `docker stop -t 25`, which finishes a request in flight and ends with status 0. No request
/// fails throughout.
#[test]
fn the_readme_sequence_in_a_real_container_loses_no_request() {
    let Some(engine) = engine_or_skip(
        "the_readme_sequence_in_a_real_container_loses_no_request",
        "readme",
    ) else {
        return;
    };
    let built = static_binaries();
    let context = engine.dir.join("image");
    std::fs::create_dir(&context).unwrap();
    std::fs::copy(&built.grace, context.join("grace")).unwrap();
    std::fs::copy(&built.server, context.join("server")).unwrap();
    std::fs::write(context.join("Dockerfile"), stand_in_dockerfile()).unwrap();
    engine.ok(&["build", "-t", "grace-demo", context.to_str().unwrap()]);

    let Demo {
        logs,
        grace,
        netns,
        addr,
        first,
    } = Demo::run(&engine, "grace-demo");
    let status0 = status(&engine);
    assert_eq!(
        status0["pid"], 1,
        "grace is the container's PID 1: {status0}"
    );
    assert_eq!(current(&engine), (1, first), "{status0}");

    let load = netns.run(move || Load::start(addr, 4, "/"));
    load.wait_more(100, T);

    engine.ok(&["kill", "-s", "USR2", "demo"]);
    let (_, second) = wait_for("generation 2 after docker kill -s USR2", T, || {
        let (generation, pid) = current(&engine);
        (generation == 2).then_some((generation, pid))
    });
    assert_ne!(second, first, "a new process");
    load.wait_more(100, T);

    let restarted = engine.ok(&["exec", "demo", "grace", "restart"]);
    let third = current(&engine);
    assert_eq!(third.0, 3, "{restarted}");
    assert!(
        restarted.contains(&format!("generation 3 (pid {})", third.1)),
        "{restarted}"
    );
    assert!(third.1 != second && third.1 != first, "{restarted}");
    load.wait_more(100, T);

    // A broken release: the next generation cannot start, grace rolls back, the old one serves.
    let broken = engine.dir.join("broken");
    std::fs::write(&broken, "not a program\n").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = "demo:/usr/local/bin/grace-demo-server";
    engine.ok(&["cp", broken.to_str().unwrap(), target]);
    let refused = engine.docker(&["exec", "demo", "grace", "restart"]);
    assert_eq!(refused.status.code(), Some(1), "{}", shown(&refused));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("restart failed"), "{said}");
    let after = status(&engine);
    assert_eq!(after["current"]["pid"], third.1, "{after}");
    assert_ne!(after["last_restart"]["result"], "ok", "{after}");
    load.wait_more(100, T);

    let text = engine.ok(&["exec", "demo", "grace", "status"]);
    assert!(text.starts_with("grace (pid 1): running"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("pid {}", third.1)) && l.contains("(current)")),
        "{text}"
    );

    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{} of {} requests failed: {:?}",
        tally.failed,
        tally.failed + tally.ok,
        &tally.errors[..tally.errors.len().min(10)]
    );
    for pid in [first, second, third.1] {
        assert!(
            tally.pids.contains(&pid),
            "generation pid {pid} served: {:?}",
            tally.pids
        );
    }

    // `docker stop -t 25`: SIGTERM to grace, which drains the request in flight and exits 0
    // long before Docker's SIGKILL.
    let server = host_pid(grace, third.1).expect("the current generation, seen from the host");
    let slow = netns.spawn(move || http_get(addr, "/sleep?duration=3s"));
    wait_for("the slow request to be in the server", T, || {
        sleeping(server).then_some(())
    });
    assert!(!slow.is_finished(), "still in flight when the stop begins");
    let started = Instant::now();
    engine.ok(&["stop", "-t", "25", "demo"]);
    let took = started.elapsed();
    let (code, body) = slow
        .join()
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!((code, served_by(&body)), (200, third.1), "{body}");
    let exit = engine.ok(&["inspect", "-f", "{{.State.ExitCode}}", "demo"]);
    assert_eq!(exit.trim(), "0", "the container's exit status");
    assert!(took < Duration::from_secs(10), "docker stop took {took:?}");

    drop(logs);
    engine.ok(&["rm", "demo"]);
    engine.finish();
}

/// A server that binds its own port, in a container with Docker's defaults (root without
/// CAP_SYS_ADMIN or CAP_SYS_PTRACE, Docker's seccomp profile): grace installs its filter with
/// no_new_privs, says so, and substitutes the bind; three restarts under load (two `docker kill
/// -s USR2`, one `docker exec … grace restart`) lose no request and each brings a new process.
#[test]
fn a_server_that_binds_its_port_is_substituted_in_a_container() {
    let Some(engine) = engine_or_skip(
        "a_server_that_binds_its_port_is_substituted_in_a_container",
        "bind",
    ) else {
        return;
    };
    let built = static_binaries();
    let context = engine.dir.join("image");
    std::fs::create_dir(&context).unwrap();
    std::fs::copy(&built.grace, context.join("grace")).unwrap();
    std::fs::copy(&built.bind_server, context.join("bind-server")).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM scratch\n\
         COPY grace /usr/local/bin/grace\n\
         COPY bind-server /usr/local/bin/bind-server\n\
         ENTRYPOINT [\"grace\", \"run\", \"--listen\", \"127.0.0.1:8080\", \"--\"]\n\
         CMD [\"bind-server\", \"127.0.0.1:8080\"]\n",
    )
    .unwrap();
    engine.ok(&["build", "-t", "grace-bind", context.to_str().unwrap()]);
    let Demo {
        logs,
        netns,
        addr,
        first,
        ..
    } = Demo::run(&engine, "grace-bind");
    // Answering before grace's readiness check has passed: current once it has.
    wait_for("generation 1 to be current", T, || {
        (status(&engine)["current"]["generation"] == 1).then_some(())
    });
    assert_eq!(current(&engine), (1, first));
    // bind_server ignores LISTEN_FDS and binds the port itself, and exits 1 if that fails: it
    // serves only because its bind got grace's socket.
    let said = shown(&engine.docker(&["logs", "demo"]));
    assert!(said.contains("no_new_privs"), "{said}");
    assert!(!said.contains("cannot be substituted"), "{said}");

    let load = netns.run(move || Load::start(addr, 4, "/"));
    load.wait_more(100, T);
    let mut pids = vec![first];
    for n in 2..=4u64 {
        if n == 4 {
            engine.ok(&["exec", "demo", "grace", "restart"]);
        } else {
            engine.ok(&["kill", "-s", "USR2", "demo"]);
        }
        let (_, pid) = wait_for(&format!("generation {n}"), T, || {
            let (generation, pid) = current(&engine);
            (generation == n).then_some((generation, pid))
        });
        assert!(!pids.contains(&pid), "a new process: {pid} after {pids:?}");
        pids.push(pid);
        netns.run(move || {
            wait_for(&format!("generation {n} to answer"), T, || {
                let (_, body) = http_get(addr, "/").ok()?;
                (served_by(&body) == pid).then_some(())
            })
        });
        load.wait_more(100, T);
    }
    let tally = load.finish();
    assert_eq!(
        tally.failed,
        0,
        "{} of {} requests failed: {:?}",
        tally.failed,
        tally.failed + tally.ok,
        &tally.errors[..tally.errors.len().min(10)]
    );
    for pid in &pids {
        assert!(
            tally.pids.contains(pid),
            "pid {pid} served: {:?}",
            tally.pids
        );
    }
    engine.ok(&["stop", "-t", "25", "demo"]);
    let exit = engine.ok(&["inspect", "-f", "{{.State.ExitCode}}", "demo"]);
    assert_eq!(exit.trim(), "0", "the container's exit status");
    drop(logs);
    engine.ok(&["rm", "demo"]);
    engine.finish();
}

/// `.dockerignore` keeps the build's output and version control out of the context of
/// `docker build .`, and every file of the repository in it (the build stage copies them all).
#[test]
fn the_build_context_has_the_sources_without_target_or_git() {
    let Some(engine) = engine_or_skip(
        "the_build_context_has_the_sources_without_target_or_git",
        "context",
    ) else {
        return;
    };
    let repo = env!("CARGO_MANIFEST_DIR");
    let built = engine.docker_with_input(
        &["build", "-t", "context", "-f", "-", repo],
        b"FROM scratch\nCOPY . /context/\n",
    );
    assert!(built.status.success(), "{}", shown(&built));
    engine.ok(&["create", "--name", "context", "context", "/none"]);
    let tar = engine.dir.join("context.tar");
    engine.ok(&["export", "-o", tar.to_str().unwrap(), "context"]);
    let listed = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    assert!(listed.status.success(), "{}", shown(&listed));
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("context/"))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    for name in &names {
        let top = name.split('/').next().unwrap();
        assert!(top != "target" && top != ".git", "{name} is in the context");
    }
    // Every file git knows that is here (a fresh clone has them all).
    let tracked = Command::new("git")
        .args(["-C", repo, "ls-files", "-z"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let mut expected: Vec<&str> = tracked.split('\0').filter(|f| !f.is_empty()).collect();
    expected.extend([
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "examples/server.rs",
    ]);
    for file in expected {
        if Path::new(repo).join(file).exists() {
            assert!(
                names.iter().any(|n| n == file),
                "{file} is not in the context"
            );
        }
    }
    engine.ok(&["rm", "context"]);
    engine.finish();
}
