//! When a new generation counts as ready (`--ready`); the probes that find out are in `probe.rs`.

use std::str::FromStr;
use std::time::Duration;

use crate::duration::parse_duration;

/// How long `auto` waits for a server that never sends `READY=1`.
pub const AUTO_DELAY: Duration = Duration::from_secs(1);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
