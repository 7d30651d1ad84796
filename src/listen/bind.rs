//! Turning specs into the sockets grace owns for its whole life: binding new ones, or adopting fds
//! that systemd (or whoever started grace) passed in.
//!
//! Every fd that comes out of here is close-on-exec; the spawn code clears the flag on exactly the
//! fds a child gets, by `dup2`-ing them onto 3, 4, ...

use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
    sockopt,
};

use super::local::{Local, Proto};
use super::spec::{Addr, Family, Host, ListenSpec};

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The backlog when `/proc/sys/net/core/somaxconn` cannot be read: the kernel default since 5.4.
const FALLBACK_BACKLOG: i32 = 4096;

/// The name systemd gives a socket that has none.
const UNNAMED: &str = "unknown";

#[derive(Debug, Clone, Default)]
pub struct BindOptions {
    /// `listen()` backlog; `None` means the system's `net.core.somaxconn`.
    pub backlog: Option<i32>,
    /// Mode for unix path sockets (`--socket-mode`), applied before `listen()`.
    pub socket_mode: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Stream,
    Datagram,
}

impl SocketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SocketKind::Stream => "stream",
            SocketKind::Datagram => "datagram",
        }
    }
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SocketKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "stream" => Ok(SocketKind::Stream),
            "datagram" => Ok(SocketKind::Datagram),
            _ => Err(format!(
                "invalid socket kind {text:?} (expected stream or datagram)"
            )),
        }
    }
}

/// A socket grace owns for its whole life.
#[derive(Debug)]
pub struct Listener {
    /// Always close-on-exec.
    pub fd: OwnedFd,
    /// The `NAME=` part, or `unknown` as systemd does; for systemd-passed fds, from
    /// `LISTEN_FDNAMES`.
    pub name: String,
    pub kind: SocketKind,
    /// The real bound address (shown as `tcp 127.0.0.1:41234`, `tcp [::]:8080`,
    /// `udp 0.0.0.0:5353`, `unix /run/app.sock`, `unix @name`).
    pub local: Local,
    /// The absolute path of a socket file grace created, to remove at final exit.
    pub unix_path: Option<PathBuf>,
    /// The spec this came from, in canonical form.
    pub spec: String,
}

impl Listener {
    /// Rebuilds a listener from an fd adopted after re-exec and the metadata saved with it.
    pub fn from_parts(
        fd: OwnedFd,
        name: String,
        kind: SocketKind,
        local: Local,
        unix_path: Option<PathBuf>,
        spec: String,
    ) -> Self {
        Listener {
            fd,
            name,
            kind,
            local,
            unix_path,
            spec,
        }
    }

    /// Removes the socket file grace created for this listener, if any; a file already gone is
    /// not an error.
    pub fn remove_socket_file(&self) -> io::Result<()> {
        match &self.unix_path {
            Some(path) => match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}

/// Binds every spec, in order (a `systemd` spec expands to all the fds systemd passed).
///
/// All-or-nothing: on any error, everything already bound is closed and every socket file already
/// created is removed before returning the error.
///
/// Call this before grace opens any other fd: `fd:N` and `systemd` take ownership of fd numbers
/// grace inherited, and that is only sound while nothing else in the process holds them.
pub fn bind_all(specs: &[ListenSpec], opts: &BindOptions) -> Result<Vec<Listener>> {
    let mut slots: Vec<Vec<Listener>> = specs.iter().map(|_| Vec::new()).collect();
    match fill_slots(specs, opts, &mut slots) {
        Ok(()) => Ok(slots.into_iter().flatten().collect()),
        Err(e) => {
            for listener in slots.into_iter().flatten() {
                if let Err(remove_error) = listener.remove_socket_file() {
                    tracing::warn!(
                        path = %listener.local,
                        "removing socket file after a failed bind: {remove_error}"
                    );
                }
            }
            Err(e)
        }
    }
}

fn fill_slots(specs: &[ListenSpec], opts: &BindOptions, slots: &mut [Vec<Listener>]) -> Result<()> {
    let backlog = backlog(opts.backlog)?;
    check_duplicates(specs)?;
    let systemd_names = if specs.iter().any(|s| s.addr == Addr::Systemd) {
        let names = systemd_names_from_env().context("taking sockets from systemd")?;
        check_systemd_overlap(specs, names.len())?;
        Some(names)
    } else {
        None
    };

    // Inherited fds first: if `fd:N` names a number grace did not inherit, a socket bound before
    // it could land on N, and grace would then own that socket twice.
    for (spec, slot) in specs.iter().zip(slots.iter_mut()) {
        match spec.addr {
            Addr::Systemd => {
                for (fd, name) in (LISTEN_FDS_START..).zip(systemd_names.iter().flatten()) {
                    let listener = adopt(fd, name.clone(), spec)
                        .with_context(|| format!("taking fd {fd} passed by systemd"))?;
                    slot.push(listener);
                }
            }
            Addr::Fd(fd) => {
                let name = spec.name.clone().unwrap_or_else(|| UNNAMED.to_string());
                let listener =
                    adopt(fd, name, spec).with_context(|| format!("taking inherited fd {fd}"))?;
                slot.push(listener);
            }
            _ => {}
        }
    }

    for (spec, slot) in specs.iter().zip(slots.iter_mut()) {
        if !matches!(spec.addr, Addr::Systemd | Addr::Fd(_)) {
            slot.push(bind_one(spec, opts, backlog)?);
        }
    }
    Ok(())
}

/// Refuses specs that would make grace own one inherited fd twice.
fn check_duplicates(specs: &[ListenSpec]) -> Result<()> {
    if specs.iter().filter(|s| s.addr == Addr::Systemd).count() > 1 {
        bail!("\"systemd\" is given more than once");
    }
    let mut seen = Vec::new();
    for spec in specs {
        if let Addr::Fd(fd) = spec.addr {
            if seen.contains(&fd) {
                bail!("fd {fd} is given more than once");
            }
            seen.push(fd);
        }
    }
    Ok(())
}

/// Refuses `fd:N` for an fd that `systemd` (fds 3 to 3+count-1) already takes.
fn check_systemd_overlap(specs: &[ListenSpec], count: usize) -> Result<()> {
    let first = i64::from(LISTEN_FDS_START);
    let last = first + i64::try_from(count).unwrap_or(i64::MAX) - 1;
    for spec in specs {
        if let Addr::Fd(fd) = spec.addr
            && (first..=last).contains(&i64::from(fd))
        {
            bail!(
                "fd {fd} is also one of the fds systemd passed (3-{last}), which \"systemd\" \
                 already takes"
            );
        }
    }
    Ok(())
}

/// The names of the fds systemd passed to grace (fd 3 onwards), from grace's own environment.
/// Read only: the child's environment is built separately.
fn systemd_names_from_env() -> Result<Vec<String>> {
    let var = |key: &str| -> Result<Option<String>> {
        match std::env::var(key) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(value)) => {
                bail!("{key} is not valid utf-8: {value:?}")
            }
        }
    };
    systemd_names(
        var("LISTEN_FDS")?.as_deref(),
        var("LISTEN_PID")?.as_deref(),
        var("LISTEN_FDNAMES")?.as_deref(),
        std::process::id(),
    )
}

