//! Warnings that another local user can provoke (refused control clients, foreign notify
//! datagrams), at most one line per interval per kind, with a count of what was held back.

use tracing::warn;

use crate::supervisor::Millis;

pub struct Throttle {
    interval: Millis,
    /// When the last line of this kind went out.
    last: Option<Millis>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(interval: Millis) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// The line to log now, if any: `line` itself, with how many like it were held back since the
    /// last one.
    pub fn admit(&mut self, now: Millis, line: String) -> Option<String> {
        match self.last {
            Some(t) if now.saturating_sub(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                let held = std::mem::take(&mut self.suppressed);
                Some(if held > 0 {
                    format!("{line} ({held} more like it suppressed)")
                } else {
                    line
                })
            }
        }
    }

    pub fn warn(&mut self, now: Millis, line: String) {
        if let Some(line) = self.admit(now, line) {
            warn!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let mut t = Throttle::new(1_000);
        assert_eq!(t.admit(0, "a".into()).as_deref(), Some("a"));
        for now in 1..=999 {
            assert_eq!(t.admit(now, "a".into()), None);
        }
        assert_eq!(
            t.admit(1_000, "a".into()).as_deref(),
            Some("a (999 more like it suppressed)")
        );
        assert_eq!(t.admit(5_000, "b".into()).as_deref(), Some("b"));
    }
}
