//! `struct sockaddr_in` / `sockaddr_in6` bytes to and from `core::net::SocketAddr`. Pure and
//! allocation-free, shared with grace's unit tests like `table.rs`.

use core::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `sizeof(struct sockaddr_in)`.
pub const SOCKADDR_IN_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
pub const SOCKADDR_IN6_LEN: usize = 28;
/// The `sockaddr_in6` of RFC 2133, without `sin6_scope_id`: the kernel still accepts it (as scope
/// 0), and so do we.
pub const SOCKADDR_IN6_RFC2133_LEN: usize = 24;

/// Reads an IPv4 or IPv6 socket address; `None` for any other family or a short buffer.
pub fn decode(bytes: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]);
    match family {
        AF_INET => {
            let b: &[u8; SOCKADDR_IN_LEN] = bytes.get(..SOCKADDR_IN_LEN)?.try_into().ok()?;
            let port = u16::from_be_bytes([b[2], b[3]]);
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        AF_INET6 => {
            let b: &[u8; SOCKADDR_IN6_RFC2133_LEN] =
                bytes.get(..SOCKADDR_IN6_RFC2133_LEN)?.try_into().ok()?;
            let port = u16::from_be_bytes([b[2], b[3]]);
            let flowinfo = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[8..24]);
            let scope_id = match bytes.get(SOCKADDR_IN6_RFC2133_LEN..SOCKADDR_IN6_LEN) {
                Some(s) => u32::from_ne_bytes([s[0], s[1], s[2], s[3]]),
                None => 0,
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flowinfo,
                scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` as the kernel would; returns its length (16 or 28).
pub fn encode(addr: &SocketAddr, out: &mut [u8; SOCKADDR_IN6_LEN]) -> usize {
    *out = [0; SOCKADDR_IN6_LEN];
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr {
        SocketAddr::V4(a) => {
            out[..2].copy_from_slice(&AF_INET.to_ne_bytes());
            out[4..8].copy_from_slice(&a.ip().octets());
            SOCKADDR_IN_LEN
        }
        SocketAddr::V6(a) => {
            out[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
            out[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            out[8..24].copy_from_slice(&a.ip().octets());
            out[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            SOCKADDR_IN6_LEN
        }
    }
}

/// What an IPv4 socket would have reported for an address seen on a dual-stack IPv6 one:
/// `[::]:P` is `0.0.0.0:P` and `[::ffff:a.b.c.d]:P` is `a.b.c.d:P`. A real IPv6 address has no
/// IPv4 form and stays as it is.
pub fn as_v4(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, a.port()))
        }
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
            None => addr,
        },
        v4 => v4,
    }
}
