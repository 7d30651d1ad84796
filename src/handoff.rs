//! The versioned record one grace image hands to the next across `execve`.
//!
//! It travels in the `GRACE_HANDOFF` environment variable of the new image only (it is never
//! passed on to a server), as lines of space-separated fields; strings are percent-encoded so that
//! no field can contain a space or a newline. A new field may be added to a version as long as the
//! decoder skips unknown keys; anything that changes the meaning of an existing one needs a new
//! version. Before re-executing, the old image runs the new binary with its own arguments and
//! `GRACE_HANDOFF_CHECK=1`: the binary parses them, prints the versions it can adopt, and exits.

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::path::Path;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::supervisor::{Cause, GenState, Generation, Millis, Outcome, Phase, Supervisor};
use crate::sys::now;

pub const VERSION: u32 = 1;
/// Versions this binary can adopt.
pub const READABLE: &[u32] = &[1];
pub const ENV: &str = "GRACE_HANDOFF";
/// Set for the check run of a new binary (see the module documentation).
pub const CHECK_ENV: &str = "GRACE_HANDOFF_CHECK";

/// A socket that survives the re-exec, by fd number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketRecord {
    pub fd: i32,
    pub stream: bool,
    pub name: String,
    pub local: String,
    pub spec: String,
    pub unix_path: Option<String>,
}

/// A control socket (`--control PATH` or the abstract one), by fd number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRecord {
    pub fd: i32,
    pub display: String,
    pub path: Option<String>,
}

/// A `grace restart` client waiting for the outcome of restart number `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub fd: i32,
    pub target: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub next_gen: u64,
    pub current: Option<u64>,
    pub pending_restart: bool,
    pub seen_notify: bool,
    pub crashes: Vec<Millis>,
    pub exit_code: i32,
    pub gens: Vec<Generation>,
    pub last_outcome: Option<Outcome>,
    pub sockets: Vec<SocketRecord>,
    pub notify_fd: i32,
    pub notify_name: String,
    /// Restarts started so far (each re-exec is one).
    pub restarts: u64,
    pub controls: Vec<ControlRecord>,
    pub clients: Vec<ClientRecord>,
    /// The memfd of grace's socket library (`--inject`), which running generations load by its
    /// fd number.
    pub preload_fd: Option<i32>,
}

impl Record {
    pub fn capture(
        sup: &Supervisor,
        sockets: Vec<SocketRecord>,
        notify_fd: i32,
        notify_name: String,
    ) -> Self {
        Self {
            next_gen: sup.next_gen,
            current: sup.current,
            pending_restart: sup.pending_restart,
            seen_notify: sup.seen_notify,
            crashes: sup.crashes.clone(),
            exit_code: sup.exit_code,
            gens: sup.gens.clone(),
            last_outcome: sup.last_outcome.clone(),
            sockets,
            notify_fd,
            notify_name,
            restarts: 0,
            controls: Vec::new(),
            clients: Vec::new(),
            preload_fd: None,
        }
    }

    /// Puts the state into a supervisor built from this image's command line. The restart that
    /// caused the re-exec goes on: the phase is `ReExec` until [`crate::supervisor::Event::Adopted`].
    pub fn restore(&self, sup: &mut Supervisor) {
        sup.next_gen = self.next_gen;
        sup.current = self.current;
        sup.pending_restart = self.pending_restart;
        sup.seen_notify = self.seen_notify;
        sup.crashes = self.crashes.clone();
        sup.exit_code = self.exit_code;
        sup.gens = self.gens.clone();
        sup.last_outcome = self.last_outcome.clone();
        sup.phase = Phase::ReExec;
    }

