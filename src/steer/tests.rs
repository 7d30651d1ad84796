//! The kernel's behaviour that steering relies on, checked on real sockets: the order of a
//! reuseport group's members after joins and leaves, and the program's choice of member (by index,
//! and by the probe's source port) for TCP over IPv4, IPv6 and dual-stack, and for UDP.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, getsockname, listen,
    setsockopt, socket, sockopt,
};

use super::*;
use crate::sys;

/// A member socket: `SO_REUSEPORT`, bound to `addr` (port 0 takes a fresh one), listening (TCP).
fn member(addr: SocketAddr, tcp: bool) -> (OwnedFd, SocketAddr) {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let ty = if tcp {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let fd = socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &false).unwrap();
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
    if tcp {
        listen(&fd, Backlog::new(64).unwrap()).unwrap();
    }
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).unwrap();
    let port = local
        .as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| local.as_sockaddr_in6().map(|a| a.port()))
        .unwrap();
    (fd, SocketAddr::new(addr.ip(), port))
}

/// Which member (by position in `sockets`) a new connection from `from` lands on.
fn lands_on(sockets: &[OwnedFd], to: SocketAddr, from: Option<SocketAddr>, tcp: bool) -> usize {
    if tcp {
        let conn = match from {
            None => TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap(),
            Some(from) => {
                let (fd, _) = member(from, false);
                drop(fd);
                connect_from(from, to)
            }
        };
        for _ in 0..200 {
            for (i, s) in sockets.iter().enumerate() {
                if nix::sys::socket::accept(s.as_fd()).is_ok() {
                    drop(conn);
                    return i;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("no member accepted the connection");
    }
    let client = UdpSocket::bind(from.unwrap_or(SocketAddr::new(to.ip(), 0))).unwrap();
    client.send_to(b"x", to).unwrap();
    for _ in 0..200 {
        for (i, s) in sockets.iter().enumerate() {
            let mut buf = [0u8; 8];
            if nix::sys::socket::recv(
                s.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            )
            .is_ok()
            {
                return i;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("no member received the datagram");
}

/// A TCP connection from a chosen source address.
fn connect_from(from: SocketAddr, to: SocketAddr) -> TcpStream {
    let family = if from.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(fd.as_raw_fd(), &SockaddrStorage::from(from)).unwrap();
    nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to)).unwrap();
    TcpStream::from(fd)
}

/// A free port on `ip`, for a client's source.
fn free_source(ip: &str) -> SocketAddr {
    let probe = std::net::TcpListener::bind((ip, 0)).unwrap();
    probe.local_addr().unwrap()
}

fn attach(sockets: &[OwnedFd], target: usize, probe: Option<(u16, usize)>) {
    sys::attach_reuseport_cbpf(sockets[0].as_fd(), &program(target, probe)).unwrap();
}

/// Tiny deterministic generator.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn the_model_follows_the_kernel_through_joins_and_leaves() {
    for tcp in [true, false] {
        let (first, addr) = member("127.0.0.1:0".parse().unwrap(), tcp);
        let mut sockets = vec![first];
        let mut model = Group::default();
        model.join(Member::Ours(inode(sockets[0].as_fd()).unwrap()));
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for step in 0..40 {
            if sockets.len() < 2 || (sockets.len() < 6 && rng.below(2) == 0) {
                let (fd, _) = member(addr, tcp);
                model.join(Member::Ours(inode(fd.as_fd()).unwrap()));
                sockets.push(fd);
            } else {
                let gone = sockets.remove(rng.below(sockets.len()));
                model.leave(inode(gone.as_fd()).unwrap());
                drop(gone);
            }
            // Every member is where the model says: the program picks it by index.
            for (i, s) in sockets.iter().enumerate() {
                let index = model.index_of(inode(s.as_fd()).unwrap()).unwrap();
                attach(&sockets, index, None);
                assert_eq!(
                    lands_on(&sockets, addr, None, tcp),
                    i,
                    "step {step}, tcp {tcp}: member {i} at index {index}"
                );
            }
        }
    }
}

#[test]
fn the_probe_is_recognised_by_its_source_port() {
    for (listen_on, client_ip, tcp) in [
        ("127.0.0.1:0", "127.0.0.1", true),
        ("[::1]:0", "::1", true),
        ("[::]:0", "127.0.0.1", true),
        ("[::]:0", "::1", true),
        ("127.0.0.1:0", "127.0.0.1", false),
        ("[::1]:0", "::1", false),
    ] {
        let (first, addr) = member(listen_on.parse().unwrap(), tcp);
        let (second, _) = member(addr, tcp);
        let sockets = vec![first, second];
        let to = SocketAddr::new(client_ip.parse().unwrap(), addr.port());
        let from = free_source(client_ip);
        attach(&sockets, 0, Some((from.port(), 1)));
        assert_eq!(
            lands_on(&sockets, to, Some(from), tcp),
            1,
            "{listen_on} from {from}"
        );
        for _ in 0..5 {
            assert_eq!(lands_on(&sockets, to, None, tcp), 0, "{listen_on}: others");
        }
        // Swapped atomically: everything to member 1 now.
        attach(&sockets, 1, None);
        for _ in 0..5 {
            assert_eq!(
                lands_on(&sockets, to, None, tcp),
                1,
                "{listen_on}: after the switch"
            );
        }
    }
}

#[test]
fn graces_own_listeners_and_their_new_members_form_one_group() {
    // What grace does: bind (proving the address free), then SO_REUSEPORT, then listen; each
    // generation adds a member with `new_member`.
    use crate::listen::{BindOptions, ListenSpec, Proto, bind_all, new_member};
    for (spec, tcp) in [
        ("127.0.0.1:0", true),
        ("udp://127.0.0.1:0", false),
        (":0", true),
    ] {
        let specs: Vec<ListenSpec> = vec![spec.parse().unwrap()];
        let opts = BindOptions {
            backlog: Some(16),
            socket_mode: None,
        };
        let first = bind_all(&specs, &opts).unwrap().remove(0);
        let (_, addr) = first.local.inet().unwrap();
        let to = SocketAddr::new(
            if addr.ip().is_unspecified() {
                "127.0.0.1".parse().unwrap()
            } else {
                addr.ip()
            },
            addr.port(),
        );
        let proto = if tcp { Proto::Tcp } else { Proto::Udp };
        let mut sockets = vec![first.fd];
        for _ in 0..2 {
            sockets.push(new_member(&sockets[0], proto).unwrap());
        }
        for s in &sockets {
            nix::fcntl::fcntl(
                s,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap();
        }
        if tcp {
            // A member takes the first socket's backlog.
            assert_eq!(sys::listen_queue(sockets[2].as_fd()).unwrap().1, 16);
        }
        for target in 0..3 {
            attach(&sockets, target, None);
            assert_eq!(lands_on(&sockets, to, None, tcp), target, "{spec}");
        }
    }
}

/// A generation's copy of a socket grace hands it, non-blocking for `lands_on`.
fn server_copy(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` is open for the duration of the call (grace's copy, held by `Steering`).
    let copy = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .unwrap();
    nix::fcntl::fcntl(
        &copy,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    copy
}

#[test]
fn steering_sends_each_generation_nothing_before_its_switch_and_stays_small() {
    use crate::listen::{BindOptions, ListenSpec, bind_all};
    let specs: Vec<ListenSpec> = vec!["127.0.0.1:0".parse().unwrap()];
    let mut listeners = bind_all(&specs, &BindOptions::default()).unwrap();
    let (_, to) = listeners[0].local.inet().unwrap();
    let (mut steering, shared) = Steering::new(&listeners);
    assert!(shared.is_empty() && steering.any(), "{shared:?}");
    // The first generation takes the listener's own socket.
    let first = steering.sockets_for(&listeners, 1, true).unwrap();
    assert_eq!(first, vec![listeners[0].fd.as_raw_fd()]);
    let mut old = server_copy(first[0]);
    for generation in 2..=12 {
        let new = server_copy(steering.sockets_for(&listeners, generation, false).unwrap()[0]);
        assert_ne!(new.as_raw_fd(), old.as_raw_fd());
        let both = [old, new];
        // Before the switch, clients go to the old generation; the probe's port to the new one.
        for _ in 0..3 {
            assert_eq!(
                lands_on(&both, to, None, true),
                0,
                "generation {generation}"
            );
        }
        let from = free_source("127.0.0.1");
        steering.probe_from(&listeners, generation, from.port());
        assert_eq!(lands_on(&both, to, Some(from), true), 1);
        steering.end_probe(&listeners, generation);
        // The switch: everything goes to the new one, whose socket is now the listener's.
        assert!(steering.steer(&mut listeners, generation).is_empty());
        assert_eq!(
            inode(listeners[0].fd.as_fd()).unwrap(),
            inode(both[1].as_fd()).unwrap()
        );
        for _ in 0..3 {
            assert_eq!(lands_on(&both, to, None, true), 1);
        }
        // The old generation is gone: its socket closes, and nothing moves.
        let [gone, new] = both;
        drop(gone);
        assert!(steering.collect(&listeners, &[generation]).is_empty());
        assert_eq!(
            steering.group_sizes(),
            vec![(0, 1)],
            "generation {generation}"
        );
        assert_eq!(lands_on(std::slice::from_ref(&new), to, None, true), 0);
        old = new;
    }
}

#[test]
fn a_rolled_back_generation_is_closed_and_never_reached() {
    use crate::listen::{BindOptions, ListenSpec, bind_all};
    let specs: Vec<ListenSpec> = vec!["udp://127.0.0.1:0".parse().unwrap()];
    let listeners = bind_all(&specs, &BindOptions::default()).unwrap();
    let (_, to) = listeners[0].local.inet().unwrap();
    let (mut steering, _) = Steering::new(&listeners);
    let current = server_copy(steering.sockets_for(&listeners, 1, true).unwrap()[0]);
    let rolled_back = server_copy(steering.sockets_for(&listeners, 2, false).unwrap()[0]);
    let both = [current, rolled_back];
    for _ in 0..5 {
        assert_eq!(lands_on(&both, to, None, false), 0);
    }
    let [current, rolled_back] = both;
    drop(rolled_back);
    assert!(steering.collect(&listeners, &[1]).is_empty());
    assert_eq!(steering.group_sizes(), vec![(0, 1)]);
    assert_eq!(lands_on(std::slice::from_ref(&current), to, None, false), 0);
}

#[test]
fn a_strangers_socket_in_the_group_is_reported() {
    use crate::listen::{BindOptions, ListenSpec, bind_all};
    let specs: Vec<ListenSpec> = vec!["127.0.0.1:0".parse().unwrap()];
    let mut listeners = bind_all(&specs, &BindOptions::default()).unwrap();
    let (_, addr) = listeners[0].local.inet().unwrap();
    let (mut steering, _) = Steering::new(&listeners);
    steering.sockets_for(&listeners, 1, true).unwrap();
    // Same user, SO_REUSEPORT, same address: the kernel lets it in.
    let (stranger, _) = member(addr, true);
    steering.sockets_for(&listeners, 2, false).unwrap();
    let logs = steering.steer(&mut listeners, 2);
    let ino = inode(stranger.as_fd()).unwrap();
    assert!(
        logs.len() == 1 && logs[0].contains(&format!("inode {ino}")),
        "{logs:?}"
    );
    // Once.
    assert!(steering.collect(&listeners, &[1, 2]).is_empty());
}

#[test]
fn an_old_generations_open_connections_are_counted_until_it_closes_them() {
    use crate::listen::{BindOptions, ListenSpec, bind_all};
    use std::collections::HashSet;
    let specs: Vec<ListenSpec> = vec!["127.0.0.1:0".parse().unwrap()];
    let mut listeners = bind_all(&specs, &BindOptions::default()).unwrap();
    let (_, to) = listeners[0].local.inet().unwrap();
    let (mut steering, _) = Steering::new(&listeners);
    let old = server_copy(steering.sockets_for(&listeners, 1, true).unwrap()[0]);
    let accept = |from: &OwnedFd| -> OwnedFd {
        for _ in 0..500 {
            if let Ok(fd) = nix::sys::socket::accept(from.as_fd()) {
                return fd;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("nothing to accept");
    };
    let clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(to).unwrap()).collect();
    let accepted: Vec<OwnedFd> = (0..2).map(|_| accept(&old)).collect();
    let new = server_copy(steering.sockets_for(&listeners, 2, false).unwrap()[0]);
    steering.steer(&mut listeners, 2);
    // What the old generation's processes hold: its listener copy, its two connections, and a
    // socket that is no connection to the port (a unix pair).
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let held = |fds: &[&dyn AsFd]| -> HashSet<u64> {
        fds.iter().map(|fd| inode(fd.as_fd()).unwrap()).collect()
    };
    let all = held(&[&old, &accepted[0], &accepted[1], &a]);
    assert_eq!(steering.open_connections(1, || all.clone()), 2);
    // Later checks ask the kernel only: one closed, then the other.
    let [first, second] = <[OwnedFd; 2]>::try_from(accepted).unwrap();
    let second_ino = inode(second.as_fd()).unwrap();
    drop(first);
    assert_eq!(
        steering.open_connections(1, || panic!("the descriptors are scanned once")),
        1
    );
    drop(second);
    assert_eq!(steering.open_connections(1, HashSet::new), 0);
    // Another generation's count is its own.
    let _client = TcpStream::connect(to).unwrap();
    let third = accept(&new);
    assert_eq!(
        steering.open_connections(2, || HashSet::from([
            inode(third.as_fd()).unwrap(),
            second_ino
        ])),
        1
    );
    drop(clients);
}

#[test]
fn members_left_behind_by_overlapping_generations_close_at_the_next_handover() {
    use crate::listen::{BindOptions, ListenSpec, bind_all};
    let specs: Vec<ListenSpec> = vec!["127.0.0.1:0".parse().unwrap()];
    let mut listeners = bind_all(&specs, &BindOptions::default()).unwrap();
    let (_, to) = listeners[0].local.inet().unwrap();
    let (mut steering, _) = Steering::new(&listeners);
    let one = server_copy(steering.sockets_for(&listeners, 1, true).unwrap()[0]);
    let two = server_copy(steering.sockets_for(&listeners, 2, false).unwrap()[0]);
    steering.steer(&mut listeners, 2);
    let three = server_copy(steering.sockets_for(&listeners, 3, false).unwrap()[0]);
    steering.steer(&mut listeners, 3);
    // Three generations overlapped; the two old ones go. The target is the last member, so
    // closing either would move it under the program: both wait.
    drop((one, two));
    steering.collect(&listeners, &[3]);
    assert_eq!(steering.group_sizes(), vec![(0, 3)]);
    let three = [three];
    assert_eq!(lands_on(&three, to, None, true), 0);
    // The next handover closes them: before the switch, while its new member is named by
    // nothing, and after it.
    let four = server_copy(steering.sockets_for(&listeners, 4, false).unwrap()[0]);
    let [three] = three;
    let both = [three, four];
    assert_eq!(lands_on(&both, to, None, true), 0);
    assert!(steering.steer(&mut listeners, 4).is_empty());
    assert_eq!(steering.group_sizes(), vec![(0, 2)]);
    for _ in 0..3 {
        assert_eq!(lands_on(&both, to, None, true), 1);
    }
    let [three, four] = both;
    drop(three);
    steering.collect(&listeners, &[4]);
    assert_eq!(steering.group_sizes(), vec![(0, 1)]);
    assert_eq!(lands_on(std::slice::from_ref(&four), to, None, true), 0);
}

#[test]
fn handshakes_in_progress_at_the_switch_are_waited_for_a_bounded_time() {
    use crate::listen::{BindOptions, ListenSpec, bind_all};
    let specs: Vec<ListenSpec> = vec!["127.0.0.1:0".parse().unwrap()];
    let mut listeners = bind_all(&specs, &BindOptions::default()).unwrap();
    let (_, to) = listeners[0].local.inet().unwrap();
    let (mut steering, _) = Steering::new(&listeners);
    let old = server_copy(steering.sockets_for(&listeners, 1, true).unwrap()[0]);
    // A client whose handshake stays in progress (completed, held until it sends data).
    sys::defer_accept(old.as_fd(), 30).unwrap();
    let client = TcpStream::connect(to).unwrap();
    let _new = server_copy(steering.sockets_for(&listeners, 2, false).unwrap()[0]);
    steering.steer(&mut listeners, 2);
    assert_eq!(steering.queued(&listeners, 1), (1, None));
    // It completes into the old generation's queue: that counts now.
    use std::io::Write;
    (&client).write_all(b"x").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while steering.queued(&listeners, 1).0 != 1 || sys::accept_queue_len(old.as_fd()).unwrap() != 1
    {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(nix::sys::socket::accept(old.as_fd()).is_ok());
    assert_eq!(steering.queued(&listeners, 1), (0, None));
    // One that never completes is waited for only so long.
    let _other = server_copy(steering.sockets_for(&listeners, 3, false).unwrap()[0]);
    sys::defer_accept(listeners[0].fd.as_fd(), 30).unwrap();
    let _late = TcpStream::connect(to).unwrap();
    steering.steer(&mut listeners, 3);
    assert_eq!(steering.queued(&listeners, 2).0, 1);
    std::thread::sleep(Duration::from_millis(super::steering::HANDSHAKE_WAIT + 100));
    let (n, log) = steering.queued(&listeners, 2);
    assert_eq!(n, 0);
    assert!(log.is_some_and(|l| l.contains("1 handshakes still incomplete")));
}
