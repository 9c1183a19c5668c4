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