    pub fn encode(&self) -> String {
        let mut s = format!("grace-handoff {VERSION}\n");
        let _ = writeln!(s, "next_gen {}", self.next_gen);
        if let Some(c) = self.current {
            let _ = writeln!(s, "current {c}");
        }
        let _ = writeln!(s, "pending_restart {}", u8::from(self.pending_restart));
        let _ = writeln!(s, "seen_notify {}", u8::from(self.seen_notify));
        for t in &self.crashes {
            let _ = writeln!(s, "crash {t}");
        }
        let _ = writeln!(s, "exit_code {}", self.exit_code);
        for g in &self.gens {
            let state = match &g.state {
                GenState::Starting { deadline, alive_at } => {
                    format!(
                        "starting {deadline} {}",
                        opt(alive_at.map(|t| t.to_string()))
                    )
                }
                GenState::Ready => "ready - -".to_string(),
                GenState::Draining { kill_at, killed } => {
                    format!("draining {kill_at} {}", u8::from(*killed))
                }
            };
            let leader = opt(g.leader_status.map(|c| c.to_string()));
            let _ = writeln!(
                s,
                "generation {} {} {} {leader} {state}",
                g.id, g.pid, g.started
            );
        }
        match &self.last_outcome {
            Some(Outcome::Ready {
                generation,
                pid,
                cause,
            }) => {
                let cause = match cause {
                    Cause::Initial => "initial",
                    Cause::Restart => "restart",
                    Cause::Crash => "crash",
                };
                let _ = writeln!(s, "outcome ready {generation} {pid} {cause}");
            }
            Some(Outcome::RolledBack { generation, reason }) => {
                let _ = writeln!(s, "outcome rolled_back {generation} {}", esc(reason));
            }
            Some(Outcome::Failed { reason }) => {
                let _ = writeln!(s, "outcome failed {}", esc(reason));
            }
            None => {}
        }
        for k in &self.sockets {
            let _ = writeln!(
                s,
                "socket {} {} {} {} {} {}",
                k.fd,
                if k.stream { "stream" } else { "dgram" },
                esc(&k.name),
                esc(&k.local),
                esc(&k.spec),
                opt(k.unix_path.as_deref().map(esc)),
            );
        }
        let _ = writeln!(s, "notify {} {}", self.notify_fd, esc(&self.notify_name));
        let _ = writeln!(s, "restarts {}", self.restarts);
        for c in &self.controls {
            let path = opt(c.path.as_deref().map(esc));
            let _ = writeln!(s, "control {} {} {path}", c.fd, esc(&c.display));
        }
        for c in &self.clients {
            let _ = writeln!(s, "client {} {}", c.fd, c.target);
        }
        if let Some(fd) = self.preload_fd {
            let _ = writeln!(s, "preload {fd}");
        }
        s
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default();
        let version = header
            .strip_prefix("grace-handoff ")
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| format!("handoff record: bad header {header:?}"))?;
        if !READABLE.contains(&version) {
            return Err(format!(
                "handoff record version {version} is not supported (this grace reads {READABLE:?})"
            ));
        }
        let mut r = Record {
            next_gen: 1,
            current: None,
            pending_restart: false,
            seen_notify: false,
            crashes: Vec::new(),
            exit_code: 0,
            gens: Vec::new(),
            last_outcome: None,
            sockets: Vec::new(),
            notify_fd: -1,
            notify_name: String::new(),
            restarts: 0,
            controls: Vec::new(),
            clients: Vec::new(),
            preload_fd: None,
        };
        for line in lines {
            let f: Vec<&str> = line.split(' ').collect();
            let bad = || format!("handoff record: bad line {line:?}");
            let num = |i: usize| -> Result<u64, String> {
                f.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad)
            };
            let int = |i: usize| -> Result<i32, String> {
                f.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad)
            };
            let text = |i: usize| -> Result<String, String> {
                f.get(i).and_then(|v| unesc(v)).ok_or_else(bad)
            };
            match f[0] {
                "next_gen" => r.next_gen = num(1)?,
                "current" => r.current = Some(num(1)?),
                "pending_restart" => r.pending_restart = num(1)? == 1,
                "seen_notify" => r.seen_notify = num(1)? == 1,
                "crash" => r.crashes.push(num(1)?),
                "exit_code" => r.exit_code = int(1)?,
                "generation" => {
                    let state = match f.get(5).copied() {
                        Some("starting") => GenState::Starting {
                            deadline: num(6)?,
                            alive_at: if f.get(7) == Some(&"-") {
                                None
                            } else {
                                Some(num(7)?)
                            },
                        },
                        Some("ready") => GenState::Ready,
                        Some("draining") => GenState::Draining {
                            kill_at: num(6)?,
                            killed: num(7)? == 1,
                        },
                        _ => return Err(bad()),
                    };
                    r.gens.push(Generation {
                        id: num(1)?,
                        pid: int(2)?,
                        started: num(3)?,
                        leader_status: if f.get(4) == Some(&"-") {
                            None
                        } else {
                            Some(int(4)?)
                        },
                        state,
                    });
                }
                "outcome" => {
                    r.last_outcome = Some(match f.get(1).copied() {
                        Some("ready") => Outcome::Ready {
                            generation: num(2)?,
                            pid: int(3)?,
                            cause: match f.get(4).copied() {
                                Some("initial") => Cause::Initial,
                                Some("crash") => Cause::Crash,
                                _ => Cause::Restart,
                            },
                        },
                        Some("rolled_back") => Outcome::RolledBack {
                            generation: num(2)?,
                            reason: text(3)?,
                        },
                        Some("failed") => Outcome::Failed { reason: text(2)? },
                        _ => return Err(bad()),
                    })
                }
                "socket" => r.sockets.push(SocketRecord {
                    fd: int(1)?,
                    stream: f.get(2) == Some(&"stream"),
                    name: text(3)?,
                    local: text(4)?,
                    spec: text(5)?,
                    unix_path: if f.get(6) == Some(&"-") {
                        None
                    } else {
                        Some(text(6)?)
                    },
                }),
                "notify" => {
                    r.notify_fd = int(1)?;
                    r.notify_name = text(2)?;
                }
                "restarts" => r.restarts = num(1)?,
                "control" => r.controls.push(ControlRecord {
                    fd: int(1)?,
                    display: text(2)?,
                    path: if f.get(3) == Some(&"-") {
                        None
                    } else {
                        Some(text(3)?)
                    },
                }),
                "client" => r.clients.push(ClientRecord {
                    fd: int(1)?,
                    target: num(2)?,
                }),
                "preload" => r.preload_fd = Some(int(1)?),
                // A key added by a newer image of the same version: not ours to interpret.
                _ => {}
            }
        }
        if r.notify_fd < 0 {
            return Err("handoff record: no notify socket".to_string());
        }
        Ok(r)
    }
}

