//! What `grace status` and `--status-file` show: one JSON object, written by hand (it is small, and
//! a serializer would be the largest dependency of the binary).

use std::fmt::Write as _;

use crate::listen::Listener;
use crate::supervisor::{Cause, GenState, Millis, Outcome, Phase, Supervisor};

/// Everything the status shows, borrowed from the runtime.
pub struct View<'a> {
    pub sup: &'a Supervisor,
    pub listeners: &'a [Listener],
    pub now: Millis,
    pub restarts: u64,
}

pub fn json(v: &View<'_>) -> String {
    let mut s = String::new();
    let phase = phase_name(&v.sup.phase);
    let _ = write!(s, "{{\"pid\":{},\"state\":\"{phase}\"", std::process::id());
    match v.sup.current.and_then(|id| v.sup.generation(id)) {
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
    for (i, g) in v.sup.gens.iter().enumerate() {
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
    for (i, l) in v.listeners.iter().enumerate() {
        let _ = write!(
            s,
            "{}{{\"name\":{},\"address\":{}}}",
            if i > 0 { "," } else { "" },
            quote(&l.name),
            quote(&l.local)
        );
    }
    let _ = write!(s, "],\"restarts\":{},\"last_restart\":", v.restarts);
    match &v.sup.last_outcome {
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
        phase_name(&v.sup.phase)
    );
    for g in &v.sup.gens {
        let current = if v.sup.current == Some(g.id) {
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
    let last = match &v.sup.last_outcome {
        None => "none".to_string(),
        Some(Outcome::Ready {
            generation, pid, ..
        }) => format!("ok: generation {generation} (pid {pid})"),
        Some(Outcome::RolledBack { generation, reason }) => {
            format!("rolled back: generation {generation} {reason}")
        }
        Some(Outcome::Failed { reason }) => format!("failed: {reason}"),
    };
    let _ = write!(s, "  restarts: {}, last: {last}", v.restarts);
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

/// Writes `text` to `path` atomically (a reader never sees half a file).
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
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
            on_crash: crate::cli::OnCrash::Exit,
        });
        let view = |sup: &Supervisor| {
            json(&View {
                sup,
                listeners: &[],
                now: 0,
                restarts: 0,
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
        sup.step(0, Event::Ready { generation: 1 });
        let text = view(&sup);
        assert!(text.contains("\"state\":\"running\""), "{text}");
        assert!(
            text.contains("\"current\":{\"generation\":1,\"pid\":10}"),
            "{text}"
        );
        sup.step(0, Event::RestartRequested);
        assert!(view(&sup).contains("\"state\":\"restarting\""));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(quote("a \"b\"\n\\c\u{1}"), "\"a \\\"b\\\"\\n\\\\c\\u0001\"");
    }
}
