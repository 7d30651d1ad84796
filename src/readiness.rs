//! When a new generation counts as ready, and the probes that find out.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::time::Duration;

use crate::duration::parse_duration;

/// How long `auto` waits for a server that never sends `READY=1`.
pub const AUTO_DELAY: Duration = Duration::from_secs(1);
/// Pause between two attempts of a probe (`http`, `tcp`, `exec`).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One probe attempt over loopback may take this long at most: the loop waits for it.
const PROBE_IO_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyMode {
    /// `READY=1` if the server ever sends it, else alive after [`AUTO_DELAY`].
    Auto,
    /// `READY=1` on `NOTIFY_SOCKET` from a process of the generation.
    Notify,
    /// Still alive after this long.
    Delay(Duration),
    /// `GET PATH` on the generation's private probe socket answers 2xx.
    Http(String),
    /// A connection to the generation's private probe socket is accepted.
    Tcp,
    /// This command exits 0 (argv split on whitespace, run directly, never through a shell).
    Exec(Vec<String>),
}

impl ReadyMode {
    /// Whether the generation gets a private loopback socket to probe.
    pub fn needs_probe_socket(&self) -> bool {
        matches!(self, ReadyMode::Http(_) | ReadyMode::Tcp)
    }
}

impl FromStr for ReadyMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = |why: &str| format!("invalid ready mode {text:?}: {why}");
        let (kind, arg) = match text.split_once(':') {
            Some((kind, arg)) => (kind, Some(arg)),
            None => (text, None),
        };
        match (kind, arg) {
            ("auto", None) => Ok(ReadyMode::Auto),
            ("notify", None) => Ok(ReadyMode::Notify),
            ("tcp", None) => Ok(ReadyMode::Tcp),
            ("delay", Some(d)) => parse_duration(d)
                .map(ReadyMode::Delay)
                .map_err(|e| invalid(&e)),
            ("http", Some(path))
                if path.starts_with('/') && !path.contains(char::is_whitespace) =>
            {
                Ok(ReadyMode::Http(path.to_string()))
            }
            ("http", _) => Err(invalid("expected http:/PATH, e.g. http:/health")),
            ("exec", Some(cmd)) if !cmd.trim().is_empty() => Ok(ReadyMode::Exec(
                cmd.split_whitespace().map(str::to_string).collect(),
            )),
            ("exec", _) => Err(invalid("expected exec:COMMAND")),
            ("delay", None) => Err(invalid("expected delay:DURATION, e.g. delay:2s")),
            ("auto" | "notify" | "tcp", Some(_)) => Err(invalid("this mode takes no argument")),
            _ => Err(invalid(
                "expected auto, notify, delay:DURATION, http:PATH, tcp or exec:COMMAND",
            )),
        }
    }
}

/// One `tcp` probe: the generation accepts a connection on its private socket. Connecting alone
/// proves nothing: grace's own copy of the socket is listening, so the kernel completes the
/// handshake whether or not the server ever accepts. What counts is the connection leaving the
/// accept queue.
pub fn probe_tcp(addr: SocketAddr, listener: &TcpListener) -> Result<(), String> {
    let _conn = TcpStream::connect_timeout(&addr, PROBE_IO_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let deadline = std::time::Instant::now() + PROBE_IO_TIMEOUT;
    loop {
        match crate::sys::accept_queue_len(listener.as_fd()) {
            Ok(0) => return Ok(()),
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(_) => {
                return Err(format!(
                    "connection to {addr} not accepted within {}",
                    crate::duration::format_duration(PROBE_IO_TIMEOUT)
                ));
            }
            Err(e) => return Err(format!("reading the accept queue of {addr}: {e}")),
        }
    }
}

/// One `http` probe: `GET path` on the private socket answers with a 2xx status.
pub fn probe_http(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_IO_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(PROBE_IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(PROBE_IO_TIMEOUT)))
        .map_err(|e| format!("probe socket: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: grace\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending GET {path}: {e}"))?;
    // The status line is all we need; it arrives in the first segment.
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "GET {path}: no reply within {}",
                    crate::duration::format_duration(PROBE_IO_TIMEOUT)
                ));
            }
            Err(e) => return Err(format!("reading the reply to GET {path}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..got]);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None => Err(format!("GET {path}: not an HTTP reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn modes() {
        assert_eq!("auto".parse(), Ok(ReadyMode::Auto));
        assert_eq!("notify".parse(), Ok(ReadyMode::Notify));
        assert_eq!("tcp".parse(), Ok(ReadyMode::Tcp));
        assert_eq!(
            "delay:2s".parse(),
            Ok(ReadyMode::Delay(Duration::from_secs(2)))
        );
        assert_eq!(
            "http:/health".parse(),
            Ok(ReadyMode::Http("/health".into()))
        );
        assert_eq!(
            "exec:check --quick".parse(),
            Ok(ReadyMode::Exec(vec!["check".into(), "--quick".into()]))
        );
    }

    #[test]
    fn bad_modes() {
        for (text, why) in [
            ("", "expected auto"),
            ("ready", "expected auto"),
            ("delay", "delay:DURATION"),
            ("delay:2", "missing unit"),
            ("http", "http:/PATH"),
            ("http:health", "http:/PATH"),
            ("exec:", "exec:COMMAND"),
            ("tcp:80", "takes no argument"),
        ] {
            let err = text.parse::<ReadyMode>().unwrap_err();
            assert!(
                err.starts_with(&format!("invalid ready mode {text:?}")),
                "{err}"
            );
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    fn one_reply(reply: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            conn.write_all(reply.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn http_probe_reads_the_status() {
        assert_eq!(
            probe_http(one_reply("HTTP/1.1 204 No Content\r\n\r\n"), "/"),
            Ok(())
        );
        let err = probe_http(one_reply("HTTP/1.1 503 Busy\r\n\r\n"), "/health").unwrap_err();
        assert_eq!(err, "GET /health answered 503");
        let err = probe_http(one_reply("SSH-2.0-x\r\n"), "/").unwrap_err();
        assert!(err.contains("not an HTTP reply"), "{err}");
    }

    #[test]
    fn tcp_probe_needs_the_connection_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Listening but nobody accepts: the handshake completes, the probe must still fail.
        let err = probe_tcp(addr, &listener).unwrap_err();
        assert!(err.contains("not accepted"), "{err}");
        let accepter = listener.try_clone().unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let _ = accepter.accept();
            }
        });
        assert_eq!(probe_tcp(addr, &listener), Ok(()));
        drop(server);
    }

    #[test]
    fn tcp_probe_fails_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(probe_tcp(addr, &other).is_err());
    }
}
