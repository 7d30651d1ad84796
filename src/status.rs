//! What `grace status` and `--status-file` show: one JSON object, written by hand (it is small, and
//! a serializer would be the largest dependency of the binary).

use std::fmt::Write as _;

use crate::listen::Listener;
use crate::steer::Steering;
use crate::supervisor::{Cause, GenState, Millis, Outcome, Phase, Supervisor};

/// Everything the status shows, borrowed from the runtime.
pub struct View<'a> {
    pub sup: &'a Supervisor,
    pub listeners: &'a [Listener],
    pub steering: &'a Steering,
    pub now: Millis,
}

pub fn json(v: &View<'_>) -> String {
    let mut s = String::new();
    let phase = phase_name(v.sup.phase());
    let _ = write!(s, "{{\"pid\":{},\"state\":\"{phase}\"", std::process::id());
    match v.sup.current() {
        Some(g) => {
            let _ = write!(
                s,
                ",\"current\":{{\"generation\":{},\"pid\":{}}}",
                g.id, g.pid
            );
        }
        None => s.push_str(",\"current\":null"),
    }
    s.push_str(",\"generations\":[");
    for (i, g) in v.sup.generations().iter().enumerate() {
        let state = state_name(&g.state);
        let uptime = v.now.saturating_sub(g.started) as f64 / 1000.0;
        let _ = write!(
            s,
            "{}{{\"generation\":{},\"pid\":{},\"state\":\"{state}\",\"uptime_seconds\":{uptime:.3}}}",
            if i > 0 { "," } else { "" },
            g.id,
            g.pid
        );
    }
    s.push_str("],\"listen\":[");
    let sizes = v.steering.group_sizes();
    for (i, l) in v.listeners.iter().enumerate() {
        // A steered listener's group: how many sockets are in it (grace's for each generation,
        // and any stranger's).
        let sockets = match sizes.iter().find(|(l, _)| *l == i) {
            Some((_, n)) => format!("\"steered\":true,\"sockets\":{n}"),
            None => "\"steered\":false".to_string(),
        };
        let _ = write!(
            s,
            "{}{{\"name\":{},\"address\":{},{sockets}}}",
            if i > 0 { "," } else { "" },
            quote(&l.name),
            quote(&l.local.to_string())
        );
    }
    let _ = write!(s, "],\"restarts\":{},\"last_restart\":", v.sup.restarts());
    match v.sup.last_outcome() {
        None => s.push_str("null"),
        Some(Outcome::Ready {
            generation, pid, ..
        }) => {
            let _ = write!(
                s,
                "{{\"result\":\"ok\",\"generation\":{generation},\"pid\":{pid}}}"
            );
        }
        Some(Outcome::RolledBack { generation, reason }) => {
            let _ = write!(
                s,
                "{{\"result\":\"rolled_back\",\"generation\":{generation},\"reason\":{}}}",
                quote(reason)
            );
        }
        Some(Outcome::Failed { reason }) => {
            let _ = write!(s, "{{\"result\":\"failed\",\"reason\":{}}}", quote(reason));
        }
    }
    s.push('}');
    s
}

/// The same for people.
pub fn text(v: &View<'_>) -> String {
    let mut s = format!(
        "grace (pid {}): {}\n",
        std::process::id(),
        phase_name(v.sup.phase())
    );
    for g in v.sup.generations() {
        let current = if v.sup.current().map(|c| c.id) == Some(g.id) {
            "  (current)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "  generation {:<4} pid {:<8} {:<9} up {}{current}",
            g.id,
            g.pid,
            state_name(&g.state),
            uptime(v.now.saturating_sub(g.started)),
        );
    }
    for l in v.listeners {
        let _ = writeln!(s, "  listening on {} ({})", l.local, l.name);
    }
    let last = match v.sup.last_outcome() {
        None => "none".to_string(),
        Some(Outcome::Ready {
            generation, pid, ..
        }) => format!("ok: generation {generation} (pid {pid})"),
        Some(Outcome::RolledBack { generation, reason }) => {
            format!("rolled back: generation {generation} {reason}")
        }
        Some(Outcome::Failed { reason }) => format!("failed: {reason}"),
    };
    let _ = write!(s, "  restarts: {}, last: {last}", v.sup.restarts());
    s
}

fn uptime(ms: Millis) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{}.{}s", secs, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Idle => "running",
        Phase::Starting {
            cause: Cause::Initial,
            ..
        } => "starting",
        Phase::ReExec | Phase::Starting { .. } => "restarting",
        Phase::Backoff { .. } => "crashed",
        Phase::Stopping { .. } => "stopping",
    }
}

fn state_name(state: &GenState) -> &'static str {
    match state {
        GenState::Starting { .. } => "starting",
        GenState::Ready => "ready",
        GenState::Draining { .. } => "draining",
        GenState::Finishing { .. } => "finishing",
    }
}

/// A JSON string literal.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `text` to `path` atomically (a reader never sees half a file), through a temporary file
/// in the same directory with an unpredictable name, created exclusively and never through a
/// symlink (`O_EXCL | O_NOFOLLOW`), then renamed over `path` (which replaces a symlink there
/// rather than following it).
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let tmp = path.with_file_name(format!(".{name}.{:016x}", unpredictable()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&tmp)
        {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 16 => {
                attempts += 1
            }
            Err(e) => return Err(e),
        }
    };
    // No fsync: the rename is what makes the update atomic for readers, and grace's loop must
    // not wait on the disk.
    let result = file
        .write_all(text.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// 64 bits nobody can guess in advance, from the kernel's random pool.
fn unpredictable() -> u64 {
    use std::io::Read as _;
    let mut buf = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => u64::from_ne_bytes(buf),
        // No /dev/urandom (an empty chroot): the clock, with O_EXCL still refusing anything
        // planted at the name.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_for_people_and_scripts() {
        use crate::supervisor::{AliveRule, Event, Policy};
        let mut sup = Supervisor::new(Policy {
            ready_timeout: 1_000,
            drain_timeout: 1_000,
            alive: AliveRule::Explicit,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            max_draining: 1,
            max_waiting: 1,
            notify_ready: true,
            probe: false,
            on_crash: crate::cli::OnCrash::Exit,
            idle_wait: 0,
            steered: false,
        });
        let view = |sup: &Supervisor| {
            json(&View {
                sup,
                listeners: &[],
                steering: &Steering::default(),
                now: 0,
            })
        };
        sup.step(0, Event::Start);
        assert!(
            view(&sup).contains("\"state\":\"starting\""),
            "{}",
            view(&sup)
        );
        sup.step(
            0,
            Event::Spawned {
                generation: 1,
                pid: 10,
            },
        );
        sup.step(0, Event::ProbePassed { generation: 1 });
        let text = view(&sup);
        assert!(text.contains("\"state\":\"running\""), "{text}");
        assert!(
            text.contains("\"current\":{\"generation\":1,\"pid\":10}"),
            "{text}"
        );
        sup.step(0, Event::RestartSignal);
        assert!(view(&sup).contains("\"state\":\"restarting\""));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(quote("a \"b\"\n\\c\u{1}"), "\"a \\\"b\\\"\\n\\\\c\\u0001\"");
    }
}
