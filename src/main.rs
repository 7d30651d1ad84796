//! grace: zero-downtime restarts for any server.

// Every `unsafe` block (all in sys.rs) says why it is sound.
#![deny(clippy::undocumented_unsafe_blocks)]

mod cli;
mod client;
mod control;
mod duration;
mod event_loop;
mod exit;
mod fields;
mod handoff;
mod held;
mod inject;
mod listen;
mod members;
mod notify;
mod pidfds;
mod probe;
mod readiness;
mod run;
mod signals;
mod spawn;
mod status;
mod steer;
mod substitute;
mod supervisor;
mod sys;
mod systemd;
mod throttle;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os(handoff::CHECK_ENV).is_some() {
        // A running grace asks whether this binary accepts its command line and can adopt its
        // handoff record, before re-executing it. `--inject always` it could not honour here is
        // a refusal, as at a fresh start.
        if let Command::Run(args) = &cli.command
            && let Err(err) = inject::check(args.inject)
        {
            eprintln!("grace: {err:#}");
            return ExitCode::from(exit::FAILURE as u8);
        }
        let versions: Vec<String> = handoff::READABLE.iter().map(u32::to_string).collect();
        println!("{}", versions.join(" "));
        return ExitCode::SUCCESS;
    }
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Restart(args) => client::restart(&args),
        Command::Status(args) => client::status(&args),
        Command::Stop(args) => client::stop(&args),
        Command::Completions { shell } => client::completions(shell),
    };
    let code = result.unwrap_or_else(|err| {
        eprintln!("grace: {err:#}");
        err.downcast_ref::<exit::ExitError>()
            .map_or(exit::FAILURE, |e| e.code)
    });
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// grace's own lines go to stderr; `GRACE_LOG` (error, warn, info, debug, trace) sets the level.
fn init_logging() {
    let level = std::env::var("GRACE_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
