//! `grace restart`, `grace status`, `grace stop` and `grace completions`: the commands that talk to
//! a running grace (or print what the CLI looks like).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::CommandFactory;

use crate::cli::{Cli, ClientArgs, CompletionTarget, StatusArgs};
use crate::control::{self, Request, Target};
use crate::exit::ExitError;

/// `--control`, else `--pid-file`, else the grace that is PID 1 (a container's init).
fn target(args: &ClientArgs) -> anyhow::Result<Target> {
    if let Some(path) = &args.control {
        return Ok(Target::Path(path.clone()));
    }
    if let Some(path) = &args.pid_file {
        return Ok(Target::Pid(read_pid(path)?));
    }
    Ok(Target::Pid(1))
}

fn read_pid(path: &Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading pid file {}", path.display()))?;
    let pid: i32 = text.trim().parse().with_context(|| {
        format!(
            "pid file {}: {:?} is not a pid",
            path.display(),
            text.trim()
        )
    })?;
    // grace writes its pid file at start-up (and again at each re-exec): a process with that pid
    // that started later is not the grace that wrote it.
    let written = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if let (Some(written), Some(started)) = (written, started_at(pid))
        && written + STALE_SLACK < started
    {
        bail!(
            "pid file {} is stale: pid {pid} started after the file was written (is grace running?)",
            path.display()
        );
    }
    Ok(pid)
}

/// How much later than its pid file a process may have started and still be the one that wrote
/// it: the boot time the kernel reports moves with the wall clock, which may be stepped (NTP
/// after boot) by a few seconds or more.
const STALE_SLACK: Duration = Duration::from_secs(120);

/// When process `pid` started, from `/proc` (its start in clock ticks after boot, and the boot
/// time).
fn started_at(pid: i32) -> Option<SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks: u64 = stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(19)?
        .parse()
        .ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as u64;
    Some(UNIX_EPOCH + Duration::from_secs(boot) + Duration::from_millis(ticks * 1000 / hz.max(1)))
}

fn failed(message: String) -> anyhow::Error {
    ExitError {
        code: crate::exit::FAILURE,
        message,
    }
    .into()
}

pub fn restart(args: &ClientArgs) -> anyhow::Result<i32> {
    let mut reply = control::send(&target(args)?, Request::Restart, args.timeout)?;
    let line = reply
        .line()
        .context("waiting for the restart")?
        .ok_or_else(|| failed("grace closed the connection without an answer".into()))?;
    if let Some(rest) = line.strip_prefix("ok ") {
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "restarted: generation {} (pid {}) is serving",
            field("generation="),
            field("pid=")
        );
        return Ok(0);
    }
    let reason = line.strip_prefix("failed ").unwrap_or(&line);
    Err(failed(format!("restart failed: {reason}")))
}

pub fn status(args: &StatusArgs) -> anyhow::Result<i32> {
    let request = if args.json {
        Request::Status
    } else {
        Request::StatusText
    };
    let mut reply = control::send(&target(&args.client)?, request, args.client.timeout)?;
    let mut any = false;
    while let Some(line) = reply.line()? {
        if !any && let Some(reason) = line.strip_prefix("failed ") {
            return Err(failed(format!("status refused: {reason}")));
        }
        println!("{line}");
        any = true;
        if args.json {
            break;
        }
    }
    if !any {
        bail!("grace closed the connection without an answer");
    }
    Ok(0)
}

pub fn stop(args: &ClientArgs) -> anyhow::Result<i32> {
    let mut reply = control::send(&target(args)?, Request::Stop, args.timeout)?;
    match reply.line()? {
        Some(line) if line == "stopping" => {}
        Some(line) => return Err(failed(format!("stop refused: {line}"))),
        None => {
            return Err(failed(
                "grace closed the connection without an answer".into(),
            ));
        }
    }
    // grace holds the connection until it is done: `stopped`, or end-of-file.
    while let Some(line) = reply.line().context("waiting for grace to exit")? {
        if line == "stopped" {
            break;
        }
    }
    println!("stopped");
    // Keep the connection open until this process exits: grace, as PID 1, waits for it to close
    // before it exits and takes the whole namespace with it; closing it any earlier would let
    // that kill this process before it has finished exiting.
    std::mem::forget(reply);
    Ok(0)
}

pub fn completions(target: CompletionTarget) -> anyhow::Result<i32> {
    let mut out = std::io::stdout();
    render(target, &mut out)?;
    Ok(0)
}

/// Writes the completion script or man page for `target`.
pub fn render(target: CompletionTarget, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    use clap_complete::Shell;
    let mut cmd = Cli::command();
    let shell = match target {
        CompletionTarget::Bash => Shell::Bash,
        CompletionTarget::Zsh => Shell::Zsh,
        CompletionTarget::Fish => Shell::Fish,
        CompletionTarget::Elvish => Shell::Elvish,
        CompletionTarget::Powershell => Shell::PowerShell,
        CompletionTarget::Man => {
            clap_mangen::Man::new(cmd)
                .render(out)
                .context("rendering the man page")?;
            return Ok(());
        }
    };
    clap_complete::generate(shell, &mut cmd, "grace", out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed files under `completions/`, one per target.
    const COMPLETION_FILES: &[(CompletionTarget, &str)] = &[
        (CompletionTarget::Bash, "grace.bash"),
        (CompletionTarget::Zsh, "_grace"),
        (CompletionTarget::Fish, "grace.fish"),
        (CompletionTarget::Elvish, "grace.elv"),
        (CompletionTarget::Powershell, "_grace.ps1"),
        (CompletionTarget::Man, "grace.1"),
    ];

    /// Fails when the committed completions drift from the CLI. Regenerate them with
    /// `GRACE_UPDATE_COMPLETIONS=1 cargo test completions`.
    #[test]
    fn completions_are_up_to_date() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("completions");
        let update = std::env::var_os("GRACE_UPDATE_COMPLETIONS").is_some();
        let mut stale = Vec::new();
        for (target, file) in COMPLETION_FILES {
            let mut fresh = Vec::new();
            render(*target, &mut fresh).unwrap();
            let path = dir.join(file);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &fresh).unwrap();
            } else if std::fs::read(&path).ok().as_deref() != Some(&fresh[..]) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "out of date: {stale:?}; run `GRACE_UPDATE_COMPLETIONS=1 cargo test completions`"
        );
    }

    #[test]
    fn every_completion_mentions_the_subcommands() {
        for (target, _) in COMPLETION_FILES {
            let mut out = Vec::new();
            render(*target, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            for word in ["restart", "status", "stop", "listen"] {
                assert!(text.contains(word), "{target:?} lacks {word}");
            }
        }
    }
}
