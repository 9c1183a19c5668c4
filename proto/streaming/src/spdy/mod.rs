//! SPDY/3.1 (framing, zlib header compression with the SPDY/3 dictionary, sessions with
//! streams and flow control) as Kubernetes uses it, both roles.
//!
//! INTERFACE SKELETON (issue 13): the signatures are fixed; the bodies are being written.

pub mod server;
