//! What reaches a terminal (a leaf module: every layer may use it): text from a remote (paths, symlink targets, messages, dates) may hold
//! escape sequences or line breaks. Human output shows them escaped, so a pod can neither drive
//! the terminal nor forge a line of output. JSON output is escaped by serde and needs none of this.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with control characters (C0, DEL, C1) and Unicode bidirectional controls written as
/// escapes (`\n`, `\t`, `\x1b`, `\u{202e}`); everything else as it is.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// An error and its causes in one line, each message once: a cause whose text the line already
/// holds (many errors print their source in their own message) is not repeated. Plain text, for
/// messages and logs at every layer; see [`error_chain`] for the terminal.
pub fn cause_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !line.contains(&msg) {
            line.push_str(": ");
            line.push_str(&msg);
        }
        cur = e.source();
    }
    line
}

/// [`cause_chain`] with control characters escaped, for the terminal.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    escape(&cause_chain(err)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert_eq!(escape("plain/päth ✓"), "plain/päth ✓");
        assert_eq!(escape("a\nb\tc\x1b[31m"), "a\\nb\\tc\\x1b[31m");
        assert_eq!(escape("\u{9b}x\u{7f}"), "\\x9bx\\x7f");
        assert_eq!(escape("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
    }

    #[test]
    fn a_chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading /x: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(22));
        assert_eq!(
            error_chain(&e),
            "reading /x: Invalid argument (os error 22)"
        );
        let e = anyhow::Error::new(e).context("loading pod p");
        assert_eq!(
            error_chain(e.as_ref()),
            "loading pod p: reading /x: Invalid argument (os error 22)"
        );
    }
}
