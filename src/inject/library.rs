//! The library as children load it: carried inside the grace binary, written once into a sealed
//! memfd that children open through `/proc/<grace>/fd/N`, and kept at the same number across
//! re-exec.

use super::*;

/// The library as children load it: a sealed memfd of grace, and its `/proc/<grace>/fd/N`.
#[derive(Debug)]
pub(super) struct Library {
    pub(super) fd: OwnedFd,
    pub(super) path: String,
}

/// Created at the first spawn that needs it (and tried again at the next if that failed), or
/// adopted from the previous image.
pub(super) static LIBRARY_FD: OnceLock<Library> = OnceLock::new();

/// The path a child loads the library from: a sealed memfd of this image, created once.
///
/// A memfd leaves nothing on disk to clean up or to tamper with (it is sealed before anyone can
/// see it). The child opens it through grace's `/proc/PID/fd/N`, which needs `/proc` and the
/// same user as grace (a server that drops privileges before its `exec` cannot load it).
pub(super) fn library_path() -> Result<&'static str, String> {
    if let Some(library) = LIBRARY_FD.get() {
        return Ok(&library.path);
    }
    let fd = write_library()?;
    let path = proc_path(&fd)?;
    debug!("grace's socket library is at {path}");
    Ok(&LIBRARY_FD.get_or_init(|| Library { fd, path }).path)
}

/// The library's fd, if there is one: grace keeps it open across a re-exec (see
/// [`adopt_library`]).
pub fn library_fd() -> Option<BorrowedFd<'static>> {
    LIBRARY_FD.get().map(|library| library.fd.as_fd())
}

/// Takes over the library fd the previous image handed over, at the same number. The
/// generations it started have `LD_PRELOAD=/proc/<grace>/fd/N` in their environment, and so has
/// every program they `exec` later: N must go on holding grace's library for as long as grace
/// runs, never whatever the number would be reused for.
pub fn adopt_library(fd: OwnedFd) {
    let number = fd.as_raw_fd();
    match adopted(fd) {
        Ok(library) => {
            debug!("grace's socket library is still at {}", library.path);
            let _ = LIBRARY_FD.set(library);
        }
        Err(why) => warn!("adopting grace's socket library (fd {number}): {why}"),
    }
}

/// The adopted fd as this image's library: kept if it holds the library this binary carries,
/// otherwise (grace was upgraded) made to hold it, still at the same number.
pub(super) fn adopted(mut fd: OwnedFd) -> Result<Library, String> {
    if !holds_library(&fd) {
        let fresh = write_library()?;
        nix::unistd::dup3(&fresh, &mut fd, OFlag::O_CLOEXEC)
            .map_err(|e| format!("replacing the previous grace's library: {e}"))?;
    }
    let path = proc_path(&fd)?;
    Ok(Library { fd, path })
}

/// Whether `fd` has exactly the bytes of the library this binary carries.
pub(super) fn holds_library(fd: &OwnedFd) -> bool {
    let Ok(file) = fd.try_clone().map(File::from) else {
        return false;
    };
    let mut bytes = vec![0u8; LIBRARY.len()];
    file.metadata()
        .is_ok_and(|m| m.len() == LIBRARY.len() as u64)
        && file.read_exact_at(&mut bytes, 0).is_ok()
        && bytes == LIBRARY
}

pub(super) fn write_library() -> Result<OwnedFd, String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        format!("writing grace's socket library to a memfd: {what}: {e}")
    };
    // MFD_NOEXEC_SEAL (Linux 6.3): nobody can execve it; mapping it executable, as the loader
    // does, is still allowed. Older kernels refuse the flag.
    let noexec = MFdFlags::from_bits_retain(0x0008);
    let base = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    let fd = match memfd_create(c"grace-preload", base | noexec) {
        Err(Errno::EINVAL) => memfd_create(c"grace-preload", base),
        other => other,
    }
    .map_err(|e| failed("memfd_create", &e))?;
    let mut file = File::from(fd);
    file.write_all(LIBRARY).map_err(|e| failed("write", &e))?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| failed("sealing", &e))?;
    Ok(OwnedFd::from(file))
}

/// `/proc/<grace>/fd/N` for one of grace's fds, checked to open.
pub(super) fn proc_path(fd: &OwnedFd) -> Result<String, String> {
    // Our pid as the /proc the child sees numbers it (inside a PID namespace with the host's
    // /proc, getpid() would name another process).
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    let path = format!("/proc/{pid}/fd/{}", fd.as_raw_fd());
    File::open(&path).map_err(|e| {
        format!("opening grace's socket library at {path}: {e} (is /proc mounted?)")
    })?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Reading the command's file.
