use super::inspect::*;
use super::library::*;
use super::shebang::*;
use super::*;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("grace-inject-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn table_round_trips() {
    let entries = [
        table::Entry {
            fd: 3,
            proto: table::Proto::Tcp,
            addr: "127.0.0.1:8080".parse().unwrap(),
        },
        table::Entry {
            fd: 4,
            proto: table::Proto::Udp,
            addr: "[::1]:5353".parse().unwrap(),
        },
        table::Entry {
            fd: 5,
            proto: table::Proto::Tcp,
            addr: "[::]:80".parse().unwrap(),
        },
        table::Entry {
            fd: 6,
            proto: table::Proto::Tcp,
            addr: "[fe80::1%2]:443".parse().unwrap(),
        },
    ];
    let text: Vec<String> = entries.iter().map(ToString::to_string).collect();
    let text = text.join(",");
    assert_eq!(
        text,
        "3:tcp:127.0.0.1:8080,4:udp:[::1]:5353,5:tcp:[::]:80,6:tcp:[fe80::1%2]:443"
    );
    let parsed: Vec<table::Entry> = table::entries(&text).map(Option::unwrap).collect();
    assert_eq!(parsed, entries);
}

#[test]
fn table_entries_that_do_not_parse_are_skipped_not_guessed() {
    let parsed: Vec<Option<table::Entry>> =
        table::entries("3:tcp:127.0.0.1:80,,2:tcp:127.0.0.1:81,x:tcp:1.2.3.4:5,4:sctp:127.0.0.1:82,5:udp:nonsense,6:udp:[::1]:53").collect();
    assert_eq!(parsed.len(), 6, "empty entries are ignored");
    assert!(parsed[0].is_some());
    assert!(parsed[1].is_none(), "fds below 3 are not grace's");
    assert!(parsed[2].is_none());
    assert!(parsed[3].is_none());
    assert!(parsed[4].is_none());
    assert_eq!(parsed[5].unwrap().fd, 6);
    assert_eq!(table::entries("").count(), 0);
}

#[test]
fn matching_rules() {
    use table::{Match, Proto, matches};
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    let rows = [
        // held, dual stack, wanted, result (the same for TCP and UDP but where noted)
        ("127.0.0.1:80", false, "127.0.0.1:80", Match::Same),
        ("127.0.0.1:80", false, "127.0.0.1:81", Match::No),
        ("127.0.0.1:80", false, "127.0.0.2:80", Match::No),
        ("127.0.0.1:80", false, "0.0.0.0:80", Match::No),
        ("0.0.0.0:80", false, "0.0.0.0:80", Match::Same),
        ("0.0.0.0:80", false, "127.0.0.1:80", Match::No),
        ("[::]:80", true, "[::]:80", Match::Same),
        ("[::]:80", false, "[::]:80", Match::Same),
        ("[::]:80", true, "0.0.0.0:80", Match::V4WildcardOnDualStack),
        ("[::]:80", false, "0.0.0.0:80", Match::No),
        ("[::]:80", true, "127.0.0.1:80", Match::No),
        ("0.0.0.0:80", false, "[::]:80", Match::No),
        ("[::1]:80", false, "[::1]:80", Match::Same),
        ("[::1]:80", false, "127.0.0.1:80", Match::No),
        ("[fe80::1%2]:80", false, "[fe80::1%3]:80", Match::No),
        ("127.0.0.1:0", false, "127.0.0.1:0", Match::No),
    ];
    for (held, dual, wanted, expected) in rows {
        assert_eq!(
            matches(Proto::Tcp, &a(held), dual, &a(wanted)),
            expected,
            "tcp {held} (dual stack: {dual}) vs {wanted}"
        );
        // UDP never gets the dual-stack socket for an IPv4 bind: recvfrom would give the
        // server IPv6 senders in its IPv4 buffer.
        let udp = match expected {
            Match::V4WildcardOnDualStack => Match::No,
            other => other,
        };
        assert_eq!(
            matches(Proto::Udp, &a(held), dual, &a(wanted)),
            udp,
            "udp {held} (dual stack: {dual}) vs {wanted}"
        );
    }
    assert_eq!(
        matches(Proto::Udp, &a("[::]:53"), true, &a("0.0.0.0:53")),
        Match::No
    );
}

