//! Which processes are a generation's, and killing all of them.
//!
//! Where grace can create cgroups (cgroup v2, delegated to it: root, a systemd unit with
//! `Delegate=yes`, a container with a writable cgroup), each generation runs in a cgroup of its
//! own, `<grace's cgroup>/grace.<ns>.<pid>/gen-N`: every process it ever forks is in there,
//! whatever it does with sessions or process groups, and `cgroup.kill` ends them all. Elsewhere a
//! generation is its process group, plus the processes re-parented to grace (it is a subreaper)
//! that carry its `GRACE_GENERATION` in their environment: a worker that called `setsid()` and
//! outlived its leader is still found.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::supervisor::GenId;

pub struct Members {
    /// `.../grace.<ns>.<pid>`, when grace can create cgroups.
    cgroups: Option<PathBuf>,
    /// The generations that really are in a cgroup of their own; the others are tracked by
    /// process group and `GRACE_GENERATION`.
    in_cgroup: Vec<GenId>,
    /// Generations asked to be killed: what is found of them later is killed too.
    killed: Vec<GenId>,
    /// Whether `/proc` shows this process's own PID namespace (a `/proc` of another one would
    /// make re-parented processes look like someone else's, and the other way round).
    own_proc: bool,
    /// Running `exec:` checks: grace's children with a `GRACE_GENERATION`, but not members.
    checks: Vec<i32>,
}

impl Members {
    /// Finds out whether grace can create cgroups, and says which way generations are tracked.
    /// `first`: a fresh start (anything left under grace's own name is a dead predecessor's and
    /// is killed and removed); otherwise a re-exec, whose generations keep their cgroups.
    /// `killed`: the generations the supervisor has already killed.
    pub fn detect(first: bool, killed: Vec<GenId>) -> Self {
        let own_proc = fs::read_link("/proc/self")
            .is_ok_and(|p| p.to_string_lossy() == std::process::id().to_string());
        let cgroups = match own_cgroup_dir() {
            Ok(dir) => {
                let root = dir.join(format!(
                    "grace.{}.{}",
                    crate::sys::pid_namespace(),
                    std::process::id()
                ));
                match fs::create_dir(&root) {
                    Ok(()) => Ok(root),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(root),
                    Err(e) => Err(format!("cannot create a cgroup in {}: {e}", dir.display())),
                }
            }
            Err(why) => Err(why),
        };
        let mut members = Self {
            cgroups: None,
            in_cgroup: Vec::new(),
            killed,
            own_proc,
            checks: Vec::new(),
        };
        match cgroups {
            Ok(root) => {
                members.cgroups = Some(root.clone());
                if first {
                    // A predecessor with this pid (PID 1 of a container, say) that died by
                    // SIGKILL: what it left is not ours to adopt.
                    for generation in members.on_disk() {
                        kill_cgroup(&root.join(format!("gen-{generation}")));
                        let _ = fs::remove_dir(root.join(format!("gen-{generation}")));
                    }
                    if own_proc {
                        sweep(root.parent().unwrap_or(Path::new("/")));
                    }
                    info!(
                        "each generation runs in a cgroup of its own under {}",
                        root.display()
                    );
                } else {
                    members.in_cgroup = members.on_disk();
                }
            }
            Err(why) => {
                if first {
                    info!(
                        "generations are tracked by process group and GRACE_GENERATION ({why}); \
                         a worker that leaves its process group and changes its environment \
                         cannot be found: give grace a cgroup (root, Delegate=yes) for those"
                    );
                }
            }
        }
        if !own_proc && first {
            info!("/proc is not this PID namespace's: re-parented workers are not looked for");
        }
        members
    }

    fn dir(&self, generation: GenId) -> Option<PathBuf> {
        if !self.in_cgroup.contains(&generation) {
            return None;
        }
        Some(self.cgroups.as_ref()?.join(format!("gen-{generation}")))
    }

