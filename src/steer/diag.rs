//! What the kernel says about the sockets on grace's ports, asked over `NETLINK_SOCK_DIAG`
//! (`inet_diag`, what `ss` uses): which sockets listen on an address (to find strangers in a
//! group), which handshakes are in progress, which connections a set of socket inodes holds.
//!
//! The kernel filters by state and by local port (a two-instruction `inet_diag` bytecode), so a
//! busy machine's thousands of `TIME_WAIT` sockets are never read, let alone parsed: a check
//! costs what the port's own sockets cost.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use crate::listen::Proto;

const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_RECV: u8 = 3;
const TCP_TIME_WAIT: u8 = 6;
/// An unconnected UDP socket is in `TCP_CLOSE`.
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSING: u8 = 11;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The request (and its answers) from before `SOCK_DIAG_BY_FAMILY`: TCP over both families.
const TCPDIAG_GETSOCK: u16 = 18;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;
/// `struct inet_diag_msg`: family, state, timer, retrans, the socket id (48 bytes), expires,
/// rqueue, wqueue, uid, inode.
const MSG_LEN: usize = 72;

/// One socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u64,
}

/// Which address families a dump covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    /// Both, in one pass over the kernel's tables for TCP.
    Any,
}

impl Family {
    fn of(addr: SocketAddr) -> Self {
        if addr.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        }
    }
}

/// The sockets of `proto` in one of `states` (a bit per state) whose local port is one of `ports`.
///
/// Every dump of connection states walks the kernel's whole established hash (262,144 buckets on
/// a machine with 24 GiB, about a millisecond) whatever the filter, so callers ask once for all
/// their ports and families: for TCP `Family::Any` is one walk (the older `TCPDIAG_GETSOCK`
/// request, whose dumps cover both families), not two.
pub fn sockets(
    proto: Proto,
    family: Family,
    states: u32,
    ports: &[u16],
) -> Result<Vec<Row>, Errno> {
    let requests = match (family, proto) {
        (Family::Any, Proto::Udp) => vec![
            request(proto, Family::V4, states, ports),
            request(proto, Family::V6, states, ports),
        ],
        _ => vec![request(proto, family, states, ports)],
    };
    let mut rows = Vec::new();
    for req in requests {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        sendto(
            fd.as_raw_fd(),
            &req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        rows.extend(read_rows(&fd)?);
    }
    Ok(rows)
}

fn request(proto: Proto, family: Family, states: u32, ports: &[u16]) -> Vec<u8> {
    let bytecode = port_filter(ports);
    let mut req = Vec::with_capacity(64 + bytecode.len());
    let kind = if family == Family::Any {
        // struct inet_diag_req: family (ignored by a dump), src_len, dst_len, ext, a zeroed
        // socket id, states, dbs.
        req.extend([0, 0, 0, 0]);
        req.extend([0u8; 48]);
        req.extend(states.to_ne_bytes());
        req.extend(0u32.to_ne_bytes());
        TCPDIAG_GETSOCK
    } else {
        // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed socket id.
        req.push(if family == Family::V6 {
            libc::AF_INET6
        } else {
            libc::AF_INET
        } as u8);
        req.push(match proto {
            Proto::Tcp => libc::IPPROTO_TCP,
            Proto::Udp => libc::IPPROTO_UDP,
        } as u8);
        req.extend([0, 0]);
        req.extend(states.to_ne_bytes());
        req.extend([0u8; 48]);
        SOCK_DIAG_BY_FAMILY
    };
    // The bytecode attribute.
    req.extend(((4 + bytecode.len()) as u16).to_ne_bytes());
    req.extend(INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    req.extend(bytecode);
    let mut msg = Vec::with_capacity(16 + req.len());
    msg.extend(((16 + req.len()) as u32).to_ne_bytes());
    msg.extend(kind.to_ne_bytes());
    msg.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(req);
    msg
}

const INET_DIAG_BC_JMP: u8 = 1;

/// The `inet_diag` bytecode that accepts a socket whose local port is one of `ports`: for each, a
/// test of `port >= p` and `port <= p` (each followed by the operand), then, but for the last, an
/// unconditional jump to the end (accept). A failed test goes on to the next port's tests, past
/// the end (reject) after the last. The kernel's audit follows each instruction's `yes` offset,
/// and every `no` must land where that walk does: hence the jumps, rather than tests whose `yes`
/// skips to the end.
fn port_filter(ports: &[u16]) -> Vec<u8> {
    let mut bc = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        // From the GE test, the next port's tests start 20 bytes on (8 + 8 + the 4-byte jump);
        // after the last, 20 bytes on is 4 past the end (16 + 4): a reject either way. From the
        // LE test, 12 bytes on.
        for (code, no) in [(INET_DIAG_BC_S_GE, 20u16), (INET_DIAG_BC_S_LE, 12)] {
            bc.extend([code, 8]);
            bc.extend(no.to_ne_bytes());
            bc.extend([0, 0]);
            bc.extend(port.to_ne_bytes());
        }
        // What follows this port's jump: 20 bytes per later port, but 16 for the last; so from
        // the jump, the end is 20 bytes per later port away.
        let to_end = (ports.len() - 1 - i) * 20;
        if to_end > 0 {
            // Lands exactly on the end: the socket is accepted.
            bc.extend([INET_DIAG_BC_JMP, 4]);
            bc.extend((to_end as u16).to_ne_bytes());
        }
    }
    bc
}

fn read_rows(fd: &OwnedFd) -> Result<Vec<Row>, Errno> {
    let mut rows = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Ok(rows);
        }
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
            if len < 16 || at + len > n {
                return Err(Errno::EBADMSG);
            }
            let body = &buf[at + 16..at + len];
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(rows),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let code = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    return Err(Errno::from_raw(-code));
                }
                SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => rows.extend(parse_msg(body)),
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            at += (len + 3) & !3;
        }
    }
}