/// Checks the socket activation variables as sd_listen_fds_with_names does, and returns one name
/// per passed fd.
fn systemd_names(
    listen_fds: Option<&str>,
    listen_pid: Option<&str>,
    fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Vec<String>> {
    let Some(listen_fds) = listen_fds else {
        bail!("LISTEN_FDS is not set (grace was not socket-activated)");
    };
    let Some(listen_pid) = listen_pid else {
        bail!("LISTEN_PID is not set");
    };
    let pid: u32 = listen_pid
        .parse()
        .ok()
        .with_context(|| format!("LISTEN_PID {listen_pid:?} is not a pid"))?;
    if pid != own_pid {
        bail!(
            "LISTEN_PID is {pid} but grace is pid {own_pid}: the sockets were meant for another \
             process"
        );
    }
    let count: usize = listen_fds
        .parse()
        .ok()
        .filter(|&n: &usize| n <= (RawFd::MAX - LISTEN_FDS_START) as usize)
        .with_context(|| format!("LISTEN_FDS {listen_fds:?} is not a number of fds"))?;
    if count == 0 {
        bail!("LISTEN_FDS is 0: systemd passed no sockets");
    }
    let Some(fdnames) = fdnames else {
        return Ok(vec![UNNAMED.to_string(); count]);
    };
    let names: Vec<String> = fdnames
        .split(':')
        .map(|name| if name.is_empty() { UNNAMED } else { name }.to_string())
        .collect();
    if names.len() != count {
        bail!(
            "LISTEN_FDNAMES has {} names for {count} fds: {fdnames:?}",
            names.len()
        );
    }
    Ok(names)
}

/// Takes ownership of an inherited fd, checks it is a socket grace can hand on, and makes it
/// close-on-exec.
fn adopt(fd: RawFd, name: String, spec: &ListenSpec) -> Result<Listener> {
    // Check through /proc first, without touching the fd, so that a number that is not open is
    // never wrapped in an OwnedFd. Without /proc, the checks after adoption catch it (EBADF).
    let proc_fd_dir = Path::new("/proc/self/fd");
    if proc_fd_dir.is_dir() {
        match fs::read_link(proc_fd_dir.join(fd.to_string())) {
            Ok(target) if target.to_string_lossy().starts_with("socket:") => {}
            Ok(target) => bail!("not a socket (it is {})", target.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!("not open"),
            Err(e) => return Err(e).context("inspecting it in /proc/self/fd"),
        }
    }

    // `fd` was inherited across exec, so it belongs to no object in this process: bind_all runs
    // before grace opens anything else, check_duplicates and check_systemd_overlap refused specs
    // that name one fd twice, and inherited fds are taken before anything is bound.
    let owned = crate::sys::adopt_fd(fd)
        .map_err(os)
        .context("taking it over")?;

    let (kind, local) = match inspect_inherited(&owned) {
        Ok(found) => found,
        Err(e) => {
            // Refused, not ours: leave it open as it was inherited.
            let _ = owned.into_raw_fd();
            return Err(e);
        }
    };
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(os)
        .context("setting FD_CLOEXEC")?;
    Ok(Listener {
        fd: owned,
        name,
        kind,
        local,
        unix_path: None,
        spec: spec.to_string(),
    })
}

fn inspect_inherited(fd: &OwnedFd) -> Result<(SocketKind, Local)> {
    let kind = match socket::getsockopt(fd, sockopt::SockType) {
        Ok(SockType::Stream) => SocketKind::Stream,
        Ok(SockType::Datagram) => SocketKind::Datagram,
        Ok(other) => {
            bail!("unsupported socket type {other:?} (grace passes on stream and datagram sockets)")
        }
        Err(Errno::ENOTSOCK) => bail!("not a socket"),
        Err(Errno::EBADF) => bail!("not open"),
        Err(e) => return Err(os(e)).context("reading SO_TYPE"),
    };
    // A connected stream socket (systemd's Accept=yes) would reach the server as if it were a
    // listener; nothing could accept on it.
    if kind == SocketKind::Stream {
        let listening = socket::getsockopt(fd, sockopt::AcceptConn)
            .map_err(os)
            .context("reading SO_ACCEPTCONN")?;
        if !listening {
            bail!("a stream socket that is not listening");
        }
    }
    let local = describe_local(fd, kind)?;
    Ok((kind, local))
}

fn bind_one(spec: &ListenSpec, opts: &BindOptions, backlog: Backlog) -> Result<Listener> {
    let (fd, kind, unix_path) = match &spec.addr {
        Addr::Tcp { host, port } => (
            bind_inet(Proto::Tcp, host, *port, backlog)?,
            SocketKind::Stream,
            None,
        ),
        Addr::Udp { host, port } => (
            bind_inet(Proto::Udp, host, *port, backlog)?,
            SocketKind::Datagram,
            None,
        ),
        Addr::Unix(path) => {
            let (fd, created) = bind_unix_path(path, opts.socket_mode, backlog)?;
            (fd, SocketKind::Stream, Some(created))
        }
        Addr::UnixAbstract(name) => (bind_abstract(name, backlog)?, SocketKind::Stream, None),
        Addr::Systemd | Addr::Fd(_) => unreachable!("inherited fds are adopted, not bound"),
    };
    let listener = Listener {
        local: match &unix_path {
            // getsockname gives the path as bound, possibly relative.
            Some(path) => Local::Unix(kind, path.clone()),
            None => describe_local(&fd, kind)?,
        },
        fd,
        name: spec.name.clone().unwrap_or_else(|| UNNAMED.to_string()),
        kind,
        unix_path,
        spec: spec.to_string(),
    };
    Ok(listener)
}

fn sock_type(proto: Proto) -> SockType {
    match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    }
}

fn bind_inet(proto: Proto, host: &Host, port: u16, backlog: Backlog) -> Result<OwnedFd> {
    let (addr, via) = match host {
        Host::Any => return bind_any(proto, port, backlog),
        Host::AnyV4 => (SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), None),
        Host::AnyV6 => (SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), None),
        Host::Ip(ip) => (SocketAddr::new(*ip, port), None),
        Host::Name { name, family } => (resolve(name, *family, port)?, Some(name.as_str())),
    };
    let label = match via {
        Some(name) => format!("{proto} {addr} ({name})"),
        None => format!("{proto} {addr}"),
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = inet_socket(proto, family)
        .map_err(os)
        .with_context(|| format!("creating a socket for {label}"))?;
    // Explicit IPv6 means IPv6 only, whatever net.ipv6.bindv6only says, so that "[::]:80" and
    // "0.0.0.0:80" can be bound side by side. A v4-mapped address needs v4 traffic.
    let v6only = match addr {
        SocketAddr::V6(v6) => Some(v6.ip().to_ipv4_mapped().is_none()),
        SocketAddr::V4(_) => None,
    };
    setup_inet(fd, proto, addr, v6only, backlog, &label)
}

