//! `--listen` specs, `[NAME=]ADDR`: parsing and the canonical text form.
//!
//! Pure: no sockets, no name resolution. Everything a person can get wrong in the text is caught
//! here, before anything is bound.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

use super::local::Proto;

/// systemd's limit for a name in `LISTEN_FDNAMES` (`FDNAME_MAX`).
const MAX_NAME_LEN: usize = 255;

/// `sun_path` holds 108 bytes: a path needs room for its trailing NUL, an abstract name for its
/// leading one.
const MAX_UNIX_NAME_LEN: usize = 107;

/// The name grace gives each generation's private readiness-probe socket (DESIGN.md section 4);
/// a user socket with that name would be indistinguishable from it in `LISTEN_FDNAMES`.
const PROBE_NAME: &str = "grace-probe";

const SCHEMES: &str = "tcp, tcp4, tcp6, udp, udp4, udp6, unix";

/// One `--listen` argument: `[NAME=]ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: Option<String>,
    pub addr: Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp {
        host: Host,
        port: u16,
    },
    Udp {
        host: Host,
        port: u16,
    },
    Unix(PathBuf),
    /// Linux abstract namespace; the name without the leading `@`.
    UnixAbstract(String),
    /// Take all the fds systemd passed to grace.
    Systemd,
    /// Take one inherited fd (>= 3).
    Fd(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// `:8080`: dual-stack `[::]` with `IPV6_V6ONLY=0`, else `0.0.0.0`.
    Any,
    /// `0.0.0.0`, `tcp4://:8080`.
    AnyV4,
    /// `[::]` (IPv6 only), `tcp6://:8080`.
    AnyV6,
    /// A literal address other than the unspecified ones.
    Ip(IpAddr),
    /// A name to resolve at bind time; `family` comes from `tcp4://`, `udp6://`, ...
    Name {
        name: String,
        family: Option<Family>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_spec(text).map_err(|problem| format!("invalid listen spec {text:?}: {problem}"))
    }
}

fn parse_spec(text: &str) -> Result<ListenSpec, String> {
    if text.is_empty() {
        return Err("it is empty".to_string());
    }
    let (name, addr_text) = split_name(text)?;
    if name.is_some() && addr_text.is_empty() {
        return Err("missing address after \"=\"".to_string());
    }
    let addr = parse_addr(addr_text)?;
    if addr == Addr::Systemd && name.is_some() {
        return Err(
            "\"systemd\" takes its names from LISTEN_FDNAMES and cannot be named".to_string(),
        );
    }
    Ok(ListenSpec { name, addr })
}

/// Splits off `NAME=`. Only unix paths and abstract names can contain `=` themselves; they start
/// with `unix:`, and a scheme always has `://`, so an `=` after either belongs to the address.
fn split_name(text: &str) -> Result<(Option<String>, &str), String> {
    let Some((prefix, rest)) = text.split_once('=') else {
        return Ok((None, text));
    };
    if prefix.starts_with("unix:") || prefix.contains("://") {
        return Ok((None, text));
    }
    check_name(prefix)?;
    Ok((Some(prefix.to_string()), rest))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name before \"=\"".to_string());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name is {} characters long (at most {MAX_NAME_LEN})",
            name.len()
        ));
    }
    if name.contains(':') {
        return Err(format!(
            "name {name:?} contains \":\", which systemd uses to join names"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "name {name:?} contains {bad:?} (allowed: letters, digits, \"_\", \".\", \"-\")"
        ));
    }
    if name == PROBE_NAME {
        return Err(format!(
            "name {PROBE_NAME:?} is reserved for grace's readiness probe socket"
        ));
    }
    Ok(())
}