#[test]
fn sockaddr_bytes_and_ipv4_view() {
    let mut buf = [0u8; addr::SOCKADDR_IN6_LEN];
    for text in ["127.0.0.1:8080", "[::1]:443", "[fe80::1%7]:22", "0.0.0.0:0"] {
        let a: SocketAddr = text.parse().unwrap();
        let n = addr::encode(&a, &mut buf);
        assert_eq!(n, if a.is_ipv4() { 16 } else { 28 });
        assert_eq!(addr::decode(&buf[..n]), Some(a), "{text}");
    }
    assert_eq!(addr::decode(&buf[..10]), None, "short");
    // RFC 2133's sockaddr_in6 has no scope id: 24 bytes, accepted by the kernel as scope 0.
    let a: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
    assert_eq!(addr::encode(&a, &mut buf), 28);
    assert_eq!(addr::decode(&buf[..24]), Some(a));
    let scoped: SocketAddr = "[fe80::1%7]:22".parse().unwrap();
    addr::encode(&scoped, &mut buf);
    assert_eq!(
        addr::decode(&buf[..24]),
        Some("[fe80::1]:22".parse().unwrap()),
        "no room for the scope: 0"
    );
    assert_eq!(addr::decode(&buf[..23]), None, "shorter than RFC 2133's");
    assert_eq!(addr::decode(&[1, 0, 0, 0]), None, "AF_UNIX");
    let v4 = |s: &str| addr::as_v4(s.parse().unwrap()).to_string();
    assert_eq!(v4("[::]:80"), "0.0.0.0:80");
    assert_eq!(v4("[::ffff:127.0.0.1]:5000"), "127.0.0.1:5000");
    assert_eq!(
        v4("[::1]:5000"),
        "[::1]:5000",
        "a real IPv6 peer has no IPv4 form"
    );
    assert_eq!(v4("10.0.0.1:1"), "10.0.0.1:1");
}

#[test]
fn elf_programs() {
    // /bin/sh is dash or bash on every Debian system: dynamically linked.
    assert_eq!(classify_elf(Path::new("/bin/sh")), Class::Dynamic);
    let info = read_elf(&mut File::open("/bin/sh").unwrap()).unwrap();
    assert!(info.interpreter && info.class64 && info.little_endian);
    assert_eq!(Some(info.machine), HOST_MACHINE);
    // ldconfig is statically linked (static-pie) in Debian's libc-bin, which is essential.
    let ldconfig = Path::new("/sbin/ldconfig");
    if ldconfig.exists() {
        assert!(
            matches!(classify_elf(ldconfig), Class::Unloadable(ref why) if why.contains("statically linked")),
            "{:?}",
            classify_elf(ldconfig)
        );
    }
    let dir = temp_dir("elf");
    let junk = script(&dir, "junk", "\x7fELF\x02\x01");
    assert!(matches!(classify_elf(&junk), Class::Unknown(_)));
}

/// A 64-bit little-endian ELF header with these program header fields, then zeroes.
fn elf_header(phentsize: u16, phnum: u16) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..6].copy_from_slice(b"\x7fELF\x02\x01");
    h[18..20].copy_from_slice(&HOST_MACHINE.unwrap_or(62).to_le_bytes());
    h[32..40].copy_from_slice(&64u64.to_le_bytes());
    h[54..56].copy_from_slice(&phentsize.to_le_bytes());
    h[56..58].copy_from_slice(&phnum.to_le_bytes());
    h
}

