//! What a socket is bound to, typed: the address grace reports, matches and hands over, formatted
//! only where people or the handoff record read it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use super::SocketKind;

/// The transport of an internet socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn of(kind: SocketKind) -> Self {
        match kind {
            SocketKind::Stream => Proto::Tcp,
            SocketKind::Datagram => Proto::Udp,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A socket's own address: `tcp [::]:8080`, `udp 127.0.0.1:5353`, `unix /run/app.sock`,
/// `unixgram @name` when shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    Inet(Proto, SocketAddr),
    Unix(SocketKind, PathBuf),
    Abstract(SocketKind, String),
    /// An inherited socket of another family, or an unnamed one: shown as found.
    Other(String),
}

impl Local {
    /// The internet address, for TCP and UDP sockets.
    pub fn inet(&self) -> Option<(Proto, SocketAddr)> {
        match self {
            Local::Inet(proto, addr) => Some((*proto, *addr)),
            _ => None,
        }
    }
}

fn unix_prefix(kind: SocketKind) -> &'static str {
    match kind {
        SocketKind::Stream => "unix",
        SocketKind::Datagram => "unixgram",
    }
}

impl fmt::Display for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Local::Inet(proto, addr) => write!(f, "{proto} {addr}"),
            Local::Unix(kind, path) => write!(f, "{} {}", unix_prefix(*kind), path.display()),
            Local::Abstract(kind, name) => write!(f, "{} @{name}", unix_prefix(*kind)),
            Local::Other(text) => f.write_str(text),
        }
    }
}

/// The inverse of `Display`, for the handoff record.
impl FromStr for Local {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let Some((prefix, rest)) = text.split_once(' ') else {
            return Ok(Local::Other(text.to_string()));
        };
        let unix = |kind| match rest.strip_prefix('@') {
            Some(name) => Local::Abstract(kind, name.to_string()),
            None => Local::Unix(kind, PathBuf::from(rest)),
        };
        let inet = |proto| {
            rest.parse()
                .map(|addr| Local::Inet(proto, addr))
                .map_err(|_| format!("bad address {text:?}"))
        };
        match prefix {
            "tcp" => inet(Proto::Tcp),
            "udp" => inet(Proto::Udp),
            "unix" if rest != "(unnamed)" => Ok(unix(SocketKind::Stream)),
            "unixgram" if rest != "(unnamed)" => Ok(unix(SocketKind::Datagram)),
            _ => Ok(Local::Other(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        for text in [
            "tcp [::]:8080",
            "tcp 127.0.0.1:1",
            "udp [::1]:53",
            "unix /run/a b.sock",
            "unixgram @grace/x",
            "unix (unnamed)",
            "socket (Packet)",
        ] {
            let local: Local = text.parse().unwrap();
            assert_eq!(local.to_string(), text);
        }
        assert!("tcp nowhere".parse::<Local>().is_err());
        assert_eq!(
            "udp 0.0.0.0:5353".parse::<Local>().unwrap().inet(),
            Some((Proto::Udp, "0.0.0.0:5353".parse().unwrap()))
        );
    }
}
