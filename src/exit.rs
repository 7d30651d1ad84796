//! Exit codes of `grace run`: one home for the table (tini's conventions). Usage errors exit 2,
//! from clap.

use nix::sys::wait::WaitStatus;

/// grace's own failure (with one line on stderr).
pub const FAILURE: i32 = 1;
/// The command exists but cannot be executed.
pub const NOT_EXECUTABLE: i32 = 126;
/// The command was not found.
pub const NOT_FOUND: i32 = 127;

/// How a process ended, as a shell would report it: the exit code, or 128 + the signal number.
pub fn code_of(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

/// The exit code that an `execve` failure maps to.
pub fn code_of_exec_errno(errno: nix::errno::Errno) -> i32 {
    use nix::errno::Errno;
    match errno {
        Errno::ENOENT | Errno::ENOTDIR => NOT_FOUND,
        _ => NOT_EXECUTABLE,
    }
}

/// An error that carries the exit code it must end `grace` with.
#[derive(Debug)]
pub struct ExitError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn status_to_code() {
        let pid = Pid::from_raw(42);
        assert_eq!(code_of(WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(code_of(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            code_of(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(
            code_of(WaitStatus::Signaled(pid, Signal::SIGKILL, true)),
            Some(137)
        );
        assert_eq!(code_of(WaitStatus::StillAlive), None);
    }

    #[test]
    fn exec_errors() {
        assert_eq!(code_of_exec_errno(Errno::ENOENT), NOT_FOUND);
        assert_eq!(code_of_exec_errno(Errno::EACCES), NOT_EXECUTABLE);
        assert_eq!(code_of_exec_errno(Errno::ENOEXEC), NOT_EXECUTABLE);
    }
}
