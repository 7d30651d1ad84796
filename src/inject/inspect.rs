//! What a command is: its ELF headers (static or dynamic, which loader, set-user-ID), and the
//! marks in the file (does it read `LISTEN_FDS` itself, is it Go), following `#!` interpreters.

use super::*;

pub(super) fn inspect(program: &Path) -> Inspection {
    let mut path = program.to_path_buf();
    let mut via = Vec::new();
    for _ in 0..=MAX_INTERPRETER_DEPTH {
        let class = match read_head(&path) {
            Err(e) => Class::Unknown(format!("reading {}: {e}", path.display())),
            Ok(head) if head.starts_with(b"#!") => {
                match scan(&path) {
                    Ok(marks) if marks.activation => {
                        return Inspection {
                            class: Class::Consumer,
                            runs: path,
                            via: via.join(", "),
                        };
                    }
                    _ => {}
                }
                match interpreter(&head) {
                    Ok(next) => {
                        via.push(format!("a script for {}", next.display()));
                        path = next;
                        continue;
                    }
                    Err(why) => Class::Unknown(format!("{}: {why}", path.display())),
                }
            }
            Ok(head) if head.starts_with(b"\x7fELF") => classify_elf(&path),
            Ok(_) => Class::Unknown(format!(
                "{} is neither an ELF program nor a #! script",
                path.display()
            )),
        };
        return Inspection {
            class,
            runs: path,
            via: via.join(", "),
        };
    }
    Inspection {
        class: Class::Unknown("too many nested #! interpreters".into()),
        runs: path,
        via: via.join(", "),
    }
}

pub(super) fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(SHEBANG_MAX);
    File::open(path)?
        .take(SHEBANG_MAX as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// The marks found in a file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marks {
    pub(super) activation: bool,
    pub(super) go: bool,
}

/// Looks through the whole file for the marks, in chunks (a server binary may be 100 MB).
pub(super) fn scan(path: &Path) -> std::io::Result<Marks> {
    // On the stack and small: a heap buffer of a megabyte stayed resident in grace after the
    // first spawn (glibc raises its mmap threshold once such a block is freed).
    const CHUNK: usize = 64 << 10;
    let keep = ACTIVATION_MARK.len().max(GO_MARK.len()) - 1;
    let activation = memchr::memmem::Finder::new(ACTIVATION_MARK);
    let go = memchr::memmem::Finder::new(GO_MARK);
    let mut file = File::open(path)?;
    let mut buf = [0u8; CHUNK + 64];
    assert!(keep < 64, "the marks fit in the carried tail");
    let mut carried = 0;
    let mut marks = Marks::default();
    loop {
        let n = file.read(&mut buf[carried..])?;
        if n == 0 {
            return Ok(marks);
        }
        let filled = carried + n;
        let window = &buf[..filled];
        marks.activation |= activation.find(window).is_some();
        marks.go |= go.find(window).is_some();
        if marks.activation && marks.go {
            return Ok(marks);
        }
        // Keep the tail, so that a mark split across two reads is still seen.
        carried = keep.min(filled);
        buf.copy_within(filled - carried..filled, 0);
    }
}

/// The parts of an ELF header that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ElfInfo {
    pub(super) class64: bool,
    pub(super) little_endian: bool,
    pub(super) machine: u16,
    /// Has a PT_INTERP program header: the kernel starts the dynamic loader.
    pub(super) interpreter: bool,
}

pub(super) const PT_INTERP: u32 = 3;

/// `sizeof(Elf64_Phdr)` and `sizeof(Elf32_Phdr)`.
pub(super) const PHDR64_SIZE: u16 = 56;
pub(super) const PHDR32_SIZE: u16 = 32;

/// The most program headers the kernel reads (`load_elf_phdrs`): a bigger table is a corrupt or
/// hostile file, not a program.
pub(super) const MAX_PHDRS_BYTES: usize = 64 << 10;