fn opt(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".to_string())
}

/// Percent-encodes everything but unreserved printable ASCII; `-` alone means "none", so a
/// literal `-` is encoded too.
fn esc(text: &str) -> String {
    if text.is_empty() {
        return "%".to_string();
    }
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_graphic() && b != b'%' && b != b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn unesc(text: &str) -> Option<String> {
    if text == "%" {
        return Some(String::new());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Asks the binary on disk which handoff versions it reads, before betting the process on it.
/// It runs with this process's own arguments, so a new binary that would not accept them is
/// refused here too rather than after the `execve`, when the generations would be orphaned. A
/// binary that hangs is given [`CHECK_TIMEOUT`].
pub fn check_new_binary(exe: &Path) -> Result<(), String> {
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHECK_ENV, "1")
        .env_remove(ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    // Wait for its answer, bounded: the pipes close when it exits. (No sleep-and-poll of the
    // child: that added most of a millisecond to every restart.)
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("the handoff check has no pipes".into());
    };
    let mut out = Pipe::new(stdout);
    let mut err = Pipe::new(stderr);
    let deadline = now() + CHECK_TIMEOUT;
    while out.open || err.open {
        let left = deadline.saturating_sub(now());
        let mut fds: Vec<PollFd> = [(out.open, out.fd()), (err.open, err.fd())]
            .into_iter()
            .filter(|(open, _)| *open)
            .map(|(_, fd)| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO),
        );
        drop(fds);
        if left == 0 || matches!(ready, Ok(0)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} did not answer the handoff check",
                exe.display()
            ));
        }
        // Non-blocking reads: whichever pipe is ready gives data or end-of-file.
        out.read_some();
        err.read_some();
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the handoff check: {e}"))?;
    let (out, err) = (out.text, err.text);
    let readable = out.split_whitespace().any(|v| v == VERSION.to_string());
    if status.success() && readable {
        return Ok(());
    }
    match err.lines().next() {
        Some(line) if !status.success() => Err(format!(
            "{} refuses this command line: {line}",
            exe.display()
        )),
        _ => Err(format!(
            "{} cannot adopt handoff version {} (it reads {:?})",
            exe.display(),
            VERSION,
            out.trim()
        )),
    }
}

/// One output pipe of the handoff check, read without blocking.
struct Pipe<R> {
    reader: R,
    text: String,
    open: bool,
}

