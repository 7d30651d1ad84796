//! The command line: clap types only. The doc comments are the help text.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sys::signal::Signal;

use crate::duration::parse_duration;
use crate::listen::ListenSpec;
use crate::readiness::ReadyMode;
use crate::signals::parse_signal;

const EXAMPLES: &str = "\
Examples:
  grace run --listen :8080 -- myserver --flag
  grace run --listen http=:8080 --listen admin=127.0.0.1:9000 --ready http:/health -- ./server
  kill -USR2 $(cat /run/app.pid)      # restart in place: new copy, then drain the old one";

/// Zero-downtime restarts for any server: grace binds the sockets once, hands them to the server
/// by systemd socket activation, and on SIGUSR2 starts a new copy on the same sockets, waits until
/// it is ready, then drains the old one.
#[derive(Debug, Parser)]
#[command(name = "grace", version, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bind the sockets and run COMMAND on them, restarting it in place on SIGUSR2.
    Run(RunArgs),
    /// Print the handoff record versions this binary can adopt (asked by the running grace before
    /// it re-executes an upgraded binary).
    #[command(name = "__handoff-versions", hide = true)]
    HandoffVersions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnCrash {
    /// Start a new generation on the same sockets (clients wait in the queue), with a capped
    /// backoff; give up after repeated crashes.
    Restart,
    /// Stop and exit with the generation's status.
    Exit,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = EXAMPLES)]
pub struct RunArgs {
    /// A socket to bind and pass to the server, [NAME=]ADDR: `:8080`, `127.0.0.1:8080`,
    /// `[::1]:8080`, `localhost:8080`, `tcp4://…`, `tcp6://…`, `udp://:5353`, `unix:/run/app.sock`,
    /// `unix:@abstract`, `fd:N`, `systemd`. Repeatable; the server gets them at fds 3, 4, … in this
    /// order.
    #[arg(short = 'l', long = "listen", value_name = "SPEC", required = true)]
    pub listen: Vec<ListenSpec>,

    /// When a new generation counts as ready: auto, notify, delay:DURATION, http:PATH, tcp or
    /// exec:COMMAND.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub ready: ReadyMode,

    /// Roll a new generation back if it is not ready within this time.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,

    /// The signal that asks a generation to drain and exit (TERM, SIGQUIT, 15, …).
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = parse_signal)]
    pub stop_signal: Signal,

    /// How long a draining generation may take before its whole process group gets SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// What to do when the current generation dies on its own.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = OnCrash::Exit)]
    pub on_crash: OnCrash,

    /// At most this many generations draining at once; the oldest is killed first.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_draining: u32,

    /// Write grace's PID here (atomically); removed on exit.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Listen backlog [default: the system's somaxconn].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: Option<i32>,

    /// File mode for unix socket files, in octal (e.g. 660).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Do not set LISTEN_PID (for servers started through a wrapper that does not `exec`).
    #[arg(long)]
    pub no_listen_pid: bool,

    /// The server command and its arguments, run directly (never through a shell).
    #[arg(value_name = "COMMAND", required = true, last = true)]
    pub command: Vec<OsString>,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!(
            "invalid socket mode {text:?}: expected octal permissions like 660"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli =
            Cli::try_parse_from(["grace", "run", "-l", ":8080", "--", "srv", "--flag"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(run.ready_timeout, Duration::from_secs(60));
        assert_eq!(run.drain_timeout, Duration::from_secs(30));
        assert_eq!(run.stop_signal, Signal::SIGTERM);
        assert_eq!(run.on_crash, OnCrash::Exit);
        assert_eq!(run.command, ["srv", "--flag"]);
    }

    #[test]
    fn socket_modes() {
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
