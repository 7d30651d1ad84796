//! The text form of the handoff record (`handoff/`, and the supervisor's state in it): one item per line, space-separated fields, the first one a
//! key. Strings are percent-encoded so that no field holds a space or a newline; `-` alone means
//! "none", so a literal `-` is encoded too.

use std::fmt::Display;
use std::str::FromStr;

/// One line being decoded. Every accessor fails with the same message naming the line.
pub struct Fields<'a> {
    line: &'a str,
    fields: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    pub fn new(line: &'a str) -> Self {
        Self {
            line,
            fields: line.split(' ').collect(),
        }
    }

    pub fn key(&self) -> &'a str {
        self.fields[0]
    }

    pub fn bad(&self) -> String {
        format!("handoff record: bad line {:?}", self.line)
    }

    pub fn word(&self, i: usize) -> Result<&'a str, String> {
        self.fields.get(i).copied().ok_or_else(|| self.bad())
    }

    pub fn num<T: FromStr>(&self, i: usize) -> Result<T, String> {
        self.word(i)?.parse().map_err(|_| self.bad())
    }

    /// A number or `-`.
    pub fn opt_num<T: FromStr>(&self, i: usize) -> Result<Option<T>, String> {
        match self.word(i)? {
            "-" => Ok(None),
            _ => self.num(i).map(Some),
        }
    }

    pub fn flag(&self, i: usize) -> Result<bool, String> {
        match self.word(i)? {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(self.bad()),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, String> {
        unesc(self.word(i)?).ok_or_else(|| self.bad())
    }

    /// A string or `-`.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, String> {
        match self.word(i)? {
            "-" => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
}

pub fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

pub fn opt<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn opt_text(value: Option<&str>) -> String {
    value.map_or_else(|| "-".to_string(), esc)
}

/// Percent-encodes everything but printable ASCII other than `%` and `-`; the empty string is `%`.
pub fn esc(text: &str) -> String {
    use std::fmt::Write as _;
    if text.is_empty() {
        return "%".to_string();
    }
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_graphic() && b != b'%' && b != b'-' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

pub fn unesc(text: &str) -> Option<String> {
    if text == "%" {
        return Some(String::new());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_survive_escaping() {
        for s in ["", "-", "a b", "100%\n", "tcp [::]:8080", "é"] {
            let e = esc(s);
            assert!(!e.contains(' ') && !e.contains('\n') && e != "-", "{e}");
            assert_eq!(unesc(&e).as_deref(), Some(s));
        }
        assert_eq!(unesc("%G1"), None);
        assert_eq!(unesc("%4"), None);
    }

    #[test]
    fn fields_name_the_line_when_bad() {
        let f = Fields::new("generation x 1 -");
        assert_eq!(f.key(), "generation");
        assert!(f.num::<u64>(1).unwrap_err().contains("generation x 1 -"));
        assert_eq!(f.num::<u64>(2), Ok(1));
        assert_eq!(f.opt_num::<u64>(3), Ok(None));
        assert!(f.word(9).is_err());
        assert!(f.flag(2).is_ok());
        assert!(f.flag(1).is_err());
    }
}