impl<R: std::io::Read + AsFd> Pipe<R> {
    fn new(reader: R) -> Self {
        // A pipe that is not ready must not stall grace.
        let _ = nix::fcntl::fcntl(
            reader.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        Self {
            reader,
            text: String::new(),
            open: true,
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.reader.as_fd()
    }

    fn read_some(&mut self) {
        if !self.open {
            return;
        }
        let mut buf = [0u8; 4096];
        match self.reader.read(&mut buf) {
            Ok(0) => self.open = false,
            Ok(n) => self.text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.open = false,
        }
    }
}

/// How long the new binary may take to answer the handoff check.
const CHECK_TIMEOUT: Millis = 5_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            next_gen: 5,
            current: Some(4),
            pending_restart: true,
            seen_notify: true,
            crashes: vec![100, 2_000],
            exit_code: 3,
            gens: vec![
                Generation {
                    id: 3,
                    pid: 1200,
                    state: GenState::Draining {
                        kill_at: 9_000,
                        killed: false,
                    },
                    started: 10,
                    leader_status: Some(0),
                },
                Generation {
                    id: 4,
                    pid: 1300,
                    state: GenState::Ready,
                    started: 20,
                    leader_status: None,
                },
                Generation {
                    id: 5,
                    pid: 1400,
                    state: GenState::Starting {
                        deadline: 99,
                        alive_at: None,
                    },
                    started: 30,
                    leader_status: None,
                },
            ],
            last_outcome: Some(Outcome::RolledBack {
                generation: 2,
                reason: "exited with status 3 - 100% sure\nnext".into(),
            }),
            sockets: vec![
                SocketRecord {
                    fd: 4,
                    stream: true,
                    name: "http".into(),
                    local: "tcp [::]:8080".into(),
                    spec: "http=:8080".into(),
                    unix_path: None,
                },
                SocketRecord {
                    fd: 5,
                    stream: false,
                    name: "".into(),
                    local: "unix /tmp/a b.sock".into(),
                    spec: "-".into(),
                    unix_path: Some("/tmp/a b.sock".into()),
                },
            ],
            notify_fd: 6,
            notify_name: "@grace/1/notify".into(),
            restarts: 9,
            controls: vec![
                ControlRecord {
                    fd: 7,
                    display: "@grace/control/1".into(),
                    path: None,
                },
                ControlRecord {
                    fd: 8,
                    display: "/run/grace ctl.sock".into(),
                    path: Some("/run/grace ctl.sock".into()),
                },
            ],
            clients: vec![ClientRecord { fd: 9, target: 10 }],
            preload_fd: Some(11),
        }
    }

    #[test]
    fn round_trip() {
        let record = sample();
        let text = record.encode();
        assert!(text.starts_with("grace-handoff 1\n"));
        assert!(!text.contains("a b"), "spaces must be escaped: {text}");
        assert!(text.contains("\npreload 11\n"), "{text}");
        assert_eq!(Record::decode(&text), Ok(record));
        let without = Record {
            preload_fd: None,
            ..sample()
        };
        assert!(!without.encode().contains("preload"));
        assert_eq!(Record::decode(&without.encode()), Ok(without));
    }

    #[test]
    fn every_outcome_round_trips() {
        for outcome in [
            Outcome::Ready {
                generation: 7,
                pid: 77,
                cause: Cause::Crash,
            },
            Outcome::Ready {
                generation: 1,
                pid: 2,
                cause: Cause::Initial,
            },
            Outcome::Failed {
                reason: "grace binary missing".into(),
            },
        ] {
            let record = Record {
                last_outcome: Some(outcome),
                ..sample()
            };
            assert_eq!(Record::decode(&record.encode()), Ok(record));
        }
    }

    #[test]
    fn refuses_unknown_versions() {
        let text = sample()
            .encode()
            .replacen("grace-handoff 1", "grace-handoff 2", 1);
        let err = Record::decode(&text).unwrap_err();
        assert!(err.contains("version 2 is not supported"), "{err}");
        assert!(Record::decode("hello").unwrap_err().contains("bad header"));
    }

    #[test]
    fn skips_unknown_keys_but_not_malformed_ones() {
        let text = sample().encode() + "future_key 1 2 3\n";
        assert_eq!(Record::decode(&text), Ok(sample()));
        let text = sample().encode() + "generation x\n";
        assert!(Record::decode(&text).unwrap_err().contains("bad line"));
    }
}