fn parse_addr(text: &str) -> Result<Addr, String> {
    if text == "systemd" {
        return Ok(Addr::Systemd);
    }
    if let Some(number) = text.strip_prefix("fd:") {
        return parse_fd(number).map(Addr::Fd);
    }
    if let Some(rest) = text.strip_prefix("unix:") {
        return parse_unix(rest);
    }
    if let Some((scheme, rest)) = text.split_once("://") {
        let (proto, family) = match scheme {
            "tcp" => (Proto::Tcp, None),
            "tcp4" => (Proto::Tcp, Some(Family::V4)),
            "tcp6" => (Proto::Tcp, Some(Family::V6)),
            "udp" => (Proto::Udp, None),
            "udp4" => (Proto::Udp, Some(Family::V4)),
            "udp6" => (Proto::Udp, Some(Family::V6)),
            _ => return Err(format!("unknown scheme {scheme:?} (expected {SCHEMES})")),
        };
        return parse_inet(rest, proto, family, scheme);
    }
    // A bare port is taken as ":PORT", as many servers do; it cannot mean anything else, since a
    // spec without a scheme always needs a port.
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Addr::Tcp {
            host: Host::Any,
            port: parse_port(text)?,
        });
    }
    if !text.contains(':') {
        return Err(
            "missing port (expected HOST:PORT, :PORT, unix:PATH, fd:N or systemd)".to_string(),
        );
    }
    parse_inet(text, Proto::Tcp, None, "tcp")
}

fn parse_fd(number: &str) -> Result<i32, String> {
    if number.is_empty() {
        return Err("missing fd number after \"fd:\"".to_string());
    }
    if !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid fd number {number:?} (expected digits)"));
    }
    let fd: i32 = number
        .parse()
        .map_err(|_| format!("fd number {number} is out of range"))?;
    let stdio = match fd {
        0 => "stdin",
        1 => "stdout",
        2 => "stderr",
        _ => return Ok(fd),
    };
    Err(format!(
        "fd {fd} is {stdio}; inherited sockets start at fd 3"
    ))
}

fn parse_unix(rest: &str) -> Result<Addr, String> {
    if let Some(name) = rest.strip_prefix('@') {
        if name.is_empty() {
            return Err("empty abstract socket name after \"unix:@\"".to_string());
        }
        check_unix_name("abstract socket name", name)?;
        return Ok(Addr::UnixAbstract(name.to_string()));
    }
    if rest.is_empty() {
        return Err("empty unix socket path after \"unix:\"".to_string());
    }
    check_unix_name("unix socket path", rest)?;
    if rest.ends_with('/') {
        return Err(format!("unix socket path {rest:?} ends in \"/\""));
    }
    Ok(Addr::Unix(PathBuf::from(rest)))
}

fn check_unix_name(what: &str, name: &str) -> Result<(), String> {
    if name.contains('\0') {
        return Err(format!("{what} contains a NUL byte"));
    }
    if name.len() > MAX_UNIX_NAME_LEN {
        return Err(format!(
            "{what} is {} bytes long (at most {MAX_UNIX_NAME_LEN})",
            name.len()
        ));
    }
    Ok(())
}

/// `HOST:PORT`, `[V6]:PORT` or `:PORT`, after any scheme; `scheme` is only for messages.
fn parse_inet(
    text: &str,
    proto: Proto,
    family: Option<Family>,
    scheme: &str,
) -> Result<Addr, String> {
    let (host, port) = if let Some(after) = text.strip_prefix('[') {
        let Some((inside, tail)) = after.split_once(']') else {
            return Err(format!("{text:?} is missing \"]\""));
        };
        let port = match tail.strip_prefix(':') {
            Some(port) => port,
            None if tail.is_empty() => return Err("missing port".to_string()),
            None => return Err(format!("unexpected {tail:?} after \"]\"")),
        };
        (parse_bracketed(inside, family, scheme)?, port)
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err("missing port".to_string());
        };
        if host.contains(':') {
            return Err(format!(
                "ipv6 address {host:?} must be in brackets, like \"[::1]:{port}\""
            ));
        }
        (parse_host(host, family, scheme)?, port)
    };
    let port = parse_port(port)?;
    Ok(match proto {
        Proto::Tcp => Addr::Tcp { host, port },
        Proto::Udp => Addr::Udp { host, port },
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err("missing port".to_string());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid port {text:?} (expected a number 0-65535)"));
    }
    text.parse()
        .map_err(|_| format!("port {text} is out of range (0-65535)"))
}

fn parse_bracketed(inside: &str, family: Option<Family>, scheme: &str) -> Result<Host, String> {
    if inside.is_empty() {
        return Err("empty ipv6 address in \"[]\"".to_string());
    }
    let ip: Ipv6Addr = inside
        .parse()
        .map_err(|_| format!("invalid ipv6 address {inside:?}"))?;
    if family == Some(Family::V4) {
        return Err(format!("{scheme} needs an ipv4 address, not [{ip}]"));
    }
    Ok(if ip.is_unspecified() {
        Host::AnyV6
    } else {
        Host::Ip(IpAddr::V6(ip))
    })
}

