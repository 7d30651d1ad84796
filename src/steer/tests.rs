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