fn parse_msg(b: &[u8]) -> Option<Row> {
    if b.len() < MSG_LEN {
        return None;
    }
    let family = i32::from(b[0]);
    let addr = |at: usize, port_at: usize| -> SocketAddr {
        let port = u16::from_be_bytes([b[port_at], b[port_at + 1]]);
        let ip = if family == libc::AF_INET6 {
            let bytes: [u8; 16] = b[at..at + 16].try_into().unwrap();
            IpAddr::V6(Ipv6Addr::from(bytes))
        } else {
            let bytes: [u8; 4] = b[at..at + 4].try_into().unwrap();
            IpAddr::V4(Ipv4Addr::from(bytes))
        };
        SocketAddr::new(ip, port)
    };
    // The socket id from byte 4: sport, dport, src (16 bytes), dst (16 bytes), interface, cookie.
    Some(Row {
        local: addr(8, 4),
        remote: addr(24, 6),
        inode: u64::from(u32::from_ne_bytes(b[68..72].try_into().unwrap())),
    })
}

fn bit(state: u8) -> u32 {
    1 << state
}

/// The inodes of the sockets that listen (TCP) or are bound unconnected (UDP) on exactly `addr`:
/// its reuseport group's members and would-be members. `None` if the kernel cannot say.
pub fn bound_on(proto: Proto, addr: SocketAddr) -> Option<Vec<u64>> {
    let state = match proto {
        Proto::Tcp => TCP_LISTEN,
        Proto::Udp => TCP_CLOSE,
    };
    let port = addr.port();
    let rows = sockets(proto, Family::of(addr), bit(state), &[port]).ok()?;
    Some(
        rows.into_iter()
            .filter(|r| r.local == addr && r.inode != 0)
            .map(|r| r.inode)
            .collect(),
    )
}

/// The handshakes in progress to one of `ports`, over IPv4 and IPv6: (local port, client).
pub fn handshakes(ports: &[u16]) -> Result<HashSet<(u16, SocketAddr)>, Errno> {
    if ports.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sockets(Proto::Tcp, Family::Any, bit(TCP_SYN_RECV), ports)?
        .into_iter()
        .map(|r| (r.local.port(), r.remote))
        .collect())
}

/// Which of the sockets `inodes` are TCP connections to one of `ports` (from established to
/// closing; not the listeners, handshakes or `TIME_WAIT`s). A connection its processes closed
/// has no inode any more, so it is not among them.
pub fn connections(ports: &[u16], inodes: &HashSet<u64>) -> Result<HashSet<u64>, Errno> {
    if ports.is_empty() || inodes.is_empty() {
        return Ok(HashSet::new());
    }
    let states = (TCP_ESTABLISHED..=TCP_CLOSING)
        .filter(|&s| ![TCP_SYN_RECV, TCP_TIME_WAIT, TCP_CLOSE, TCP_LISTEN].contains(&s))
        .fold(0, |m, s| m | bit(s));
    Ok(sockets(Proto::Tcp, Family::Any, states, ports)?
        .into_iter()
        .filter(|r| inodes.contains(&r.inode))
        .map(|r| r.inode)
        .collect())
}