pub(super) fn read_elf(file: &mut File) -> Result<ElfInfo, String> {
    let mut ident = [0u8; 64];
    file.read_exact(&mut ident)
        .map_err(|e| format!("reading its ELF header: {e}"))?;
    let class64 = match ident[4] {
        1 => false,
        2 => true,
        other => return Err(format!("unknown ELF class {other}")),
    };
    let little_endian = match ident[5] {
        1 => true,
        2 => false,
        other => return Err(format!("unknown ELF data encoding {other}")),
    };
    let u16_at = |at: usize| {
        let b = [ident[at], ident[at + 1]];
        if little_endian {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u32_at = |at: usize| {
        let b = [ident[at], ident[at + 1], ident[at + 2], ident[at + 3]];
        if little_endian {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&ident[at..at + 8]);
        if little_endian {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let machine = u16_at(18);
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(32), u16_at(54), u16_at(56))
    } else {
        (u64::from(u32_at(28)), u16_at(42), u16_at(44))
    };
    let expected = if class64 { PHDR64_SIZE } else { PHDR32_SIZE };
    if phentsize != expected {
        return Err(format!(
            "bad program header size {phentsize} (expected {expected})"
        ));
    }
    let size = usize::from(phentsize) * usize::from(phnum);
    if size == 0 || size > MAX_PHDRS_BYTES {
        return Err(format!("bad number of program headers {phnum}"));
    }
    let mut headers = vec![0u8; size];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut headers))
        .map_err(|e| format!("reading its program headers: {e}"))?;
    let interpreter = headers.chunks_exact(usize::from(phentsize)).any(|h| {
        let b = [h[0], h[1], h[2], h[3]];
        let p_type = if little_endian {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        };
        p_type == PT_INTERP
    });
    Ok(ElfInfo {
        class64,
        little_endian,
        machine,
        interpreter,
    })
}

/// `e_machine` of the programs the library is built for (grace's own architecture).
pub(super) const HOST_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(62)
} else if cfg!(target_arch = "aarch64") {
    Some(183)
} else if cfg!(target_arch = "riscv64") {
    Some(243)
} else {
    None
};

/// What decides whether the loader runs a program in secure mode: who runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Runner {
    /// Real user and group ids (the kernel compares the new effective ids with these).
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// `PR_SET_NO_NEW_PRIVS` (systemd's `NoNewPrivileges=`): set-user-ID bits are ignored.
    pub(super) no_new_privs: bool,
}

impl Runner {
    /// grace itself, whose children inherit all three.
    fn current() -> Self {
        let no_new_privs = std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"]))
        });
        Runner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            no_new_privs,
        }
    }
}

/// Why running the file would put the dynamic loader in secure mode (`AT_SECURE`), where it
/// ignores an `LD_PRELOAD` entry with a `/` in it (grace's is `/proc/…`): what the file is, and
/// who grace would have to run as. Linux's rule (`cap_bprm_creds_from_file`): a set-user-ID
/// (set-group-ID) file whose owner (group) is not the runner's, or file capabilities for a runner
/// that is not root; neither counts on a `nosuid` mount, nor the bits under `no_new_privs`.
pub(super) fn secure_exec(
    meta: &Metadata,
    capabilities: bool,
    nosuid: bool,
    runner: Runner,
) -> Option<(String, String)> {
    const S_ISUID: u32 = 0o4000;
    const S_ISGID: u32 = 0o2000;
    const S_IXGRP: u32 = 0o0010;
    if nosuid {
        return None;
    }
    let mode = meta.mode();
    if !runner.no_new_privs {
        if mode & S_ISUID != 0 && meta.uid() != runner.uid {
            return Some((
                format!("is set-user-ID (owner uid {})", meta.uid()),
                "as that user".into(),
            ));
        }
        if mode & (S_ISGID | S_IXGRP) == S_ISGID | S_IXGRP && meta.gid() != runner.gid {
            return Some((
                format!("is set-group-ID (group gid {})", meta.gid()),
                "in that group".into(),
            ));
        }
    }
    if capabilities && runner.uid != 0 {
        return Some((
            "has file capabilities (security.capability)".into(),
            "as root".into(),
        ));
    }
    None
}

pub(super) fn classify_elf(path: &Path) -> Class {
    classify_elf_as(path, Runner::current())
}

pub(super) fn classify_elf_as(path: &Path, runner: Runner) -> Class {
    let info = match File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|mut f| read_elf(&mut f))
    {
        Ok(info) => info,
        Err(e) => return Class::Unknown(format!("{}: {e}", path.display())),
    };
    if !info.interpreter {
        return Class::Unloadable("is statically linked (it does not load LD_PRELOAD)".into());
    }
    if !info.class64 || !info.little_endian || Some(info.machine) != HOST_MACHINE {
        return Class::Unloadable(
            "is built for another architecture than grace's socket library".into(),
        );
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let capabilities = sys::has_xattr(path, c"security.capability").unwrap_or(false);
        let nosuid = statvfs(path).is_ok_and(|s| s.flags().contains(FsFlags::ST_NOSUID));
        if let Some((what, who)) = secure_exec(&meta, capabilities, nosuid, runner) {
            return Class::Unloadable(format!(
                "{what}: the loader runs it in secure mode, which ignores a library preloaded by \
                 path, unless grace runs {who}"
            ));
        }
    }
    match scan(path) {
        Ok(marks) if marks.go => Class::Unloadable(
            "is a Go program, which makes its socket system calls itself (the library never \
             sees them)"
                .into(),
        ),
        Ok(marks) if marks.activation => Class::Consumer,
        Ok(_) => Class::Dynamic,
        Err(e) => Class::Unknown(format!("reading {}: {e}", path.display())),
    }
}