    /// Creates the generation's cgroup and opens it (its directory, to start the child in, and
    /// its `cgroup.procs`, for a child that has to move itself). [`Members::joined`] once the
    /// child runs.
    pub fn prepare(&self, generation: GenId) -> Option<(OwnedFd, OwnedFd)> {
        let dir = self.cgroups.as_ref()?.join(format!("gen-{generation}"));
        if let Err(e) = fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            warn!(
                "generation {generation} runs without a cgroup of its own: creating {}: {e}",
                dir.display()
            );
            return None;
        }
        let open = |path: &Path, write: bool, flags| {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(nix::libc::O_CLOEXEC | flags)
                .open(path)
                .map(OwnedFd::from)
                .inspect_err(|e| warn!("generation {generation}: opening {}: {e}", path.display()))
                .ok()
        };
        Some((
            open(&dir, false, nix::libc::O_DIRECTORY)?,
            open(&dir.join("cgroup.procs"), true, 0)?,
        ))
    }

    /// The generation's leader `pid` was started: it is tracked by its cgroup if it really got
    /// there, by its process group otherwise.
    pub fn joined(&mut self, generation: GenId, pid: i32) {
        let Some(root) = &self.cgroups else { return };
        let wanted = format!("/gen-{generation}");
        let there = fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
            c.lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&wanted))
        }) || procs_of(&root.join(format!("gen-{generation}"))).contains(&pid);
        if there {
            self.in_cgroup.push(generation);
        } else {
            warn!("generation {generation} did not get into its cgroup: tracked by process group");
        }
    }

    /// Generations the supervisor had killed before a re-exec.
    pub fn mark_killed(&mut self, generations: impl Iterator<Item = GenId>) {
        self.killed.extend(generations);
    }

    /// The `exec:` checks running now (they are not members of their generation).
    pub fn set_checks(&mut self, pids: Vec<i32>) {
        self.checks = pids;
    }

    /// SIGKILL to every process of the generation: its cgroup, else its process group (while
    /// that is known to be the generation's: its leader runs, or a child of grace is in it) and
    /// the re-parented processes that carry its number.
    pub fn kill(&mut self, generation: GenId, pgid: i32, leader_alive: bool) {
        if !self.killed.contains(&generation) {
            self.killed.push(generation);
        }
        match self.dir(generation) {
            Some(dir) => kill_cgroup(&dir),
            None => {
                if (leader_alive || crate::sys::group_has_child(pgid))
                    && let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL)
                {
                    debug!("killing process group {pgid}: {e}");
                }
                for pid in self.orphans_of(generation) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    /// Whether nothing of the generation is left. What turns up of a generation that was killed
    /// (a worker re-parented since) is killed on sight.
    pub fn empty(&self, generation: GenId, pgid: i32) -> bool {
        let (group_empty, rest) = match self.dir(generation) {
            Some(dir) => (true, procs_of(&dir)),
            None => (
                killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH)
                    || !crate::sys::group_has_child(pgid),
                self.orphans_of(generation),
            ),
        };
        if self.killed.contains(&generation) {
            for &pid in &rest {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        group_empty && rest.is_empty()
    }

    /// Whether anything of a generation whose leader was reaped can still be found (after a
    /// re-exec: one that cannot is forgotten, and its group id never signalled).
    pub fn remains(&self, generation: GenId, pgid: i32) -> bool {
        crate::sys::group_has_child(pgid)
            || match self.dir(generation) {
                Some(dir) => !procs_of(&dir).is_empty(),
                None => !self.orphans_of(generation).is_empty(),
            }
    }

    /// The processes of a generation, as far as they can be seen: its cgroup's, else its process
    /// group's and its re-parented workers' (none where `/proc` is another namespace's).
    pub fn pids(&self, generation: GenId, pgid: i32) -> Vec<i32> {
        if let Some(dir) = self.dir(generation) {
            return procs_of(&dir);
        }
        if !self.own_proc {
            return Vec::new();
        }
        let mut pids: Vec<i32> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| process_group(pid) == Some(pgid))
            .collect();
        for pid in self.orphans_of(generation) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// The generation is gone: its cgroup goes too.
    pub fn forget(&mut self, generation: GenId) {
        self.killed.retain(|&g| g != generation);
        self.in_cgroup.retain(|&g| g != generation);
        let Some(root) = &self.cgroups else { return };
        let dir = root.join(format!("gen-{generation}"));
        if let Err(e) = fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", dir.display());
        }
    }

    /// The generations that have a cgroup directory here.
    pub fn on_disk(&self) -> Vec<GenId> {
        let Some(root) = &self.cgroups else {
            return Vec::new();
        };
        fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("gen-")?.parse().ok())
            .collect()
    }

    /// At grace's final exit: its cgroups go (they are empty by then).
    pub fn remove_all(&mut self) {
        for generation in self.on_disk() {
            self.forget(generation);
        }
        if let Some(root) = &self.cgroups {
            let _ = fs::remove_dir(root);
        }
    }

    /// grace's children that carry `GRACE_GENERATION=<generation>` (its `exec:` checks aside):
    /// without a cgroup, the workers of that generation re-parented to grace (and its leader,
    /// until it is reaped).
    fn orphans_of(&self, generation: GenId) -> Vec<i32> {
        if !self.own_proc {
            return Vec::new();
        }
        let me = std::process::id();
        let wanted = format!("GRACE_GENERATION={generation}");
        fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|pid| !self.checks.contains(pid))
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/environ"))
                    .unwrap_or_default()
                    .split(|&b| b == 0)
                    .any(|var| var == wanted.as_bytes())
            })
            .collect()
    }
}

/// grace's own cgroup directory in the cgroup v2 hierarchy.
fn own_cgroup_dir() -> Result<PathBuf, String> {
    let own =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 hierarchy")?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    // `36 25 0:30 / /sys/fs/cgroup rw,… - cgroup2 cgroup2 rw,…`: the mount point is field 5, the
    // filesystem type the first field after ` - `.
    let mount = mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split(' ').nth(4))
        .ok_or("cgroup v2 is not mounted")?;
    let dir = Path::new(mount).join(path.trim_start_matches('/'));
    if !dir.join("cgroup.procs").exists() {
        return Err(format!("{} is not grace's cgroup", dir.display()));
    }
    Ok(dir)
}

/// Removes what graces of this PID namespace killed with SIGKILL left: empty
/// `grace.<ns>.<pid>` cgroups whose pid is gone. (A cgroup with a process in it cannot be
/// removed, so nothing that runs is touched.)
fn sweep(parent: &Path) {
    let prefix = format!("grace.{}.", crate::sys::pid_namespace());
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for generation in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
            if generation.path().is_dir() {
                let _ = fs::remove_dir(generation.path());
            }
        }
        let _ = fs::remove_dir(entry.path());
    }
}

/// The process group of `pid`, from `/proc/<pid>/stat` (`pid (comm) state ppid pgrp …`; the
/// command name may hold spaces and parentheses, so fields are counted after the last `)`).
fn process_group(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn procs_of(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_cgroup(dir: &Path) {
    // Linux 5.14+: one write kills everything, forks in progress included.
    let killed = OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"));
    if killed.is_err() {
        for pid in procs_of(dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
