//! What a child starts with: its program, argv, environment and fds, for a generation or a ready
//! check. The fork and exec themselves are in `sys.rs`.

use std::ffi::{CString, OsStr, OsString};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::cli::Compat;
use crate::exit::{self, ExitError};
use crate::handoff;
use crate::listen::{Listener, Local};
use crate::supervisor::GenId;
use crate::sys::{self, ExecPlan};

/// Variables grace sets for a generation, or that belong to grace itself: never passed through.
pub const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "GRACE_GENERATION",
    "GRACE_PROBE_ADDR",
    handoff::ENV,
    handoff::CHECK_ENV,
];

/// Finds the command in `PATH` (as a shell would), or fails with 127/126 and one line.
pub fn resolve_command(command: &[OsString]) -> anyhow::Result<PathBuf> {
    let program = &command[0];
    let shown = program.to_string_lossy();
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match std::fs::metadata(&path) {
            Err(e) => Err(ExitError {
                code: exit::NOT_FOUND,
                message: format!("command {shown:?}: {e}"),
            }
            .into()),
            Ok(m) if m.is_dir() => Err(ExitError {
                code: exit::NOT_EXECUTABLE,
                message: format!("command {shown:?} is a directory"),
            }
            .into()),
            Ok(_) if nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err() => {
                Err(ExitError {
                    code: exit::NOT_EXECUTABLE,
                    message: format!("command {shown:?} is not executable"),
                }
                .into())
            }
            Ok(_) => Ok(path),
        };
    }
    which::which(program).map_err(|_| {
        ExitError {
            code: exit::NOT_FOUND,
            message: format!("command {shown:?} not found in PATH"),
        }
        .into()
    })
}

/// The fds (sockets in `--listen` order, then the private probe socket if any) and the
/// environment a generation gets.
pub fn layout(
    listeners: &[Listener],
    sockets: Vec<RawFd>,
    probe: Option<(RawFd, SocketAddr)>,
    notify_socket: &str,
    generation: GenId,
    compat: &[Compat],
) -> (Vec<RawFd>, Vec<CString>) {
    let mut fds = sockets;
    let mut names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let mut env = base_env();
    if let Some((fd, addr)) = probe {
        fds.push(fd);
        names.push("grace-probe");
        env.extend(env_entry(
            OsStr::new("GRACE_PROBE_ADDR"),
            OsStr::new(&addr.to_string()),
        ));
    }
    for (k, v) in [
        ("LISTEN_FDS", fds.len().to_string()),
        ("LISTEN_FDNAMES", names.join(":")),
        ("NOTIFY_SOCKET", notify_socket.to_string()),
        ("GRACE_GENERATION", generation.to_string()),
    ] {
        env.extend(env_entry(OsStr::new(k), OsStr::new(&v)));
    }
    for (k, v) in compat_env(compat, listeners, generation) {
        env.extend(env_entry(OsStr::new(&k), OsStr::new(&v)));
    }
    (fds, env)
}

/// Everything `sys::spawn` needs, as C strings. `listen_pid`: set `LISTEN_PID` in the child.
pub fn plan(
    program: &std::path::Path,
    command: &[OsString],
    env: Vec<CString>,
    listen_pid: bool,
    fds: Vec<RawFd>,
) -> Result<ExecPlan, String> {
    let argv: Vec<CString> = command
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let program = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| "the command path holds a NUL byte".to_string())?;
    Ok(ExecPlan::new(program, argv, env, listen_pid, fds))
}

/// Starts an `exec:` ready check, through the same fork/exec as a generation (so it gets a clean
/// signal state, not grace's blocked mask), with no sockets.
pub fn ready_check(argv: &[String], generation: GenId, pid: i32) -> Result<i32, String> {
    let program = which::which(&argv[0])
        .map_err(|_| format!("ready check {:?} not found in PATH", argv[0]))?;
    let mut env = base_env();
    env.extend(env_entry(
        OsStr::new("GRACE_GENERATION"),
        OsStr::new(&generation.to_string()),
    ));
    env.extend(env_entry(
        OsStr::new("GRACE_PID"),
        OsStr::new(&pid.to_string()),
    ));
    let argv: Vec<CString> = argv
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let program_c = CString::new(program.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut plan = ExecPlan::new(program_c, argv, env, false, Vec::new());
    sys::spawn(&mut plan)
        .map(|p| p.as_raw())
        .map_err(|e| format!("running ready check {}: {}", program.display(), e.desc()))
}

/// grace's own environment minus what grace sets or keeps for itself.
pub fn base_env() -> Vec<CString> {
    std::env::vars_os()
        .filter(|(k, _)| !RESERVED_ENV.iter().any(|r| OsStr::new(r) == k))
        .filter_map(|(k, v)| env_entry(&k, &v))
        .collect()
}

/// The variables another tool's servers expect (`--compat`), for sockets placed at 3, 4, …
pub fn compat_env(
    compat: &[Compat],
    listeners: &[Listener],
    generation: GenId,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for tool in compat {
        match tool {
            Compat::ServerStarter => {
                // start_server's format: `PORT=FD` pairs joined by `;`, the port as it was given
                // (`8080`, `127.0.0.1:8080`, or a unix socket path).
                let ports: Vec<String> = listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("{}={}", server_starter_port(l), 3 + i))
                    .collect();
                env.push(("SERVER_STARTER_PORT".into(), ports.join(";")));
                env.push(("SERVER_STARTER_GENERATION".into(), generation.to_string()));
            }
            Compat::Einhorn => {
                env.push(("EINHORN_FD_COUNT".into(), listeners.len().to_string()));
                for i in 0..listeners.len() {
                    env.push((format!("EINHORN_FD_{i}"), (3 + i).to_string()));
                }
            }
        }
    }
    env
}

/// `8080` for a wildcard TCP socket, `host:port` for a specific one, the path for a unix socket.
fn server_starter_port(l: &Listener) -> String {
    match &l.local {
        Local::Inet(_, addr) if addr.ip().is_unspecified() => addr.port().to_string(),
        Local::Inet(_, addr) => addr.to_string(),
        Local::Unix(_, path) => path.display().to_string(),
        Local::Abstract(_, name) => format!("@{name}"),
        Local::Other(text) => text.clone(),
    }
}

pub fn env_entry(key: &OsStr, value: &OsStr) -> Option<CString> {
    let mut bytes = key.as_bytes().to_vec();
    bytes.push(b'=');
    bytes.extend_from_slice(value.as_bytes());
    CString::new(bytes).ok()
}