fn parse_host(host: &str, family: Option<Family>, scheme: &str) -> Result<Host, String> {
    if host.is_empty() {
        return Ok(match family {
            None => Host::Any,
            Some(Family::V4) => Host::AnyV4,
            Some(Family::V6) => Host::AnyV6,
        });
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        if family == Some(Family::V6) {
            return Err(format!("{scheme} needs an ipv6 address, not {ip}"));
        }
        return Ok(if ip.is_unspecified() {
            Host::AnyV4
        } else {
            Host::Ip(IpAddr::V4(ip))
        });
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("invalid ipv4 address {host:?}"));
    }
    if let Some(bad) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!("invalid host {host:?}: unexpected {bad:?}"));
    }
    // "udp:5353" would otherwise quietly mean the host named "udp".
    if matches!(host, "tcp" | "tcp4" | "tcp6" | "udp" | "udp4" | "udp6") {
        return Err(format!(
            "{host:?} is a scheme, not a host (did you mean \"{host}://\"?)"
        ));
    }
    Ok(Host::Name {
        name: host.to_string(),
        family,
    })
}

/// The canonical form, which parses back to the same spec: the short `HOST:PORT` form for TCP
/// unless a family has to be spelled out (`tcp4://NAME:PORT`), `udp://`, `udp4://`, `udp6://` for
/// UDP.
impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name}=")?;
        }
        write!(f, "{}", self.addr)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp { host, port } => match host.name_family() {
                Some(family) => write!(f, "tcp{}://{host}:{port}", family.digit()),
                None => write!(f, "{host}:{port}"),
            },
            Addr::Udp { host, port } => match host.name_family() {
                Some(family) => write!(f, "udp{}://{host}:{port}", family.digit()),
                None => write!(f, "udp://{host}:{port}"),
            },
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
            Addr::UnixAbstract(name) => write!(f, "unix:@{name}"),
            Addr::Systemd => f.write_str("systemd"),
            Addr::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

/// The host part as written in a spec: empty for `Any`, brackets around IPv6.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Any => Ok(()),
            Host::AnyV4 => f.write_str("0.0.0.0"),
            Host::AnyV6 => f.write_str("[::]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Name { name, .. } => f.write_str(name),
        }
    }
}

impl Host {
    /// The family a name was restricted to: the one thing the short form cannot express.
    fn name_family(&self) -> Option<Family> {
        match self {
            Host::Name { family, .. } => *family,
            _ => None,
        }
    }
}