/// `:PORT`: one dual-stack `[::]` socket where the kernel has IPv6, else `0.0.0.0`.
fn bind_any(proto: Proto, port: u16, backlog: Backlog) -> Result<OwnedFd> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let label = format!("{proto} {addr}");
    match inet_socket(proto, AddressFamily::Inet6) {
        Ok(fd) => setup_inet(fd, proto, addr, Some(false), backlog, &label),
        Err(Errno::EAFNOSUPPORT) => {
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let label = format!("{proto} {addr}");
            tracing::info!("ipv6 is not available; binding {label} instead of [::]:{port}");
            let fd = inet_socket(proto, AddressFamily::Inet)
                .map_err(os)
                .with_context(|| format!("creating a socket for {label}"))?;
            setup_inet(fd, proto, addr, None, backlog, &label)
        }
        Err(e) => Err(os(e)).with_context(|| format!("creating a socket for {label}")),
    }
}

fn inet_socket(proto: Proto, family: AddressFamily) -> nix::Result<OwnedFd> {
    socket::socket(family, sock_type(proto), SockFlag::SOCK_CLOEXEC, None)
}

fn setup_inet(
    fd: OwnedFd,
    proto: Proto,
    addr: SocketAddr,
    v6only: Option<bool>,
    backlog: Backlog,
    label: &str,
) -> Result<OwnedFd> {
    // SO_REUSEADDR lets a restarted grace bind while old connections sit in TIME_WAIT. It is not
    // set for UDP, where it would let another socket share the port.
    if proto == Proto::Tcp {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
            .map_err(os)
            .with_context(|| format!("setting SO_REUSEADDR on {label}"))?;
    }
    if let Some(v6only) = v6only {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)
            .map_err(os)
            .with_context(|| format!("setting IPV6_V6ONLY on {label}"))?;
    }
    // SO_REUSEPORT makes the socket the first of a group that each new generation joins with a
    // socket of its own (see steer/). It must never let grace join a stranger's group: the
    // address is first proven free by a bind without it. A TCP socket takes the option between
    // `bind` and `listen` (it joins its group at `listen`); a UDP socket joins at `bind`, so a
    // throwaway socket proves the address free first (and finds the port, for port 0).
    let addr = if proto == Proto::Udp {
        let probe = inet_socket(
            proto,
            if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            },
        )
        .map_err(os)
        .with_context(|| format!("creating a socket for {label}"))?;
        if let Some(v6only) = v6only {
            let _ = socket::setsockopt(&probe, sockopt::Ipv6V6Only, &v6only);
        }
        socket::bind(probe.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(os)
            .with_context(|| format!("binding {label}"))?;
        let bound = inet_addr_of(&probe).with_context(|| format!("binding {label}"))?;
        drop(probe);
        reuse_port(&fd, label)?;
        bound
    } else {
        addr
    };
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(os)
        .with_context(|| format!("binding {label}"))?;
    if proto == Proto::Tcp {
        reuse_port(&fd, label)?;
        socket::listen(&fd, backlog)
            .map_err(os)
            .with_context(|| format!("listening on {label}"))?;
    }
    Ok(fd)
}

