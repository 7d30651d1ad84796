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
use tracing::{debug, info};

use crate::supervisor::GenId;

pub struct Members {
    /// `.../grace.<ns>.<pid>`, when grace can create cgroups.
    cgroups: Option<PathBuf>,
    /// Generations asked to be killed: what is found of them later is killed too.
    killed: Vec<GenId>,
}

impl Members {
    /// Finds out whether grace can create cgroups, and says which way generations are tracked.
    /// Safe to call again after a re-exec: the cgroups of running generations are kept.
    pub fn detect(first: bool) -> Self {
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
        let cgroups = match cgroups {
            Ok(root) => {
                if first {
                    sweep(root.parent().unwrap_or(Path::new("/")));
                    info!(
                        "each generation runs in a cgroup of its own under {}",
                        root.display()
                    );
                }
                Some(root)
            }
            Err(why) => {
                if first {
                    info!("generations are tracked by process group and GRACE_GENERATION ({why})");
                }
                None
            }
        };
        Self {
            cgroups,
            killed: Vec::new(),
        }
    }

    fn dir(&self, generation: GenId) -> Option<PathBuf> {
        Some(self.cgroups.as_ref()?.join(format!("gen-{generation}")))
    }

    /// Creates the generation's cgroup and opens it (its directory, to start the child in, and
    /// its `cgroup.procs`, for a child that has to move itself).
    pub fn prepare(&self, generation: GenId) -> Option<(OwnedFd, OwnedFd)> {
        let dir = self.dir(generation)?;
        if let Err(e) = fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            debug!("creating {}: {e}", dir.display());
            return None;
        }
        let open = |path: &Path, write: bool, flags| {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(nix::libc::O_CLOEXEC | flags)
                .open(path)
                .map(OwnedFd::from)
                .inspect_err(|e| debug!("opening {}: {e}", path.display()))
                .ok()
        };
        Some((
            open(&dir, false, nix::libc::O_DIRECTORY)?,
            open(&dir.join("cgroup.procs"), true, 0)?,
        ))
    }

    /// SIGKILL to every process of the generation: its cgroup, its process group, and (without
    /// cgroups) the orphans that carry its number.
    pub fn kill(&mut self, generation: GenId, pgid: i32) {
        if !self.killed.contains(&generation) {
            self.killed.push(generation);
        }
        if let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
            debug!("killing process group {pgid}: {e}");
        }
        match self.dir(generation) {
            Some(dir) => kill_cgroup(&dir),
            None => {
                for pid in orphans_of(generation) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    /// Whether nothing of the generation is left. What turns up of a generation that was killed
    /// (a worker re-parented since) is killed on sight.
    pub fn empty(&self, generation: GenId, pgid: i32) -> bool {
        let group_empty = killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH);
        let rest: Vec<i32> = match self.dir(generation) {
            Some(dir) => procs_of(&dir),
            None => orphans_of(generation),
        };
        if self.killed.contains(&generation) {
            for &pid in &rest {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        group_empty && rest.is_empty()
    }

    /// The generation is gone: its cgroup goes too.
    pub fn forget(&mut self, generation: GenId) {
        self.killed.retain(|&g| g != generation);
        if let Some(dir) = self.dir(generation)
            && let Err(e) = fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            debug!("removing {}: {e}", dir.display());
        }
    }

    /// The generations that have a cgroup here (after a re-exec: those of the previous image).
    pub fn known(&self) -> Vec<GenId> {
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
        for generation in self.known() {
            self.forget(generation);
        }
        if let Some(root) = &self.cgroups {
            let _ = fs::remove_dir(root);
        }
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

/// grace's children that carry `GRACE_GENERATION=<generation>`: without cgroups, the workers of
/// that generation re-parented to grace (and its leader, until it is reaped).
fn orphans_of(generation: GenId) -> Vec<i32> {
    let me = std::process::id();
    let wanted = format!("GRACE_GENERATION={generation}");
    fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .any(|var| var == wanted.as_bytes())
        })
        .collect()
}
