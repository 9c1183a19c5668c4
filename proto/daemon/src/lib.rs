//! What `cloudcore` and `edgecore` share besides the wire protocol: the process plumbing of a
//! daemon. Each module is one concern; the binaries own their state and call these helpers.

pub mod datadir;
pub mod files;
pub mod health;
pub mod http;
pub mod logfmt;
pub mod logging;
pub mod signal;
pub mod sqlite;

/// An error and its causes on one line (`outer: cause: root cause`), for a log line, a CLI
/// message or a failed health check.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