fn reuse_port(fd: &OwnedFd, label: &str) -> Result<()> {
    socket::setsockopt(fd, sockopt::ReusePort, &true)
        .map_err(os)
        .with_context(|| format!("setting SO_REUSEPORT on {label}"))
}

fn inet_addr_of(fd: &impl AsFd) -> Result<SocketAddr> {
    let local: SockaddrStorage = socket::getsockname(fd.as_fd().as_raw_fd()).map_err(os)?;
    if let Some(v4) = local.as_sockaddr_in() {
        return Ok(SocketAddr::from(*v4));
    }
    local
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
        .context("not an internet socket")
}

/// Another member of the `SO_REUSEPORT` group of `first` (a listener grace bound, or an inherited
/// one with `SO_REUSEPORT`): the same family, address, options and backlog, bound and (TCP)
/// listening. It joins the group at the end (TCP at `listen`, UDP at `bind`).
pub fn new_member(first: &impl AsFd, proto: Proto) -> Result<OwnedFd> {
    let addr = inet_addr_of(first)?;
    let label = format!("{proto} {addr}");
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = inet_socket(proto, family)
        .map_err(os)
        .with_context(|| format!("creating a socket for {label}"))?;
    if proto == Proto::Tcp {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(os)?;
    }
    if addr.is_ipv6() {
        let v6only = socket::getsockopt(first, sockopt::Ipv6V6Only).map_err(os)?;
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only).map_err(os)?;
    }
    reuse_port(&fd, &label)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(os)
        .with_context(|| format!("binding another socket on {label}"))?;
    if proto == Proto::Tcp {
        // The same backlog as the first socket's (a listener reports it in TCP_INFO).
        let backlog = crate::sys::listen_queue(first.as_fd())
            .ok()
            .and_then(|(_, max)| Backlog::new(max as i32).ok())
            .unwrap_or(Backlog::MAXALLOWABLE);
        socket::listen(&fd, backlog)
            .map_err(os)
            .with_context(|| format!("listening on {label}"))?;
    }
    Ok(fd)
}

/// Whether an internet socket has `SO_REUSEPORT` on (it can have others in its group).
pub fn reuses_port(fd: &impl AsFd) -> bool {
    socket::getsockopt(fd, sockopt::ReusePort).unwrap_or(false)
}

fn resolve(name: &str, family: Option<Family>, port: u16) -> Result<SocketAddr> {
    let found: Vec<SocketAddr> = (name, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {name:?}"))?
        .collect();
    pick_address(name, family, &found)
}

/// The first address of the wanted family, in resolver order.
fn pick_address(name: &str, family: Option<Family>, found: &[SocketAddr]) -> Result<SocketAddr> {
    let mut usable: Vec<SocketAddr> = Vec::new();
    for addr in found {
        let wanted = match family {
            None => true,
            Some(Family::V4) => addr.is_ipv4(),
            Some(Family::V6) => addr.is_ipv6(),
        };
        if wanted && !usable.contains(addr) {
            usable.push(*addr);
        }
    }
    let Some(&first) = usable.first() else {
        match family {
            Some(family) => bail!("resolving {name:?}: no {family} address"),
            None => bail!("resolving {name:?}: no address"),
        }
    };
    if usable.len() > 1 {
        let all: Vec<String> = usable.iter().map(|a| a.ip().to_string()).collect();
        tracing::info!(
            "{name:?} resolves to {}; binding {}",
            all.join(", "),
            first.ip()
        );
    }
    Ok(first)
}

fn bind_unix_path(path: &Path, mode: Option<u32>, backlog: Backlog) -> Result<(OwnedFd, PathBuf)> {
    let label = format!("unix {}", path.display());
    // Recorded absolute so that removing it at exit does not depend on the working directory.
    let absolute = std::path::absolute(path).with_context(|| format!("binding {label}"))?;
    clear_stale_socket(path).with_context(|| format!("binding {label}"))?;
    let fd = bound_unix_socket(UnixAddr::new(path), &label)?;

    // The file exists now and is ours: remove it if anything below fails. chmod comes before
    // listen() because until then every connect() is refused, so no client gets in under the
    // umask's permissions.
    let finish = || -> Result<()> {
        if let Some(mode) = mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
        }
        socket::listen(&fd, backlog)
            .map_err(os)
            .with_context(|| format!("listening on {label}"))
    };
    if let Err(e) = finish() {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok((fd, absolute))
}

/// Makes way for binding at `path`: nothing there is fine, a socket nobody listens on (left by a
/// crash) is removed, anything else is an error.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context("checking the existing file"),
    };
    let file_type = meta.file_type();
    if !file_type.is_socket() {
        let what = if file_type.is_file() {
            "a regular file"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_symlink() {
            "a symlink"
        } else {
            "a special file"
        };
        bail!("the file exists and is not a socket (it is {what})");
    }
    // Non-blocking, so that a live server with a full backlog answers EAGAIN instead of leaving
    // grace blocked in connect().
    let probe = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(os)
    .context("creating a socket to probe the existing one")?;
    let addr = UnixAddr::new(path).map_err(os)?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN) => {
            bail!("address already in use (a process is listening on the existing socket)")
        }
        Err(Errno::ECONNREFUSED) => {
            tracing::info!(path = %path.display(), "removing stale socket file");
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).context("removing the stale socket file")
                }
                _ => Ok(()),
            }
        }
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(os(e)).context("connecting to the existing socket to see if it is in use"),
    }
}

fn bind_abstract(name: &str, backlog: Backlog) -> Result<OwnedFd> {
    let label = format!("unix @{name}");
    let fd = bound_unix_socket(UnixAddr::new_abstract(name.as_bytes()), &label)?;
    socket::listen(&fd, backlog)
        .map_err(os)
        .with_context(|| format!("listening on {label}"))?;
    Ok(fd)
}

