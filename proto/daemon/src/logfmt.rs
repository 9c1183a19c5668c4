//! Escaping for the text log format of both binaries.
//!
//! Names, hostnames, token ids and reasons that reach a log line often come from the network
//! or from a client. tracing-subscriber's text format writes a `%`-formatted field as it is, so
//! a node name holding a newline could append a forged `INFO ... node joined` line. [`Escaped`]
//! is a [`FormatFields`] that formats fields as tracing-subscriber's default does and then
//! renders every control character (C0, DEL, C1), line and paragraph separators and the Unicode
//! bidirectional controls as an escape (`\n`, `\r`, `\t`, `\u{1b}`, `\u{202e}`, ...). It covers
//! every field of the event, its message, and the fields of its spans, which are formatted by
//! the same `FormatFields`. JSON logs escape by themselves and do not use it.
//!
//! Wiring: [`crate::logging::init`] installs it for the text format.

use std::fmt;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// Formats fields as tracing-subscriber's `DefaultFields` does, with control characters
/// escaped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Escaped;

impl<'writer> FormatFields<'writer> for Escaped {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut raw = String::new();
        DefaultFields::new().format_fields(Writer::new(&mut raw), fields)?;
        write_escaped(&mut writer, &raw)
    }
}

/// Whether `c` must not reach a text log as it is: it could end or rewrite the line, or
/// reorder what a reader sees.
pub fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(
            c,
            '\u{061c}' // Arabic letter mark
            | '\u{200e}' | '\u{200f}' // LRM, RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202a}'..='\u{202e}' // embeddings and overrides
            | '\u{2066}'..='\u{2069}' // isolates
        )
}

/// Writes `text` with every character [`needs_escape`] names escaped.
pub fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(needs_escape) {
        out.write_str(&rest[..at])?;
        let c = rest[at..].chars().next().unwrap_or_default();
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            other => write!(out, "\\u{{{:x}}}", u32::from(other))?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// `text` with every character [`needs_escape`] names escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // Writing to a String cannot fail.
    let _ = write_escaped(&mut out, text);
    out
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped() {
        let cases = [
            ("gw-1", "gw-1"),
            ("a\nb", "a\\nb"),
            ("a\r\nb", "a\\r\\nb"),
            ("tab\there", "tab\\there"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("nul\0", "nul\\u{0}"),
            ("del\u{7f}", "del\\u{7f}"),
            ("c1\u{85}next", "c1\\u{85}next"),
            ("rlo\u{202e}gnp.exe", "rlo\\u{202e}gnp.exe"),
            ("iso\u{2066}x\u{2069}", "iso\\u{2066}x\\u{2069}"),
            ("ls\u{2028}ps\u{2029}", "ls\\u{2028}ps\\u{2029}"),
            ("üñí ✓", "üñí ✓"),
        ];
        for (raw, want) in cases {
            assert_eq!(escape(raw), want, "{raw:?}");
        }
    }

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_subscriber_with_escaped_fields_writes_one_line_per_event() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(Escaped)
            .with_writer(move || writer.clone())
            .finish();
        let name = "gw\n2026-12-04T18:30:00.000000Z  INFO cloudcore::join: node joined";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("connection", node.name = %name);
            let _entered = span.enter();
            tracing::warn!(node.name = %name, reason = "x\ry", "join refused: {name}");
        });
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\r'), "{text}");
        // The message, the event's field and the span's field are all escaped.
        assert_eq!(
            text.matches("gw\\n2026-12-04T18:30:00").count(),
            3,
            "{text}"
        );
        assert!(text.contains("x\\ry"), "{text}");
    }
}
