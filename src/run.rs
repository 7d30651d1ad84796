//! `grace run`: block signals, bind the sockets (or adopt them from the previous image), run the
//! loop, clean up.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use crate::cli::{InjectMode, RunArgs};
use crate::control::ControlServer;
use crate::event_loop::EventLoop;
use crate::handoff::{self, Record};
use crate::held::Held;
use crate::inject;
use crate::listen::{BindOptions, bind_all};
use crate::members::Members;
use crate::notify::NotifySocket;
use crate::pidfds::Pidfds;
use crate::readiness::{AUTO_DELAY, ReadyMode};
use crate::signals::Signals;
use crate::spawn;
use crate::status;
use crate::steer::Steering;
use crate::supervisor::{AliveRule, Event, GenState, Millis, Policy, Supervisor};
use crate::sys;

/// `grace restart` clients waiting at once, at most.
const MAX_WAITING: usize = 32;

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    // 1. Signals first: from here on, nothing that arrives is lost or fatal.
    let signals = Signals::install()?;
    if let Err(e) = sys::become_subreaper() {
        warn!("cannot become a child subreaper: {e}");
    }
    // 2. The sockets: bound now, or handed over by the previous image.
    let (sup, held, members, first) = match std::env::var(handoff::ENV).ok() {
        Some(text) => {
            let (sup, held, members) = adopt(&text, &args, signals.as_fd().as_raw_fd())?;
            info!("re-executed; continuing the restart");
            (sup, held, members, Event::Adopted)
        }
        None => {
            let held = bind(&args)?;
            let members = Members::detect(true, Vec::new());
            let policy = policy_of(&args, held.steering.any());
            (Supervisor::new(policy), held, members, Event::Start)
        }
    };
    if let Some(path) = &args.pid_file {
        match write_pid_file(path) {
            Err(e) if matches!(first, Event::Adopted) => warn!("{e:#}"),
            result => result?,
        }
    }
    // 3. The loop, until grace is done.
    let mut event_loop = EventLoop::new(args, sup, signals, held, members, grace_exe());
    let code = event_loop.run(first);
    // 4. Nothing left behind.
    event_loop.finish();
    Ok(code)
}

/// A fresh start: everything is checked and bound before the first generation starts.
fn bind(args: &RunArgs) -> anyhow::Result<Held> {
    sys::cloexec_inherited_fds();
    inject::check(args.inject)?;
    // A command that is not there fails here, before anything is bound.
    spawn::resolve_command(&args.command)?;
    let opts = BindOptions {
        backlog: args.backlog,
        socket_mode: args.socket_mode,
    };
    let listeners = bind_all(&args.listen, &opts)?;
    for l in &listeners {
        info!("listening on {} (name {})", l.local, l.name);
    }
    let (steering, shared) = Steering::new(&listeners);
    for line in shared {
        info!("{line}");
    }
    if listeners.iter().any(|l| l.local.inet().is_some()) {
        inject::announce(args.inject);
    }
    Ok(Held {
        listeners,
        steering,
        notify: NotifySocket::create()?,
        control: ControlServer::open(args.control.as_deref())?,
        pidfds: Pidfds::default(),
        substitution: Default::default(),
        library: None,
    })
}

/// The previous image's state, once the record passed validation: nothing in it is signalled or
/// used before that.
fn adopt(text: &str, args: &RunArgs, signalfd: i32) -> anyhow::Result<(Supervisor, Held, Members)> {
    let mut record = Record::decode(text)
        .and_then(|r| r.validate(&[signalfd]).map(|()| r))
        .map_err(anyhow::Error::msg)
        .context("adopting the previous image's state")?;
    let mut members = Members::detect(false, Vec::new());
    for generation in record.drop_unreachable_generations(|id, pgid| members.remains(id, pgid)) {
        warn!("generation {generation}: nothing of it is left to find; forgotten");
    }
    let held = Held::adopt(&record.fds, &record.groups).inspect_err(|_| {
        // Exiting now would leave the generations running on their own, holding the sockets
        // with nobody to stop them: take them down with us. (Their pids were validated: each
        // leader is this process's child, or something of it can still be found.)
        for (id, pid, alive) in record.state.pids() {
            members.kill(id, pid, alive);
        }
    })?;
    if held.library.is_some()
        && args.inject != InjectMode::Never
        && inject::mechanism(args.inject) == inject::Mechanism::Off
    {
        warn!(
            "the grace before this one preloaded its socket library into servers that bind a \
             --listen address; this one substitutes binds through seccomp, which this kernel \
             cannot do: new generations of such a server will find the address in use (run the \
             previous grace again, or have the server take its sockets by socket activation)"
        );
    }
    let sup = Supervisor::restore(policy_of(args, held.steering.any()), record.state);
    members.mark_killed(
        sup.generations()
            .iter()
            .filter(|g| matches!(g.state, GenState::Draining { killed: true, .. }))
            .map(|g| g.id),
    );
    Ok((sup, held, members))
}

/// `steered`: some listener is steered (an old generation's queue and connections are waited for).
fn policy_of(args: &RunArgs, steered: bool) -> Policy {
    let ms = |d: Duration| d.as_millis() as Millis;
    Policy {
        ready_timeout: ms(args.ready_timeout),
        drain_timeout: ms(args.drain_timeout),
        idle_wait: ms(args.idle_wait),
        steered,
        alive: match &args.ready {
            ReadyMode::Auto => AliveRule::Auto(ms(AUTO_DELAY)),
            ReadyMode::Delay(d) => AliveRule::After(ms(*d)),
            _ => AliveRule::Explicit,
        },
        notify_ready: matches!(args.ready, ReadyMode::Auto | ReadyMode::Notify),
        probe: matches!(
            args.ready,
            ReadyMode::Http(_) | ReadyMode::Tcp | ReadyMode::Exec(_)
        ),
        stop_signal: args.stop_signal,
        max_draining: args.max_draining as usize,
        max_waiting: MAX_WAITING,
        on_crash: args.on_crash,
    }
}

/// The file to `execve` on restart. Resolved now, from how grace was invoked, so that a binary
/// replaced on disk (or a symlink switched to a new release) is what the next image runs;
/// `/proc/self/exe` would keep pointing at the old, possibly deleted, file.
fn grace_exe() -> PathBuf {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let path = Path::new(&argv0);
    let resolved = if argv0.as_bytes().contains(&b'/') {
        std::path::absolute(path).ok()
    } else {
        which::which(&argv0).ok()
    };
    resolved
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    status::write_atomically(path, &format!("{}\n", std::process::id()))
        .with_context(|| format!("writing pid file {}", path.display()))
}