/// A close-on-exec Unix stream socket bound to `addr` (not listening yet).
fn bound_unix_socket(addr: nix::Result<UnixAddr>, label: &str) -> Result<OwnedFd> {
    let addr = addr
        .map_err(os)
        .with_context(|| format!("binding {label}"))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(os)
    .with_context(|| format!("creating a socket for {label}"))?;
    socket::bind(fd.as_raw_fd(), &addr)
        .map_err(os)
        .with_context(|| format!("binding {label}"))?;
    Ok(fd)
}

/// The address the socket is bound to, as the kernel reports it.
fn describe_local(fd: &impl AsFd, kind: SocketKind) -> Result<Local> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_fd().as_raw_fd())
        .map_err(os)
        .context("reading the socket's address")?;
    let proto = Proto::of(kind);
    if let Some(v4) = addr.as_sockaddr_in() {
        return Ok(Local::Inet(proto, SocketAddr::from(*v4)));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Ok(Local::Inet(proto, SocketAddr::V6(SocketAddrV6::from(*v6))));
    }
    if let Some(unix) = addr.as_unix_addr() {
        return Ok(if let Some(path) = unix.path() {
            Local::Unix(kind, path.to_path_buf())
        } else if let Some(name) = unix.as_abstract() {
            Local::Abstract(kind, String::from_utf8_lossy(name).into_owned())
        } else {
            Local::Other(format!(
                "{} (unnamed)",
                match kind {
                    SocketKind::Stream => "unix",
                    SocketKind::Datagram => "unixgram",
                }
            ))
        });
    }
    Ok(Local::Other(match addr.family() {
        Some(family) => format!("socket ({family:?})"),
        None => "socket (unknown family)".to_string(),
    }))
}

/// The `listen()` backlog: the requested one, else the system's `somaxconn`.
fn backlog(requested: Option<i32>) -> Result<Backlog> {
    let wanted = requested.unwrap_or_else(system_somaxconn);
    if wanted < 0 {
        bail!("invalid backlog {wanted} (expected 0 or more)");
    }
    // nix refuses values above libc's SOMAXCONN (4096), even where net.core.somaxconn is higher.
    // listen(-1) asks for the kernel's maximum, which it clamps to net.core.somaxconn: exactly
    // the default, and as close as nix lets us get to a larger explicit value.
    Ok(Backlog::new(wanted).unwrap_or(Backlog::MAXALLOWABLE))
}

fn system_somaxconn() -> i32 {
    fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(FALLBACK_BACKLOG)
}

