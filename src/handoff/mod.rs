//! The versioned record one grace image hands to the next across `execve`.
//!
//! It travels in the `GRACE_HANDOFF` environment variable of the new image only (it is never
//! passed on to a server), as lines of space-separated fields (`fields.rs`). It holds the
//! supervisor's whole state and one `fd` line per descriptor that survives the exec, with the
//! [`Role`] that says what it is. A new field may be added to a version as long as the decoder
//! skips unknown keys; anything that changes the meaning of an existing one needs a new version.
//! The new image checks the record against the system ([`Record::validate`]) before it trusts any
//! of it: a record that names pid -1 must not become `kill(-1, SIGTERM)`.
//!
//! Before re-executing, the old image runs the new binary with its own arguments and
//! `GRACE_HANDOFF_CHECK=1` ([`check::check_new_binary`]): the binary parses them, prints the
//! versions it can adopt, and exits.

mod check;

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::fields::{Fields, esc, opt, opt_text};
pub use check::check_new_binary;

use crate::listen::{Local, SocketKind};
use crate::steer::{GroupRecord, Member};
use crate::supervisor::{ClientId, GenId, Millis, STATE_KEYS, State};

/// Version 3: the supervisor's whole state, one `fd` line per descriptor with its role, and one
/// `group` line per steered listener (version 2 had no steered sockets: its listeners are
/// adopted as shared ones).
pub const VERSION: u32 = 4;
/// Versions this binary can adopt.
pub const READABLE: &[u32] = &[2, 3, 4];
pub const ENV: &str = "GRACE_HANDOFF";
/// Set for the check run of a new binary (see the module documentation).
pub const CHECK_ENV: &str = "GRACE_HANDOFF_CHECK";

/// What a descriptor that survives the exec is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A `--listen` socket.
    Listener {
        kind: SocketKind,
        name: String,
        local: Local,
        spec: String,
        /// A socket file grace created, removed at final exit.
        unix_path: Option<PathBuf>,
    },
    /// The `NOTIFY_SOCKET` of every generation.
    Notify { name: String },
    /// A control socket.
    Control {
        display: String,
        path: Option<PathBuf>,
    },
    /// A connected control client: its request so far and the deadline for the rest; none once
    /// its request went to the supervisor (a `grace restart` waiting for the outcome).
    Client {
        id: ClientId,
        partial: String,
        deadline: Option<Millis>,
    },
    /// The memfd of the preload library a grace before seccomp substitution gave its generations
    /// (`LD_PRELOAD=/proc/PID/fd/N`): never made now, but kept open and carried on, so that what
    /// those generations still exec can load it.
    Library,
    /// A pidfd of a generation's leader.
    Pidfd { pid: i32 },
    /// A generation's own socket in the reuseport group of listener number `listener`.
    Member {
        listener: usize,
        owner: Option<GenId>,
    },
    /// The notification descriptor of a generation's `bind` filter (bind substitution).
    Filter { generation: GenId },
}

/// One descriptor that survives the exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub fd: i32,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    pub fds: Vec<Carried>,
    /// The steered listeners' groups.
    pub groups: Vec<GroupRecord>,
}

impl Record {
    pub fn encode(&self) -> String {
        let mut s = format!("grace-handoff {VERSION}\n");
        self.state.encode(&mut s);
        for Carried { fd, role } in &self.fds {
            let role = match role {
                Role::Listener {
                    kind,
                    name,
                    local,
                    spec,
                    unix_path,
                } => format!(
                    "listener {kind} {} {} {} {}",
                    esc(name),
                    esc(&local.to_string()),
                    esc(spec),
                    opt_text(unix_path.as_ref().and_then(|p| p.to_str()))
                ),
                Role::Notify { name } => format!("notify {}", esc(name)),
                Role::Control { display, path } => format!(
                    "control {} {}",
                    esc(display),
                    opt_text(path.as_ref().and_then(|p| p.to_str()))
                ),
                Role::Client {
                    id,
                    partial,
                    deadline,
                } => format!("client {id} {} {}", esc(partial), opt(*deadline)),
                Role::Library => "library".to_string(),
                Role::Pidfd { pid } => format!("pidfd {pid}"),
                Role::Member { listener, owner } => format!("member {listener} {}", opt(*owner)),
                Role::Filter { generation } => format!("filter {generation}"),
            };
            let _ = writeln!(s, "fd {fd} {role}");
        }
        for g in &self.groups {
            let members: Vec<String> = g
                .members
                .iter()
                .map(|m| match m {
                    Member::Ours(i) => format!("o{i}"),
                    Member::Foreign(i) => format!("f{i}"),
                })
                .collect();
            let _ = writeln!(
                s,
                "group {} {} {} {}",
                g.listener,
                g.target,
                opt(g.target_owner),
                members.join(",")
            );
        }
        s
    }

