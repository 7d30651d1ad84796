//! The program a `#!` line runs, as the kernel and `env` resolve it.

use super::*;

/// The program a `#!` line runs, resolved as the kernel and env do: the kernel takes the first
/// word (up to a space or a tab) as the interpreter and the rest of the line, trimmed of spaces
/// and tabs, as one argument; `#!/usr/bin/env ARG` then runs the command ARG names (see
/// [`env_command`]), looked up in `PATH`. A carriage return is no blank for the kernel: a script
/// with CRLF line ends (`#!/bin/sh\r`) names an interpreter that does not exist.
pub(super) fn interpreter(head: &[u8]) -> Result<PathBuf, String> {
    let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let line = trim(line, blank);
    let end = line.iter().position(blank).unwrap_or(line.len());
    let (word, rest) = line.split_at(end);
    if word.is_empty() {
        return Err("empty #! line".into());
    }
    if word.contains(&b'\r') {
        return Err(crlf(&String::from_utf8_lossy(word)));
    }
    let first = PathBuf::from(OsStr::from_bytes(word));
    if first.file_name().is_none_or(|name| name != "env") {
        return Ok(first);
    }
    let rest = trim(rest, blank);
    if rest.is_empty() {
        return Ok(first);
    }
    let Some(command) = env_command(&String::from_utf8_lossy(rest))? else {
        return Ok(first);
    };
    if command.name.contains('\r') {
        return Err(crlf(&command.name));
    }
    if command.name.contains('/') {
        let path = PathBuf::from(&command.name);
        return Ok(match command.dir {
            Some(dir) if path.is_relative() => Path::new(&dir).join(path),
            _ => path,
        });
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let found = match &command.search {
        Some(dirs) => which::which_in(&command.name, Some(dirs), cwd),
        None => which::which(&command.name),
    };
    found.map_err(|_| format!("{:?} (run by env) is not in PATH", command.name))
}

pub(super) fn trim(bytes: &[u8], blank: impl Fn(&u8) -> bool) -> &[u8] {
    let start = bytes.iter().position(|b| !blank(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

pub(super) fn crlf(name: &str) -> String {
    format!(
        "the #! line ends in a carriage return (the script has CRLF line ends), so it names \
         {name:?}, which does not exist"
    )
}

/// The command an `env` run from a `#!` line runs, and what changes its lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EnvCommand {
    pub(super) name: String,
    /// `-P PATH`: the directories searched instead of `PATH`.
    pub(super) search: Option<String>,
    /// `-C DIR` (`--chdir`): where a relative path is found.
    pub(super) dir: Option<String>,
}

/// env's options that take a value, short and long; `S` (`split-string`) splits it into more
/// arguments.
pub(super) const ENV_VALUE_OPTIONS: &[(char, &str)] = &[
    ('u', "unset"),
    ('C', "chdir"),
    ('S', "split-string"),
    ('a', "argv0"),
    ('P', ""),
];

/// env's long options that take no value (or only one given with `=`).
pub(super) const ENV_FLAG_OPTIONS: &[&str] = &[
    "ignore-environment",
    "null",
    "debug",
    "block-signal",
    "default-signal",
    "ignore-signal",
    "list-signal-handling",
    "help",
    "version",
];

/// Parses env's arguments as GNU env does (options until the first other word, then
/// `NAME=VALUE` assignments, then the command); `first` is the one argument a `#!` line passes.
/// `None` when no command follows (env then runs the script itself, or prints its environment).
pub(super) fn env_command(first: &str) -> Result<Option<EnvCommand>, String> {
    let mut args = VecDeque::from([first.to_string()]);
    let mut search = None;
    let mut dir = None;
    let mut options = true;
    while let Some(arg) = args.pop_front() {
        if options && arg.starts_with('-') && arg != "-" && arg != "--" {
            let Some((option, value)) = env_option(&arg) else {
                continue;
            };
            let Some(value) = value.or_else(|| args.pop_front()) else {
                return Err(format!("env's option {arg:?} has no value"));
            };
            match option {
                'S' => {
                    for word in split_string(&value).into_iter().rev() {
                        args.push_front(word);
                    }
                }
                'P' => search = Some(value),
                'C' => dir = Some(value),
                _ => {}
            }
        } else if (options && (arg == "-" || arg == "--")) || arg.contains('=') {
            // The end of the options (`-` also empties the environment), or an assignment.
            options = false;
        } else {
            return Ok(Some(EnvCommand {
                name: arg,
                search,
                dir,
            }));
        }
    }
    Ok(None)
}

/// The option in `arg` (`-uNAME`, `-i`, `-iu`, `--unset=NAME`, `--chdir`, …) that takes a value,
/// with the value if it is in `arg` itself; `None` for options that take none.
pub(super) fn env_option(arg: &str) -> Option<(char, Option<String>)> {
    if let Some(long) = arg.strip_prefix("--") {
        let (name, inline) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (long, None),
        };
        // getopt_long takes any unambiguous prefix of a long option.
        if let Some((short, _)) = ENV_VALUE_OPTIONS.iter().find(|(_, long)| *long == name) {
            return Some((*short, inline));
        }
        let mut candidates = ENV_VALUE_OPTIONS
            .iter()
            .filter(|(_, long)| !long.is_empty() && long.starts_with(name));
        let flag = ENV_FLAG_OPTIONS.iter().any(|f| f.starts_with(name));
        return match (candidates.next(), candidates.next()) {
            (Some((short, _)), None) if !flag => Some((*short, inline)),
            _ => None,
        };
    }
    // A cluster of short options: the first that takes a value takes the rest of the word (or
    // the next argument).
    let (at, short) = arg[1..]
        .char_indices()
        .find(|(_, c)| ENV_VALUE_OPTIONS.iter().any(|(s, _)| s == c))?;
    let rest = &arg[1 + at + short.len_utf8()..];
    Some((short, (!rest.is_empty()).then(|| rest.to_string())))
}

/// env's `-S STRING`: words separated by whitespace, with `'…'` and `"…"` quoting and a `#` that
/// starts a word ending the string. (env's escapes and `${NAME}` are not expanded.)
pub(super) fn split_string(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, c) if c.is_ascii_whitespace() => words.extend(word.take()),
            (None, '#') if word.is_none() => break,
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    words.extend(word);
    words
}