/// nix's errors as std's, whose Display is the familiar
/// "Address already in use (os error 98)".
fn os(e: Errno) -> io::Error {
    io::Error::from(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn specs(texts: &[&str]) -> Vec<ListenSpec> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn bind(texts: &[&str]) -> Result<Vec<Listener>> {
        bind_all(&specs(texts), &BindOptions::default())
    }

    fn bind_err(texts: &[&str]) -> String {
        format!("{:#}", bind(texts).expect_err("bind should fail"))
    }

    /// A fresh directory per call, unique across parallel tests and concurrent runs.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("grace-listen-{}-{label}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn unique_abstract_name(label: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("grace-test-{}-{label}-{n}", std::process::id())
    }

    fn port_of(local: &str) -> u16 {
        local.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn is_cloexec(fd: &impl AsFd) -> bool {
        let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFD).unwrap();
        FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
    }

    fn ipv6_loopback_available() -> bool {
        fs::read_to_string("/proc/net/if_inet6")
            .map(|text| {
                text.lines()
                    .any(|l| l.starts_with("00000000000000000000000000000001"))
            })
            .unwrap_or(false)
    }

    /// Accepts one connection on a TCP listener and checks bytes flow through it.
    fn assert_accepts_tcp(listener: Listener, connect_to: SocketAddr) {
        let server = TcpListener::from(listener.fd);
        let mut client = TcpStream::connect(connect_to).unwrap();
        let (mut conn, _) = server.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn binds_port_zero_and_reports_the_real_port() {
        let listeners = bind(&["web=127.0.0.1:0"]).unwrap();
        let [listener] = <[Listener; 1]>::try_from(listeners).unwrap();
        let port = port_of(&listener.local.to_string());
        assert_ne!(port, 0);
        assert_eq!(listener.local.to_string(), format!("tcp 127.0.0.1:{port}"));
        assert_eq!(listener.name, "web");
        assert_eq!(listener.kind, SocketKind::Stream);
        assert_eq!(listener.spec, "web=127.0.0.1:0");
        assert_eq!(listener.unix_path, None);
        assert!(is_cloexec(&listener.fd));
        assert_eq!(
            socket::getsockopt(&listener.fd, sockopt::ReuseAddr),
            Ok(true)
        );
        // The first of its reuseport group (steer/): each generation adds a socket.
        assert_eq!(
            socket::getsockopt(&listener.fd, sockopt::ReusePort),
            Ok(true)
        );
        assert_accepts_tcp(listener, SocketAddr::from(([127, 0, 0, 1], port)));
    }

    #[test]
    fn a_strangers_reuseport_socket_is_never_joined() {
        for (proto, ty) in [("tcp", SockType::Stream), ("udp", SockType::Datagram)] {
            let stranger =
                socket::socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).unwrap();
            socket::setsockopt(&stranger, sockopt::ReusePort, &true).unwrap();
            let any = SockaddrStorage::from(SocketAddr::from(([127, 0, 0, 1], 0)));
            socket::bind(stranger.as_raw_fd(), &any).unwrap();
            if ty == SockType::Stream {
                socket::listen(&stranger, Backlog::new(8).unwrap()).unwrap();
            }
            let port = inet_addr_of(&stranger).unwrap().port();
            let err = bind(&[&format!("{proto}://127.0.0.1:{port}")]).unwrap_err();
            assert!(
                format!("{err:#}").contains("Address already in use"),
                "{proto}: {err:#}"
            );
        }
    }

    #[test]
    fn new_members_join_the_first_sockets_group() {
        for spec in ["127.0.0.1:0", "udp://127.0.0.1:0", "[::1]:0", ":0"] {
            let listeners = bind(&[spec]).unwrap();
            let l = &listeners[0];
            let proto = if l.kind == SocketKind::Stream {
                Proto::Tcp
            } else {
                Proto::Udp
            };
            let member = new_member(&l.fd, proto).unwrap();
            assert_eq!(
                inet_addr_of(&member).unwrap(),
                inet_addr_of(&l.fd).unwrap(),
                "{spec}"
            );
            if l.local.to_string().starts_with("tcp [::]") {
                assert_eq!(socket::getsockopt(&member, sockopt::Ipv6V6Only), Ok(false));
            }
        }
    }

    #[test]
    fn unnamed_sockets_are_named_unknown() {
        let listeners = bind(&["127.0.0.1:0", "tcp4://localhost:0"]).unwrap();
        assert_eq!(listeners.len(), 2);
        assert!(listeners.iter().all(|l| l.name == "unknown"));
        assert!(
            listeners[1].local.to_string().starts_with("tcp 127.0.0.1:"),
            "{}",
            listeners[1].local
        );
        assert_eq!(listeners[1].spec, "tcp4://localhost:0");
    }

    #[test]
    fn a_port_in_use_is_refused_with_the_port_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let message = bind_err(&[&format!("127.0.0.1:{port}")]);
        assert_eq!(
            message,
            format!("binding tcp 127.0.0.1:{port}: Address already in use (os error 98)")
        );
    }

    #[test]
    fn any_is_dual_stack_where_ipv6_exists() {
        let listeners = bind(&[":0"]).unwrap();
        let [listener] = <[Listener; 1]>::try_from(listeners).unwrap();
        let port = port_of(&listener.local.to_string());
        if Path::new("/proc/net/if_inet6").exists() {
            assert_eq!(listener.local.to_string(), format!("tcp [::]:{port}"));
            assert_eq!(
                socket::getsockopt(&listener.fd, sockopt::Ipv6V6Only),
                Ok(false)
            );
        } else {
            println!("note: no ipv6 in this kernel; checked the 0.0.0.0 fallback only");
            assert_eq!(listener.local.to_string(), format!("tcp 0.0.0.0:{port}"));
        }
        // Reachable over IPv4 either way.
        assert_accepts_tcp(listener, SocketAddr::from(([127, 0, 0, 1], port)));
    }

    #[test]
    fn ipv6_loopback() {
        if !ipv6_loopback_available() {
            println!("note: skipping ipv6_loopback: ::1 is not configured (/proc/net/if_inet6)");
            return;
        }
        let listeners = bind(&["[::1]:0"]).unwrap();
        let [listener] = <[Listener; 1]>::try_from(listeners).unwrap();
        let port = port_of(&listener.local.to_string());
        assert_eq!(listener.local.to_string(), format!("tcp [::1]:{port}"));
        assert_eq!(
            socket::getsockopt(&listener.fd, sockopt::Ipv6V6Only),
            Ok(true)
        );
        assert_accepts_tcp(listener, SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    }

    #[test]
    fn explicit_ipv6_any_is_ipv6_only() {
        if !ipv6_loopback_available() {
            println!("note: skipping explicit_ipv6_any_is_ipv6_only: no ipv6 (/proc/net/if_inet6)");
            return;
        }
        let listeners = bind(&["[::]:0"]).unwrap();
        assert!(listeners[0].local.to_string().starts_with("tcp [::]:"));
        assert_eq!(
            socket::getsockopt(&listeners[0].fd, sockopt::Ipv6V6Only),
            Ok(true)
        );
    }

    #[test]
    fn udp_sockets_receive_datagrams() {
        let listeners = bind(&["dns=udp://127.0.0.1:0"]).unwrap();
        let [listener] = <[Listener; 1]>::try_from(listeners).unwrap();
        let port = port_of(&listener.local.to_string());
        assert_eq!(listener.local.to_string(), format!("udp 127.0.0.1:{port}"));
        assert_eq!(listener.kind, SocketKind::Datagram);
        assert_eq!(listener.spec, "dns=udp://127.0.0.1:0");
        assert!(is_cloexec(&listener.fd));
        let server = UdpSocket::from(listener.fd);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"query", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"query");
    }

    #[test]
    fn abstract_unix_sockets() {
        let name = unique_abstract_name("abstract");
        let listeners = bind(&[&format!("unix:@{name}")]).unwrap();
        let [listener] = <[Listener; 1]>::try_from(listeners).unwrap();
        assert_eq!(listener.local.to_string(), format!("unix @{name}"));
        assert_eq!(listener.unix_path, None);
        assert!(is_cloexec(&listener.fd));

        let message = bind_err(&[&format!("unix:@{name}")]);
        assert_eq!(
            message,
            format!("binding unix @{name}: Address already in use (os error 98)")
        );

        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixListener::from(listener.fd);
        let _client = UnixStream::connect_addr(&addr).unwrap();
        server.accept().unwrap();
    }

    #[test]
    fn unix_path_socket_is_created_with_mode_and_recorded() {
        let dir = TempDir::new("mode");
        let path = dir.join("app.sock");
        let opts = BindOptions {
            backlog: Some(16),
            socket_mode: Some(0o600),
        };
        let listeners = bind_all(&specs(&[&format!("unix:{}", path.display())]), &opts).unwrap();
        let [listener] = <[Listener; 1]>::try_from(listeners).unwrap();
        assert_eq!(
            listener.local.to_string(),
            format!("unix {}", path.display())
        );
        assert_eq!(listener.unix_path.as_deref(), Some(path.as_path()));
        assert!(is_cloexec(&listener.fd));
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let server = UnixListener::from(listener.fd.try_clone().unwrap());
        let _client = UnixStream::connect(&path).unwrap();
        server.accept().unwrap();

        listener.remove_socket_file().unwrap();
        assert!(!path.exists());
        listener.remove_socket_file().unwrap();
    }

    #[test]
    fn stale_unix_socket_is_replaced() {
        let dir = TempDir::new("stale");
        let path = dir.join("stale.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "dropping a UnixListener leaves its file");

        let listeners = bind(&[&format!("unix:{}", path.display())]).unwrap();
        let server = UnixListener::from(listeners.into_iter().next().unwrap().fd);
        let _client = UnixStream::connect(&path).unwrap();
        server.accept().unwrap();
    }

    #[test]
    fn live_unix_socket_is_refused() {
        let dir = TempDir::new("live");
        let path = dir.join("live.sock");
        let _live = UnixListener::bind(&path).unwrap();
        let message = bind_err(&[&format!("unix:{}", path.display())]);
        assert_eq!(
            message,
            format!(
                "binding unix {}: address already in use (a process is listening on the \
                 existing socket)",
                path.display()
            )
        );
        assert!(path.exists());
        UnixStream::connect(&path).expect("the live socket is untouched");
    }

    #[test]
    fn non_socket_file_is_refused_and_kept() {
        let dir = TempDir::new("regular");
        let path = dir.join("not-a-socket");
        fs::write(&path, "data").unwrap();
        let message = bind_err(&[&format!("unix:{}", path.display())]);
        assert_eq!(
            message,
            format!(
                "binding unix {}: the file exists and is not a socket (it is a regular file)",
                path.display()
            )
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "data");
    }

    #[test]
    fn relative_unix_path_is_recorded_absolute() {
        // A relative path that climbs from the working directory (which tests must not change) to
        // the root and back down into a temp dir, so nothing is created in the source tree.
        let dir = TempDir::new("relative");
        let cwd = std::env::current_dir().unwrap();
        let up = "../".repeat(cwd.components().count() - 1);
        let relative = PathBuf::from(up).join(dir.join("rel.sock").strip_prefix("/").unwrap());
        assert!(relative.is_relative());

        let listeners = bind(&[&format!("unix:{}", relative.display())]).unwrap();
        let expected = cwd.join(&relative);
        assert_eq!(listeners[0].unix_path.as_deref(), Some(expected.as_path()));
        assert_eq!(
            listeners[0].local.to_string(),
            format!("unix {}", expected.display())
        );
        assert!(dir.join("rel.sock").exists());
        listeners[0].remove_socket_file().unwrap();
        assert!(!dir.join("rel.sock").exists());
    }

    #[test]
    fn a_later_failure_closes_and_removes_everything() {
        let dir = TempDir::new("all-or-nothing");
        let first = dir.join("first.sock");
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let name = unique_abstract_name("cleanup");

        let message = bind_err(&[
            &format!("unix:{}", first.display()),
            &format!("unix:@{name}"),
            "127.0.0.1:0",
            &format!("127.0.0.1:{port}"),
        ]);
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(
            !first.exists(),
            "the socket file created before the failure is removed"
        );
        // The abstract name is free again, so its socket was closed.
        let again = bind(&[&format!("unix:@{name}")]).unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_missing_directory_fails_without_leftovers() {
        let dir = TempDir::new("missing-dir");
        let first = dir.join("first.sock");
        let missing = dir.join("no/such/dir.sock");
        let message = bind_err(&[
            &format!("unix:{}", first.display()),
            &format!("unix:{}", missing.display()),
        ]);
        assert_eq!(
            message,
            format!(
                "binding unix {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        assert!(!first.exists());
    }

    #[test]
    fn unresolvable_family_names_the_host() {
        let found = [
            SocketAddr::from(([127, 0, 0, 1], 80)),
            SocketAddr::from(([127, 0, 0, 1], 80)),
            SocketAddr::from(([10, 0, 0, 1], 80)),
        ];
        assert_eq!(
            pick_address("db", None, &found).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 80))
        );
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 80));
        assert_eq!(
            pick_address("db", Some(Family::V6), &[found[0], v6]).unwrap(),
            v6
        );
        assert_eq!(
            format!(
                "{:#}",
                pick_address("db", Some(Family::V6), &found).unwrap_err()
            ),
            "resolving \"db\": no ipv6 address"
        );
        assert_eq!(
            format!("{:#}", pick_address("db", None, &[]).unwrap_err()),
            "resolving \"db\": no address"
        );
    }

    #[test]
    fn inherited_fd_is_adopted_and_made_cloexec() {
        // Stand in for a socket inherited across exec: no SOCK_CLOEXEC, released to a bare number.
        let sock = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        socket::bind(
            sock.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::from(([127, 0, 0, 1], 0))),
        )
        .unwrap();
        socket::listen(&sock, Backlog::new(8).unwrap()).unwrap();
        assert!(!is_cloexec(&sock));
        let raw = sock.into_raw_fd();

        let listeners = bind(&[&format!("admin=fd:{raw}"), "127.0.0.1:0"]).unwrap();
        assert_eq!(listeners.len(), 2);
        let adopted = &listeners[0];
        assert_eq!(adopted.fd.as_raw_fd(), raw);
        assert_eq!(adopted.name, "admin");
        assert_eq!(adopted.kind, SocketKind::Stream);
        assert_eq!(adopted.spec, format!("admin=fd:{raw}"));
        assert!(
            adopted.local.to_string().starts_with("tcp 127.0.0.1:"),
            "{}",
            adopted.local
        );
        assert_eq!(adopted.unix_path, None);
        assert!(is_cloexec(&adopted.fd));
    }

    #[test]
    fn inherited_datagram_fd_is_adopted() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let raw = OwnedFd::from(sock).into_raw_fd();
        let listeners = bind(&[&format!("fd:{raw}")]).unwrap();
        assert_eq!(listeners[0].kind, SocketKind::Datagram);
        assert_eq!(
            listeners[0].local.to_string(),
            format!("udp 127.0.0.1:{port}")
        );
        assert_eq!(listeners[0].name, "unknown");
    }

    #[test]
    fn inherited_fd_that_is_not_a_socket_is_refused_and_left_open() {
        let file = fs::File::open("/dev/null").unwrap();
        let raw = file.as_raw_fd();
        let message = bind_err(&[&format!("fd:{raw}")]);
        assert_eq!(
            message,
            format!("taking inherited fd {raw}: not a socket (it is /dev/null)")
        );
        assert!(fcntl(file.as_fd(), FcntlArg::F_GETFD).is_ok(), "still open");
    }

    #[test]
    fn inherited_fd_that_is_not_listening_is_refused() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let raw = client.as_raw_fd();
        let message = bind_err(&[&format!("fd:{raw}")]);
        assert_eq!(
            message,
            format!("taking inherited fd {raw}: a stream socket that is not listening")
        );
        assert!(
            fcntl(client.as_fd(), FcntlArg::F_GETFD).is_ok(),
            "still open"
        );
    }

    #[test]
    fn inherited_fd_that_is_not_open_is_refused() {
        // Far above any fd a test opens, so no parallel test can race onto it.
        let message = bind_err(&["fd:999999", "127.0.0.1:0"]);
        assert_eq!(message, "taking inherited fd 999999: not open");
    }

    #[test]
    fn an_fd_named_twice_is_refused_before_anything_is_taken() {
        let message = bind_err(&["fd:999998", "other=fd:999998"]);
        assert_eq!(message, "fd 999998 is given more than once");
        let message = bind_err(&["systemd", "127.0.0.1:0", "systemd"]);
        assert_eq!(message, "\"systemd\" is given more than once");
    }

    #[test]
    fn fds_overlapping_systemd_range_are_refused() {
        let message = check_systemd_overlap(&specs(&["systemd", "fd:4"]), 3).unwrap_err();
        assert_eq!(
            message.to_string(),
            "fd 4 is also one of the fds systemd passed (3-5), which \"systemd\" already takes"
        );
        check_systemd_overlap(&specs(&["systemd", "fd:6"]), 3).unwrap();
    }

    #[test]
    fn systemd_without_socket_activation_is_refused() {
        if std::env::var_os("LISTEN_FDS").is_some() {
            println!("note: skipping: the test process itself has LISTEN_FDS set");
            return;
        }
        let message = bind_err(&["127.0.0.1:0", "systemd"]);
        assert_eq!(
            message,
            "taking sockets from systemd: LISTEN_FDS is not set (grace was not socket-activated)"
        );
    }

    #[test]
    fn systemd_variables_are_checked() {
        let pid = 4242;
        let names = |fds, listen_pid, fdnames| {
            systemd_names(fds, listen_pid, fdnames, pid).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            names(Some("2"), Some("4242"), None),
            Ok(vec!["unknown".to_string(); 2])
        );
        assert_eq!(
            names(Some("3"), Some("4242"), Some("http:https:")),
            Ok(vec![
                "http".to_string(),
                "https".to_string(),
                "unknown".to_string()
            ])
        );
        let rows = [
            (
                None,
                Some("4242"),
                None,
                "LISTEN_FDS is not set (grace was not socket-activated)",
            ),
            (Some("1"), None, None, "LISTEN_PID is not set"),
            (
                Some("1"),
                Some("abc"),
                None,
                "LISTEN_PID \"abc\" is not a pid",
            ),
            (
                Some("1"),
                Some("1"),
                None,
                "LISTEN_PID is 1 but grace is pid 4242: the sockets were meant for another process",
            ),
            (
                Some("x"),
                Some("4242"),
                None,
                "LISTEN_FDS \"x\" is not a number of fds",
            ),
            (
                Some("-1"),
                Some("4242"),
                None,
                "LISTEN_FDS \"-1\" is not a number of fds",
            ),
            (
                Some("99999999999"),
                Some("4242"),
                None,
                "LISTEN_FDS \"99999999999\" is not a number of fds",
            ),
            (
                Some("0"),
                Some("4242"),
                None,
                "LISTEN_FDS is 0: systemd passed no sockets",
            ),
            (
                Some("2"),
                Some("4242"),
                Some("http"),
                "LISTEN_FDNAMES has 1 names for 2 fds: \"http\"",
            ),
        ];
        for (fds, listen_pid, fdnames, expected) in rows {
            assert_eq!(names(fds, listen_pid, fdnames), Err(expected.to_string()));
        }
    }

    #[test]
    fn backlog_defaults_to_somaxconn() {
        assert_eq!(backlog(Some(128)).unwrap(), Backlog::new(128).unwrap());
        assert_eq!(backlog(Some(1 << 20)).unwrap(), Backlog::MAXALLOWABLE);
        let expected = system_somaxconn();
        let default = backlog(None).unwrap();
        assert_eq!(
            i32::from(default),
            if expected <= 4096 { expected } else { -1 }
        );
        assert_eq!(
            format!("{:#}", backlog(Some(-5)).unwrap_err()),
            "invalid backlog -5 (expected 0 or more)"
        );
    }

    #[test]
    fn socket_kind_text_round_trips() {
        for kind in [SocketKind::Stream, SocketKind::Datagram] {
            assert_eq!(kind.to_string().parse::<SocketKind>(), Ok(kind));
        }
        assert!("seqpacket".parse::<SocketKind>().is_err());
    }
}
