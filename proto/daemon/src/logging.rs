//! The tracing subscriber both daemons install: `RUST_LOG` read as a list of `target=level`
//! directives with a bare level as the default (`info` when unset), to stderr, as text or JSON
//! lines.
//!
//! The directives are tracing-subscriber's `Targets`, not its `EnvFilter`: the span and field
//! filters `EnvFilter` adds bring a regex engine, 150 KiB of code that is resident in every
//! gateway's edgecore (docs/benchmarks.md, "The edge build").

use std::str::FromStr as _;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`. A `RUST_LOG` that is not
/// a list of directives is reported on stderr, and `info` is used.
pub fn init(format: LogFormat) {
    let filter = match filter(std::env::var("RUST_LOG").ok().as_deref()) {
        Ok(filter) => filter,
        Err(message) => {
            eprintln!("{message}");
            Targets::new().with_default(LevelFilter::INFO)
        }
    };
    let builder = tracing_subscriber::fmt()
        // Names and reasons from the network are escaped: no client can forge a log line.
        .fmt_fields(crate::logfmt::Escaped)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // The builder's own level cap (INFO by default) would hide what `filter` enables.
        .with_max_level(LevelFilter::TRACE);
    match format {
        LogFormat::Text => builder.finish().with(filter).init(),
        LogFormat::Json => builder.json().finish().with(filter).init(),
    }
}

/// The filter `RUST_LOG` names: unset or blank is `info`.
fn filter(rust_log: Option<&str>) -> Result<Targets, String> {
    match rust_log.map(str::trim) {
        None | Some("") => Ok(Targets::new().with_default(LevelFilter::INFO)),
        Some(directives) => Targets::from_str(directives).map_err(|e| {
            format!("RUST_LOG={directives:?} is not a list of target=level directives ({e}); logging at info")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn directives_name_a_default_and_levels_per_target() {
        let unset = filter(None).expect("unset");
        assert!(unset.would_enable("edgecore::pods", &Level::INFO));
        assert!(!unset.would_enable("edgecore::pods", &Level::DEBUG));

        let mixed = filter(Some("warn,edgecore::outbox=debug")).expect("valid");
        assert!(mixed.would_enable("edgecore::outbox", &Level::DEBUG));
        assert!(mixed.would_enable("edgecore::outbox::writer", &Level::DEBUG));
        assert!(!mixed.would_enable("edgecore::pods", &Level::INFO));
        assert!(mixed.would_enable("edgecore::pods", &Level::WARN));

        let error = filter(Some("edgecore=loud")).expect_err("not a level");
        assert!(error.contains("RUST_LOG=\"edgecore=loud\""), "{error}");
    }
}