#[test]
fn corrupt_program_header_tables_are_refused_without_allocating_them() {
    let dir = temp_dir("corrupt-elf");
    let path = dir.join("corrupt");
    let read = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        read_elf(&mut File::open(&path).unwrap())
    };
    // Up to 4 GiB before: 65535 headers of 65535 bytes.
    let err = read(&elf_header(u16::MAX, u16::MAX)).unwrap_err();
    assert!(err.contains("bad program header size 65535"), "{err}");
    let err = read(&elf_header(4, 10)).unwrap_err();
    assert!(err.contains("(expected 56)"), "{err}");
    // The right size, but more than the kernel's 64 KiB of headers.
    let err = read(&elf_header(56, 1171)).unwrap_err();
    assert!(err.contains("bad number of program headers 1171"), "{err}");
    let err = read(&elf_header(56, 0)).unwrap_err();
    assert!(err.contains("bad number of program headers 0"), "{err}");
    assert!(matches!(
        classify_elf(&path),
        Class::Unknown(ref why) if why.contains("program headers")
    ));
    // 1170 headers (65520 bytes) is allowed; the file is too short for them.
    let err = read(&elf_header(56, 1170)).unwrap_err();
    assert!(err.contains("reading its program headers"), "{err}");
    // A plausible table of all-zero (PT_NULL) headers: no interpreter.
    let info = read(&elf_header(56, 3)).unwrap();
    assert!(!info.interpreter);
    // 32-bit programs have 32-byte headers.
    let mut h32 = elf_header(0, 0);
    h32[4] = 1;
    h32[28..32].copy_from_slice(&52u32.to_le_bytes());
    h32[42..44].copy_from_slice(&32u16.to_le_bytes());
    h32[44..46].copy_from_slice(&2u16.to_le_bytes());
    assert!(!read(&h32).unwrap().class64);
    h32[42..44].copy_from_slice(&56u16.to_le_bytes());
    assert!(read(&h32).unwrap_err().contains("(expected 32)"));
}

const USER: Runner = Runner {
    uid: 1000,
    gid: 1000,
    no_new_privs: false,
};
const ROOT: Runner = Runner {
    uid: 0,
    gid: 0,
    no_new_privs: false,
};

#[test]
fn set_id_programs_and_file_capabilities_cannot_load_the_library() {
    let dir = temp_dir("setuid");
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    let copy = dir.join("sh");
    std::fs::copy(&sh, &copy).unwrap();
    let mode = |m: u32| {
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(m)).unwrap();
        std::fs::metadata(&copy).unwrap()
    };
    let owner = mode(0o755).uid();
    let group = std::fs::metadata(&copy).unwrap().gid();
    let other = Runner {
        uid: owner.wrapping_add(1),
        gid: group.wrapping_add(1),
        no_new_privs: false,
    };
    let its_owner = Runner {
        uid: owner,
        gid: group,
        no_new_privs: false,
    };
    assert_eq!(secure_exec(&mode(0o755), false, false, other), None);

    let setuid = mode(0o4755);
    let (what, who) = secure_exec(&setuid, false, false, other).unwrap();
    assert_eq!(what, format!("is set-user-ID (owner uid {owner})"));
    assert_eq!(who, "as that user");
    // Run by its owner (root for a root-owned copy), the ids do not change: no secure mode.
    assert_eq!(secure_exec(&setuid, false, false, its_owner), None);
    assert_eq!(secure_exec(&setuid, false, true, other), None, "nosuid");
    let nnp = Runner {
        no_new_privs: true,
        ..other
    };
    assert_eq!(
        secure_exec(&setuid, false, false, nnp),
        None,
        "no_new_privs"
    );

    let setgid = mode(0o2755);
    let (what, _) = secure_exec(&setgid, false, false, other).unwrap();
    assert!(what.starts_with("is set-group-ID"), "{what}");
    assert_eq!(secure_exec(&setgid, false, false, its_owner), None);
    // Set-group-ID without group execute is mandatory locking, not a set-group-ID program.
    assert_eq!(secure_exec(&mode(0o2745), false, false, other), None);

    let plain = mode(0o755);
    let (what, who) = secure_exec(&plain, true, false, USER).unwrap();
    assert!(what.contains("file capabilities"), "{what}");
    assert_eq!(who, "as root");
    assert_eq!(secure_exec(&plain, true, false, ROOT), None);
    assert_eq!(secure_exec(&plain, true, true, USER), None, "nosuid");

    // Through classify, on the file itself (the bits count whoever made the copy).
    mode(0o4755);
    if !statvfs(&copy).unwrap().flags().contains(FsFlags::ST_NOSUID) {
        let class = classify_elf_as(&copy, other);
        assert!(
            matches!(class, Class::Unloadable(ref why) if why.contains("set-user-ID") && why.contains("secure mode")),
            "{class:?}"
        );
        assert_eq!(classify_elf_as(&copy, its_owner), Class::Dynamic);
    }
    mode(0o755);
    assert_eq!(classify_elf_as(&copy, other), Class::Dynamic);
    assert_eq!(sys::has_xattr(&copy, c"security.capability"), Ok(false));
    // With a capability set by setcap (libcap2-bin), where the test runs as root.
    let setcap = Path::new("/usr/sbin/setcap");
    if setcap.exists() && nix::unistd::geteuid().is_root() {
        let status = std::process::Command::new(setcap)
            .arg("cap_net_bind_service=ep")
            .arg(&copy)
            .status()
            .unwrap();
        if status.success() {
            assert_eq!(sys::has_xattr(&copy, c"security.capability"), Ok(true));
            assert!(matches!(
                classify_elf_as(&copy, USER),
                Class::Unloadable(ref why) if why.contains("file capabilities")
            ));
            assert_eq!(classify_elf_as(&copy, ROOT), Class::Dynamic);
        }
    }
}

