use std::os::fd::{AsRawFd, OwnedFd};

use super::*;
use crate::supervisor::state::tests::full;

/// Real descriptors of the kinds the roles of `sample` need, in that order, so that `validate`
/// finds them open and fitting.
struct Fds(Vec<OwnedFd>);

impl Fds {
    fn new(kids: &[Child]) -> Self {
        use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
        let (a, b) = UnixStream::pair().unwrap();
        let control_dir = std::env::temp_dir().join(format!("grace-handoff-{}", kids[0].pid()));
        let _ = std::fs::create_dir_all(&control_dir);
        let control = UnixListener::bind(control_dir.join("c.sock")).unwrap();
        let _ = std::fs::remove_dir_all(&control_dir);
        Fds(vec![
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().into(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into(),
            UnixDatagram::unbound().unwrap().into(),
            control.try_clone().unwrap().into(),
            control.into(),
            a.into(),
            b.into(),
            std::fs::File::open(std::env::current_exe().unwrap())
                .unwrap()
                .into(),
            crate::sys::pidfd_open(kids[0].pid()).unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().into(),
        ])
    }
    fn raw(&self, i: usize) -> i32 {
        self.0[i].as_raw_fd()
    }
}

/// A child of this process for the record to name, killed when dropped.
struct Child(std::process::Child);

impl Child {
    fn new() -> Self {
        Child(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap(),
        )
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A record that passes validation: `full()`'s state with its running generations on real
/// children, and every role on a real fd.
fn sample(fds: &Fds, kids: &[Child]) -> Record {
    let mut state = full();
    let mut text = String::new();
    state.encode(&mut text);
    // Point the generations whose leader runs at our children; 1200's leader was reaped.
    let text = text
        .replace(" 1300 ", &format!(" {} ", kids[0].pid()))
        .replace(" 1400 ", &format!(" {} ", kids[1].pid()))
        .replace("phase starting 5 crash", "phase reexec");
    state = State::decode(text.lines().map(Fields::new)).unwrap();
    let roles = vec![
        Role::Listener {
            kind: SocketKind::Stream,
            name: "http".into(),
            local: "tcp [::]:8080".parse().unwrap(),
            spec: "http=:8080".into(),
            unix_path: None,
        },
        Role::Listener {
            kind: SocketKind::Datagram,
            name: String::new(),
            local: "unix /tmp/a b.sock".parse().unwrap(),
            spec: "-".into(),
            unix_path: Some("/tmp/a b.sock".into()),
        },
        Role::Notify {
            name: "@grace/1/notify".into(),
        },
        Role::Control {
            display: "@grace/control/1".into(),
            path: None,
        },
        Role::Control {
            display: "/run/grace ctl.sock".into(),
            path: Some("/run/grace ctl.sock".into()),
        },
        Role::Client {
            id: 7,
            partial: String::new(),
            deadline: None,
        },
        Role::Client {
            id: 8,
            partial: "rest".into(),
            deadline: Some(6),
        },
        Role::Library,
        Role::Pidfd { pid: kids[0].pid() },
        Role::Member {
            listener: 0,
            owner: Some(3),
        },
    ];
    let fds = roles
        .into_iter()
        .enumerate()
        .map(|(i, role)| Carried {
            fd: fds.raw(i),
            role,
        })
        .collect();
    Record {
        state,
        fds,
        groups: vec![GroupRecord {
            listener: 0,
            target: 41,
            target_owner: None,
            members: vec![Member::Ours(40), Member::Foreign(9), Member::Ours(41)],
        }],
    }
}

fn fixture() -> (Fds, Vec<Child>) {
    let kids = vec![Child::new(), Child::new()];
    (Fds::new(&kids), kids)
}

#[test]
fn round_trip_and_validates() {
    let (fds, kids) = fixture();
    let record = sample(&fds, &kids);
    let text = record.encode();
    assert!(text.starts_with("grace-handoff 4\n"));
    assert!(!text.contains("a b"), "spaces must be escaped: {text}");
    let decoded = Record::decode(&text).unwrap();
    assert_eq!(decoded, record);
    assert_eq!(decoded.validate(&[]), Ok(()));
}

#[test]
fn refuses_unknown_versions() {
    let (fds, kids) = fixture();
    let text = sample(&fds, &kids)
        .encode()
        .replacen("grace-handoff 4", "grace-handoff 1", 1);
    let err = Record::decode(&text).unwrap_err();
    assert!(err.contains("version 1 is not supported"), "{err}");
    assert!(Record::decode("hello").unwrap_err().contains("bad header"));
}

#[test]
fn skips_unknown_keys_but_not_malformed_ones() {
    let (fds, kids) = fixture();
    let record = sample(&fds, &kids);
    let text = record.encode() + "future_key 1 2 3\n";
    assert_eq!(Record::decode(&text), Ok(record.clone()));
    let text = record.encode() + "generation x\n";
    assert!(Record::decode(&text).unwrap_err().contains("bad line"));
    let text = record.encode() + "fd 40 teleporter\n";
    assert!(Record::decode(&text).unwrap_err().contains("bad line"));
}

/// Replaces the pid of the generation whose leader runs (`kids[0]`) in the record's text.
fn with_pid(record: &Record, kids: &[Child], pid: &str) -> Result<Record, String> {
    let from = format!("generation 4 {} ", kids[0].pid());
    let text = record.encode();
    assert!(text.contains(&from));
    Record::decode(&text.replace(&from, &format!("generation 4 {pid} ")))
}

#[test]
fn pids_that_are_not_our_children_are_refused() {
    let (fds, kids) = fixture();
    let record = sample(&fds, &kids);
    let stranger = Child::new();
    // A child of our child: alive, but not ours.
    let grandchild = std::process::Command::new("sh")
        .args(["-c", "sleep 30 & echo $!; wait"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut shell = Child(grandchild);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(shell.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let not_ours = line.trim().to_string();
    let me = std::process::id().to_string();
    for pid in ["-1", "0", "1", me.as_str(), not_ours.as_str()] {
        let err = match with_pid(&record, &kids, pid) {
            Ok(r) => r.validate(&[]).unwrap_err(),
            Err(decode) => decode,
        };
        assert!(
            err.contains("refused") || err.contains("bad line"),
            "{pid}: {err}"
        );
    }
    // Our own child passes.
    let ok = with_pid(&record, &kids, &stranger.pid().to_string()).unwrap();
    // ...except that the pidfd then names a pid that is no generation's.
    assert!(ok.validate(&[]).unwrap_err().contains("pidfd"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(not_ours.parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = shell.0.kill();
}

#[test]
fn bad_fds_are_refused() {
    let (fds, kids) = fixture();
    let record = sample(&fds, &kids);
    type Mutation = Box<dyn Fn(&mut Record)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|r| r.fds[0].fd = 2), "below 3"),
        (Box::new(|r| r.fds[0].fd = -1), "below 3"),
        (Box::new(|r| r.fds[1].fd = r.fds[0].fd), "named twice"),
        (Box::new(|r| r.fds[0].fd = 100_000), "not open"),
        (
            Box::new(|r| r.fds.retain(|c| !matches!(c.role, Role::Notify { .. }))),
            "notify",
        ),
        (
            Box::new(|r| {
                r.fds
                    .retain(|c| !matches!(c.role, Role::Client { id: 7, .. }))
            }),
            "client 7",
        ),
        // The notify role on the library's file, a listener on a pidfd, a client on a pidfd.
        (
            Box::new(|r| {
                let library = r.fds.remove(7);
                r.fds[2].fd = library.fd;
            }),
            "not a unix datagram socket",
        ),
        (
            Box::new(|r| {
                let pidfd = r.fds.remove(8);
                r.fds[0].fd = pidfd.fd;
            }),
            "not a listening stream socket",
        ),
        (
            Box::new(|r| {
                let pidfd = r.fds.remove(8);
                r.fds[6].fd = pidfd.fd;
            }),
            "not a connected unix stream socket",
        ),
        // A member of the datagram listener on a stream socket; of a listener with no group; of
        // a listener that does not exist.
        (
            Box::new(|r| {
                r.groups[0].listener = 1;
                r.fds[9].role = Role::Member {
                    listener: 1,
                    owner: None,
                };
            }),
            "not a member of listener 1",
        ),
        (Box::new(|r| r.groups.clear()), "not a member of listener 0"),
        (
            Box::new(|r| {
                r.fds[9].role = Role::Member {
                    listener: 5,
                    owner: None,
                }
            }),
            "a member of no listener",
        ),
        (
            Box::new(|r| r.groups[0].listener = 7),
            "a group for listener 7",
        ),
    ];
    for (mutate, why) in cases {
        let mut r = record.clone();
        mutate(&mut r);
        // Through the text form, as the new image sees it.
        let r = Record::decode(&r.encode()).unwrap();
        let err = r.validate(&[]).unwrap_err();
        assert!(err.contains(why), "{why}: {err}");
    }
}

/// A tiny deterministic generator: the test must be repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_mutated_records_never_panic_and_never_pass_with_bad_pids() {
    let (fds, kids) = fixture();
    let text = sample(&fds, &kids).encode();
    let words: Vec<&str> = text.split([' ', '\n']).collect();
    let junk = [
        "-1",
        "0",
        "1",
        "-",
        "%",
        "%ZZ",
        "",
        "99999999999999999999",
        "fd",
        "generation",
        "3",
        "ready",
        "starting",
        "draining",
        "\u{0}",
        "é",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for round in 0..5_000 {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(lines.len());
            let mut f: Vec<String> = lines[i].split(' ').map(str::to_string).collect();
            match rng.below(6) {
                0 => {
                    let j = rng.below(f.len());
                    f[j] = junk[rng.below(junk.len())].to_string();
                }
                1 => {
                    let j = rng.below(f.len());
                    f[j] = words[rng.below(words.len())].to_string();
                }
                2 => {
                    f.pop();
                }
                3 => f.push(junk[rng.below(junk.len())].to_string()),
                4 => {
                    let j = rng.below(lines.len());
                    lines.push(lines[j].clone());
                }
                _ => {
                    lines.remove(i.max(1));
                    continue;
                }
            }
            lines[i] = f.join(" ");
        }
        let mutated = lines.join("\n");
        let Ok(record) = Record::decode(&mutated) else {
            continue;
        };
        if record.validate(&[]).is_ok() {
            accepted += 1;
            // Whatever passed names only our children, and fds that are open and unique.
            for (_, pid, alive) in record.state.pids() {
                assert!(pid > 1, "round {round}: {mutated}");
                if alive {
                    assert_eq!(crate::sys::parent_of(pid), Some(std::process::id() as i32));
                }
            }
        }
    }
    assert!(accepted > 0, "some harmless mutations must still pass");
    // Pure noise.
    for _ in 0..2_000 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let noise = format!("grace-handoff 2\n{}", String::from_utf8_lossy(&bytes));
        let _ = Record::decode(&noise).map(|r| r.validate(&[]));
    }
}

#[test]
fn records_not_written_mid_reexec_or_naming_our_own_fds_are_refused() {
    let (fds, kids) = fixture();
    let record = sample(&fds, &kids);
    let text = record.encode().replace("phase reexec", "phase idle");
    let err = Record::decode(&text).unwrap().validate(&[]).unwrap_err();
    assert!(err.contains("not written during a re-exec"), "{err}");
    let err = record.validate(&[fds.raw(3)]).unwrap_err();
    assert!(err.contains("one this image opened itself"), "{err}");
}

#[test]
fn generations_nothing_of_which_can_be_found_are_dropped_not_signalled() {
    let (fds, kids) = fixture();
    let mut record = sample(&fds, &kids);
    // Generation 3's leader (pid 1200) was reaped, and no child of ours is in its group.
    assert_eq!(
        record.drop_unreachable_generations(|_, pgid| crate::sys::group_has_child(pgid)),
        vec![3]
    );
    let left: Vec<i32> = record.state.pids().map(|(_, pid, _)| pid).collect();
    assert_eq!(left, vec![kids[0].pid(), kids[1].pid()]);
}
