//! The table grace hands to the preload library in `GRACE_INJECT`: which inherited fd holds which
//! socket address, and the rule that decides whether a server's `bind` means one of them.
//!
//! Pure and allocation-free: this file is compiled into the `no_std` library and into grace itself
//! (which encodes the table and runs the unit tests).
//!
//! Format: entries separated by `,`, each `FD:PROTO:ADDR`, with PROTO `tcp` or `udp` and ADDR a
//! socket address as Rust prints it: `3:tcp:127.0.0.1:8080,4:udp:[::1]:5353`. An entry the
//! library cannot read is skipped, never guessed at.

use core::fmt;
use core::net::{Ipv4Addr, SocketAddr};

/// The variable that carries the table.
pub const ENV: &str = "GRACE_INJECT";

/// The most entries the library keeps (its table is a fixed-size static).
pub const MAX_ENTRIES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One socket grace passes: the fd number the server finds it at, and its bound address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub fd: i32,
    pub proto: Proto,
    pub addr: SocketAddr,
}

impl Entry {
    pub fn parse(text: &str) -> Option<Entry> {
        let (fd, rest) = text.split_once(':')?;
        let (proto, addr) = rest.split_once(':')?;
        let fd = fd.parse::<i32>().ok().filter(|&fd| fd >= 3)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return None,
        };
        Some(Entry {
            fd,
            proto,
            addr: addr.parse().ok()?,
        })
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.fd, self.proto.as_str(), self.addr)
    }
}

/// The entries of a table in order: `None` for one that does not parse.
pub fn entries(text: &str) -> impl Iterator<Item = Option<Entry>> + '_ {
    text.split(',')
        .filter(|entry| !entry.is_empty())
        .map(Entry::parse)
}

/// How a server's `bind` address relates to a socket grace holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    No,
    /// Same family, address and port (and IPv6 scope).
    Same,
    /// A TCP server binds `0.0.0.0:P` and grace holds the dual-stack `[::]:P` that `--listen :P`
    /// gives: the server's "all IPv4 interfaces" is inside grace's "all interfaces". The library
    /// then shows the server IPv4 addresses (its `getsockname`, its `accept` peers) as an IPv4
    /// socket would.
    V4WildcardOnDualStack,
}

/// Whether binding `wanted` means the `proto` socket grace holds at `held`. Only the same family
/// matches, with one exception for TCP: see [`Match::V4WildcardOnDualStack`]. `dual_stack` says
/// whether the held IPv6 socket also takes IPv4 (`IPV6_V6ONLY` off).
///
/// Not for UDP: a datagram server reads each sender's address with `recvfrom`/`recvmsg`, which
/// would give it IPv6 (`::ffff:a.b.c.d`) addresses cut to the size of its IPv4 buffer. Such a
/// server needs `--listen udp://0.0.0.0:P`, and is told so when its bind fails.
pub fn matches(proto: Proto, held: &SocketAddr, dual_stack: bool, wanted: &SocketAddr) -> Match {
    if held.port() != wanted.port() || wanted.port() == 0 {
        return Match::No;
    }
    match (held, wanted) {
        (SocketAddr::V4(h), SocketAddr::V4(w)) if h.ip() == w.ip() => Match::Same,
        (SocketAddr::V6(h), SocketAddr::V6(w))
            if h.ip() == w.ip() && h.scope_id() == w.scope_id() =>
        {
            Match::Same
        }
        (SocketAddr::V6(h), SocketAddr::V4(w))
            if proto == Proto::Tcp
                && dual_stack
                && h.ip().is_unspecified()
                && *w.ip() == Ipv4Addr::UNSPECIFIED =>
        {
            Match::V4WildcardOnDualStack
        }
        _ => Match::No,
    }
}