#[test]
fn static_program_refused_by_always_skipped_by_auto() {
    let ldconfig = Path::new("/sbin/ldconfig");
    if !ldconfig.exists() {
        return;
    }
    match decide(InjectMode::Always, ldconfig) {
        Verdict::Refuse(message) => {
            assert!(message.contains("statically linked"), "{message}");
            assert!(message.contains("socket activation"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decide(InjectMode::Auto, ldconfig),
        Verdict::Skip(ref why) if why.contains("statically linked")
    ));
    assert!(matches!(
        decide(InjectMode::Never, Path::new("/bin/sh")),
        Verdict::Skip(_)
    ));
    assert!(matches!(
        decide(InjectMode::Auto, Path::new("/bin/sh")),
        Verdict::Inject(_)
    ));
}

#[test]
fn scripts_are_followed_to_their_interpreter() {
    let dir = temp_dir("scripts");
    let direct = script(&dir, "direct", "#!/bin/sh -e\necho hi\n");
    let found = inspect(&direct);
    assert_eq!(found.class, Class::Dynamic);
    assert_eq!(found.runs, PathBuf::from("/bin/sh"));
    assert_eq!(found.via, "a script for /bin/sh");

    // A version-manager shim: `#!/usr/bin/env bash`, resolved in PATH like env does.
    let shim = script(
        &dir,
        "python3",
        "#!/usr/bin/env bash\nexec python3 \"$@\"\n",
    );
    let found = inspect(&shim);
    assert_eq!(found.class, Class::Dynamic);
    assert_eq!(found.runs, which::which("bash").unwrap());
    assert_eq!(
        found.via,
        format!("a script for {}", which::which("bash").unwrap().display())
    );
    let split = script(&dir, "split", "#!/usr/bin/env -S LC_ALL=C sh -e\n");
    assert_eq!(inspect(&split).runs, which::which("sh").unwrap());

    // A script of a script.
    let outer = script(&dir, "outer", &format!("#!{}\n", direct.display()));
    let found = inspect(&outer);
    assert_eq!(found.class, Class::Dynamic);
    assert_eq!(
        found.via,
        format!("a script for {}, a script for /bin/sh", direct.display())
    );

    let consumer = script(&dir, "consumer", "#!/bin/sh\necho $LISTEN_FDS\n");
    assert_eq!(inspect(&consumer).class, Class::Consumer);

    let missing = script(&dir, "missing", "#!/usr/bin/env no-such-interpreter-here\n");
    assert!(
        matches!(inspect(&missing).class, Class::Unknown(ref why) if why.contains("not in PATH"))
    );
    let text = script(&dir, "text", "just text\n");
    assert!(matches!(inspect(&text).class, Class::Unknown(_)));
    let looping = script(&dir, "loop", "#!/proc/self/exe\n");
    std::fs::write(&looping, format!("#!{}\n", looping.display())).unwrap();
    assert!(matches!(inspect(&looping).class, Class::Unknown(ref why) if why.contains("too many")));
}

#[test]
fn env_options_that_take_a_value_are_skipped_with_it() {
    let sh = which::which("sh").unwrap();
    let runs = |line: &str| interpreter(line.as_bytes());
    for line in [
        "#!/usr/bin/env sh",
        "#!/usr/bin/env  sh  \n",
        "#!/usr/bin/env\tsh\t",
        "#! /usr/bin/env sh\n",
        "#!/usr/bin/env -S -u NAME sh -e",
        "#!/usr/bin/env -S -uNAME sh",
        "#!/usr/bin/env -S -i -u NAME -C /tmp A=1 sh -e",
        "#!/usr/bin/env -S --unset=NAME sh",
        "#!/usr/bin/env -S --unset NAME sh",
        "#!/usr/bin/env -S --uns NAME --chdir /tmp sh",
        "#!/usr/bin/env -S -iu NAME sh",
        "#!/usr/bin/env -S -a ARGV0 sh",
        "#!/usr/bin/env -S --argv0=ARGV0 --debug -v sh",
        "#!/usr/bin/env -S --block-signal=PIPE sh",
        "#!/usr/bin/env -S -- sh",
        "#!/usr/bin/env -S - sh",
        "#!/usr/bin/env -S -S sh",
        "#!/usr/bin/env -S 'sh' -e # a comment",
        "#!/usr/bin/env -S sh\r\n",
        "#!/usr/bin/env -Ssh",
        "#!/usr/bin/env --split-string=sh",
    ] {
        assert_eq!(runs(line), Ok(sh.clone()), "{line:?}");
    }
    // -P searches its directories instead of PATH; -C moves a relative path.
    assert_eq!(
        runs("#!/usr/bin/env -S -P /usr/bin:/bin sh"),
        which::which_in("sh", Some("/usr/bin:/bin"), "/").map_err(|e| e.to_string())
    );
    assert_eq!(
        runs("#!/usr/bin/env -S -P /nonexistent sh"),
        Err("\"sh\" (run by env) is not in PATH".into())
    );
    assert_eq!(
        runs("#!/usr/bin/env -S -C /usr ./bin/sh"),
        Ok(PathBuf::from("/usr/./bin/sh"))
    );
    assert_eq!(
        runs("#!/usr/bin/env -S /bin/sh -e"),
        Ok(PathBuf::from("/bin/sh"))
    );
    // Without -S the kernel passes the rest of the line as one argument: env then looks
    // for a program named "sh -e" (and fails), or takes it all as an option's value.
    assert_eq!(
        runs("#!/usr/bin/env sh -e"),
        Err("\"sh -e\" (run by env) is not in PATH".into())
    );
    assert_eq!(
        runs("#!/usr/bin/env -u NAME sh"),
        Ok(PathBuf::from("/usr/bin/env")),
        "-u takes \" NAME sh\": no command"
    );
    assert_eq!(runs("#!/usr/bin/env"), Ok(PathBuf::from("/usr/bin/env")));
    assert_eq!(
        runs("#!/usr/bin/env -S -u"),
        Err("env's option \"-u\" has no value".into())
    );
    // A name that is only an assignment or a path after `--` is still the command.
    assert_eq!(runs("#!/usr/bin/env -S A=1 B=2 sh"), Ok(sh.clone()));
    assert_eq!(
        runs("#!/usr/bin/env -S A=1 -i"),
        Err("\"-i\" (run by env) is not in PATH".into()),
        "options end at the first assignment"
    );
}

#[test]
fn a_crlf_shebang_names_no_interpreter() {
    for line in ["#!/bin/sh\r\n", "#!/bin/sh\r", "#!/usr/bin/env sh\r\n"] {
        let err = interpreter(line.as_bytes()).unwrap_err();
        assert!(err.contains("carriage return"), "{line:?}: {err}");
        assert!(err.contains("sh\\r"), "{line:?}: {err}");
    }
    // A blank before the CR: the kernel's interpreter is /bin/sh, its argument "\r".
    assert_eq!(interpreter(b"#!/bin/sh \r\n"), Ok(PathBuf::from("/bin/sh")));
    let dir = temp_dir("crlf");
    let crlf = script(&dir, "crlf", "#!/bin/sh\r\necho hi\r\n");
    assert!(
        matches!(inspect(&crlf).class, Class::Unknown(ref why) if why.contains("carriage return")),
        "{:?}",
        inspect(&crlf)
    );
    assert!(matches!(
        decide(InjectMode::Auto, &crlf),
        Verdict::Skip(ref why) if why.contains("carriage return")
    ));
}

#[test]
fn a_library_that_cannot_be_prepared_fails_always_but_not_auto() {
    let why = "writing grace's socket library to a memfd: memfd_create: EMFILE".to_string();
    let err = without_library(InjectMode::Always, Path::new("/bin/sh"), why.clone());
    assert_eq!(err, Err(format!("--inject always: {why}")));
    for _ in 0..2 {
        assert_eq!(
            without_library(InjectMode::Auto, Path::new("/bin/sh"), why.clone()),
            Ok(())
        );
    }
}

#[test]
fn the_library_fd_is_adopted_at_the_same_number() {
    // The previous image's memfd, with the same library: kept as it is.
    let same = write_library().unwrap();
    let number = same.as_raw_fd();
    let library = adopted(same).unwrap();
    assert_eq!(library.fd.as_raw_fd(), number);
    assert!(
        library.path.ends_with(&format!("/fd/{number}")),
        "{}",
        library.path
    );
    assert_eq!(std::fs::read(&library.path).unwrap(), LIBRARY);

    // A previous grace's different library (an upgrade): this one's, at the same number.
    let old = memfd_create(c"old-preload", MFdFlags::MFD_CLOEXEC).unwrap();
    File::from(old.try_clone().unwrap())
        .write_all(b"an older library")
        .unwrap();
    let number = old.as_raw_fd();
    assert!(!holds_library(&old));
    let library = adopted(old).unwrap();
    assert_eq!(library.fd.as_raw_fd(), number);
    assert!(holds_library(&library.fd));
    assert_eq!(std::fs::read(&library.path).unwrap(), LIBRARY);
    let flags = fcntl(&library.fd, FcntlArg::F_GETFD).unwrap();
    assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "still close-on-exec");
}

#[test]
fn marks_split_across_chunks_are_found() {
    let dir = temp_dir("marks");
    let path = dir.join("big");
    let mut data = vec![b'x'; (1 << 20) - 4];
    data.extend_from_slice(b"LISTEN_FDS");
    data.extend(vec![b'y'; 100]);
    std::fs::write(&path, &data).unwrap();
    assert_eq!(
        scan(&path).unwrap(),
        Marks {
            activation: true,
            go: false
        }
    );
    std::fs::write(&path, b"nothing here").unwrap();
    assert_eq!(scan(&path).unwrap(), Marks::default());
}

#[test]
fn preload_is_appended_to_the_users() {
    let mut env = vec![
        CString::new("A=1").unwrap(),
        CString::new("LD_PRELOAD=/usr/lib/libuser.so").unwrap(),
    ];
    assert_eq!(
        take_var(&mut env, "LD_PRELOAD").unwrap(),
        b"/usr/lib/libuser.so"
    );
    assert_eq!(env.len(), 1);
    assert_eq!(take_var(&mut env, "LD_PRELOAD"), None);
}

#[test]
fn the_library_is_carried_and_loads_from_a_memfd() {
    assert!(
        LIBRARY.starts_with(b"\x7fELF"),
        "build.rs built the library"
    );
    let path = library_path().unwrap();
    assert!(path.starts_with("/proc/"), "{path}");
    assert_eq!(std::fs::read(path).unwrap(), LIBRARY);
    // Sealed: nobody can change what children load.
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(b"x"));
    assert!(write.is_err());
    // The loader accepts it (a process with no table passes everything through).
    let status = std::process::Command::new("/bin/true")
        .env("LD_PRELOAD", path)
        .env_remove(ENV)
        .status()
        .unwrap();
    assert!(status.success());
}