impl Family {
    fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: Host, port: u16) -> Addr {
        Addr::Tcp { host, port }
    }

    fn udp(host: Host, port: u16) -> Addr {
        Addr::Udp { host, port }
    }

    fn ip(text: &str) -> Host {
        Host::Ip(text.parse().unwrap())
    }

    fn name(name: &str, family: Option<Family>) -> Host {
        Host::Name {
            name: name.to_string(),
            family,
        }
    }

    fn spec(name: Option<&str>, addr: Addr) -> ListenSpec {
        ListenSpec {
            name: name.map(str::to_string),
            addr,
        }
    }

    /// (input, parsed, canonical display)
    fn valid_rows() -> Vec<(&'static str, ListenSpec, &'static str)> {
        use Family::{V4, V6};
        vec![
            (":8080", spec(None, tcp(Host::Any, 8080)), ":8080"),
            ("8080", spec(None, tcp(Host::Any, 8080)), ":8080"),
            (":0", spec(None, tcp(Host::Any, 0)), ":0"),
            (":65535", spec(None, tcp(Host::Any, 65535)), ":65535"),
            (":080", spec(None, tcp(Host::Any, 80)), ":80"),
            (
                "127.0.0.1:8080",
                spec(None, tcp(ip("127.0.0.1"), 8080)),
                "127.0.0.1:8080",
            ),
            ("[::1]:8080", spec(None, tcp(ip("::1"), 8080)), "[::1]:8080"),
            (
                "[fe80::1:2]:1",
                spec(None, tcp(ip("fe80::1:2"), 1)),
                "[fe80::1:2]:1",
            ),
            (
                "localhost:8080",
                spec(None, tcp(name("localhost", None), 8080)),
                "localhost:8080",
            ),
            (
                "my-host_1.example.com:443",
                spec(None, tcp(name("my-host_1.example.com", None), 443)),
                "my-host_1.example.com:443",
            ),
            ("0.0.0.0:80", spec(None, tcp(Host::AnyV4, 80)), "0.0.0.0:80"),
            ("[::]:80", spec(None, tcp(Host::AnyV6, 80)), "[::]:80"),
            ("tcp://:80", spec(None, tcp(Host::Any, 80)), ":80"),
            (
                "tcp://127.0.0.1:80",
                spec(None, tcp(ip("127.0.0.1"), 80)),
                "127.0.0.1:80",
            ),
            (
                "tcp://localhost:80",
                spec(None, tcp(name("localhost", None), 80)),
                "localhost:80",
            ),
            ("tcp4://:80", spec(None, tcp(Host::AnyV4, 80)), "0.0.0.0:80"),
            (
                "tcp4://0.0.0.0:80",
                spec(None, tcp(Host::AnyV4, 80)),
                "0.0.0.0:80",
            ),
            (
                "tcp4://10.0.0.1:80",
                spec(None, tcp(ip("10.0.0.1"), 80)),
                "10.0.0.1:80",
            ),
            (
                "tcp4://localhost:80",
                spec(None, tcp(name("localhost", Some(V4)), 80)),
                "tcp4://localhost:80",
            ),
            ("tcp6://:80", spec(None, tcp(Host::AnyV6, 80)), "[::]:80"),
            (
                "tcp6://[::]:80",
                spec(None, tcp(Host::AnyV6, 80)),
                "[::]:80",
            ),
            (
                "tcp6://[::1]:80",
                spec(None, tcp(ip("::1"), 80)),
                "[::1]:80",
            ),
            (
                "tcp6://localhost:80",
                spec(None, tcp(name("localhost", Some(V6)), 80)),
                "tcp6://localhost:80",
            ),
            (
                "udp://:5353",
                spec(None, udp(Host::Any, 5353)),
                "udp://:5353",
            ),
            (
                "udp://127.0.0.1:53",
                spec(None, udp(ip("127.0.0.1"), 53)),
                "udp://127.0.0.1:53",
            ),
            (
                "udp://[::1]:53",
                spec(None, udp(ip("::1"), 53)),
                "udp://[::1]:53",
            ),
            (
                "udp://localhost:53",
                spec(None, udp(name("localhost", None), 53)),
                "udp://localhost:53",
            ),
            (
                "udp4://:53",
                spec(None, udp(Host::AnyV4, 53)),
                "udp://0.0.0.0:53",
            ),
            (
                "udp4://localhost:53",
                spec(None, udp(name("localhost", Some(V4)), 53)),
                "udp4://localhost:53",
            ),
            (
                "udp6://:53",
                spec(None, udp(Host::AnyV6, 53)),
                "udp://[::]:53",
            ),
            (
                "udp6://localhost:53",
                spec(None, udp(name("localhost", Some(V6)), 53)),
                "udp6://localhost:53",
            ),
            (
                "unix:/run/app.sock",
                spec(None, Addr::Unix("/run/app.sock".into())),
                "unix:/run/app.sock",
            ),
            (
                "unix:app.sock",
                spec(None, Addr::Unix("app.sock".into())),
                "unix:app.sock",
            ),
            (
                "unix:./run/a=b.sock",
                spec(None, Addr::Unix("./run/a=b.sock".into())),
                "unix:./run/a=b.sock",
            ),
            (
                "unix:@grace",
                spec(None, Addr::UnixAbstract("grace".into())),
                "unix:@grace",
            ),
            (
                "unix:@a=b",
                spec(None, Addr::UnixAbstract("a=b".into())),
                "unix:@a=b",
            ),
            ("systemd", spec(None, Addr::Systemd), "systemd"),
            ("fd:3", spec(None, Addr::Fd(3)), "fd:3"),
            ("fd:1024", spec(None, Addr::Fd(1024)), "fd:1024"),
            (
                "http=:8080",
                spec(Some("http"), tcp(Host::Any, 8080)),
                "http=:8080",
            ),
            (
                "http=8080",
                spec(Some("http"), tcp(Host::Any, 8080)),
                "http=:8080",
            ),
            (
                "api.v2-x_y=127.0.0.1:0",
                spec(Some("api.v2-x_y"), tcp(ip("127.0.0.1"), 0)),
                "api.v2-x_y=127.0.0.1:0",
            ),
            (
                "dns=udp6://[::1]:53",
                spec(Some("dns"), udp(ip("::1"), 53)),
                "dns=udp://[::1]:53",
            ),
            (
                "admin=unix:/run/a=b.sock",
                spec(Some("admin"), Addr::Unix("/run/a=b.sock".into())),
                "admin=unix:/run/a=b.sock",
            ),
            (
                "unix=unix:@x",
                spec(Some("unix"), Addr::UnixAbstract("x".into())),
                "unix=unix:@x",
            ),
            (
                "inherited=fd:7",
                spec(Some("inherited"), Addr::Fd(7)),
                "inherited=fd:7",
            ),
        ]
    }

    #[test]
    fn valid_specs_parse() {
        for (input, expected, _) in valid_rows() {
            assert_eq!(input.parse::<ListenSpec>(), Ok(expected), "input {input:?}");
        }
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (input, expected, canonical) in valid_rows() {
            assert_eq!(expected.to_string(), canonical, "input {input:?}");
            assert_eq!(
                canonical.parse::<ListenSpec>(),
                Ok(expected),
                "canonical {canonical:?}"
            );
        }
    }

    #[test]
    fn longest_names_are_accepted() {
        let long_name = "n".repeat(255);
        let input = format!("{long_name}=:80");
        assert_eq!(
            input.parse::<ListenSpec>().unwrap().name.as_deref(),
            Some(long_name.as_str())
        );
        let path = format!("/{}", "p".repeat(106));
        let parsed: ListenSpec = format!("unix:{path}").parse().unwrap();
        assert_eq!(parsed.addr, Addr::Unix(path.into()));
        let abstract_name = "a".repeat(107);
        let parsed: ListenSpec = format!("unix:@{abstract_name}").parse().unwrap();
        assert_eq!(parsed.addr, Addr::UnixAbstract(abstract_name));
    }

    #[test]
    fn invalid_specs_are_refused_with_a_reason() {
        let long_name = "n".repeat(256);
        let long_name_spec = format!("{long_name}=:80");
        let long_path = format!("unix:/{}", "p".repeat(107));
        let long_abstract = format!("unix:@{}", "a".repeat(108));
        let rows: Vec<(&str, String)> = vec![
            ("", "it is empty".into()),
            (
                "127.0.0.1:99999",
                "port 99999 is out of range (0-65535)".into(),
            ),
            (":65536", "port 65536 is out of range (0-65535)".into()),
            ("99999", "port 99999 is out of range (0-65535)".into()),
            (
                ":123456789012345678901234567890",
                "port 123456789012345678901234567890 is out of range (0-65535)".into(),
            ),
            (":", "missing port".into()),
            ("127.0.0.1:", "missing port".into()),
            ("[::1]", "missing port".into()),
            ("tcp://", "missing port".into()),
            (
                "localhost",
                "missing port (expected HOST:PORT, :PORT, unix:PATH, fd:N or systemd)".into(),
            ),
            (
                ":http",
                "invalid port \"http\" (expected a number 0-65535)".into(),
            ),
            (
                ":-1",
                "invalid port \"-1\" (expected a number 0-65535)".into(),
            ),
            (
                ":+80",
                "invalid port \"+80\" (expected a number 0-65535)".into(),
            ),
            (
                ":8080 ",
                "invalid port \"8080 \" (expected a number 0-65535)".into(),
            ),
            (
                "http://:80",
                "unknown scheme \"http\" (expected tcp, tcp4, tcp6, udp, udp4, udp6, unix)".into(),
            ),
            (
                "TCP://:80",
                "unknown scheme \"TCP\" (expected tcp, tcp4, tcp6, udp, udp4, udp6, unix)".into(),
            ),
            (
                "://:80",
                "unknown scheme \"\" (expected tcp, tcp4, tcp6, udp, udp4, udp6, unix)".into(),
            ),
            (
                "udp:5353",
                "\"udp\" is a scheme, not a host (did you mean \"udp://\"?)".into(),
            ),
            ("=:80", "empty name before \"=\"".into()),
            ("http=", "missing address after \"=\"".into()),
            (
                &long_name_spec,
                "name is 256 characters long (at most 255)".into(),
            ),
            (
                "my name=:80",
                "name \"my name\" contains ' ' (allowed: letters, digits, \"_\", \".\", \"-\")"
                    .into(),
            ),
            (
                "héllo=:80",
                "name \"héllo\" contains 'é' (allowed: letters, digits, \"_\", \".\", \"-\")"
                    .into(),
            ),
            (
                "a:b=:80",
                "name \"a:b\" contains \":\", which systemd uses to join names".into(),
            ),
            (
                "grace-probe=:80",
                "name \"grace-probe\" is reserved for grace's readiness probe socket".into(),
            ),
            ("[::1:8080", "\"[::1:8080\" is missing \"]\"".into()),
            ("[::1]8080", "unexpected \"8080\" after \"]\"".into()),
            ("[]:80", "empty ipv6 address in \"[]\"".into()),
            ("[::g]:80", "invalid ipv6 address \"::g\"".into()),
            (
                "[localhost]:80",
                "invalid ipv6 address \"localhost\"".into(),
            ),
            ("[1.2.3.4]:80", "invalid ipv6 address \"1.2.3.4\"".into()),
            (
                "::1:8080",
                "ipv6 address \"::1\" must be in brackets, like \"[::1]:8080\"".into(),
            ),
            ("256.0.0.1:80", "invalid ipv4 address \"256.0.0.1\"".into()),
            (
                "127.0.0.01:80",
                "invalid ipv4 address \"127.0.0.01\"".into(),
            ),
            (
                "ex ample.com:80",
                "invalid host \"ex ample.com\": unexpected ' '".into(),
            ),
            ("a/b:80", "invalid host \"a/b\": unexpected '/'".into()),
            (
                "tcp4://[::1]:80",
                "tcp4 needs an ipv4 address, not [::1]".into(),
            ),
            (
                "udp4://[::]:53",
                "udp4 needs an ipv4 address, not [::]".into(),
            ),
            (
                "tcp6://127.0.0.1:80",
                "tcp6 needs an ipv6 address, not 127.0.0.1".into(),
            ),
            (
                "udp6://0.0.0.0:53",
                "udp6 needs an ipv6 address, not 0.0.0.0".into(),
            ),
            ("unix:", "empty unix socket path after \"unix:\"".into()),
            (
                "unix:@",
                "empty abstract socket name after \"unix:@\"".into(),
            ),
            (
                "unix:/run/",
                "unix socket path \"/run/\" ends in \"/\"".into(),
            ),
            (
                "unix:/run/a\0b",
                "unix socket path contains a NUL byte".into(),
            ),
            (
                &long_path,
                "unix socket path is 108 bytes long (at most 107)".into(),
            ),
            (
                &long_abstract,
                "abstract socket name is 108 bytes long (at most 107)".into(),
            ),
            ("fd:", "missing fd number after \"fd:\"".into()),
            ("fd:x", "invalid fd number \"x\" (expected digits)".into()),
            ("fd:-3", "invalid fd number \"-3\" (expected digits)".into()),
            (
                "fd:99999999999",
                "fd number 99999999999 is out of range".into(),
            ),
            (
                "fd:0",
                "fd 0 is stdin; inherited sockets start at fd 3".into(),
            ),
            (
                "fd:1",
                "fd 1 is stdout; inherited sockets start at fd 3".into(),
            ),
            (
                "fd:2",
                "fd 2 is stderr; inherited sockets start at fd 3".into(),
            ),
            (
                "web=systemd",
                "\"systemd\" takes its names from LISTEN_FDNAMES and cannot be named".into(),
            ),
        ];
        for (input, problem) in rows {
            let expected = format!("invalid listen spec {input:?}: {problem}");
            assert_eq!(
                input.parse::<ListenSpec>(),
                Err(expected),
                "input {input:?}"
            );
        }
    }
}