    /// Parses a record; it is not to be trusted until [`Record::validate`] passed.
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
        let mut state_lines = Vec::new();
        let mut fds = Vec::new();
        let mut groups = Vec::new();
        for line in lines {
            let f = Fields::new(line);
            match f.key() {
                key if STATE_KEYS.contains(&key) => state_lines.push(f),
                "fd" => fds.push(Carried {
                    fd: f.num(1)?,
                    role: role_of(&f)?,
                }),
                "group" => groups.push(group_of(&f)?),
                // A key added by a newer image of the same version: not ours to interpret.
                _ => {}
            }
        }
        Ok(Record {
            state: State::decode(state_lines)?,
            fds,
            groups,
        })
    }

    /// Checks the record against this process before anything in it is used: it was written
    /// in the middle of a re-exec; every generation's pid is > 1 and not grace's own, and one
    /// whose leader has not been reaped is a child of this process (asked of the kernel, not of
    /// `/proc`); every fd is ≥ 3, named once, open, not one this image opened itself (`own`), and
    /// of the kind its role says; there is one notify socket; pidfds, clients and waiting clients
    /// are named once and belong to what the record names.
    pub fn validate(&self, own: &[i32]) -> Result<(), String> {
        let refuse = |why: String| Err(format!("handoff record refused: {why}"));
        self.state.check().or_else(refuse)?;
        if !self.state.mid_reexec() {
            return refuse("it was not written during a re-exec".into());
        }
        let me = std::process::id() as i32;
        let own_group = nix::unistd::getpgrp().as_raw();
        let pids: Vec<(u64, i32, bool)> = self.state.pids().collect();
        for &(generation, pid, leader_alive) in &pids {
            if pid <= 1 || pid == me || pid == own_group {
                return refuse(format!("generation {generation} names pid {pid}"));
            }
            if leader_alive && !crate::sys::is_child(pid) {
                return refuse(format!(
                    "generation {generation}'s pid {pid} is not a child of this process"
                ));
            }
        }
        let mut seen = Vec::new();
        for c in &self.fds {
            if c.fd < 3 {
                return refuse(format!("fd {} is below 3", c.fd));
            }
            if seen.contains(&c.fd) {
                return refuse(format!("fd {} is named twice", c.fd));
            }
            seen.push(c.fd);
            if own.contains(&c.fd) {
                return refuse(format!("fd {} is one this image opened itself", c.fd));
            }
            if !crate::sys::fd_is_open(c.fd) {
                return refuse(format!("fd {} is not open", c.fd));
            }
            let kind = crate::sys::fd_kind(c.fd)
                .map_err(|e| format!("handoff record refused: fd {}: {e}", c.fd))?;
            if !fits(&c.role, kind) {
                return refuse(format!("fd {} is not {}", c.fd, what(&c.role)));
            }
        }
        let notify = self
            .fds
            .iter()
            .filter(|c| matches!(c.role, Role::Notify { .. }))
            .count();
        if notify != 1 {
            return refuse(format!("{notify} notify sockets (expected 1)"));
        }
        let mut pidfd_pids = Vec::new();
        let mut clients: Vec<ClientId> = Vec::new();
        for c in &self.fds {
            match c.role {
                Role::Pidfd { pid } => {
                    if !pids.iter().any(|&(_, p, _)| p == pid) {
                        return refuse(format!(
                            "pidfd {} is for pid {pid}, not a generation",
                            c.fd
                        ));
                    }
                    if pidfd_pids.contains(&pid) {
                        return refuse(format!("two pidfds for pid {pid}"));
                    }
                    pidfd_pids.push(pid);
                }
                Role::Client { id, deadline, .. } => {
                    if clients.contains(&id) {
                        return refuse(format!("client {id} is named twice"));
                    }
                    // A client past its request waits for a restart's outcome.
                    if deadline.is_none() && !self.state.clients().any(|w| w == id) {
                        return refuse(format!("client {id} waits for nothing"));
                    }
                    clients.push(id);
                }
                _ => {}
            }
        }
        if let Some(id) = self.state.clients().find(|id| !clients.contains(id)) {
            return refuse(format!("waiting client {id} has no fd"));
        }
        // Steered sockets: each belongs to a listener of its kind that has a group, named once.
        let listeners: Vec<&Role> = self
            .fds
            .iter()
            .map(|c| &c.role)
            .filter(|r| matches!(r, Role::Listener { .. }))
            .collect();
        let mut grouped = Vec::new();
        for g in &self.groups {
            if g.listener >= listeners.len() || grouped.contains(&g.listener) {
                return refuse(format!("a group for listener {}", g.listener));
            }
            grouped.push(g.listener);
        }
        for c in &self.fds {
            if let Role::Member { listener, .. } = c.role {
                let Some(Role::Listener { .. }) = listeners.get(listener) else {
                    return refuse(format!("fd {} is a member of no listener", c.fd));
                };
                let kind = crate::sys::fd_kind(c.fd)
                    .map_err(|e| format!("handoff record refused: fd {}: {e}", c.fd))?;
                // A member may have stopped listening: a server's shutdown(2) takes its own
                // socket out of the group (it is closed once its generation is gone).
                let stopped = match kind {
                    crate::sys::FdKind::Socket { family, stream, .. } => {
                        crate::sys::FdKind::Socket {
                            family,
                            stream,
                            listening: true,
                        }
                    }
                    other => other,
                };
                if !grouped.contains(&listener) || !fits(listeners[listener], stopped) {
                    return refuse(format!(
                        "fd {} is not a member of listener {listener}",
                        c.fd
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether an fd of this kind can play `role`.
fn fits(role: &Role, kind: crate::sys::FdKind) -> bool {
    use crate::sys::FdKind::{Pidfd, RegularFile, SeccompNotify, Socket};
    const UNIX: i32 = nix::libc::AF_UNIX;
    match (role, kind) {
        (
            Role::Listener {
                kind: SocketKind::Stream,
                ..
            },
            Socket {
                stream: true,
                listening,
                ..
            },
        ) => listening,
        (
            Role::Listener {
                kind: SocketKind::Datagram,
                ..
            },
            Socket { stream: false, .. },
        ) => true,
        (
            Role::Notify { .. },
            Socket {
                family,
                stream: false,
                ..
            },
        ) => family == UNIX,
        (
            Role::Control { .. },
            Socket {
                family,
                stream: true,
                listening: true,
            },
        ) => family == UNIX,
        (
            Role::Client { .. },
            Socket {
                family,
                stream: true,
                listening: false,
            },
        ) => family == UNIX,
        (Role::Library, RegularFile) => true,
        (Role::Pidfd { .. }, Pidfd) => true,
        (Role::Filter { .. }, SeccompNotify) => true,
        // Checked against its listener's kind.
        (Role::Member { .. }, Socket { .. }) => true,
        _ => false,
    }
}

fn what(role: &Role) -> &'static str {
    match role {
        Role::Listener {
            kind: SocketKind::Stream,
            ..
        } => "a listening stream socket",
        Role::Listener { .. } => "a datagram socket",
        Role::Notify { .. } => "a unix datagram socket",
        Role::Control { .. } => "a listening unix stream socket",
        Role::Client { .. } => "a connected unix stream socket",
        Role::Library => "a regular file",
        Role::Pidfd { .. } => "a pidfd",
        Role::Member { .. } => "a socket",
        Role::Filter { .. } => "a seccomp notification descriptor",
    }
}

/// Leaves out the generations whose leader was reaped and of which nothing can be found
/// (`remains(generation, pgid)` says): their group id could be anyone's by now.
impl Record {
    pub fn drop_unreachable_generations(&mut self, remains: impl Fn(u64, i32) -> bool) -> Vec<u64> {
        self.state
            .retain_gens(|id, pid, leader_alive| leader_alive || remains(id, pid))
    }
}

fn role_of(f: &Fields<'_>) -> Result<Role, String> {
    let path =
        |i: usize| -> Result<Option<PathBuf>, String> { Ok(f.opt_text(i)?.map(PathBuf::from)) };
    Ok(match f.word(2)? {
        "listener" => Role::Listener {
            kind: f.word(3)?.parse().map_err(|_| f.bad())?,
            name: f.text(4)?,
            local: f.text(5)?.parse().map_err(|_| f.bad())?,
            spec: f.text(6)?,
            unix_path: path(7)?,
        },
        "notify" => Role::Notify { name: f.text(3)? },
        "control" => Role::Control {
            display: f.text(3)?,
            path: path(4)?,
        },
        "client" => Role::Client {
            id: f.num(3)?,
            partial: f.text(4)?,
            deadline: f.opt_num(5)?,
        },
        "library" => Role::Library,
        "pidfd" => Role::Pidfd { pid: f.num(3)? },
        "member" => Role::Member {
            listener: f.num(3)?,
            owner: f.opt_num(4)?,
        },
        "filter" => Role::Filter {
            generation: f.num(3)?,
        },
        _ => return Err(f.bad()),
    })
}

fn group_of(f: &Fields<'_>) -> Result<GroupRecord, String> {
    let members = f
        .word(4)?
        .split(',')
        .map(|m| {
            let inode = |rest: &str| rest.parse::<u64>().map_err(|_| f.bad());
            match m.split_at_checked(1) {
                Some(("o", rest)) => inode(rest).map(Member::Ours),
                Some(("f", rest)) => inode(rest).map(Member::Foreign),
                _ => Err(f.bad()),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GroupRecord {
        listener: f.num(1)?,
        target: f.num(2)?,
        target_owner: f.opt_num(3)?,
        members,
    })
}

#[cfg(test)]
mod tests;
