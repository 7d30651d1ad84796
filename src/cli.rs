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
    /// Restart the running grace and wait for the outcome: exit 0 once the new generation serves,
    /// 1 with the reason when it was rolled back.
    Restart(ClientArgs),
    /// Show the running grace's generations, PIDs, states, listen addresses and last restart.
    Status(StatusArgs),
    /// Stop the running grace gracefully and wait until it has exited.
    Stop(ClientArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) or the man page (man).
    Completions {
        /// bash, zsh, fish, elvish, powershell, or man
        #[arg(value_name = "SHELL")]
        shell: CompletionTarget,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionTarget {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
    /// The man page (roff).
    Man,
}

/// How `grace restart`, `status` and `stop` find the running grace: `--control`, `--pid-file`, or
/// with neither, the grace that is PID 1 (in a container: `docker exec c grace restart`).
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The control socket that `grace run --control PATH` created.
    #[arg(long, value_name = "PATH", conflicts_with = "pid_file")]
    pub control: Option<PathBuf>,

    /// The pid file that `grace run --pid-file PATH` wrote.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Give up waiting for the answer after this long.
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Print the status as JSON (the same object as `--status-file`).
    #[arg(long)]
    pub json: bool,
}

/// Environment variables of other tools, for servers written for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compat {
    /// `SERVER_STARTER_PORT` (`addr=fd;…`) and `SERVER_STARTER_GENERATION`, as start_server sets them.
    ServerStarter,
    /// `EINHORN_FD_COUNT` and `EINHORN_FD_<i>`, as einhorn sets them.
    Einhorn,
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

    /// After traffic moved to a new generation, wait up to this long for the old one to close
    /// the connections it accepted before sending it the stop signal (0: do not wait).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub idle_wait: Duration,

    /// What to do when the current generation dies on its own.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = OnCrash::Exit)]
    pub on_crash: OnCrash,

    /// At most this many generations draining at once; the oldest is killed first.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_draining: u32,

    /// Write grace's PID here (atomically); removed on exit.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Also accept restart/status/stop requests on this Unix socket (mode 0600, same user or root).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Keep this file up to date with the status as JSON (rewritten atomically on every change).
    #[arg(long, value_name = "PATH")]
    pub status_file: Option<PathBuf>,

    /// Also set the environment another tool's servers expect (repeatable).
    #[arg(long, value_name = "TOOL", value_enum)]
    pub compat: Vec<Compat>,

    /// Listen backlog [default: the system's somaxconn].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: Option<i32>,

    /// File mode for unix socket files, in octal (e.g. 660).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Do not set LISTEN_PID (for servers started through a wrapper that does not `exec`).
    #[arg(long)]
    pub no_listen_pid: bool,

    /// For servers that bind their own port: a seccomp filter in every generation hands a server
    /// that binds a --listen address its generation's socket instead, whatever the binary (Go,
    /// static, musl); nothing is added to its environment. Where grace lacks CAP_SYS_ADMIN (a user
    /// other than root, or root in a container) the server runs with no_new_privs, which the
    /// kernel then requires for the filter. Needs Linux 5.9: `auto`
    /// says so and runs without it on older kernels, `always` refuses to start.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = InjectMode::Auto)]
    pub inject: InjectMode,

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
        assert_eq!(run.idle_wait, Duration::from_secs(5));
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

/// `--inject`: whether a server's bind of a --listen address gets grace's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InjectMode {
    /// For every command, where the kernel can (Linux 5.9+); before that, grace says so and runs
    /// without.
    Auto,
    /// For every command; on a kernel before 5.9 grace refuses to start.
    Always,
    /// Never: the server gets the sockets by socket activation only.
    Never,
}
