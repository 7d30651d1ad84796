//! Durations on the command line: `500ms`, `2s`, `1m`, `1h`.

use std::time::Duration;

/// Parses a whole number followed by a unit (`ms`, `s`, `m`, `h`). A unit is required so that
/// `--drain-timeout 30` can never be misread as milliseconds or minutes.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("invalid duration {text:?}: {why}");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(invalid("expected a number followed by ms, s, m or h"));
    }
    let value: u64 = digits.parse().map_err(|_| invalid("number is too large"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(invalid("missing unit (ms, s, m or h)")),
        other => {
            return Err(invalid(&format!(
                "unknown unit {other:?} (expected ms, s, m or h)"
            )));
        }
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| invalid("number is too large"))
}

/// The inverse of [`parse_duration`] for messages: the largest unit that divides exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_durations() {
        for (text, ms) in [
            ("0s", 0),
            ("500ms", 500),
            ("2s", 2_000),
            ("1m", 60_000),
            ("90s", 90_000),
            ("2h", 7_200_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn invalid_durations_name_the_input_and_the_problem() {
        for (text, why) in [
            ("", "expected a number"),
            ("s", "expected a number"),
            ("30", "missing unit"),
            ("1.5s", "unknown unit \".5s\""),
            ("5d", "unknown unit \"d\""),
            ("-1s", "expected a number"),
            ("99999999999999999999s", "too large"),
            ("18446744073709551615h", "too large"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid duration {text:?}")),
                "{err}"
            );
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["0s", "250ms", "2s", "1m", "3h", "1500ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