/// The socket inodes the processes `pids` hold.
pub fn socket_inodes(pids: &[i32]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path())
                && let Some(inode) = crate::sys::socket_link_inode(&target)
            {
                out.insert(inode);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;

    fn inode(fd: &impl AsFd) -> u64 {
        crate::steer::inode(fd.as_fd()).unwrap()
    }

    #[test]
    fn finds_listeners_connections_and_datagram_sockets_on_real_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Another port's listener is filtered out by the kernel.
        let _other = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(bound_on(Proto::Tcp, addr), Some(vec![inode(&listener)]));
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let v6_addr = v6.local_addr().unwrap();
        assert_eq!(bound_on(Proto::Tcp, v6_addr), Some(vec![inode(&v6)]));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        assert_eq!(bound_on(Proto::Udp, udp_addr), Some(vec![inode(&udp)]));

        let client = TcpStream::connect(addr).unwrap();
        let (accepted, from) = listener.accept().unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        let v6_client = TcpStream::connect(v6_addr).unwrap();
        let (v6_accepted, _) = v6.accept().unwrap();
        let mine = socket_inodes(&[std::process::id() as i32]);
        assert!(mine.contains(&inode(&accepted)));
        // Both families in one dump; only the ports asked for.
        let ports = [addr.port(), v6_addr.port()];
        let both = HashSet::from([inode(&accepted), inode(&v6_accepted)]);
        assert_eq!(connections(&ports, &mine).unwrap(), both);
        assert_eq!(
            connections(&[addr.port()], &mine).unwrap(),
            HashSet::from([inode(&accepted)])
        );
        // Someone else's inodes: not counted.
        assert!(
            connections(&ports, &HashSet::from([1, 2]))
                .unwrap()
                .is_empty()
        );
        drop(accepted);
        let mine = socket_inodes(&[std::process::id() as i32]);
        assert_eq!(
            connections(&ports, &mine).unwrap(),
            HashSet::from([inode(&v6_accepted)])
        );
        drop((client, v6_client));
    }

    #[test]
    fn the_port_filter_keeps_exactly_the_ports_asked_for() {
        let listeners: Vec<TcpListener> = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let port = |i: usize| listeners[i].local_addr().unwrap().port();
        for asked in [vec![0], vec![0, 2], vec![3, 1, 2], vec![0, 1, 2, 3]] {
            let ports: Vec<u16> = asked.iter().map(|&i| port(i)).collect();
            let mut got: Vec<u64> = sockets(Proto::Tcp, Family::Any, bit(TCP_LISTEN), &ports)
                .unwrap()
                .into_iter()
                .filter(|r| listeners.iter().any(|l| inode(l) == r.inode))
                .map(|r| r.inode)
                .collect();
            got.sort_unstable();
            let mut want: Vec<u64> = asked.iter().map(|&i| inode(&listeners[i])).collect();
            want.sort_unstable();
            assert_eq!(got, want, "ports {ports:?}");
        }
    }

    #[test]
    fn sees_handshakes_in_progress_over_both_families() {
        let mut listeners = Vec::new();
        for at in ["127.0.0.1:0", "[::1]:0"] {
            let l = TcpListener::bind(at).unwrap();
            // The handshake completes but stays in SYN_RECV until the client sends something.
            crate::sys::defer_accept(l.as_fd(), 30).unwrap();
            listeners.push(l);
        }
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert!(handshakes(&ports).unwrap().is_empty());
        let mut clients: Vec<TcpStream> = listeners
            .iter()
            .map(|l| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let expected: HashSet<(u16, SocketAddr)> = clients
            .iter()
            .map(|c| (c.peer_addr().unwrap().port(), c.local_addr().unwrap()))
            .collect();
        assert_eq!(handshakes(&ports).unwrap(), expected);
        assert_eq!(handshakes(&ports[..1]).unwrap().len(), 1);
        // Data completes it into the accept queue: no longer a handshake.
        use std::io::Write;
        clients[0].write_all(b"x").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while handshakes(&ports[..1]).unwrap().len() == 1 {
            assert!(std::time::Instant::now() < deadline, "still in SYN_RECV");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(handshakes(&ports).unwrap().len(), 1);
    }
}
